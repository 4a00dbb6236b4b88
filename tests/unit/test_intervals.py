"""The intervals (analysis/intervals.py) against cases worked by hand and an exact bootstrap; the
views' program columns; each chart's subtitle counts against SQL counts."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis import connect, queries
from analysis.intervals import interval, resample_counts, summarise, wilson
from analysis.summary import FIGURES, KEPT_SHORT, subtitle_lines
from tests.unit.test_analysis import PROGRAMS, run_dir  # noqa: F401 (a fixture)


def test_two_programs_by_hand() -> None:
    # Resampling {0, 2}: means 0, 1, 2 with chances 1/4, 1/2, 1/4, so the 2.5th and 97.5th
    # percentiles are the ends.
    assert interval([0.0, 2.0], [1, 1]) == (1.0, 0.0, 2.0)
    # A program of three rows at 1 and one of a row at 0: the mean over rows is 3/4 (not the
    # mean of the programs' means, 1/2); resampled, the programs stay whole: AA 1, AB 3/4, BB 0.
    assert interval([3.0, 0.0], [3, 1]) == (0.75, 0.0, 1.0)


def test_a_share_of_programs_gets_wilsons_interval() -> None:
    # 28 of 28 right: the bootstrap would say [1, 1]; Wilson's lower end is
    # 28 / (28 + 1.96^2) = 0.8794.
    mean, lo, hi = interval([1.0] * 28, [1] * 28)
    assert (mean, hi) == (1.0, 1.0) and lo == pytest.approx(0.87938, abs=1e-4)
    got = interval([1.0] * 50 + [0.0] * 50, [1] * 100)
    assert got == pytest.approx((0.5, *(x[0] for x in wilson([0.5], [100]))))
    # one row of 0/1 a program only: a program of two rows is a mean, bootstrapped
    assert interval([1.0, 0.0, 2.0], [1, 1, 2])[1] != wilson([0.75], [3])[0][0]


def test_degenerate_cells() -> None:
    assert interval([2.0, 2.0, 2.0], [1, 1, 1]) == (2.0, 2.0, 2.0), "no spread"
    mean, lo, hi = interval([0.4], [1])
    assert mean == 0.4 and math.isnan(lo) and math.isnan(hi), "one program: no interval"
    assert all(math.isnan(x) for x in interval([], []))
    with pytest.raises(ValueError, match="count > 0"):
        interval([1.0, 0.0], [1, 0])


def test_matches_the_exact_bootstrap() -> None:
    """Four programs (sums, counts): every one of the 4^4 resamples is equally likely, so the
    bootstrap distribution is known exactly; the seeded interval's ends sit at its quantiles."""
    sums, counts = np.array([0.0, 1.0, 5.0, 2.0]), np.array([1, 2, 3, 1])
    stats = sorted(
        sums[list(pick)].sum() / counts[list(pick)].sum()
        for pick in itertools.product(range(4), repeat=4)
    )
    mean, lo, hi = interval(sums, counts)
    assert mean == pytest.approx(8 / 7)

    def cdf(x: float) -> float:
        return sum(s <= x + 1e-12 for s in stats) / len(stats)

    # lo is (within the Monte Carlo error of 2000 resamples) the 2.5% quantile, hi the 97.5%.
    assert cdf(lo) >= 0.025 - 0.01 and cdf(lo - 1e-9) <= 0.025 + 0.01
    assert cdf(hi) >= 0.975 - 0.01 and cdf(hi - 1e-9) <= 0.975 + 0.01


def test_seeded_and_shared_by_cells_of_one_size() -> None:
    values = np.array([0.1, 0.7, 0.2, 3.0, 0.05, 1.1, 0.4])
    first = interval(values, np.ones(7))
    resample_counts.cache_clear()  # drawn again, as in another process
    assert interval(values, np.ones(7)) == first, "the same on every run"
    assert interval(values, np.ones(7), seed=1) != first
    counts = resample_counts(7)
    assert counts.shape == (2000, 7) and (counts.sum(axis=1) == 7).all()
    assert not counts.flags.writeable


def test_summarise_per_cell() -> None:
    partial = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1, 1],
            "head": [None, None, 2, 2, 2],
            "task": ["t"] * 5,
            "seq_len": [4, 8, 4, 8, 12],
            "program": [0, 0, 0, 0, 0],
            "x__sum": [1.0, 0.0, 3.0, 0.0, 2.0],
            "x__n": [1, 1, 3, 1, 0],  # the last program has no row of x in the cell
        }
    )
    got = summarise(partial, ["layer", "head"], ["x"])
    assert list(got.columns) == ["layer", "head", "x", "x_lo", "x_hi", "programs", "n"]
    assert got.layer.tolist() == [0, 1] and pd.isna(got["head"][0]), "a NULL key is a cell"
    assert got.programs.tolist() == [2, 2] and got.n.tolist() == [2, 4]
    assert got.x.tolist() == [0.5, 0.75]
    # layer 0: one 0/1 row a program, a share (Wilson's); layer 1: rows of 3 and 1, bootstrapped
    lo, hi = wilson([0.5], [2])
    assert (got.x_lo[0], got.x_hi[0]) == pytest.approx((lo[0], hi[0]))
    assert (got.x_lo[1], got.x_hi[1]) == (0.0, 1.0)


def test_cells_of_one_size_computed_together_equal_each_alone() -> None:
    """`summarise` stacks the cells of one size into one matrix product: each cell's numbers
    are those of `interval` on its own programs, whatever its neighbours."""
    rng = np.random.default_rng(3)
    rows = []
    for cell in range(40):
        for program in range(int(rng.integers(1, 9))):
            count = int(rng.integers(0, 4))  # 0: no row of x here
            rows.append((cell, program, rng.normal() * count, count))
    partial = pd.DataFrame(rows, columns=["cell", "program", "x__sum", "x__n"])
    got = summarise(partial.assign(task="t", seq_len=4), ["cell"], ["x"]).set_index("cell")
    for cell, part in partial[partial.x__n > 0].groupby("cell"):
        want = interval(part.x__sum.to_numpy(), part.x__n.to_numpy())
        row = got.loc[cell]
        assert (row.x, row.x_lo, row.x_hi) == pytest.approx(want, nan_ok=True), cell
        assert row.programs == len(part) and row.n == part.x__n.sum()


def test_wilson_by_hand() -> None:
    lo, hi = wilson([0.5, 0.0, 0.3], [100, 10, 0])
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half 1.96 * sqrt(0.0025 + 0.000096) / 1.0384
    assert lo[0] == pytest.approx(0.40383, abs=1e-4) and hi[0] == pytest.approx(0.59617, abs=1e-4)
    # p = 0, n = 10: [0, 2 * 0.19208 / 1.38416]
    assert lo[1] == pytest.approx(0.0, abs=1e-12) and hi[1] == pytest.approx(0.27754, abs=1e-4)
    assert math.isnan(lo[2]) and math.isnan(hi[2]), "no held-out programs"


def test_aggregate_intervals_are_the_program_bootstrap(run_dir) -> None:  # noqa: F811
    """A patching cell's interval is `interval` over its programs' sums and counts of rows."""
    con = connect(run_dir)
    got = queries.run(con, queries.HEATMAP_BY_LABEL).set_index(["model", "site", "layer", "label"])
    rows = con.execute(
        "SELECT * FROM patching WHERE top1_correct AND cf_top1_correct AND NOT heuristic"
    ).df()
    cell = rows[(rows.model == "org/a") & (rows.site == "attn_head") & (rows.layer == 1)]
    cell = cell[cell.label == "query_var"]
    per = cell.groupby(["task", "seq_len", "program"]).norm_effect.agg(["sum", "count"])
    want = interval(per["sum"].to_numpy(), per["count"].to_numpy())
    row = got.loc[("org/a", "attn_head", 1, "query_var")]
    assert (row.mean_effect, row.mean_effect_lo, row.mean_effect_hi) == pytest.approx(want)
    assert row.programs == len(per) == 2 and row.n == 4, "2 programs x 2 heads"


def test_views_carry_the_programs_columns(run_dir) -> None:  # noqa: F811
    con = connect(run_dir)
    for view in ("behavior", "patching"):
        n, files = (
            con.execute(f"SELECT count(*) FROM {v}").fetchone()[0] for v in (view, f"{view}_files")
        )
        assert n == files, "one row per row of the files"
    got = con.execute(
        "SELECT DISTINCT seq_len, program, depth, heuristic FROM patching ORDER BY ALL"
    ).fetchall()
    assert got == sorted((p[1], p[2], p[3], p[4]) for p in PROGRAMS)


def test_subtitle_counts_are_the_sql_counts(run_dir) -> None:  # noqa: F811
    con = connect(run_dir)
    counts = con.execute(
        """SELECT model,
                  count(DISTINCT (task, seq_len, program)) FILTER (
                      WHERE top1_correct AND cf_top1_correct AND NOT heuristic),
                  count(DISTINCT (task, seq_len, program))
           FROM patching WHERE counterfactual = 'root_value' GROUP BY model ORDER BY model"""
    ).fetchall()
    # (4, 0) is heuristic, (8, 1) answered wrong: two of four kept
    assert counts == [("org/a", 2, 4), ("org/b", 2, 4)]
    figure = FIGURES["patching_heatmap"]
    df = queries.run(con, figure.query)
    lines = subtitle_lines(con, figure, False, df)
    want = ", ".join(f"{k} of {n} ({m})" for m, k, n in counts)
    assert lines[0] == f"{KEPT_SHORT}: {want}"
    assert lines[1] == queries.BY_LABEL_DESCRIPTION
    every = subtitle_lines(con, figure, True, df)[0]
    assert every == "all programs: 4 (org/a), 4 (org/b)"
    accuracy = subtitle_lines(con, FIGURES["accuracy_vs_length"], False, df)[0]
    assert accuracy == "all programs: 4 (org/a), 4 (org/b)"
