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

The option `stratify` balances more than depth. With `heuristic` in it, the target is a cell
(depth, heuristic), where heuristic means the root value sits on line 1 or 2, a shortcut a model
can take without following the chain. Left to chance, few deep chains start late (of the
depth-4 programs, about 1 in 4 at seq_len 16 and 1 in 20 at seq_len 8 root on line 3 or later),
so analysis cells split by heuristic rest on a handful of programs; stratified, every feasible
cell gets the same share. The cells cycle with the index (`strata_cycle`), and the program is
still found by rejection: its root line is one the random process produced, not one planted.
"""

import dataclasses
import random
from collections.abc import Collection, Sequence

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
# What `stratify` may name. Depth is always cycled; naming it only says so.
STRATA = ("depth", "heuristic")
# The 1-based lines that count as the heuristic's "root value near the top".
HEURISTIC_LINES = 2


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


def check_stratify(stratify: Sequence[str]) -> frozenset[str]:
    """The strata named by the `stratify` option, checked.

    Raises:
        ValueError: not a list of strings, an unknown stratum name, or a name given twice.
    """
    example = "fix: write e.g. stratify: [depth, heuristic]"
    if not isinstance(stratify, (list, tuple)):  # a bare string is not a list
        raise ValueError(
            f"binding: stratify={stratify!r} must be a list of stratum names from "
            f"{list(STRATA)}; {example}"
        )
    if not all(isinstance(name, str) for name in stratify):
        raise ValueError(
            f"binding: stratify={list(stratify)!r} must hold stratum names (strings) from "
            f"{list(STRATA)}; {example}"
        )
    unknown = [name for name in stratify if name not in STRATA]
    if unknown:
        raise ValueError(
            f"binding: stratify names unknown stratum {', '.join(map(repr, unknown))}; "
            f"fix: use names from {list(STRATA)}, e.g. stratify: [depth, heuristic]"
        )
    repeated = sorted({name for name in stratify if stratify.count(name) > 1})
    if repeated:
        raise ValueError(
            f"binding: stratify={list(stratify)!r} names {', '.join(map(repr, repeated))} "
            f"more than once; fix: name each stratum once, e.g. stratify: [depth, heuristic]"
        )
    return frozenset(stratify)


def strata_cycle(
    seq_len: int, max_depth: int = MAX_DEPTH, stratify: Collection[str] = ()
) -> list[tuple[int, bool | None]]:
    """The target cells `(depth, heuristic)` that program indices cycle through.

    Program `index` aims at cell `index % len(cycle)`, so any run of `len(cycle)` consecutive
    programs holds every cell once. Without `heuristic` in `stratify` the cells are the depths
    `1..D`, `D = min(max_depth, seq_len)`, with heuristic `None` (either). With it, they are the
    non-heuristic cells `(1, False) ..`, less the infeasible ones, then the heuristic ones
    `(1, True) .. (D, True)`: a run shorter than the cycle, or the programs past its last full
    cycle, go to the cells that patching keeps (root after line 2) first.

    The infeasible cells: a chain's lines are distinct and run forward from its root
    (`chain_of` only looks before the line it resolves), and nothing else constrains them
    (copies may skip lines; a hop only needs a name other than the one it copies, and n_names
    >= 2), so a depth-d chain rooted on line r needs r + d - 1 <= seq_len, and p_var in (0, 1)
    makes every such chain a possible draw. A heuristic root (r = 1) fits every d <= D; a
    non-heuristic one (r >= 3) needs seq_len >= d + 2. When every cell fits, depth stays
    `1 + index % D` as without the option.

    Args:
        seq_len: assignment lines.
        max_depth: deepest query chain.
        stratify: the `stratify` option (checked by the caller).

    Returns:
        The cycle, non-heuristic cells first.
    """
    depths = range(1, min(max_depth, seq_len) + 1)
    if "heuristic" not in stratify:
        return [(d, None) for d in depths]
    later = [(d, False) for d in depths if d + HEURISTIC_LINES <= seq_len]
    return later + [(d, True) for d in depths]


def _in_cell(chain: list[int], depth: int, heuristic: bool | None) -> bool:
    # chain[-1] is the root's 0-based line; heuristic None accepts either.
    in_top = chain[-1] < HEURISTIC_LINES
    return len(chain) == depth and (heuristic is None or in_top == heuristic)


def generate(
    seed: int,
    seq_len: int,
    index: int,
    *,
    style: Style = "seed",
    max_depth: int = MAX_DEPTH,
    p_var: float = P_VAR,
    n_names: int = len(LETTERS),
    stratify: Sequence[str] = (),
) -> Program:
    """The binding program number `index` of the (seed, seq_len) stream.

    Args:
        seed: sweep seed.
        seq_len: assignment lines before the query (the paper uses 16).
        index: program number; also fixes the target depth `1 + index % min(max_depth, seq_len)`
            (with `stratify: [heuristic]`, the target cell; see `strata_cycle`).
        style: `seed` writes `a = 5`, `paper` writes `a=5`.
        max_depth: deepest query chain (1-4, as in the paper).
        p_var: probability that a line copies an assigned variable rather than a digit.
        n_names: variables are drawn from the first `n_names` letters (2-26); fewer names mean
            more reassignment (a training curriculum uses few names first).
        stratify: strata to balance, from `depth` and `heuristic` (default none). Depth is
            always balanced. With `heuristic`, the target is a (depth, heuristic) cell taken
            from `strata_cycle`: every feasible cell once per cycle (a non-heuristic depth-d
            chain needs seq_len >= d + 2; infeasible cells are left out of the cycle), so
            heuristic and non-heuristic programs of each depth come in equal numbers instead
            of by chance. `[]` and `[depth]` give the same programs as no option;
            `[heuristic]` the same as `[depth, heuristic]`.

    Returns:
        A `Program` with its counterfactual (the root value changed), depth, root line,
        heuristic flag and spans `ref_depth_1_rhs` (the root value) .. `ref_depth_{depth}_rhs`,
        `query_var`, `final_colon`.

    Raises:
        ValueError: bad seq_len, style, max_depth, p_var, n_names or stratify.
    """
    check_seq_len(NAME, seq_len, minimum=1)
    style = check_style(style)
    if not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"binding: max_depth={max_depth} must be between 1 and {MAX_DEPTH}")
    if not 0.0 < p_var < 1.0:
        raise ValueError(f"binding: p_var={p_var} must be strictly between 0 and 1")
    if not 2 <= n_names <= len(LETTERS):
        raise ValueError(f"binding: n_names={n_names} must be between 2 and {len(LETTERS)}")
    strata = check_stratify(stratify)
    pool = LETTERS[:n_names]
    rng = program_rng(seed, NAME, seq_len, index)
    cycle = strata_cycle(seq_len, max_depth, strata)
    target, target_heuristic = cycle[index % len(cycle)]
    for _ in range(MAX_ATTEMPTS):
        lines = _draw_lines(rng, seq_len, p_var, pool)
        names = sorted({line.lhs for line in lines})
        chains = {v: chain_of(lines, v) for v in names}
        candidates = [v for v in names if _in_cell(chains[v], target, target_heuristic)]
        if candidates:
            break
    else:  # pragma: no cover - p_var in (0, 1) makes every cell of the cycle reachable
        raise RuntimeError(
            f"binding: no depth-{target} chain (heuristic={target_heuristic}) "
            f"in {MAX_ATTEMPTS} programs"
        )
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
        heuristic=root_line <= HEURISTIC_LINES,
        spans=out.spans,
    )
