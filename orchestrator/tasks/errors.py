"""What kind of wrong answer a model gave to a binding program.

A wrong answer is more telling than a count of wrong answers: the paper's models first learn to
answer with an early constant, later to follow the chain, and the errors of each stage differ.
`error_kind` sorts one wrong answer into one of `ERROR_KINDS`, re-reading the program's lines
from its text (both styles, `a = 5` and `a=5`), so that it needs nothing beyond the `Program`
record: it runs on a results folder's `programs` rows as well as on freshly generated ones.

Several kinds can apply to one answer (a digit on line 1 can also be a distractor's value); the
first that applies in `ERROR_KINDS`' order wins, most specific first:

1. `not_a_candidate`: no digit (or nothing parsed). Disjoint from the rest, which are digits of
   the program.
2. `stale_binding`: a value the queried variable held before its last assignment. Derived from
   the queried variable itself: the model followed the right variable but read it at the wrong
   time, the most specific evidence of all, and a small set (one value per earlier assignment).
3. `line_1_2_constant`: a digit assigned on line 1 or 2, the paper's positional shortcut. At most
   two values, chosen without regard to the query.
4. `distractor_value`: the final value of another variable. In a 16-line program most digits are
   some variable's value, so it is the weakest evidence and comes last.
5. `other`: a digit none of the above explains.
"""

import re

from orchestrator.tasks.base import Program
from orchestrator.tasks.binding import DIGITS, NAME, _Line, chain_of

ERROR_KINDS = (
    "not_a_candidate",
    "stale_binding",
    "line_1_2_constant",
    "distractor_value",
    "other",
)
CANDIDATES = tuple(DIGITS)  # the family's answers (`orchestrator.tasks.FAMILIES`)
# The shortcut reads the constants of the first lines (the paper's line-1/line-2 heuristic).
EARLY_LINES = 2

_ASSIGNMENT = re.compile(r"([a-z])\s*=\s*([a-z]|\d)")


def parse_lines(text: str) -> list[_Line]:
    """The assignments of a binding program's text, the query line (`#q:`) left out.

    Raises:
        ValueError: a statement line that is not `v = <digit>` or `v = <variable>`.
    """
    lines = []
    for no, line in enumerate(text.split("\n")[:-1], 1):
        match = _ASSIGNMENT.fullmatch(line.strip())
        if match is None:
            raise ValueError(
                f"binding: line {no} {line!r} is not an assignment `v = <digit>` or "
                "`v = <variable>`; give the text of a binding program"
            )
        lines.append(_Line(*match.groups()))
    return lines


def root_value(lines: list[_Line], var: str, before: int | None = None) -> str:
    """The digit `var` holds just before line `before` (default: after the last line)."""
    return lines[chain_of(lines, var, before)[-1]].rhs


def stale_values(lines: list[_Line], var: str) -> set[str]:
    """Every value `var` held at some point before its last assignment."""
    assigned = [i for i, line in enumerate(lines) if line.lhs == var]
    return {root_value(lines, var, i + 1) for i in assigned[:-1]}


def early_constants(lines: list[_Line]) -> set[str]:
    """The digits assigned on lines 1 and 2."""
    return {line.rhs for line in lines[:EARLY_LINES] if line.rhs in DIGITS}


def distractor_values(lines: list[_Line], var: str) -> set[str]:
    """The final values of every variable other than `var`."""
    return {root_value(lines, v, None) for v in {line.lhs for line in lines} - {var}}


def error_kind(program: Program, predicted: str | None) -> str | None:
    """The kind of a wrong answer (one of `ERROR_KINDS`, by the priority of the module's
    docstring).

    Args:
        program: the program asked.
        predicted: the model's answer (None where none was parsed).

    Returns:
        None where the answer is right or the program is not a binding one (the other families
        have no chains to classify by), else the kind.

    Raises:
        ValueError: a binding program whose text has a line that is not an assignment.
    """
    if program.task != NAME or predicted == program.answer:
        return None
    if predicted not in CANDIDATES:
        return "not_a_candidate"
    lines = parse_lines(program.text)
    if predicted in stale_values(lines, program.query):
        return "stale_binding"
    if predicted in early_constants(lines):
        return "line_1_2_constant"
    if predicted in distractor_values(lines, program.query):
        return "distractor_value"
    return "other"
