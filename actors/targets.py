"""From a program's character spans to token positions, labels and answer tokens, per tokenizer.

Programs carry tokenizer-free character spans (DESIGN: Programs); each model maps them through its
own tokenizer's offsets. A clean/counterfactual pair is usable for patching only when both
texts tokenize to the same length and the two answers begin with different tokens; otherwise
`encode_pair` returns a `Skip` with the reason, which the caller records.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from orchestrator.tasks.base import Program

Positions = Literal["all", "targets"]
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """One program ready to patch.

    Attributes:
        clean_ids / cf_ids: token ids of the prompts (same length).
        clean_answer_id / cf_answer_id: first token of each answer after its prompt.
        labels: one label per position (`ref_depth_k_rhs`, `query_var`, `final_colon`,
            `cf_const`, or `other`).
        tokens: the decoded token at each position.
        diff: the positions where the prompts' tokens differ (ascending); activations before
            the first are identical in the two runs.
    """

    clean_ids: list[int]
    cf_ids: list[int]
    clean_answer_id: int
    cf_answer_id: int
    labels: list[str]
    tokens: list[str]
    diff: list[int]

    @property
    def first_diff(self) -> int:
        return self.diff[0]

    def positions(self, which: Positions) -> list[int]:
        """Every position, or only the labelled ones."""
        if which == "all":
            return list(range(len(self.clean_ids)))
        return [i for i, label in enumerate(self.labels) if label != OTHER]


@dataclasses.dataclass(frozen=True)
class Skip:
    """A program that cannot be patched with this tokenizer, and why."""

    reason: str


def answer_token(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> int:
    """The first token the model must produce after `prompt` to write `answer`.

    Tokenizes the prompt with and without the answer appended and takes the first token past
    the prompt, so that merges at the boundary (BPE) are the tokenizer's own.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + answer)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids)]
    # The answer merged into the prompt's last token; fall back to the answer on its own.
    alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert alone, f"answer {answer!r} tokenizes to nothing"
    return alone[0]


def label_positions(
    offsets: Sequence[tuple[int, int]], spans: Mapping[str, Sequence[int]]
) -> list[str]:
    """The label of each token: the span its characters overlap, else `other`.

    Special tokens (offsets `(0, 0)`) are `other`. Where a token overlaps several spans (a BPE
    token covering `#x:`), the span that starts last wins, so the finer label is kept.
    """
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    labels = []
    for start, end in offsets:
        label = OTHER
        if end > start:
            for name, (s, e) in ordered:
                if start < e and s < end:
                    label = name
        labels.append(label)
    return labels


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    clean: str,
    cf: str,
    clean_answer: str,
    cf_answer: str,
    spans: Mapping[str, Sequence[int]],
) -> EncodedPair | Skip:
    """Tokenize a clean/counterfactual pair and map its spans onto token positions."""
    enc = tokenizer(clean, return_offsets_mapping=True)
    cf_ids = tokenizer(cf)["input_ids"]
    clean_ids = enc["input_ids"]
    if len(clean_ids) != len(cf_ids):
        return Skip(
            f"clean and counterfactual tokenize to {len(clean_ids)} and {len(cf_ids)} tokens"
        )
    diffs = [i for i, (a, b) in enumerate(zip(clean_ids, cf_ids, strict=True)) if a != b]
    if not diffs:
        return Skip("clean and counterfactual prompts tokenize identically")
    clean_tok = answer_token(tokenizer, clean, clean_answer)
    cf_tok = answer_token(tokenizer, cf, cf_answer)
    if clean_tok == cf_tok:
        return Skip(f"answers {clean_answer!r} and {cf_answer!r} start with the same token")
    return EncodedPair(
        clean_ids=clean_ids,
        cf_ids=cf_ids,
        clean_answer_id=clean_tok,
        cf_answer_id=cf_tok,
        labels=label_positions(enc["offset_mapping"], spans),
        tokens=[tokenizer.decode([t]) for t in clean_ids],
        diff=diffs,
    )


def encode_program(
    tokenizer: PreTrainedTokenizerBase, program: Program | Mapping
) -> EncodedPair | Skip:
    """`encode_pair` on a program with a counterfactual (a `Program` or its `to_dict()`)."""
    prog = program if isinstance(program, Mapping) else program.to_dict()
    if prog.get("cf_text") is None:
        raise ValueError(
            f"program {prog['task']}/{prog['index']} has cf_text=None: patching needs a "
            "counterfactual; generate the program with orchestrator.tasks (every family writes "
            "one) or leave it out of the patching experiment"
        )
    return encode_pair(
        tokenizer,
        prog["text"],
        prog["cf_text"],
        prog["answer"],
        prog["cf_answer"],
        prog["spans"],
    )
