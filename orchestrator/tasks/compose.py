"""Assembly shared by the families other than `binding`: core blocks, distractor lines, and the
search for a one-constant counterfactual.

A family describes its program as *blocks* of lines that must stay together (a `for` line and its
body, a `try`/`except` statement), in order; the remaining `seq_len` lines are distractor
statements over other names, slotted between blocks. Constants that a counterfactual may change
are single digits labelled `const:<k>`; the family's `evaluate(consts)` computes the answer from
their values with the family's own model of Python's semantics (tests check it by running the
text).
"""

import dataclasses
import random
from collections.abc import Callable, Sequence

from orchestrator.tasks.base import (
    LETTERS,
    LineBuilder,
    Program,
    Style,
    assign_op,
    check_seq_len,
    check_style,
    program_rng,
    query_line,
    replace_at,
)

Piece = str | tuple[str | None, str]
Line = tuple[Piece, ...]
Block = list[Line]
Evaluate = Callable[[Sequence[int]], str | None]
DIGITS = range(10)


def const(k: int, value: int) -> tuple[str, str]:
    """The k-th changeable constant of a program, as a labelled piece."""
    assert 0 <= value <= 9, f"constants are single digits, got {value}"
    return (f"const:{k}", str(value))


def distractor_lines(rng: random.Random, names: Sequence[str], n: int, style: Style) -> list[Line]:
    """`n` statements over `names` only: fresh assignments, copies and increments, in order.

    Each line reads only names assigned by an earlier distractor line, so the lines are valid
    Python in the order given and never touch the family's own variables.
    """
    eq, inc = assign_op(style), assign_op(style, "+=")
    assigned: list[str] = []
    lines: list[Line] = []
    for _ in range(n):
        roll = rng.random()
        if assigned and roll < 0.3:
            lines.append((rng.choice(assigned), inc, str(rng.randrange(1, 10))))
            continue
        lhs = rng.choice(names)
        rhs = str(rng.randrange(10))
        if assigned and roll < 0.6 and [v for v in assigned if v != lhs]:
            rhs = rng.choice([v for v in assigned if v != lhs])
        lines.append((lhs, eq, rhs))
        if lhs not in assigned:
            assigned.append(lhs)
    return lines


def interleave(rng: random.Random, blocks: Sequence[Block], extra: Sequence[Line]) -> list[Line]:
    """Blocks in order with the `extra` lines, in their own order, in random gaps between them."""
    slots = sorted(rng.randrange(len(blocks) + 1) for _ in extra)
    out: list[Line] = []
    it = iter(zip(slots, extra, strict=True))
    pending = next(it, None)
    for gap in range(len(blocks) + 1):
        while pending is not None and pending[0] == gap:
            out.append(pending[1])
            pending = next(it, None)
        if gap < len(blocks):
            out.extend(blocks[gap])
    return out


def _counterfactual(
    rng: random.Random, consts: list[int], evaluate: Evaluate, answer: str
) -> tuple[int, int, str] | None:
    """(constant index, new digit, new answer) whose answer differs in its first character."""
    for k in rng.sample(range(len(consts)), len(consts)):
        for digit in rng.sample(DIGITS, len(DIGITS)):
            if digit == consts[k]:
                continue
            changed = [*consts[:k], digit, *consts[k + 1 :]]
            new = evaluate(changed)
            if new is not None and new[0] != answer[0]:
                return k, digit, new
    return None


@dataclasses.dataclass(frozen=True)
class Core:
    """What a family draws for one program.

    Attributes:
        blocks: the family's lines; constants labelled with `const(k, value)`.
        reserved: names the family uses; distractors use the other letters.
        query: the variable whose final value is the answer.
        consts: the constants' values, by k.
        evaluate: the answer for any values of the constants, or None where the family rules
            the program out (e.g. an answer outside the candidate range).
    """

    blocks: Sequence[Block]
    reserved: set[str]
    query: str
    consts: list[int]
    evaluate: Evaluate


def assemble(
    task: str, seed: int, seq_len: int, index: int, rng: random.Random, style: Style, core: Core
) -> Program | None:
    """Fill the core to `seq_len` lines with distractors, write the text, find the counterfactual.

    Returns:
        The program, or None when no single-constant change moves the answer (the caller draws
        again, so every program has a counterfactual).
    """
    core_lines = sum(len(b) for b in core.blocks)
    assert core_lines <= seq_len, f"{task}: {core_lines} core lines exceed seq_len={seq_len}"
    names = [c for c in LETTERS if c not in core.reserved]
    extra = distractor_lines(rng, names, seq_len - core_lines, style)
    out = LineBuilder()
    for line in interleave(rng, core.blocks, extra):
        out.add(*line)
    out.add(*query_line(core.query))
    answer = core.evaluate(core.consts)
    assert answer is not None, f"{task}: the family drew constants {core.consts} it rules out"
    found = _counterfactual(rng, core.consts, core.evaluate, answer)
    if found is None:
        return None
    k, digit, cf_answer = found
    start, _ = out.spans[f"const:{k}"]
    spans = {label: span for label, span in out.spans.items() if not label.startswith("const:")}
    spans["cf_const"] = out.spans[f"const:{k}"]
    return Program(
        task=task,
        seq_len=seq_len,
        index=index,
        seed=seed,
        text=out.text,
        answer=answer,
        query=core.query,
        cf_text=replace_at(out.text, start, str(digit)),
        cf_answer=cf_answer,
        spans=dict(sorted(spans.items())),
    )


def generate_family(
    task: str,
    min_seq_len: int,
    draw_core: Callable[[random.Random, int, Style], Core],
    seed: int,
    seq_len: int,
    index: int,
    style: str,
    tries: int = 1_000,
) -> Program:
    """Program `index` of a family's (seed, seq_len) stream: draw cores until one has a
    counterfactual.

    Raises:
        ValueError: seq_len below the family's minimum, or a bad style.
    """
    check_seq_len(task, seq_len, minimum=min_seq_len)
    checked = check_style(style)
    rng = program_rng(seed, task, seq_len, index)
    for _ in range(tries):
        program = assemble(
            task, seed, seq_len, index, rng, checked, draw_core(rng, seq_len, checked)
        )
        if program is not None:
            return program
    raise RuntimeError(
        f"{task}: no program with a counterfactual in {tries} draws"
    )  # pragma: no cover
