"""Behaviour: does the model answer with the program's value?

Two methods, chosen per family and tokenizer:
- `logits`: with the raw template, when every candidate answer of the family starts with a
  different token, the prediction is the candidate whose first token has the highest
  next-token logit. Exact and one forward per batch.
- `generate`: otherwise (multi-token answers that share a first token, or a template that makes
  the model talk), greedy generation of `max_new_tokens` and the family's answer parser.

The vLLM backend (GPU machines) always generates; its request building and output parsing are
plain functions here, so that they are tested without vLLM.
"""

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch

from actors.loading import LoadedModel
from orchestrator.tasks import CHAT_TEMPLATE, RAW_TEMPLATE, get_family, parse_answer, render_prompt

BEHAVIOR_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("depth", pa.int32()),
        ("heuristic", pa.bool_()),
        ("expected", pa.string()),
        ("predicted", pa.string()),
        ("correct", pa.bool_()),
        ("backend", pa.string()),
        ("method", pa.string()),
    ]
)


def resolve_template(template: str) -> str:
    """`raw` and `chat` name the built-in templates; anything else is a format string."""
    return {"raw": RAW_TEMPLATE, "chat": CHAT_TEMPLATE}.get(template, template)


def first_token_ids(tokenizer: Any, prompt: str, candidates: Sequence[str]) -> list[int] | None:
    """First token of each candidate after `prompt`, or None if two candidates share one."""
    from actors.targets import answer_token

    ids = [answer_token(tokenizer, prompt, c) for c in candidates]
    return ids if len(set(ids)) == len(ids) else None


def behavior_rows(
    model: str,
    programs: Sequence[Any],
    predictions: Sequence[str | None],
    backend: str,
    method: str,
) -> pa.Table:
    """The behaviour table for programs and the answers the model gave (None: no answer)."""
    rows = {f.name: [] for f in BEHAVIOR_SCHEMA}
    for p, pred in zip(programs, predictions, strict=True):
        rows["model"].append(model)
        rows["task"].append(p.task)
        rows["seq_len"].append(p.seq_len)
        rows["program"].append(p.index)
        rows["depth"].append(p.depth)
        rows["heuristic"].append(p.heuristic)
        rows["expected"].append(p.answer)
        rows["predicted"].append(pred)
        rows["correct"].append(pred == p.answer)
        rows["backend"].append(backend)
        rows["method"].append(method)
    return pa.table(rows, schema=BEHAVIOR_SCHEMA)


class HFScorer:
    """Scores programs with a Hugging Face model (CPU or GPU)."""

    def __init__(
        self, lm: LoadedModel, template: str = "raw", batch_size: int = 64, max_new_tokens: int = 8
    ) -> None:
        self.lm = lm
        self.template = resolve_template(template)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.lm.tokenizer(
            list(prompts), return_tensors="pt", padding=True, padding_side="left"
        )
        return {
            k: v.to(self.lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
        }

    @torch.no_grad()
    def _by_logits(
        self, prompts: Sequence[str], candidates: Sequence[str], ids: list[int]
    ) -> list[str]:
        out: list[str] = []
        index = torch.tensor(ids, device=self.lm.device)
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size])
            logits = self.lm.model(**enc, logits_to_keep=1).logits[:, -1]
            best = logits[:, index].argmax(-1).tolist()
            out.extend(candidates[i] for i in best)
        return out

    @torch.no_grad()
    def _by_generation(self, prompts: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        tok = self.lm.tokenizer
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size])
            gen = self.lm.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(parse_answer(tok.decode(row, skip_special_tokens=True)) for row in new)
        return out

    def score(self, programs: Sequence[Any]) -> pa.Table:
        """One behaviour row per program (all of one family)."""
        if not programs:
            return BEHAVIOR_SCHEMA.empty_table()
        families = {p.task for p in programs}
        assert len(families) == 1, f"score one family at a time, got {sorted(families)}"
        candidates = get_family(programs[0].task).candidates
        prompts = [render_prompt(p, self.template) for p in programs]
        ids = None
        if self.template == RAW_TEMPLATE:
            ids = first_token_ids(self.lm.tokenizer, prompts[0], candidates)
        if ids is not None:
            preds: list[str | None] = list(self._by_logits(prompts, candidates, ids))
            method = "logits"
        else:
            preds, method = self._by_generation(prompts), "generate"
        return behavior_rows(self.lm.name, programs, preds, "hf", method)


# -- vLLM: plain functions for requests and outputs; the engine only on GPU machines ---------


def vllm_requests(
    programs: Sequence[Any], template: str, max_new_tokens: int
) -> tuple[list[str], dict]:
    """Prompts and greedy `SamplingParams` keyword arguments for a batch of programs."""
    tpl = resolve_template(template)
    prompts = [render_prompt(p, tpl) for p in programs]
    return prompts, {"max_tokens": max_new_tokens, "temperature": 0.0}


def vllm_predictions(outputs: Sequence[Any]) -> list[str | None]:
    """Parse vLLM `RequestOutput`s (anything with `.outputs[0].text`) into answers."""
    return [parse_answer(o.outputs[0].text) if o.outputs else None for o in outputs]


class VLLMScorer:
    """Scores programs with `vllm.LLM` (greedy generation and the family's parser)."""

    def __init__(self, model: str, template: str = "raw", max_new_tokens: int = 8, **engine: Any):
        from vllm import LLM

        self.name = model
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.llm = LLM(model=model, **engine)

    def score(self, programs: Sequence[Any]) -> pa.Table:
        from vllm import SamplingParams

        prompts, params = vllm_requests(programs, self.template, self.max_new_tokens)
        outputs = self.llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
        return behavior_rows(self.name, programs, vllm_predictions(outputs), "vllm", "generate")


def vllm_available() -> bool:
    """vLLM is importable and there is a CUDA device for it."""
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True
