"""Analysis of attention-knockout results on synthetic run folders with known values: the view,
the routing map over the kept programs, the root edge's top heads, the chart and the CLI."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors.knockout import KNOCKOUT_SCHEMA
from analysis import charts, connect, queries
from analysis.__main__ import CHARTS, main, summary
from analysis.db import PROGRAM_COLUMNS
from tests.parquet_rows import write_part
from tests.unit.test_analysis import PROGRAMS, behavior_table, programs_table

SCHEMA = KNOCKOUT_SCHEMA  # the writer's own, so that the two cannot drift apart
SOURCES = ("ref_depth_1_rhs", "ref_depth_2_rhs", "query_var")
# norm_effect of the root edge at the answer, by (layer, head), for org/a (org/b: negated); the
# other sources and scope `later` read half of it. Kept programs add 0.01 * program; the
# heuristic (4, 0) and the wrong (8, 1) read 9.0, which no kept mean can hide.
ROOT = {(0, 0): 0.1, (0, 1): -0.6, (1, 0): 0.4, (1, 1): 0.05}
DROPPED = {(4, 0), (8, 1)}


def norm(model: str, program: tuple, layer: int, head: int, source: str, scope: str):
    """The norm_effect of one row (None: the gap was too small, program (8, 0) at L1H1)."""
    seq_len, index = program[1:3]
    if (seq_len, index) in DROPPED:
        return 9.0
    if (seq_len, index, layer, head) == (8, 0, 1, 1):
        return None
    base = ROOT[layer, head] * (-1 if model == "org/b" else 1)
    if (source, scope) != ("ref_depth_1_rhs", "answer"):
        base /= 2
    return base + 0.01 * index


def knockout_rows(model: str, scope: str) -> list[dict]:
    rows = []
    for program in PROGRAMS:
        task, seq_len, index = program[:3]
        for layer, head in ROOT:
            for pos, source in enumerate(SOURCES):
                value = norm(model, program, layer, head, source, scope)
                effect = None if value is None else 2 * value
                rows.append(
                    {
                        "model": model,
                        "task": task,
                        "seq_len": seq_len,
                        "program": index,
                        "layer": layer,
                        "head": head,
                        "source": source,
                        "source_pos": pos,
                        "scope": scope,
                        "token": "x",
                        "clean_answer": "1",
                        "cf_answer": "2",
                        "answer_prefix": "",
                        "top1_correct": (seq_len, index) != (8, 1),
                        "clean_logit_diff": -1.0,
                        "cf_logit_diff": 1.0 if value is not None else -1.0,
                        "knocked_logit_diff": -1.0 + (effect or 0.0),
                        "effect": effect or 0.0,
                        "norm_effect": value,
                        "top1_changed": value is not None and value > 0.5,
                    }
                )
    return rows


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Knockout for org/a at both scopes and org/b at `answer` only, beside behaviour rows."""
    root = tmp_path / "run"
    root.mkdir()
    pq.write_table(programs_table(), root / "programs.parquet")
    for model, scopes in (("org/a", ("answer", "later")), ("org/b", ("answer",))):
        for scope in scopes:
            write_part(root, "knockout", model, scope, knockout_rows(model, scope), "s1", SCHEMA)
        write_part(root, "behavior", model, "binding", behavior_table(model, [True] * 4), "b1")
    return root


def test_view_reads_the_files_with_their_own_model_ids(run_dir) -> None:
    con = connect(run_dir)
    assert con.execute("SELECT count(*) FROM knockout").fetchone() == (3 * 4 * 4 * 3,)
    got = con.execute(
        "SELECT model, scope, count(*) FROM knockout GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    assert got == [("org/a", "answer", 48), ("org/a", "later", 48), ("org/b", "answer", 48)]
    columns = [r[0] for r in con.execute("DESCRIBE knockout_files").fetchall()]
    assert columns == [*SCHEMA.names, "step"], "the writer's columns, then the worker's step"
    columns = [r[0] for r in con.execute("DESCRIBE knockout").fetchall()]
    assert columns == [*SCHEMA.names, "step", *PROGRAM_COLUMNS], "then the program's"


def test_routing_map_keeps_right_non_heuristic_programs(run_dir) -> None:
    con = connect(run_dir)
    routes = queries.run(con, queries.ROUTING_MAP)
    assert len(routes) == 3 * 4 * 3  # (model, scope) x (layer, head) x source
    cell = routes.set_index(["model", "scope", "source", "layer", "head"])
    # kept: (4, 1) and (8, 0), program indices 1 and 0
    a = cell.loc[("org/a", "answer", "ref_depth_1_rhs", 0, 1)]
    assert a.n == 2 and a.mean_effect == pytest.approx(-0.6 + 0.005)
    later = cell.loc[("org/a", "later", "query_var", 1, 0)]
    assert later.n == 2 and later.mean_effect == pytest.approx(0.2 + 0.005)
    # a null norm_effect (gap < 1e-3) is not counted: L1H1 reads program (4, 1) alone
    b = cell.loc[("org/b", "answer", "ref_depth_1_rhs", 1, 1)]
    assert b.n == 1 and b.mean_effect == pytest.approx(-0.05 + 0.01)
    every = queries.run(con, queries.ROUTING_MAP, include_all=True).set_index(
        ["model", "scope", "source", "layer", "head"]
    )
    c = every.loc[("org/a", "answer", "ref_depth_1_rhs", 0, 1)]
    assert c.n == 4 and c.mean_effect == pytest.approx((-0.6 + 0.01 - 0.6 + 9.0 + 9.0) / 4)


def test_top_root_heads_rank_by_size_either_way(run_dir) -> None:
    top = queries.run(connect(run_dir), queries.TOP_ROOT_HEADS, k=3)
    got = {
        model: [(r.layer, r.head, round(r.mean_effect, 4)) for r in rows.itertuples()]
        for model, rows in top.groupby("model")
    }
    assert got == {
        "org/a": [(0, 1, -0.595), (1, 0, 0.405), (0, 0, 0.105)],
        "org/b": [(0, 1, 0.605), (1, 0, -0.395), (0, 0, -0.095)],
    }


def test_the_kept_filter_is_one_for_every_view() -> None:
    """Knockout asks only `top1_correct`; patching and attribution also the counterfactual's."""
    assert "p.top1_correct AND p.cf_top1_correct AND NOT" in queries._kept("patching")
    knocked = queries._kept("knockout", correct=queries.KNOCKOUT_CORRECT)
    assert "cf_top1_correct" not in knocked and "(p.top1_correct AND NOT" in knocked


def test_routing_map_chart(run_dir, tmp_path) -> None:
    assert CHARTS["routing_map"] == (queries.ROUTING_MAP, charts.routing_map)
    df = queries.run(connect(run_dir), queries.ROUTING_MAP)
    chart = charts.routing_map(df)
    spec = chart.to_dict()
    assert {k: v["field"] for k, v in spec["facet"].items()} == {"row": "panel", "column": "source"}
    assert spec["facet"]["column"]["sort"] == list(SOURCES)
    enc = spec["spec"]["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color")} == {
        "x": "head",
        "y": "layer",
        "color": "mean_effect",
    }
    scale = enc["color"]["scale"]
    assert scale["scheme"] == charts.DIVERGING and scale["domainMid"] == 0
    assert scale["domain"] == [-1, 1], "the patching heatmap's scale"
    panels = {row["panel"] for row in spec["datasets"][spec["data"]["name"]]}
    assert panels == {"org/a · scope: answer", "org/a · scope: later", "org/b · scope: answer"}
    assert spec["config"]["axis"]["grid"] is False, "the theme is on"
    png, svg, _ = charts.save(chart, tmp_path / "charts", "routing_map")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip()[:4] == "<svg"


def test_cli_writes_the_routing_map_and_the_root_heads(run_dir, tmp_path, capsys) -> None:
    assert main([str(run_dir), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    head = out.index("knockout of the root edge (source ref_depth_1_rhs, scope answer)")
    lines = out[head:].splitlines()
    assert "programs whose top-1 is the answer (top1_correct), root not on line 1-2" in lines[0]
    assert lines[1].split() == [
        *("model", "layer", "head", "mean_effect", "mean_effect", "95%", "CI", "programs", "n")
    ]
    # (model, layer, head, mean_effect), then after the interval: programs, rows
    rows = [(r.split()[:4], r.split()[-2:]) for r in lines[2:8]]
    assert rows == [
        (["org/a", "0", "1", "-0.595"], ["2", "2"]),
        (["org/a", "1", "0", "0.405"], ["2", "2"]),
        (["org/a", "0", "0", "0.105"], ["2", "2"]),
        (["org/b", "0", "1", "0.605"], ["2", "2"]),
        (["org/b", "1", "0", "-0.395"], ["2", "2"]),
        (["org/b", "0", "0", "-0.095"], ["2", "2"]),
    ]
    assert "routing_map" in {p.stem for p in (tmp_path / "c").glob("*.png")}


def test_a_run_without_a_knockout_folder_still_works(tmp_path, capsys) -> None:
    root = tmp_path / "run"
    (root / "behavior").mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    pq.write_table(behavior_table("org/a", [True] * 4), root / "behavior" / "b.parquet")
    con = connect(root)
    columns = [r[0] for r in con.execute("DESCRIBE knockout_files").fetchall()]
    assert columns == [*SCHEMA.names, "step"], "the writer's columns, then the worker's step"
    columns = [r[0] for r in con.execute("DESCRIBE knockout").fetchall()]
    assert columns == [*SCHEMA.names, "step", *PROGRAM_COLUMNS], "then the program's"
    for sql in (queries.ROUTING_MAP, queries.TOP_ROOT_HEADS):
        assert len(queries.run(con, sql)) == 0
    assert "knockout of the root edge" not in summary(con, include_all=False)
    assert main([str(root), "--out", str(tmp_path / "c")]) == 0
    assert "knockout of the root edge" not in capsys.readouterr().out
    written = {p.stem for p in (tmp_path / "c").glob("*.png")}
    assert "accuracy_by_depth" in written and "routing_map" not in written
