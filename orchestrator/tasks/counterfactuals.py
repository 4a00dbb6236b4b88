"""Counterfactual kinds of a binding program, beyond the root value: each one question a
researcher asks after root-value patching has said *where* the value is carried.

- `root_value`: the generator's own counterfactual (the root digit changed; the answer changes).
- `query_swap`: the same statements, another variable queried whose answer differs. Patching the
  final positions from it separates "which variable is asked" from "what its value is".
- `distractor`: a digit on a line outside the queried chain changed; the answer does not change.
  A control: every patch should have about zero effect.
- `reassign`: a digit of a binding that the query's chain must *not* read changed (a variable of
  the chain assigned a constant before the assignment the chain reads, i.e. a stale binding);
  the answer does not change.

Each variant is one character replaced, so text and counterfactual have the same length, and
is drawn deterministically from (seed, task, seq_len, index, kind). Each is checked by running
both programs in Python (`run_binding`). What changed gets a span of its own (`query_var` for
`query_swap`; `distractor_rhs`, `stale_rhs`), so it has a label in patching rows.
`variant` returns None where a program has no such counterfactual (every variable has the
answer's value; no digit off the chain; no stale binding).
"""

import dataclasses

from orchestrator.tasks.base import Program, program_rng, replace_at
from orchestrator.tasks.binding import DIGITS, NAME, chain_of
from orchestrator.tasks.errors import parse_lines

ROOT_VALUE = "root_value"
KINDS: tuple[str, ...] = (ROOT_VALUE, "query_swap", "distractor", "reassign")
# The kinds after which the answer is the clean one (controls): their `cf_answer` is `answer`.
SAME_ANSWER: tuple[str, ...] = ("distractor", "reassign")
LABELS = {"distractor": "distractor_rhs", "reassign": "stale_rhs"}
# Why `variant` returns None for a program (the reason recorded when patching skips it).
NONE_BECAUSE = {
    "query_swap": "every other variable has the answer's value",
    "distractor": "every digit is on the queried chain",
    "reassign": "no variable of the queried chain is assigned a digit before the binding it reads",
}


def run_binding(text: str, query: str) -> str:
    """The value of `query` after running the program `text` in Python (its query line is a
    comment), as `print` writes it."""
    scope: dict = {}
    exec(compile(text, "<binding program>", "exec"), {"__builtins__": {}}, scope)
    return str(scope[query])


def _rhs_offsets(text: str) -> list[int]:
    """Per statement line, the character offset of its right-hand side (one character)."""
    offsets, start = [], 0
    for line in text.split("\n")[:-1]:
        offsets.append(start + len(line) - 1)
        start += len(line) + 1
    return offsets


def _chain_lines(lines, query: str) -> set[int]:
    return set(chain_of(lines, query))


def _stale_lines(lines, query: str) -> list[int]:
    """Lines that assign a digit to a variable of the query's chain before the assignment the
    chain reads of it (bindings the answer must not depend on)."""
    read = {lines[i].lhs: i for i in chain_of(lines, query)}
    return [
        i
        for i, line in enumerate(lines)
        if line.lhs in read and i < read[line.lhs] and line.rhs in DIGITS
    ]


def variant(program: Program, kind: str) -> Program | None:
    """`program` with the counterfactual of `kind` in `cf_text` / `cf_answer` (and a span for
    what changed), or None where the program has none.

    Raises:
        ValueError: an unknown kind, or a kind other than `root_value` for a family other than
            binding.
    """
    if kind not in KINDS:
        raise ValueError(f"counterfactual {kind!r}: use one of {list(KINDS)}")
    if kind == "root_value":
        return program
    if program.task != NAME:
        raise ValueError(
            f"counterfactual {kind!r} is defined for binding programs, not {program.task}; "
            "fix: use root_value for this task"
        )
    rng = program_rng(program.seed, f"{program.task}/{kind}", program.seq_len, program.index)
    lines = parse_lines(program.text)
    if kind == "query_swap":
        names = sorted({line.lhs for line in lines} - {program.query})
        values = {v: lines[chain_of(lines, v)[-1]].rhs for v in names}
        others = [v for v in names if values[v] != program.answer]
        if not others:
            return None
        new = rng.choice(others)
        start, _ = program.spans["query_var"]
        out = dataclasses.replace(
            program, cf_text=replace_at(program.text, start, new), cf_answer=values[new]
        )
    else:
        chain = _chain_lines(lines, program.query)
        if kind == "distractor":
            where = [i for i, line in enumerate(lines) if i not in chain and line.rhs in DIGITS]
        else:
            where = _stale_lines(lines, program.query)
        if not where:
            return None
        line = rng.choice(where)
        offset = _rhs_offsets(program.text)[line]
        digit = rng.choice([d for d in DIGITS if d != lines[line].rhs])
        spans = {**program.spans, LABELS[kind]: (offset, offset + 1)}
        out = dataclasses.replace(
            program,
            cf_text=replace_at(program.text, offset, digit),
            cf_answer=program.answer,
            spans=spans,
        )
    assert len(out.cf_text) == len(out.text)
    assert run_binding(out.text, out.query) == out.answer, (kind, out.text)
    new_query = out.cf_text.rsplit("#", 1)[1].rstrip(":") if kind == "query_swap" else out.query
    assert run_binding(out.cf_text, new_query) == out.cf_answer, (kind, out.cf_text)
    return out
