"""The kinds of wrong binding answers, on hand-made programs with every kind and every conflict
of the priority, and on generated programs of both styles."""

import pytest

from orchestrator.tasks import iter_programs
from orchestrator.tasks.base import Program
from orchestrator.tasks.errors import (
    ERROR_KINDS,
    distractor_values,
    early_constants,
    error_kind,
    parse_lines,
    root_value,
    stale_values,
)

STYLES = {"paper": lambda text: text, "seed": lambda text: text.replace("=", " = ")}


def binding(text: str, answer: str, style: str = "paper", query: str = "q") -> Program:
    """A binding program of `text` (paper style, `#q:` appended), rewritten in `style`."""
    lines = text.split("\n")
    return Program(
        task="binding",
        seq_len=len(lines),
        index=0,
        seed=0,
        text=STYLES[style](text) + f"\n#{query}:",
        answer=answer,
        query=query,
    )


# Lines: 1 q=4 | 2 b=9 | 3 c=2 | 4 d=c (d=2) | 5 c=7 | 6 q=d (q=2) | 7 q=1.
# q's answer 1; q held 4 and 2 before (stale); lines 1-2 hold 4 and 9; the others end at
# b=9, c=7, d=2 (distractors).
MIXED = "q=4\nb=9\nc=2\nd=c\nc=7\nq=d\nq=1"
MIXED_KINDS = {
    "1": None,
    "4": "stale_binding",  # also on line 1
    "2": "stale_binding",  # also d's final value
    "9": "line_1_2_constant",  # also b's final value
    "7": "distractor_value",
    **dict.fromkeys("03568", "other"),
    "10": "not_a_candidate",
    "x": "not_a_candidate",
    None: "not_a_candidate",
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_answer_to_one_program_gets_its_kind(style) -> None:
    program = binding(MIXED, "1", style)
    assert {pred: error_kind(program, pred) for pred in MIXED_KINDS} == MIXED_KINDS
    lines = parse_lines(program.text)
    assert [(line.lhs, line.rhs) for line in lines][3:6] == [("d", "c"), ("c", "7"), ("q", "d")]
    assert stale_values(lines, "q") == {"4", "2"}
    assert early_constants(lines) == {"4", "9"}
    assert distractor_values(lines, "q") == {"9", "7", "2"}


@pytest.mark.parametrize(
    ("text", "answer", "predicted", "kind"),
    [
        # each kind alone: the prediction fits it and no other
        ("a=1\nb=2\nc=3\nq=4\nd=5\nq=6", "6", "4", "stale_binding"),
        # stale through a copy: q took b's 7 at line 4; b's final value is 3, not 7
        ("x=1\ny=2\nb=7\nq=b\nb=3\nq=5", "5", "7", "stale_binding"),
        # a and b were reassigned, so line 1's 8 and line 2's 9 are no variable's final value
        ("a=8\nb=9\na=1\nb=2\nq=3", "3", "8", "line_1_2_constant"),
        ("a=8\nb=9\na=1\nb=2\nq=3", "3", "9", "line_1_2_constant"),
        # q copied c's 5; c's later 7 is c's final value, not q's
        ("a=1\nb=2\nc=5\nq=c\nc=7", "5", "7", "distractor_value"),
        ("a=1\nb=2\nc=5\nq=c\nc=7", "5", "0", "other"),
        # a digit of the program that none of the kinds explains: line 3's 6, overwritten
        ("a=1\nb=2\nc=6\nc=3\nq=4", "4", "6", "other"),
        ("a=1\nq=a", "1", None, "not_a_candidate"),
        ("a=1\nq=a", "1", "", "not_a_candidate"),
        ("a=1\nq=a", "1", "True", "not_a_candidate"),
        ("a=1\nq=a", "1", "12", "not_a_candidate"),  # a substring of the digits is no digit
        ("a=1\nq=a", "1", "1", None),
    ],
)
def test_each_kind_alone(text, answer, predicted, kind) -> None:
    for style in STYLES:
        assert error_kind(binding(text, answer, style), predicted) == kind, style


@pytest.mark.parametrize(
    ("text", "predicted", "kinds", "kind"),
    [
        # q=4 on line 1, reassigned: stale and a line-1 constant
        ("q=4\na=1\nq=6", "4", {"stale_binding", "line_1_2_constant"}, "stale_binding"),
        # q held c's 5, and 5 is c's final value
        ("a=1\nb=2\nc=5\nq=c\nq=3", "5", {"stale_binding", "distractor_value"}, "stale_binding"),
        # a's 8 on line 1 is also a's final value
        ("a=8\nb=2\nc=3\nq=4", "8", {"line_1_2_constant", "distractor_value"}, "line_1_2_constant"),
        # all three: q=4 on line 1, copied into a, then q reassigned
        (
            "q=4\na=q\nb=5\nq=6",
            "4",
            {"stale_binding", "line_1_2_constant", "distractor_value"},
            "stale_binding",
        ),
    ],
)
def test_priority_decides_conflicts(text, predicted, kinds, kind) -> None:
    lines = parse_lines(text + "\n#q:")
    fits = {
        "stale_binding": predicted in stale_values(lines, "q"),
        "line_1_2_constant": predicted in early_constants(lines),
        "distractor_value": predicted in distractor_values(lines, "q"),
    }
    assert {k for k, fit in fits.items() if fit} == kinds, "the case has the conflict it names"
    assert error_kind(binding(text, root_value(lines, "q")), predicted) == kind
    assert ERROR_KINDS.index(kind) == min(ERROR_KINDS.index(k) for k in kinds)


def test_other_families_and_right_answers_have_no_kind() -> None:
    program = next(iter_programs("boolean", 0, 4, 1))
    assert error_kind(program, None) is None and error_kind(program, "nonsense") is None


@pytest.mark.parametrize("style", ["seed", "paper"])
def test_generated_programs_read_back_to_their_answers(style) -> None:
    """Re-reading the text resolves the query to the generator's answer, so a right answer is
    never classified and every digit but the answer is."""
    for program in iter_programs("binding", 3, 16, 40, style=style):
        lines = parse_lines(program.text)
        assert len(lines) == 16
        assert root_value(lines, program.query) == program.answer, program.text
        assert error_kind(program, program.answer) is None
        kinds = {error_kind(program, d) for d in "0123456789" if d != program.answer}
        assert None not in kinds and kinds <= set(ERROR_KINDS) - {"not_a_candidate"}
        # a heuristic program's root is on line 1 or 2: its answer is the shortcut's too
        if program.heuristic:
            assert program.answer in early_constants(lines)


def test_a_text_that_is_no_binding_program_is_refused() -> None:
    with pytest.raises(ValueError, match=r"line 2 'a \+= 1' is not an assignment"):
        parse_lines("a=1\na += 1\n#a:")
