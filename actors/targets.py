"""From a program's character spans to token positions, labels and answer tokens, per tokenizer.

Programs carry tokenizer-free character spans (DESIGN: Programs); each model maps them through its
own tokenizer's offsets. What is appended to the prompts and which answer tokens are compared
is `actors.answers`' rule. A clean/counterfactual pair is usable for patching only when both
texts tokenize to the same length and some token tells the answers apart; otherwise
`encode_pair` returns a `Skip` with the reason, which the caller records.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from actors.answers import Question, Skip, ask
from orchestrator.tasks import get_family
from orchestrator.tasks.base import Program

Positions = Literal["all", "targets"]
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """One program ready to patch.

    Attributes:
        clean_ids / cf_ids: token ids of the inputs (same length): each prompt followed by
            the tokens appended before the compared answer tokens (`prefix`).
        clean_answer_id / cf_answer_id: the compared tokens: the first at which the answers,
            as the tokenizer writes them after the prompt, differ.
        labels: one label per position (`ref_depth_k_rhs`, `query_var`, `final_colon`,
            `cf_const`, or `other`; appended positions are `other`).
        tokens: the decoded token at each position.
        diff: the positions where the prompts' tokens differ (ascending); activations before
            the first are identical in the two runs.
        prefix: the text of the appended tokens (the `answer_prefix` column).
        clean_answer_ids / cf_answer_ids: each answer's tokens from the compared one on.
        candidates: the tokens the family's answers continue with after the inputs.
        same_answer: the counterfactual program's answer is the clean one (a control,
            `orchestrator.tasks.counterfactuals.SAME_ANSWER`): `cf_answer_id` is then the
            contrast token (the root-value counterfactual's answer), not the counterfactual
            program's own answer, which is `clean_answer_id`.
    """

    clean_ids: list[int]
    cf_ids: list[int]
    clean_answer_id: int
    cf_answer_id: int
    labels: list[str]
    tokens: list[str]
    diff: list[int]
    prefix: str = ""
    clean_answer_ids: tuple[int, ...] = ()
    cf_answer_ids: tuple[int, ...] = ()
    candidates: tuple[int, ...] = ()
    same_answer: bool = False

    @property
    def cf_own_id(self) -> int:
        """The token of the counterfactual program's own answer."""
        return self.clean_answer_id if self.same_answer else self.cf_answer_id

    @property
    def first_diff(self) -> int:
        return self.diff[0]

    def positions(self, which: Positions) -> list[int]:
        """Every position, or only the labelled ones."""
        if which == "all":
            return list(range(len(self.clean_ids)))
        return [i for i, label in enumerate(self.labels) if label != OTHER]


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
    candidates: Sequence[str] | None = None,
    prefix: str = "",
) -> EncodedPair | Skip:
    """Tokenize a clean/counterfactual pair, ask it as `actors.answers.ask` does, and map its
    spans onto token positions.

    Args:
        candidates: every answer of the family (default: the two answers).
        prefix: the text between prompt and answer, already resolved from `auto`.
    """
    question = ask(
        tokenizer,
        clean,
        cf,
        clean_answer,
        cf_answer,
        candidates or (clean_answer, cf_answer),
        prefix,
    )
    if isinstance(question, Skip):
        return question
    diffs = [
        i
        for i, (a, b) in enumerate(zip(question.clean_ids, question.cf_ids, strict=True))
        if a != b
    ]
    if not diffs:
        return Skip("clean and counterfactual prompts tokenize identically")
    return _pair(tokenizer, clean, spans, question, diffs)


def _pair(
    tokenizer: PreTrainedTokenizerBase,
    clean: str,
    spans: Mapping[str, Sequence[int]],
    question: Question,
    diffs: list[int],
) -> EncodedPair:
    offsets = tokenizer(clean, return_offsets_mapping=True)["offset_mapping"]
    labels = label_positions(offsets, spans) + [OTHER] * len(question.prefix_ids)
    return EncodedPair(
        clean_ids=question.clean_ids,
        cf_ids=question.cf_ids,
        clean_answer_id=question.clean_answer[0],
        cf_answer_id=question.cf_answer[0],
        labels=labels,
        tokens=[tokenizer.decode([t]) for t in question.clean_ids],
        diff=diffs,
        prefix=question.prefix,
        clean_answer_ids=tuple(question.clean_answer),
        cf_answer_ids=tuple(question.cf_answer),
        candidates=tuple(question.candidates),
    )


def encode_program(
    tokenizer: PreTrainedTokenizerBase,
    program: Program | Mapping,
    prefix: str = "",
    contrast: str | None = None,
) -> EncodedPair | Skip:
    """`encode_pair` on a program with a counterfactual (a `Program` or its `to_dict()`), its
    family's candidates, and `prefix` (already resolved from `auto`).

    Args:
        contrast: the answer compared with the clean one when the counterfactual program's
            answer is the clean one (a control, whose own answers tell nothing apart): the
            root-value counterfactual's answer. The pair is then `same_answer`.

    Raises:
        ValueError: no counterfactual, or a control without a `contrast`.
    """
    prog = program if isinstance(program, Mapping) else program.to_dict()
    if prog.get("cf_text") is None:
        raise ValueError(
            f"program {prog['task']}/{prog['index']} has cf_text=None: patching needs a "
            "counterfactual; generate the program with orchestrator.tasks (every family writes "
            "one) or leave it out of the patching experiment"
        )
    same = prog["cf_answer"] == prog["answer"]
    if same and contrast is None:
        raise ValueError(
            f"program {prog['task']}/{prog['index']}: its counterfactual has the clean answer "
            f"{prog['answer']!r}, so no logit difference tells the runs apart; give the "
            "contrast answer (the root-value counterfactual's)"
        )
    pair = encode_pair(
        tokenizer,
        prog["text"],
        prog["cf_text"],
        prog["answer"],
        contrast if same else prog["cf_answer"],
        prog["spans"],
        get_family(prog["task"]).candidates,
        prefix,
    )
    if same and isinstance(pair, EncodedPair):
        return dataclasses.replace(pair, same_answer=True)
    return pair
