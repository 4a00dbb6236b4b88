"""How far to trust a mean: its program count and a 95% bootstrap interval over programs.

A cell of an aggregate (a (layer, label) of the patching heatmap, a depth of the accuracy chart)
is a mean over rows, and the rows come in programs: one row per program in an accuracy cell,
several in a patching cell (each position of a label, each head). Programs are what was sampled,
so the interval resamples programs with replacement and keeps each program's rows together (a
cluster bootstrap). A resample's statistic is the mean over the rows of the programs it drew,
`sum_i w_i s_i / sum_i w_i c_i`, where `w_i` counts the draws of program `i` and `s_i`, `c_i`
are the sum and count of its rows in the cell; the point estimate is the same ratio with every
`w_i = 1`, the plain mean over rows. The interval is the 2.5th and 97.5th percentile of
`RESAMPLES` such statistics (the percentile method).

Where each program gives the cell one row of 0 or 1 (an accuracy, a flip rate, a share of the
wrong answers), the mean is a proportion of programs, and the interval is Wilson's score
interval instead: the percentile bootstrap of a proportion collapses to a point when every
program agrees (28 of 28 right would read [1.000, 1.000]), where Wilson's says [0.879, 1.000].

The draws are seeded by (`SEED`, the cell's number of programs), and programs are taken in key
order, so the same rows give the same interval on every run and machine. A cell of one program
has no interval (NaN), and a cell of fewer than `MIN_PROGRAMS` programs is drawn greyed on the
charts: an interval from 3 programs is itself a guess.

Probes are scored on held-out programs whose rows are not kept, only `accuracy` and `n_test`:
their interval is Wilson's too.
"""

import functools
import math
import statistics

import numpy as np
import pandas as pd

# The columns that name a program in every view that has programs (`programs` has one row each).
PROGRAM = ("task", "seq_len", "program")
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
# Cells resting on fewer programs than this are drawn greyed and flagged in the summary.
MIN_PROGRAMS = 10
# The suffixes of a mean's interval columns: `mean_effect_lo`, `mean_effect_hi`.
LO, HI = "_lo", "_hi"
# The suffixes of the per-program partial sums that `summarise` reads.
SUM, COUNT = "__sum", "__n"


@functools.lru_cache(maxsize=256)
def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """`(resamples, n)` draw counts: row `b` says how often resample `b` drew each of `n`
    programs (each row sums to `n`). Read-only: it is shared by every cell of `n` programs."""
    rng = np.random.default_rng([seed, n])
    kind = np.int32 if resamples * n < 2**31 else np.int64  # half the memory traffic
    rows = n * np.arange(resamples, dtype=kind)[:, None]
    drawn = rng.integers(0, n, size=(resamples, n), dtype=kind) + rows
    counts = np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n)
    counts = counts.astype(np.float64)
    counts.setflags(write=False)
    return counts


def interval(
    sums, counts, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float, float]:
    """The mean over rows `sum(sums) / sum(counts)` and its percentile bootstrap interval, from
    each program's sum and count of rows (programs in a fixed order); where every program gives
    one row of 0 or 1 (an accuracy, a flip rate), the mean is a share of programs and the
    interval Wilson's. NaN bounds for one program; all NaN for none.

    Raises:
        ValueError: `sums` and `counts` differ in length, or a count is not positive.
    """
    s = np.asarray(sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError(f"sums {s.shape} and counts {c.shape} must be equal-length vectors")
    if len(s) == 0:
        return math.nan, math.nan, math.nan
    if (c <= 0).any():
        raise ValueError("every program needs at least one row (count > 0)")
    mean, lo, hi = _cells(s[None, :], c[None, :], resamples, seed, level)
    return float(mean[0]), float(lo[0]), float(hi[0])


def _cells(
    s: np.ndarray, c: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`interval` of each row of `(cells, n)` sums and counts (cells of one size): one matrix
    product of the cells with the shared draw counts, instead of one a cell."""
    k, n = s.shape
    mean = s.sum(axis=1) / c.sum(axis=1)
    lo, hi = np.full(k, np.nan), np.full(k, np.nan)
    if n < 2:
        return mean, lo, hi
    share = (c == 1).all(axis=1) & ((s == 0) | (s == 1)).all(axis=1)  # Wilson's
    if share.any():
        lo[share], hi[share] = wilson(mean[share], np.full(share.sum(), n), level)
    rest = ~share
    if rest.any():
        w = resample_counts(n, resamples, seed)
        stats = (s[rest] @ w.T) / (c[rest] @ w.T)
        tail = (1.0 - level) / 2.0
        lo[rest], hi[rest] = np.quantile(stats, [tail, 1.0 - tail], axis=1)
    return mean, lo, hi


def summarise(
    partial: pd.DataFrame,
    by: list[str],
    values: list[str],
    unit: tuple[str, ...] = PROGRAM,
    first: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Per cell (`by`), from one row per (cell, program) with `<v>__sum` and `<v>__n` for each
    value `v`: the mean `v`, its interval `v_lo`, `v_hi`, the cell's `programs` (those with a
    row of the first value) and `n` (rows of the first value); `first`: columns taken from the
    cell's first program. Rows in the order of `by` (NULL keys are cells too)."""
    columns = [
        *by,
        *first,
        *(c for v in values for c in (v, v + LO, v + HI)),
        "programs",
        "n",
    ]
    if not len(partial):
        return pd.DataFrame({c: pd.Series(dtype=partial.dtypes.get(c, "float64")) for c in columns})
    ordered = partial.sort_values([*by, *unit], kind="stable", na_position="last")
    ordered = ordered.reset_index(drop=True)
    cell = ordered.groupby(by, dropna=False, sort=False).ngroup().to_numpy()
    heads = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])  # each cell's first row
    out = ordered.loc[heads, [*by, *first]].reset_index(drop=True)
    for i, v in enumerate(values):
        have = ordered[v + COUNT].to_numpy() > 0
        mean, lo, hi, programs, rows = _per_cell(
            ordered[v + SUM].to_numpy(np.float64)[have],
            ordered[v + COUNT].to_numpy(np.float64)[have],
            cell[have],
            len(heads),
        )
        out[v], out[v + LO], out[v + HI] = mean, lo, hi
        if i == 0:
            out["programs"], out["n"] = programs, rows
    out = out[columns].astype({"programs": "int64", "n": "int64"})
    # The cell's columns keep their types where no cell is NULL (a layer stays an int32).
    kept = {c: partial[c].dtype for c in [*by, *first] if out[c].notna().all()}
    return out.astype(kept)


def _per_cell(s: np.ndarray, c: np.ndarray, cell: np.ndarray, cells: int) -> tuple[np.ndarray, ...]:
    """Mean, interval, programs and rows of each of `cells` cells, from rows (programs) sorted
    by `cell`; a cell without rows reads NaN and 0."""
    mean, lo, hi = (np.full(cells, np.nan) for _ in range(3))
    programs = np.bincount(cell, minlength=cells)
    rows = np.bincount(cell, weights=c, minlength=cells)
    start = np.r_[0, np.cumsum(programs)[:-1]]
    for n in np.unique(programs[programs > 0]):
        ids = np.flatnonzero(programs == n)
        take = (start[ids][:, None] + np.arange(n)[None, :]).ravel()
        m, a, b = _cells(s[take].reshape(len(ids), n), c[take].reshape(len(ids), n))
        mean[ids], lo[ids], hi[ids] = m, a, b
    return mean, lo, hi, programs, rows


def wilson(p, n, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval for proportions `p` of `n` trials (arrays alike); NaN where
    `n` is 0 or missing."""
    z = statistics.NormalDist().inv_cdf((1.0 + level) / 2.0)
    p = np.asarray(p, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    bad = ~(n > 0)
    lo = np.where(bad, np.nan, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(bad, np.nan, np.clip(centre + half, 0.0, 1.0))
    return lo, hi
