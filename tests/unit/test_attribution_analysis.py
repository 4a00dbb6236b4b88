"""Analysis of attribution results on synthetic run folders with known values: the view, the
agreement of estimate and exact (Spearman, Pearson, top-k recall), the estimate heatmap, the
charts and the CLI."""

import math
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.attribution import ATTRIBUTION_SCHEMA
from analysis import charts, connect, queries
from analysis.__main__ import main, summary
from analysis.db import PROGRAM_COLUMNS
from tests.parquet_rows import write_part
from tests.unit.test_analysis import PROGRAMS, patching_rows, programs_table

LABELS = ["ref_depth_1_rhs", "query_var", "final_colon", None, ""]  # the last two: unlabelled
SCHEMA = ATTRIBUTION_SCHEMA  # the writer's own, so that the two cannot drift apart


def cell(program: tuple, site: str, layer: int, pos: int, estimate: float, **kw) -> dict:
    """One attribution row: clean logit diff -1, counterfactual +1 (so norm = value / 2)."""
    task, seq_len, index = program[:3]
    exact = kw.pop("exact", None)
    row = {
        "model": "org/a",
        "task": task,
        "seq_len": seq_len,
        "program": index,
        "site": site,
        "layer": layer,
        "head": None,
        "pos": pos,
        "token": "x",
        "label": "query_var",
        "clean_answer": "1",
        "cf_answer": "2",
        "answer_prefix": "",
        "top1_correct": True,
        "cf_top1_correct": True,
        "clean_logit_diff": -1.0,
        "cf_logit_diff": 1.0,
        "estimate": estimate,
        "norm_estimate": estimate / 2,
        "grad_drop": None,
        "attention_fix": False,
        "verify": None,
        "exact": exact,
        "norm_exact": None if exact is None else exact / 2,
        "exact_flipped": None if exact is None else exact > 1,
    }
    row.update(kw)
    return row


def attribution_rows(site: str, seed: int = 0) -> list[dict]:
    """Two layers x five positions (x two heads at attn_head) per program; random estimates,
    exact = estimate + noise on each program's 2 largest |estimate| (`top`) and 2 others
    (`random`). Program (8, 1) is answered wrong, as in the patching rows."""
    rng = random.Random(seed)
    rows = []
    for program in PROGRAMS:
        cells = [
            cell(program, site, layer, pos, rng.uniform(-1, 1), label=label, head=head)
            for layer in (0, 1)
            for pos, label in enumerate(LABELS)
            for head in ([0, 1] if site == "attn_head" else [None])
        ]
        # float32 round trip, so that the Python values are the ones the files hold
        for row in cells:
            row["estimate"] = float(pa.array([row["estimate"]], pa.float32())[0].as_py())
            row["norm_estimate"] = row["estimate"] / 2
            row["top1_correct"] = program[1:3] != (8, 1)
        order = sorted(cells, key=lambda r: -abs(r["estimate"]))
        picks = [(r, "top") for r in order[:2]] + [(r, "random") for r in rng.sample(order[2:], 2)]
        for row, kind in picks:
            exact = row["estimate"] + rng.gauss(0, 0.3)
            row.update(verify=kind, exact=exact, norm_exact=exact / 2, exact_flipped=exact > 1)
        rows += cells
    return rows


def write(root: Path, site: str, rows: list[dict], model: str = "org/a") -> None:
    write_part(root, "attribution", model, site, rows, "s1", schema=SCHEMA)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Attribution at resid_pre and attn_head; exact patching at resid_pre only, for org/a and
    org/b (which has no attribution)."""
    root = tmp_path / "run"
    root.mkdir()
    pq.write_table(programs_table(), root / "programs.parquet")
    for site in ("resid_pre", "attn_head"):
        write(root, site, attribution_rows(site))
    for model in ("org/a", "org/b"):
        write_part(root, "patching", model, "resid_pre", patching_rows(model, "resid_pre"), "p1")
    return root


def frame(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "attribution", partitioning=None).to_pandas()


def test_view_reads_the_files(run_dir) -> None:
    con = connect(run_dir)
    assert con.execute("SELECT count(*) FROM attribution").fetchone() == (4 * 10 * (1 + 2),)
    assert con.execute("SELECT DISTINCT model FROM attribution").fetchall() == [("org/a",)]
    assert con.execute("SELECT count(exact), count(verify) FROM attribution").fetchone() == (
        4 * 4 * 2,
        4 * 4 * 2,
    )
    assert con.execute(
        "SELECT typeof(estimate), typeof(head) FROM attribution LIMIT 1"
    ).fetchone() == (
        "FLOAT",
        "INTEGER",
    )


def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman's ρ by its definition: Pearson's r of the average ranks."""
    return x.rank(method="average").corr(y.rank(method="average"))


def test_agreement_correlations_match_pandas_and_scipy(run_dir) -> None:
    got = queries.run(connect(run_dir), queries.AGREEMENT).set_index("site")
    verified = frame(run_dir).dropna(subset=["exact"])
    for site, cells in verified.groupby("site"):
        row = got.loc[site]
        assert row.n == len(cells) == 4 * 4
        assert row.spearman == pytest.approx(spearman(cells.estimate, cells.exact), abs=1e-9)
        assert row.pearson == pytest.approx(cells.estimate.corr(cells.exact), abs=1e-6)
        try:
            from scipy.stats import spearmanr
        except ImportError:
            continue
        assert row.spearman == pytest.approx(spearmanr(cells.estimate, cells.exact)[0], abs=1e-9)


def test_spearman_averages_the_ranks_of_ties(tmp_path) -> None:
    """estimate 1, 2, 2, 4 (ranks 1, 2.5, 2.5, 4) against exact 1, 3, 2, 5 (ranks 1, 3, 2, 4):
    rank deviations (-1.5, 0, 0, 1.5) and (-1.5, .5, -.5, 1.5), so ρ = 4.5 / sqrt(4.5 * 5)."""
    program = PROGRAMS[1]
    rows = [
        cell(program, "resid_pre", layer, 0, est, exact=exact, verify="top")
        for layer, (est, exact) in enumerate([(1, 1), (2, 3), (2, 2), (4, 5)])
    ]
    write(tmp_path, "resid_pre", rows)
    got = queries.run(connect(tmp_path), queries.AGREEMENT).iloc[0]
    assert got.n == 4 and got.spearman == pytest.approx(3 / math.sqrt(10))
    assert got.spearman == pytest.approx(spearman(pd.Series([1, 2, 2, 4]), pd.Series([1, 3, 2, 5])))


def test_top_k_recall_on_a_hand_made_case(tmp_path) -> None:
    """Program A: estimates 5, -4, 3, 2, 1, .5 on six cells; the two largest verified as `top`
    (k = 2), the last two at random. Exact: 1, .1, -, -, 3, .2: the exact top 2 are cells 4 and
    0, the estimate top 4 cells 0-3: recall 1/2. Program B: a perfect estimate, recall 1.
    Program C has no `top` cell: left out."""
    a, b, c = PROGRAMS[1], PROGRAMS[2], PROGRAMS[3]
    verified_a = {0: ("top", 1.0), 1: ("top", 0.1), 4: ("random", 3.0), 5: ("random", 0.2)}
    rows = []
    for layer, est in enumerate([5, -4, 3, 2, 1, 0.5]):
        kind, exact = verified_a.get(layer, (None, None))
        rows.append(cell(a, "resid_pre", layer, 0, est, verify=kind, exact=exact))
        kind = "top" if layer < 2 else "random" if layer > 3 else None
        rows.append(cell(b, "resid_pre", layer, 0, est, verify=kind, exact=kind and est))
        kind = "random" if layer > 3 else None
        rows.append(cell(c, "resid_pre", layer, 0, est, verify=kind, exact=kind and 9.0))
    write(tmp_path, "resid_pre", rows)
    got = queries.run(connect(tmp_path), queries.AGREEMENT).iloc[0]
    assert (got.n, got.programs, got.k) == (4 + 4 + 2, 2, 2)
    assert got.top_k_recall == pytest.approx((0.5 + 1.0) / 2)


def kept_means(run_dir: Path) -> pd.DataFrame:
    """The estimate heatmap by pandas: kept programs (both runs right, root not on line 1-2),
    unlabelled positions as `other`, mean over programs, positions and heads."""
    df = frame(run_dir)
    heuristic = {(p[1], p[2]) for p in PROGRAMS if p[4]}
    keep = df.top1_correct & df.cf_top1_correct
    keep &= ~pd.MultiIndex.from_arrays([df.seq_len, df.program]).isin(heuristic)
    df = df[keep].assign(label=df.label.where(df.label != "").fillna("other"))
    means = df.groupby(["model", "site", "layer", "label"]).norm_estimate.mean()
    return means.rename("mean_effect").reset_index()


def test_heatmap_means_match_pandas(run_dir) -> None:
    con = connect(run_dir)
    want = kept_means(run_dir).set_index(["model", "site", "layer", "label"]).mean_effect
    got = queries.run(con, queries.ATTRIBUTION_BY_LABEL)
    got = got.set_index(["model", "site", "layer", "label"])
    assert set(got.index.get_level_values("label")) == {
        "ref_depth_1_rhs",
        "query_var",
        "final_colon",
        "other",
    }
    assert len(got) == len(want) == 2 * 2 * 4
    pd.testing.assert_series_equal(
        got.mean_effect.sort_index(), want.sort_index(), check_dtype=False, atol=1e-6
    )
    n = got.loc[("org/a", "attn_head", 0, "other"), "n"]
    assert n == 2 * 2 * 2, "2 kept programs x 2 unlabelled positions x 2 heads"
    assert queries.run(con, queries.ATTRIBUTION_BY_LABEL, include_all=True).n.sum() == 4 * 30


def test_heatmap_sets_exact_beside_estimate_where_patched(run_dir) -> None:
    con = connect(run_dir)
    heat = queries.run(con, queries.ATTRIBUTION_HEATMAP)
    estimate = heat[heat.kind == "estimate"].drop(columns="kind").reset_index(drop=True)
    alone = queries.run(con, queries.ATTRIBUTION_BY_LABEL)
    # (the union reads the test's int64 patching layers and int32 attribution ones as int64)
    pd.testing.assert_frame_equal(estimate, alone, check_dtype=False)
    exact = heat[heat.kind == "exact"]
    assert set(zip(exact.model, exact.site, strict=True)) == {("org/a", "resid_pre")}, (
        "exact only where the model has estimates and the site was patched"
    )
    patched = queries.run(con, queries.HEATMAP_BY_LABEL)
    patched = patched[patched.model == "org/a"].reset_index(drop=True)
    exact = exact.drop(columns="kind").reset_index(drop=True)
    pd.testing.assert_frame_equal(exact, patched, check_dtype=False)


def test_charts_build_and_save(run_dir, tmp_path) -> None:
    con = connect(run_dir)
    agreement = queries.run(con, queries.AGREEMENT).set_index("site")
    cells = queries.run(con, queries.ATTRIBUTION_VERIFIED)
    assert len(cells) == 2 * 16 and set(cells.verify) == {"top", "random"}
    scatter = charts.attribution_scatter(cells)
    spec = scatter.to_dict()
    assert spec["facet"]["field"] == "panel" and spec["resolve"]["scale"]["x"] == "independent"
    rows = next(iter(spec["datasets"].values()))
    titles = {r["panel"] for r in rows}
    assert titles == {
        f"{site} · ρ = {agreement.loc[site].spearman:.2f}, n = 16"
        for site in ("resid_pre", "attn_head")
    }
    rule, points = spec["spec"]["layer"]
    assert rule["mark"]["type"] == "rule" and rule["encoding"]["x2"]["field"] == "hi"
    assert points["encoding"]["color"]["scale"]["domain"] == ["top", "random"]

    heat = queries.run(con, queries.ATTRIBUTION_HEATMAP)
    chart = charts.attribution_heatmap(heat)
    spec = chart.to_dict()
    assert {k: v["field"] for k, v in spec["facet"].items()} == {"row": "site", "column": "panel"}
    rows = next(iter(spec["datasets"].values()))
    assert {r["panel"] for r in rows} == {"estimate", "exact"}
    scale = spec["spec"]["encoding"]["color"]["scale"]
    assert scale["domain"] == [-1, 1] and scale["domainMid"] == 0, "the one effect scale"
    for name, drawn in (("attribution_scatter", scatter), ("attribution_heatmap", chart)):
        png, svg, html = charts.save(drawn, tmp_path / "charts", name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert svg.read_text().lstrip().startswith("<svg") and "vega" in html.read_text()


def test_panels_name_the_model_where_there_are_several(run_dir) -> None:
    rows = [r | {"model": "org/b"} for r in attribution_rows("resid_pre", seed=1)]
    write(run_dir, "resid_pre", rows, model="org--b")
    con = connect(run_dir)
    cells = queries.run(con, queries.ATTRIBUTION_VERIFIED)
    rows = next(iter(charts.attribution_scatter(cells).to_dict()["datasets"].values()))
    assert {r["panel"].split(" · ")[0] for r in rows} == {"org/a", "org/b"}
    heat = queries.run(con, queries.ATTRIBUTION_HEATMAP)
    rows = next(iter(charts.attribution_heatmap(heat).to_dict()["datasets"].values()))
    assert {r["panel"] for r in rows} == {
        "org/a · estimate",
        "org/a · exact",
        "org/b · estimate",
        "org/b · exact",
    }


def test_cli_writes_the_charts_and_the_agreement(run_dir, tmp_path, capsys) -> None:
    assert main([str(run_dir), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "attribution estimate against exact patching, verified cells" in out
    table = out[out.index("verified cells") :].splitlines()
    assert table[1].split() == [
        "model",
        "site",
        "n",
        "programs",
        "spearman",
        "pearson",
        "k",
        "top_k_recall",
        "top_k_recall",
        "95%",
        "CI",
    ]
    fields = table[2].split()  # sites in order: attn_head first; k = 2 top cells a program
    assert fields[:4] == ["org/a", "attn_head", "16", "4"] and fields[6] == "2"
    written = {p.stem for p in (tmp_path / "c").glob("*.png")}
    assert {"attribution_scatter", "attribution_heatmap", "patching_heatmap"} <= written


def test_a_run_without_attribution_still_works(tmp_path, capsys) -> None:
    root = tmp_path / "run"
    (root / "patching").mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    rows = patching_rows("org/a", "resid_pre")
    pq.write_table(pa.Table.from_pylist(rows), root / "patching" / "p.parquet")
    con = connect(root)
    assert con.execute("SELECT count(*) FROM attribution").fetchone() == (0,)
    for sql in (queries.AGREEMENT, queries.ATTRIBUTION_HEATMAP, queries.ATTRIBUTION_VERIFIED):
        assert len(queries.run(con, sql)) == 0
    assert "attribution" not in summary(con, include_all=False)
    assert main([str(root), "--out", str(tmp_path / "c")]) == 0
    written = {p.stem for p in (tmp_path / "c").glob("*.png")}
    assert "patching_heatmap" in written and not any(w.startswith("attribution") for w in written)


def test_agreement_over_every_cell_the_run_also_patched(tmp_path) -> None:
    """Attribution rows joined with the run's own patching rows by cell: Spearman and Pearson
    of estimate against patched - clean over every joined cell, and the top-10-in-top-20 share
    per program, against pandas."""
    rng = random.Random(3)
    root = tmp_path / "run"
    root.mkdir()
    pq.write_table(programs_table(), root / "programs.parquet")
    for site in ("resid_pre", "attn_head"):
        patched = patching_rows("org/a", site)
        rows = []
        for p in patched:
            exact = p["patched_logit_diff"] - p["clean_logit_diff"]
            program = (p["task"], p["seq_len"], p["program"])
            estimate = float(pa.array([exact + rng.gauss(0, 0.5)], pa.float32())[0].as_py())
            rows.append(cell(program, site, p["layer"], p["pos"], estimate, head=p["head"]))
        write(root, site, rows)
        # One patched cell without an estimate: the join leaves it out.
        write_part(root, "patching", "org/a", site, patched, "p1")
    got = queries.run(connect(root), queries.AGREEMENT_ALL_CELLS).set_index("site")
    est = frame(root)
    pat = pq.read_table(root / "patching", partitioning=None).to_pandas()
    pat["exact"] = (pat.patched_logit_diff - pat.clean_logit_diff).astype("float32")
    key = ["task", "seq_len", "program", "site", "layer", "pos"]
    for site in ("resid_pre", "attn_head"):
        keys = key + (["head"] if site == "attn_head" else [])
        joined = est[est.site == site].merge(pat[pat.site == site][[*keys, "exact"]], on=keys)
        joined = joined.drop(columns=["exact_x"]).rename(columns={"exact_y": "exact"})
        row = got.loc[site]
        assert row.cells == len(joined) == len(pat[pat.site == site])
        assert row.spearman == pytest.approx(spearman(joined.estimate, joined.exact), abs=1e-6)
        assert row.pearson == pytest.approx(joined.estimate.corr(joined.exact), abs=1e-5)
        shares = []
        for _, p in joined.groupby(["task", "seq_len", "program"]):
            top = set(p.exact.abs().nlargest(10).index)
            shares.append(len(top & set(p.estimate.abs().nlargest(20).index)) / len(top))
        assert row.programs == len(shares)
        assert row.top10_in_top20 == pytest.approx(sum(shares) / len(shares))


def test_the_empty_view_has_the_writers_columns(tmp_path) -> None:
    con = connect(tmp_path)
    columns = [r[0] for r in con.execute("DESCRIBE attribution_files").fetchall()]
    assert columns == [*ATTRIBUTION_SCHEMA.names, "step"], "the writer's, then the worker's step"
    columns = [r[0] for r in con.execute("DESCRIBE attribution").fetchall()]
    assert columns == [*ATTRIBUTION_SCHEMA.names, "step", *PROGRAM_COLUMNS], "and the program's"
