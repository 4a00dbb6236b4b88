"""The variable-binding task of Wu, Geiger & Millière (ICML 2025).

`seq_len` assignment lines, each `v = <digit>` or `v = <variable>` over single-letter names, then
a query comment `#q:`; the answer is q's value under Python's semantics (a copy `b = a` takes a's
value at that line; reassigning `a` later does not change `b`).

Each program is drawn by a plain random process (a line's right-hand side is a variable already
assigned with probability `p_var`, else a digit; names drawn from all 26 letters, so reassignment
happens), and rejected until some variable's chain has the program's target depth; the query is
drawn among those variables. Target depths cycle 1..max_depth with the index, so any run of
`max_depth` consecutive programs holds every depth once: balance by construction, with the
program itself found by rejection sampling rather than built to measure.
"""

import dataclasses
import random

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

NAME = "binding"
DIGITS = "0123456789"
MAX_DEPTH = 4
P_VAR = 0.5
MAX_ATTEMPTS = 100_000


@dataclasses.dataclass(frozen=True)
class _Line:
    lhs: str
    rhs: str  # a digit or a variable name


def _draw_lines(rng: random.Random, seq_len: int, p_var: float, names: str) -> list[_Line]:
    lines: list[_Line] = []
    assigned: list[str] = []  # in first-assignment order: deterministic, unlike a set
    for _ in range(seq_len):
        lhs = rng.choice(names)
        sources = [v for v in assigned if v != lhs]
        if sources and rng.random() < p_var:
            rhs = rng.choice(sources)
        else:
            rhs = rng.choice(DIGITS)
        lines.append(_Line(lhs, rhs))
        if lhs not in assigned:
            assigned.append(lhs)
    return lines


def chain_of(lines: list[_Line], var: str, before: int | None = None) -> list[int]:
    """Line indices of var's chain, from the line that last assigns it back to the root value.

    Args:
        lines: the program's assignments.
        var: the variable to resolve.
        before: resolve var's value just before this line (default: after the last line).

    Returns:
        `[i_query, ..., i_root]`; `len(...)` is the referential depth.
    """
    end = len(lines) if before is None else before
    chain: list[int] = []
    while True:
        i = max((j for j in range(end) if lines[j].lhs == var), default=None)
        assert i is not None, f"{var!r} is read before it is assigned (line {end})"
        chain.append(i)
        if lines[i].rhs in DIGITS:
            return chain
        var, end = lines[i].rhs, i


def generate(
    seed: int,
    seq_len: int,
    index: int,
    *,
    style: Style = "seed",
    max_depth: int = MAX_DEPTH,
    p_var: float = P_VAR,
    n_names: int = len(LETTERS),
) -> Program:
    """The binding program number `index` of the (seed, seq_len) stream.

    Args:
        seed: sweep seed.
        seq_len: assignment lines before the query (the paper uses 16).
        index: program number; also fixes the target depth `1 + index % min(max_depth, seq_len)`.
        style: `seed` writes `a = 5`, `paper` writes `a=5`.
        max_depth: deepest query chain (1-4, as in the paper).
        p_var: probability that a line copies an assigned variable rather than a digit.
        n_names: variables are drawn from the first `n_names` letters (2-26); fewer names mean
            more reassignment (a training curriculum uses few names first).

    Returns:
        A `Program` with its counterfactual (the root value changed), depth, root line,
        heuristic flag and spans `ref_depth_1_rhs` (the root value) .. `ref_depth_{depth}_rhs`,
        `query_var`, `final_colon`.

    Raises:
        ValueError: bad seq_len, style, max_depth, p_var or n_names.
    """
    check_seq_len(NAME, seq_len, minimum=1)
    style = check_style(style)
    if not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"binding: max_depth={max_depth} must be between 1 and {MAX_DEPTH}")
    if not 0.0 < p_var < 1.0:
        raise ValueError(f"binding: p_var={p_var} must be strictly between 0 and 1")
    if not 2 <= n_names <= len(LETTERS):
        raise ValueError(f"binding: n_names={n_names} must be between 2 and {len(LETTERS)}")
    pool = LETTERS[:n_names]
    rng = program_rng(seed, NAME, seq_len, index)
    target = 1 + index % min(max_depth, seq_len)
    for _ in range(MAX_ATTEMPTS):
        lines = _draw_lines(rng, seq_len, p_var, pool)
        names = sorted({line.lhs for line in lines})
        chains = {v: chain_of(lines, v) for v in names}
        candidates = [v for v in names if len(chains[v]) == target]
        if candidates:
            break
    else:  # pragma: no cover - p_var in (0, 1) makes every depth <= seq_len reachable
        raise RuntimeError(f"binding: no depth-{target} chain in {MAX_ATTEMPTS} programs")
    query = rng.choice(candidates)
    chain = chains[query]
    # ref_depth_k_rhs is the right-hand side of the k-th line counted from the root.
    labels = {line_no: f"ref_depth_{k}_rhs" for k, line_no in enumerate(reversed(chain), 1)}
    eq = assign_op(style)
    out = LineBuilder()
    for i, line in enumerate(lines):
        out.add(line.lhs, eq, (labels.get(i), line.rhs))
    out.add(*query_line(query))
    text = out.text
    answer = lines[chain[-1]].rhs
    cf_answer = rng.choice([d for d in DIGITS if d != answer])
    root_start, _ = out.spans["ref_depth_1_rhs"]
    root_line = chain[-1] + 1
    return Program(
        task=NAME,
        seq_len=seq_len,
        index=index,
        seed=seed,
        text=text,
        answer=answer,
        query=query,
        cf_text=replace_at(text, root_start, cf_answer),
        cf_answer=cf_answer,
        depth=len(chain),
        root_line=root_line,
        heuristic=root_line <= 2,
        spans=out.spans,
    )
