"""Greedy next-token accuracy of a causal LM on binding programs, in the paper's format.

The prompt is the program text exactly as `orchestrator.tasks` prints it (statements, then one
`#q:` line); the model is right when its greedy next token decodes to the answer. Used by the
trainer's periodic evaluation, by the model card and by the test that guards the shipped model.
"""

import collections
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from orchestrator.tasks.base import Program


@torch.no_grad()
def greedy_next_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 256,
) -> list[str]:
    """Decode the argmax next token after each text (right padding, read at the last real token)."""
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = [tokenizer(t)["input_ids"] for t in chunk]
        width = max(len(ids) for ids in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(enc):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(1).to(device) - 1
        top = logits[torch.arange(len(enc), device=device), last].argmax(-1).tolist()
        out.extend(tokenizer.decode([t]) for t in top)
    return out


def accuracy_report(programs: Sequence[Program], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy overall, per depth, and on heuristic / non-heuristic programs.

    Returns:
        `{"all": a, "depth_1": ..., "depth_4": ..., "heuristic": ..., "non_heuristic": ...}`;
        a group with no programs is left out.
    """
    assert len(programs) == len(predictions), f"{len(programs)} programs, {len(predictions)} preds"
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for program, pred in zip(programs, predictions, strict=True):
        ok = pred == program.answer
        groups["all"].append(ok)
        if program.depth is not None:
            groups[f"depth_{program.depth}"].append(ok)
        if program.heuristic is not None:
            groups["heuristic" if program.heuristic else "non_heuristic"].append(ok)
    order = ["all", *(f"depth_{d}" for d in range(1, 5)), "heuristic", "non_heuristic"]
    return {k: sum(groups[k]) / len(groups[k]) for k in order if groups.get(k)}
