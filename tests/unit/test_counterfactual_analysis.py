"""Analysis of patching from several counterfactual kinds on synthetic run folders with known
values: old files read as root-value rows, the root-value aggregates ignore the other kinds, the
control table and the by-label means against pandas, the chart and the CLI."""

import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import charts, connect, queries
from analysis.__main__ import CHARTS, main, summary
from orchestrator.tasks.counterfactuals import KINDS
from tests.parquet_rows import view_schema, write_part
from tests.unit.test_analysis import PROGRAMS, patching_rows, programs_table
from tests.unit.test_attribution_analysis import cell
from tests.unit.test_attribution_analysis import write as write_attribution

SCHEMA = view_schema("patching")
LABELS = ("ref_depth_1_rhs", "distractor_rhs", "query_var", "final_colon")
DROPPED = {(4, 0), (8, 1)}  # heuristic (root on line 1-2) and answered wrong


def kind_rows(model: str, site: str, kind: str, seed: int = 0) -> list[dict]:
    """Two layers x four labels (x two heads at attn_head) per program, of one counterfactual
    kind. norm_effect: root_value layer + 0.1 * program + head; query_swap uniform in (-1, 1);
    the controls small (gauss, sd 0.05). The dropped programs read 9.0, which no kept mean can
    hide, and the distractor of program (4, 1) is no longer answered right (cf_top1_correct)."""
    rng = random.Random(f"{seed} {model} {site} {kind}")
    control = kind in ("distractor", "reassign")
    rows = []
    for task, seq_len, program, _, _ in PROGRAMS:
        for layer in (0, 1):
            for pos, label in enumerate(LABELS):
                for head in [0, 1] if site == "attn_head" else [None]:
                    if (seq_len, program) in DROPPED:
                        effect = 9.0
                    elif kind == "root_value":
                        effect = layer + 0.1 * program + (head or 0)
                    elif kind == "query_swap":
                        effect = rng.uniform(-1, 1)
                    else:
                        effect = rng.gauss(0, 0.05)
                    # float32, so that the Python values are the ones the files hold
                    effect = float(pa.array([effect], pa.float32())[0].as_py())
                    rows.append(
                        {
                            "model": model,
                            "task": task,
                            "seq_len": seq_len,
                            "program": program,
                            "site": site,
                            "layer": layer,
                            "head": head,
                            "pos": pos,
                            "token": "x",
                            "label": label,
                            "clean_answer": "1",
                            "cf_answer": "1" if control else "3" if kind == "query_swap" else "2",
                            "top1": "1",
                            "top1_candidate": True,
                            "top1_correct": (seq_len, program) != (8, 1),
                            "cf_top1_correct": not (kind == "distractor" and program == 1),
                            "clean_logit_diff": -1.0,
                            "cf_logit_diff": 0.0 if control else 1.0,
                            "patched_logit_diff": -1.0 + 2 * effect,
                            "norm_effect": effect,
                            "flipped": abs(effect) > (0.05 if control else 0.5),
                            "counterfactual": kind,
                            "contrast_answer": "2" if control else None,
                            "contrast_logit_diff": 1.0,
                        }
                    )
    for row in rows:
        row["contrast_answer"] = row["contrast_answer"] or row["cf_answer"]
    return rows


def write(root: Path, model: str, site: str, kinds: tuple[str, ...], name: str = "p") -> None:
    for kind in kinds:
        rows = kind_rows(model, site, kind)
        write_part(root, "patching", model, site, rows, f"{name}-{kind}", SCHEMA)


def new_run(root: Path, kinds: tuple[str, ...] = KINDS) -> Path:
    """org/a at resid_pre and attn_head from `kinds`; org/b at resid_pre from root_value only."""
    root.mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    for site in ("resid_pre", "attn_head"):
        write(root, "org/a", site, kinds)
    write(root, "org/b", "resid_pre", ("root_value",))
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return new_run(tmp_path / "run")


def frame(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "patching", partitioning=None).to_pandas()


def kept(root: Path) -> pd.DataFrame:
    """The kept rows by pandas, of every kind: both runs right, root not on line 1-2."""
    df = frame(root)
    heuristic = {(p[1], p[2]) for p in PROGRAMS if p[4]}
    keep = df.top1_correct & df.cf_top1_correct
    return df[keep & ~pd.MultiIndex.from_arrays([df.seq_len, df.program]).isin(heuristic)]


def test_the_writer_columns_lead_the_view() -> None:
    """The test's files carry the view's columns; the writer's are those, in order (it appends
    the counterfactual columns at the end, and the worker the model's training step)."""
    from actors.patching import PATCHING_SCHEMA

    assert SCHEMA.names[-4:] == [
        "counterfactual",
        "contrast_answer",
        "contrast_logit_diff",
        "step",
    ]
    assert SCHEMA.names[: len(PATCHING_SCHEMA)] == PATCHING_SCHEMA.names


def test_old_files_read_as_root_value_alone_and_beside_new_ones(tmp_path) -> None:
    root = tmp_path / "run"
    (root / "patching").mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    old = pa.Table.from_pylist(patching_rows("org/a", "resid_pre", old=True))
    assert "counterfactual" not in old.column_names and "clean_correct" in old.column_names
    pq.write_table(old, root / "patching" / "old.parquet")
    alone = connect(root).execute(
        "SELECT counterfactual, count(*), count_if(contrast_answer = cf_answer), "
        "count_if(contrast_logit_diff = cf_logit_diff), count(top1_correct) FROM patching "
        "GROUP BY 1"
    )
    assert alone.fetchall() == [("root_value", len(old), len(old), len(old), len(old))]
    write(root, "org/b", "resid_pre", ("root_value", "distractor"), name="new")
    con = connect(root)
    columns = {r[0]: r[1] for r in con.execute("DESCRIBE patching").fetchall()}
    assert [columns[name] for name in SCHEMA.names[-4:-1]] == ["VARCHAR", "VARCHAR", "FLOAT"]
    got = con.execute(
        "SELECT model, counterfactual, any_value(contrast_answer), any_value(cf_answer), "
        "any_value(contrast_logit_diff), any_value(cf_logit_diff), count(*), "
        "count(top1_correct) FROM patching GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    n = 4 * 2 * len(LABELS)
    assert got == [
        ("org/a", "root_value", "2", "2", 1.0, 1.0, len(old), len(old)),  # from the cf columns
        ("org/b", "distractor", "2", "1", 1.0, 0.0, n, n),  # their own
        ("org/b", "root_value", "2", "2", 1.0, 1.0, n, n),
    ]
    # The old rows stay in the root-value aggregates: org/a's resid_pre cell as before.
    heat = queries.run(con, queries.HEATMAP_BY_LABEL).set_index(["model", "layer", "label"])
    assert heat.loc[("org/a", 1, "query_var")].mean_effect == pytest.approx((1.1 + 1.0) / 2)


def test_root_value_aggregates_ignore_the_other_kinds(tmp_path) -> None:
    """Every root-value aggregate, kept or `include_all`, reads the same with or without the
    other kinds' rows (whose dropped programs read 9.0 and whose kept ones differ), and so does
    the agreement of attribution with the run's exact patching."""
    root_only, every = tmp_path / "root", tmp_path / "every"
    for root, kinds in ((root_only, ("root_value",)), (every, KINDS)):
        new_run(root, kinds)
        rows = []
        for p in kind_rows("org/a", "resid_pre", "root_value"):
            program = (p["task"], p["seq_len"], p["program"])
            rows.append(cell(program, "resid_pre", p["layer"], p["pos"], 0.1 * p["pos"]))
        write_attribution(root, "resid_pre", rows)
    assert connect(every).execute("SELECT count(DISTINCT counterfactual) FROM patching").fetchone()[
        0
    ] == len(KINDS)
    named = [
        "HEATMAP_BY_LABEL",
        "HEATMAP_BY_POSITION",
        "FLIP_RATE",
        "HEADS",
        "TOP_CELLS",
        "COVERAGE",
        "ATTRIBUTION_HEATMAP",
        "AGREEMENT_ALL_CELLS",
    ]
    for name in named:
        for include_all in (False, True):
            sql = getattr(queries, name)
            want = queries.run(connect(root_only), sql, include_all=include_all)
            got = queries.run(connect(every), sql, include_all=include_all)
            assert len(want), name
            pd.testing.assert_frame_equal(got, want, obj=f"{name}, include_all={include_all}")


def test_control_table_matches_pandas(run_dir) -> None:
    got = queries.run(connect(run_dir), queries.COUNTERFACTUAL_CONTROL)
    assert list(got.columns) == [
        "model",
        "site",
        "counterfactual",
        "programs",
        "rows",
        *("mean_effect", "mean_effect_lo", "mean_effect_hi"),
        *("mean_abs_effect", "mean_abs_effect_lo", "mean_abs_effect_hi"),
        "max_cell_effect",
        *("flip_rate", "flip_rate_lo", "flip_rate_hi"),
    ]
    assert list(zip(got.site, got.counterfactual, strict=True)) == [
        (site, kind) for site in ("attn_head", "resid_pre") for kind in KINDS
    ], "org/b (root_value alone) left out; kinds in their order, root_value first"
    df = kept(run_dir)
    df = df[df.model == "org/a"]
    key = ["model", "site", "counterfactual"]
    cells = df.groupby([*key, "layer", "label", "head"], dropna=False).norm_effect.mean().abs()
    want = pd.DataFrame(
        {
            "programs": df.groupby(key).apply(
                lambda g: g[["seq_len", "program"]].drop_duplicates().shape[0],
                include_groups=False,
            ),
            "rows": df.groupby(key).size(),
            "mean_effect": df.groupby(key).norm_effect.mean(),
            "mean_abs_effect": df.norm_effect.abs().groupby([df[k] for k in key]).mean(),
            "max_cell_effect": cells.groupby(level=key).max(),
            "flip_rate": df.groupby(key).flipped.mean(),
        }
    )
    got = got.set_index(key)
    pd.testing.assert_frame_equal(
        got[list(want.columns)].sort_index(),
        want.sort_index(),
        check_dtype=False,
        check_names=False,
        atol=1e-6,
    )
    assert got.loc[("org/a", "resid_pre", "distractor"), "programs"] == 1, (
        "the distractor of (4, 1) is no longer answered right: only (8, 0) is kept"
    )
    assert got.loc[("org/a", "resid_pre", "root_value"), "max_cell_effect"] == pytest.approx(
        1.05, abs=1e-6
    ), "layer 1: 1 + mean(0.1, 0.0)"
    every = queries.run(connect(run_dir), queries.COUNTERFACTUAL_CONTROL, include_all=True)
    assert set(every.programs) == {4} and every.max_cell_effect.min() > 4, "9.0 read in"


def test_by_label_means_match_pandas(run_dir) -> None:
    got = queries.run(connect(run_dir), queries.COUNTERFACTUAL_BY_LABEL)
    key = ["model", "counterfactual", "site", "layer", "label"]
    assert list(got.columns) == [
        *(*key, "mean_effect", "mean_effect_lo", "mean_effect_hi", "programs", "n")
    ]
    assert list(dict.fromkeys(got.counterfactual)) == list(KINDS)
    df = kept(run_dir)
    df = df[df.model == "org/a"]
    want = df.groupby(key).norm_effect.agg(["mean", "count"])
    want.columns = ["mean_effect", "n"]
    pd.testing.assert_frame_equal(
        got.set_index(key)[["mean_effect", "n"]].sort_index(),
        want.sort_index(),
        check_dtype=False,
        atol=1e-6,
    )
    n = got.set_index(key).loc[("org/a", "root_value", "attn_head", 0, "query_var"), "n"]
    assert n == 2 * 2, "2 kept programs x 2 heads"
    # The root-value panels are the patching heatmap's cells.
    root = got[got.counterfactual == "root_value"].drop(columns="counterfactual")
    heat = queries.run(connect(run_dir), queries.HEATMAP_BY_LABEL)
    pd.testing.assert_frame_equal(
        root.reset_index(drop=True), heat[heat.model == "org/a"].reset_index(drop=True)
    )


def test_a_root_value_run_has_no_control_rows(tmp_path) -> None:
    con = connect(new_run(tmp_path / "run", ("root_value",)))
    for sql in (queries.COUNTERFACTUAL_CONTROL, queries.COUNTERFACTUAL_BY_LABEL):
        assert len(queries.run(con, sql, include_all=True)) == 0


def test_chart_has_a_column_per_kind_on_the_patching_scale(tmp_path) -> None:
    assert CHARTS["counterfactual_heatmap"] == (
        queries.COUNTERFACTUAL_BY_LABEL,
        charts.counterfactual_heatmap,
    )
    root = new_run(tmp_path / "run", ("reassign", "root_value", "distractor"))
    df = queries.run(connect(root), queries.COUNTERFACTUAL_BY_LABEL)
    chart = charts.counterfactual_heatmap(df)
    spec = chart.to_dict()
    facet = spec["facet"]
    assert {k: v["field"] for k, v in facet.items()} == {"row": "panel", "column": "counterfactual"}
    assert facet["column"]["sort"] == ["root_value", "distractor", "reassign"]
    rows = spec["datasets"][spec["data"]["name"]]
    assert {r["counterfactual"] for r in rows} == {"root_value", "distractor", "reassign"}
    assert {r["panel"] for r in rows} == {"resid_pre", "attn_head"}, "one model: site alone"
    assert "the controls' answer does not change" in spec["title"]
    enc = spec["spec"]["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color")} == {
        "x": "label",
        "y": "layer",
        "color": "mean_effect",
    }
    assert enc["x"]["sort"] == ["ref_depth_1_rhs", "distractor_rhs", "query_var", "final_colon"]
    patching = charts.patching_heatmap(df).to_dict()["spec"]["encoding"]["color"]
    assert enc["color"] == patching, "the patching heatmap's scale, over the same cells"
    assert df.mean_effect.abs().max() > 1, "beyond the scale: clamped"
    scale = enc["color"]["scale"]
    assert scale["scheme"] == charts.DIVERGING and scale["domainMid"] == 0
    assert scale["domain"] == [-1, 1] and scale["clamp"] is True
    assert spec["config"]["axis"]["grid"] is False, "the theme is on"
    png, svg, _ = charts.save(chart, tmp_path / "charts", "counterfactual_heatmap")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip()[:4] == "<svg"
    write(root, "org/b", "resid_pre", ("distractor",), name="more")
    df = queries.run(connect(root), queries.COUNTERFACTUAL_BY_LABEL)
    rows = next(iter(charts.counterfactual_heatmap(df).to_dict()["datasets"].values()))
    assert {r["panel"] for r in rows} == {
        "org/a · resid_pre",
        "org/a · attn_head",
        "org/b · resid_pre",
    }


def test_cli_prints_the_control_table_and_writes_the_chart(run_dir, tmp_path, capsys) -> None:
    assert main([str(run_dir), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("patching effect by counterfactual kind") :].split("\n\n")[0]
    lines = table.splitlines()
    assert "programs whose top-1 is the answer in both runs" in lines[0]
    assert lines[1].split()[:5] == ["model", "site", "counterfactual", "programs", "rows"]
    assert [line.split()[2] for line in lines[2:-1]] == list(KINDS) * 2
    assert lines[-1] == "(8 of 8 rows rest on fewer than 10 programs)"
    assert out.index("top (site, layer, label) cells") < out.index("by counterfactual kind")
    png = tmp_path / "c" / "counterfactual_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_root_value_run_prints_and_saves_what_an_old_one_did(tmp_path, capsys) -> None:
    """The same root-value rows in the new schema and in the old one (no counterfactual
    columns): the same summary, the same charts, no control table nor chart."""
    new, old = tmp_path / "new", tmp_path / "old"
    for root, schema in ((new, SCHEMA), (old, None)):
        (root / "patching").mkdir(parents=True)
        pq.write_table(programs_table(), root / "programs.parquet")
        for site in ("resid_pre", "attn_head"):
            rows = patching_rows("org/a", site)
            if schema is not None:
                for row in rows:
                    row.update(
                        counterfactual="root_value",
                        contrast_answer=row["cf_answer"],
                        contrast_logit_diff=row["cf_logit_diff"],
                    )
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, root / "patching" / f"{site}.parquet")
    assert "counterfactual" not in pq.read_schema(old / "patching" / "resid_pre.parquet").names
    text = summary(connect(new), include_all=False)
    assert text == summary(connect(old), include_all=False)
    assert "counterfactual kind" not in text and "top (site, layer, label) cells" in text
    written = {}
    for root in (new, old):
        assert main([str(root), "--out", str(root / "c")]) == 0
        written[root] = sorted(p.name for p in (root / "c").iterdir())
    assert written[new] == written[old] and "patching_heatmap.png" in written[new]
    assert not any(name.startswith("counterfactual") for name in written[new])
    assert "counterfactual kind" not in capsys.readouterr().out
