"""How a program's answer is asked of a model: what is appended to the prompt, which tokens are
compared, and which tokens the family's other answers would start with there.

A char-level model writes `#b:5`; a Qwen or Llama vocabulary writes `#b: 5` as `#`, `b`, `:`,
` `, `5`, so after `#b:` its next token is a space, and comparing digit tokens right after the
prompt asks it the wrong question. One rule, shared by behaviour and patching, asks it the
right one:

1. **Answer prefix.** A string written between the prompt and the answer: the spec's
   `answer_prefix` (e.g. `" "`), or with `auto` the model's own greedy next token when that
   token is whitespace or punctuation that no candidate answer begins with (a GPT-2-like
   vocabulary that writes ` 5` as one token gives its leading space).
2. **Compared tokens.** Both answers are written after prompt + prefix and tokenized as the
   model's tokenizer writes them; the tokens both continuations share (the prefix's own token,
   the `2` of `27` and `29`) are appended to both prompts, and the first tokens at which they
   differ are the ones compared. A pair whose answers are the same tokens up to the end of one
   of them (`2` and `27` with one digit per token) has no such token and is skipped.
3. **Candidates.** The distinct tokens the family's candidate answers continue with at the
   compared position (those whose tokens agree with the appended ones), for `choice_correct`:
   the answer's token beats every other candidate's.

The appended text is recorded in every row (`answer_prefix`), so a result says which question
it answers.
"""

import dataclasses
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Question:
    """A clean/counterfactual pair as the model is asked it.

    Attributes:
        clean_ids / cf_ids: the prompts' tokens followed by `prefix_ids` (the model's inputs).
        n_prompt: tokens of the prompts themselves.
        prefix_ids: tokens appended to both prompts; `prefix` is their text.
        clean_answer / cf_answer: each answer's tokens from the first one that differs on
            (at least one each).
        candidates: the distinct tokens the family's answers continue with after the inputs
            (the two answers' first tokens among them).
    """

    clean_ids: list[int]
    cf_ids: list[int]
    n_prompt: int
    prefix_ids: list[int]
    prefix: str
    clean_answer: list[int]
    cf_answer: list[int]
    candidates: list[int]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def continuations(
    tokenizer: Any, prompt_ids: list[int], prompt: str, texts: Sequence[str]
) -> list[list[int]]:
    """The tokens the tokenizer writes for each of `texts` after `prompt` (whose tokens are
    `prompt_ids`), merges at the boundary being the tokenizer's own; one tokenizer call.

    Where a text merges into the prompt's last token, the prompt's tokens are kept and the text
    is tokenized on its own: the model is fed the prompt as it is everywhere else.
    """
    out = []
    n = len(prompt_ids)
    for text, full in zip(texts, tokenizer([prompt + t for t in texts])["input_ids"], strict=True):
        if full[:n] == prompt_ids and len(full) > n:
            out.append(full[n:])
            continue
        alone = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert alone, f"{text!r} tokenizes to nothing"
        out.append(alone)
    return out


def is_filler(ch: str) -> bool:
    """Whitespace or punctuation: what a model may write between a prompt and its answer."""
    return ch.isspace() or unicodedata.category(ch)[0] in "PZ"


def auto_prefix(next_text: str, candidates: Sequence[str]) -> str:
    """The prefix `auto` takes from the text of the model's greedy next token.

    The token's leading whitespace or punctuation, when no candidate begins with it and the
    rest of the token (if any) is the start of a candidate: `" "` from `" "` or from `" 5"`;
    nothing from `"5"`, from `" the"`, or from `"-"` where `-3` is a candidate.
    """
    lead = ""
    for ch in next_text:
        if not is_filler(ch):
            break
        lead += ch
    rest = next_text[len(lead) :]
    if not lead or any(c.startswith(lead) for c in candidates):
        return ""
    if rest and not any(c.startswith(rest) or rest.startswith(c) for c in candidates):
        return ""
    return lead


@dataclasses.dataclass(frozen=True)
class Skip:
    """A program that cannot be asked of this tokenizer, and why."""

    reason: str


def ask(
    tokenizer: Any,
    prompt: str,
    cf_prompt: str,
    answer: str,
    cf_answer: str,
    candidates: Sequence[str],
    prefix: str = "",
    same_length: bool = True,
    candidate_tokens: Sequence[list[int]] | None = None,
) -> Question | Skip:
    """The question of one pair (see the module docstring), or why there is none.

    Args:
        tokenizer: the model's tokenizer.
        prompt / cf_prompt: the clean and counterfactual prompts (same token length).
        answer / cf_answer: their answers as text.
        candidates: every answer the family can give.
        prefix: the text written between prompt and answer (already resolved from `auto`).
    """
    clean_ids, cf_ids = _ids(tokenizer, prompt), _ids(tokenizer, cf_prompt)
    if len(clean_ids) != len(cf_ids):
        return Skip(
            f"clean and counterfactual tokenize to {len(clean_ids)} and {len(cf_ids)} tokens"
        )
    (clean,) = continuations(tokenizer, clean_ids, prompt, [prefix + answer])
    (cf,) = continuations(tokenizer, cf_ids, cf_prompt, [prefix + cf_answer])
    n = 0
    while n < min(len(clean), len(cf)) and clean[n] == cf[n]:
        n += 1
    if n == len(clean) or n == len(cf):
        return Skip(
            f"answers {answer!r} and {cf_answer!r} (after {prefix!r}) tokenize so that one is "
            "the start of the other: no token tells them apart"
        )
    shared = clean[:n]
    if candidate_tokens is None:
        texts = [prefix + c for c in candidates]
        candidate_tokens = continuations(tokenizer, clean_ids, prompt, texts)
    following = {c[n] for c in candidate_tokens if c[:n] == shared and len(c) > n}
    following |= {clean[n], cf[n]}
    return Question(
        clean_ids=clean_ids + shared,
        cf_ids=cf_ids + shared,
        n_prompt=len(clean_ids),
        prefix_ids=shared,
        prefix=tokenizer.decode(shared) if shared else "",
        clean_answer=clean[n:],
        cf_answer=cf[n:],
        candidates=sorted(following),
    )


def choice(logits: Sequence[float], candidates: Sequence[int], answer: int) -> bool:
    """`logits[i]` is candidate `candidates[i]`'s: the answer's beats every other one's
    (strictly: a tie is no choice)."""
    mine = logits[list(candidates).index(answer)]
    return all(mine > x for x, t in zip(logits, candidates, strict=True) if t != answer)


@torch.no_grad()
def next_tokens(
    model: Any,
    sequences: Sequence[Sequence[int]],
    picks: Sequence[Sequence[int]] | None = None,
    batch_size: int = 64,
) -> tuple[list[int], list[list[float]]]:
    """Greedy next token after each sequence, and its next-token logits of `picks[i]`.

    Sequences of one length run together, so no padding shifts a position; only one batch's
    `[batch, vocab]` logits are alive at a time.
    """
    device = next(model.parameters()).device
    top: list[int] = [0] * len(sequences)
    picked: list[list[float]] = [[] for _ in sequences]
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(i)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            part = members[start : start + batch_size]
            ids = torch.tensor([list(sequences[i]) for i in part], device=device)
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
            best = logits.argmax(-1).tolist()
            for j, i in enumerate(part):
                top[i] = best[j]
                if picks is not None and picks[i]:
                    picked[i] = logits[j, list(picks[i])].tolist()
    return top, picked


def resolve_prefixes(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[str],
    prefix: str,
    batch_size: int = 64,
) -> list[str]:
    """Each prompt's answer prefix: `prefix` itself, or under `auto` the one `auto_prefix`
    takes from the model's greedy next token after the prompt (one forward per prompt)."""
    if prefix != AUTO:
        return [prefix] * len(prompts)
    top, _ = next_tokens(model, [_ids(tokenizer, p) for p in prompts], batch_size=batch_size)
    return [auto_prefix(tokenizer.decode([t]), candidates) for t in top]
