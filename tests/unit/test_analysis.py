"""Analysis on a synthetic results folder with known values: views, aggregates, charts, CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import charts, connect, queries
from analysis.__main__ import CHARTS, summary
from tests.parquet_rows import write_part

PROGRAMS = [
    # task, seq_len, program, depth, heuristic
    ("binding", 4, 0, 1, True),
    ("binding", 4, 1, 2, False),
    ("binding", 8, 0, 3, False),
    ("binding", 8, 1, 4, False),
]


def programs_table() -> pa.Table:
    return pa.table(
        {
            "task": [p[0] for p in PROGRAMS],
            "seq_len": pa.array([p[1] for p in PROGRAMS], pa.int32()),
            "program": pa.array([p[2] for p in PROGRAMS], pa.int64()),
            "text": ["a=1\n#a:"] * 4,
            "answer": ["1"] * 4,
            "depth": pa.array([p[3] for p in PROGRAMS], pa.int32()),
            "heuristic": [p[4] for p in PROGRAMS],
        }
    )


def behavior_table(model: str, correct: list[bool]) -> pa.Table:
    return pa.table(
        {
            "model": [model] * 4,
            "task": ["binding"] * 4,
            "seq_len": pa.array([p[1] for p in PROGRAMS], pa.int32()),
            "program": pa.array([p[2] for p in PROGRAMS], pa.int64()),
            "depth": pa.array([p[3] for p in PROGRAMS], pa.int32()),
            "heuristic": [p[4] for p in PROGRAMS],
            "expected": ["1"] * 4,
            "predicted": ["1" if c else "2" for c in correct],
            "correct": correct,
            "backend": ["hf"] * 4,
        }
    )


def patching_rows(model: str, site: str, old: bool = False) -> list[dict]:
    """Two layers x three labels x programs, norm_effect = layer + 0.1 * program (+ head).
    `old`: the columns as runs before the prompt check wrote them (clean_correct, cf_correct)."""
    rows = []
    for task, seq_len, program, _, _ in PROGRAMS:
        for layer in (0, 1):
            for pos, label in enumerate(["ref_depth_1_rhs", "query_var", "final_colon"]):
                for head in [0, 1] if site == "attn_head" else [None]:
                    effect = layer + 0.1 * program + (head or 0)
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
                            "cf_answer": "2",
                            # program 1 of length 8 is answered wrong: excluded by default
                            "top1_correct": not (seq_len == 8 and program == 1),
                            "cf_top1_correct": True,
                            "top1": "1",
                            "top1_candidate": True,
                            "clean_logit_diff": -1.0,
                            "cf_logit_diff": 1.0,
                            "patched_logit_diff": -1.0 + 2 * effect,
                            "norm_effect": effect,
                            "flipped": effect > 0.5,
                        }
                    )
                    if old:
                        row = rows.pop()
                        row["clean_correct"] = row.pop("top1_correct")
                        row["cf_correct"] = row.pop("cf_top1_correct")
                        del row["top1"], row["top1_candidate"]
                        rows.append(row)
    return rows


def write_run(root: Path) -> Path:
    """`root` (made) with the programs, and two models' behaviour and patching rows."""
    root.mkdir()
    pq.write_table(programs_table(), root / "programs.parquet")
    for model, correct in (("org/a", [True, True, False, True]), ("org/b", [True] * 4)):
        write_part(root, "behavior", model, "binding", behavior_table(model, correct), "b1")
        for site in ("resid_pre", "attn_head"):
            write_part(root, "patching", model, site, patching_rows(model, site), "p1")
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = write_run(tmp_path / "run")
    # A half-written file left by a crash, in the temporary folder: readers must not see it.
    (root / ".tmp").mkdir()
    (root / ".tmp" / "p2.parquet.abc123").write_bytes(b"PAR1 truncated")
    return root


def test_views_count_rows(run_dir) -> None:
    con = connect(run_dir)
    count = lambda view: con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]  # noqa: E731
    assert count("programs") == 4
    assert count("behavior") == 8
    assert count("patching") == 2 * (4 * 2 * 3) * (1 + 2)
    assert count("skipped") == 0, "no skipped files: an empty view, not an error"
    assert con.execute("SELECT DISTINCT model FROM patching ORDER BY 1").fetchall() == [
        ("org/a",),
        ("org/b",),
    ], "the real model id, not the escaped folder name"


def test_accuracy_aggregates_match_hand_computation(run_dir) -> None:
    con = connect(run_dir)
    acc = queries.run(con, queries.ACCURACY_BY_LENGTH)
    got = {(r.model, r.seq_len): (r.accuracy, r.n) for r in acc.itertuples()}
    assert got == {
        ("org/a", 4): (1.0, 2),
        ("org/a", 8): (0.5, 2),
        ("org/b", 4): (1.0, 2),
        ("org/b", 8): (1.0, 2),
    }
    depth = queries.run(con, queries.ACCURACY_BY_DEPTH)
    a = depth[depth.model == "org/a"].set_index("depth")["accuracy"].to_dict()
    assert a == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}


def test_patching_aggregates_exclude_wrong_and_heuristic_programs(run_dir) -> None:
    con = connect(run_dir)
    heat = queries.run(con, queries.HEATMAP_BY_LABEL)
    cell = heat[
        (heat.model == "org/a")
        & (heat.site == "resid_pre")
        & (heat.layer == 1)
        & (heat.label == "query_var")
    ].iloc[0]
    # kept: (4,1) and (8,0): heuristic (4,0) and wrong (8,1) are out. effect = 1 + 0.1*program.
    assert cell.n == 2 and cell.mean_effect == pytest.approx((1.1 + 1.0) / 2)
    heat_all = queries.run(con, queries.HEATMAP_BY_LABEL, include_all=True)
    cell = heat_all[
        (heat_all.model == "org/a")
        & (heat_all.site == "resid_pre")
        & (heat_all.layer == 1)
        & (heat_all.label == "query_var")
    ].iloc[0]
    assert cell.n == 4 and cell.mean_effect == pytest.approx((1.0 + 1.1 + 1.0 + 1.1) / 4)
    heads = queries.run(con, queries.HEADS)
    h = heads[
        (heads.model == "org/b")
        & (heads.layer == 0)
        & (heads["head"] == 1)
        & (heads.label == "final_colon")
    ].iloc[0]
    assert h.mean_effect == pytest.approx(1.05)  # 0 + 1 + mean(0.1, 0.0)
    flips = queries.run(con, queries.FLIP_RATE)
    assert set(flips.label) == {"ref_depth_1_rhs"} and set(flips.site) == {"resid_pre"}
    assert flips.set_index(["model", "layer"]).flip_rate.to_dict() == {
        ("org/a", 0): 0.0,
        ("org/a", 1): 1.0,
        ("org/b", 0): 0.0,
        ("org/b", 1): 1.0,
    }
    top = queries.run(con, queries.TOP_CELLS, k=2)
    assert list(top.groupby("model").size()) == [2, 2]
    assert top.iloc[0].site == "attn_head" and top.iloc[0].layer == 1


def test_runs_written_before_the_renaming_filter_the_same(run_dir, tmp_path) -> None:
    """Old patching files (clean_correct, cf_correct), alone or next to new ones, keep the
    same programs: the old columns meant top-1 over the vocabulary too."""
    old = tmp_path / "old"
    (old / "patching").mkdir(parents=True)
    pq.write_table(programs_table(), old / "programs.parquet")
    for site in ("resid_pre", "attn_head"):
        table = pa.Table.from_pylist(patching_rows("org/a", site, old=True))
        assert "top1_correct" not in table.column_names
        pq.write_table(table, old / "patching" / f"{site}.parquet")
    want = queries.run(connect(run_dir), queries.COVERAGE).iloc[0]
    assert (want.programs_kept, want.programs_all) == (2, 4)
    got = queries.run(connect(old), queries.COVERAGE).iloc[0]
    assert (got.programs_kept, got.programs_all) == (2, 4)
    # Both versions in one folder: each row is filtered by whichever column it has.
    new = pa.Table.from_pylist(patching_rows("org/b", "resid_pre"))
    pq.write_table(new, old / "patching" / "new.parquet")
    con = connect(old)
    kept = con.execute(
        queries.KEPT + "SELECT model, count(DISTINCT (seq_len, program)) FROM kept GROUP BY 1 "
        "ORDER BY 1",
        {"include_all": False},
    ).fetchall()
    assert kept == [("org/a", 2), ("org/b", 2)]
    assert con.execute("SELECT count(*) FROM patching WHERE top1_correct IS NULL").fetchone() == (
        0,
    )
    # A column neither version wrote reads as NULL rather than failing the query.
    assert con.execute("SELECT count(metric) FROM patching").fetchone() == (0,)


def test_summary_says_when_every_program_is_filtered_out(tmp_path) -> None:
    """A model whose top-1 is never the answer (a prompt that stops before it) keeps no
    program: the summary says so and, after it, the prompt check says why."""
    root = tmp_path / "run"
    (root / "patching").mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    rows = patching_rows("org/a", "resid_pre")
    for row in rows:
        row.update(top1_correct=False, top1=" ", top1_candidate=False)
    pq.write_table(pa.Table.from_pylist(rows), root / "patching" / "p.parquet")
    text = summary(connect(root), include_all=False)
    assert "top (site, layer, label) cells: none (programs whose top-1 is the answer" in text
    assert ": 0 of 4; --include-all keeps all)" in text
    assert text.index("cells: none") < text.index("prompt check:")
    assert "  org/a  binding  patching  -       4         4 (100%)               ' ' (4)" in text
    assert "warning: org/a on binding: 4 of 4 programs (100%)" in text


def test_charts_are_valid_files_with_the_expected_facets(run_dir, tmp_path) -> None:
    con = connect(run_dir)
    expected = {  # facet fields (wrapped facets have one), and the panels' encodings
        "accuracy_vs_length": (
            {"facet": "task"},
            {"x": "seq_len", "y": "accuracy", "color": "model"},
        ),
        "accuracy_by_depth": (
            {"facet": "model"},
            {"x": "depth", "y": "accuracy", "color": "root"},
        ),
        "patching_heatmap": (
            {"row": "site", "column": "model"},
            {"x": "label", "y": "layer", "color": "mean_effect"},
        ),
        "flip_rate": (
            {"row": "site", "column": "model"},
            {"x": "layer", "y": "flip_rate", "color": "label"},
        ),
        "heads": (
            {"row": "label", "column": "model"},
            {"x": "head", "y": "layer", "color": "mean_effect"},
        ),
    }
    assert set(CHARTS) - set(expected) == {
        "attribution_scatter",
        "attribution_heatmap",
        "routing_map",
        "error_kinds",
        "counterfactual_heatmap",
        "accuracy_by_step",
        "root_effect_by_step",
        "probes_by_step",
    }, "tested in test_attribution_analysis.py, test_knockout_analysis.py, below, in "
    "test_counterfactual_analysis.py and in test_trajectory_analysis.py"
    for name in expected:
        sql, draw = CHARTS[name]
        chart = draw(queries.run(con, sql))
        spec = chart.to_dict()
        facets, encodings = expected[name]
        facet = spec["facet"]
        got = (
            {"facet": facet["field"]}
            if "field" in facet
            else {k: v["field"] for k, v in facet.items()}
        )
        assert got == facets, name
        inner = spec["spec"]
        layers = inner.get("layer", [inner])
        # the first layer of data marks, past the interval band (an area) under the lines
        enc = next(x for x in layers if _mark(x) != "area")["encoding"]
        assert {k: enc[k]["field"] for k in encodings} == encodings, name
        assert spec["config"]["axis"]["grid"] is False, "the theme is on"
        png, svg, html = charts.save(chart, tmp_path / "charts", name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert svg.read_text().lstrip().startswith("<svg") and svg.stat().st_size > 2_000
        assert "vega" in html.read_text()
    heat = charts.patching_heatmap(queries.run(con, queries.HEATMAP_BY_LABEL)).to_dict()
    scale = heat["spec"]["encoding"]["color"]["scale"]
    assert scale["domainMid"] == 0 and scale["domain"][0] == -scale["domain"][1]


def _mark(layer: dict) -> str:
    mark = layer["mark"]
    return mark["type"] if isinstance(mark, dict) else mark


def kinds_table(model: str, rows: list[tuple[int, str | None]], task: str = "binding"):
    """Behaviour rows of (depth, error_kind): right where the kind is None."""
    return pa.table(
        {
            "model": [model] * len(rows),
            "task": [task] * len(rows),
            "seq_len": pa.array([16] * len(rows), pa.int32()),
            "program": pa.array(range(len(rows)), pa.int64()),
            "depth": pa.array([d for d, _ in rows], pa.int32()),
            "correct": [k is None for _, k in rows],
            "error_kind": pa.array([k for _, k in rows], pa.string()),
        }
    )


@pytest.fixture
def errors_dir(tmp_path) -> Path:
    """org/a: depth 1 two right, two line-1/2; depth 4 one right, one line-1/2, one stale, two
    other. org/b: one not_a_candidate at depth 2. Left out: another family's row and four wrong
    answers of a file written before the column (their kind reads NULL)."""
    root = tmp_path / "errors"
    (root / "behavior").mkdir(parents=True)
    a = [(1, None), (1, None), (1, "line_1_2_constant"), (1, "line_1_2_constant"), (4, None)]
    a += [(4, "line_1_2_constant"), (4, "stale_binding"), (4, "other"), (4, "other")]
    pq.write_table(kinds_table("org/a", a), root / "behavior" / "a.parquet")
    pq.write_table(kinds_table("org/b", [(2, "not_a_candidate")]), root / "behavior" / "b.parquet")
    # a kind on another family's row would be a writer's bug; the query reads binding only
    pq.write_table(kinds_table("org/b", [(2, "other")], "range"), root / "behavior" / "r.parquet")
    pq.write_table(behavior_table("org/b", [False] * 4), root / "behavior" / "old.parquet")
    return root


def test_error_kinds_by_depth_count_and_share_the_wrong_answers(errors_dir) -> None:
    got = queries.run(connect(errors_dir), queries.ERROR_KINDS_BY_DEPTH)
    rows = {(r.model, r.depth, r.error_kind): (r.n, r.wrong, r.share) for r in got.itertuples()}
    assert rows == {
        ("org/a", 1, "line_1_2_constant"): (2, 2, 1.0),
        ("org/a", 4, "line_1_2_constant"): (1, 4, 0.25),
        ("org/a", 4, "other"): (2, 4, 0.5),
        ("org/a", 4, "stale_binding"): (1, 4, 0.25),
        ("org/b", 2, "not_a_candidate"): (1, 1, 1.0),
    }


def test_error_kinds_chart_and_summary(errors_dir, tmp_path) -> None:
    from orchestrator.tasks.errors import ERROR_KINDS

    con = connect(errors_dir)
    assert CHARTS["error_kinds"] == (queries.ERROR_KINDS_BY_DEPTH, charts.error_kinds)
    chart = charts.error_kinds(queries.run(con, queries.ERROR_KINDS_BY_DEPTH))
    spec = chart.to_dict()
    bars, counts = spec["spec"]["layer"]
    assert spec["facet"]["field"] == "model" and bars["mark"]["type"] == "bar"
    assert counts["encoding"]["text"]["field"] == "wrong", "the number wrong above each bar"
    enc = bars["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color", "order")} == {
        "x": "depth",
        "y": "share",
        "color": "error_kind",
        "order": "rank",
    }
    assert enc["y"]["stack"] == "zero" and enc["color"]["scale"]["domain"] == list(ERROR_KINDS)
    assert spec["config"]["axis"]["grid"] is False, "the theme is on"
    png, _, _ = charts.save(chart, tmp_path / "charts", "error_kinds")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = summary(con, include_all=False)
    table = text[text.index("wrong binding answers by kind") :].splitlines()
    assert table[1].split() == [
        "model",
        "depth",
        "wrong",
        "not_a_candidate",
        "stale_binding",
        "line_1_2_constant",
        "other",
    ], "the kinds that occur, in priority order"
    # Each share with its interval over the wrong answers, `[lo, hi]`: 0 where a kind is absent.
    intervals = r"\[(\d\.\d\d), (\d\.\d\d)\]"
    assert re.sub(intervals, "", table[3]).split() == [
        "org/a",
        "4",
        "4",
        "0.00",
        "0.25",
        "0.25",
        "0.50",
    ]
    assert re.sub(intervals, "", table[4]).split() == [
        "org/b",
        "2",
        "1",
        "1.00",
        "0.00",
        "0.00",
        "0.00",
    ]
    for share, lo, hi in re.findall(r"(\d\.\d\d) " + intervals, table[3]):
        assert float(lo) <= float(share) <= float(hi), table[3]
    assert "[" not in table[4], "one wrong answer: no interval"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True)


def test_cli_summary_sql_and_errors(run_dir, tmp_path) -> None:
    out = run_cli(str(run_dir), "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert "accuracy by model x task x program length" in out.stdout
    assert "top (site, layer, label) cells" in out.stdout
    assert (
        "programs whose top-1 is the answer in both runs (top1_correct, cf_top1_correct), "
        "root not on line 1-2: 2 of 4; --include-all keeps all" in out.stdout
    )
    # After the summary, the prompt check: the behaviour files here predate its columns, so
    # it reads the patching rows, one per program.
    check = out.stdout[out.stdout.index("prompt check:") :]
    assert out.stdout.index("top (site, layer, label) cells") < out.stdout.index("prompt check:")
    assert "org/a  binding  patching  -       4         0 (0%)" in check, check
    assert "warning" not in check
    assert len(list((tmp_path / "c").glob("*.png"))) == 5
    out = run_cli(
        str(run_dir),
        "--sql",
        "SELECT model, count(*) AS n FROM behavior GROUP BY 1 ORDER BY 1",
        "--format",
        "json",
    )
    assert [json.loads(x) for x in out.stdout.splitlines()] == [
        {"model": "org/a", "n": 4},
        {"model": "org/b", "n": 4},
    ]
    out = run_cli(str(run_dir), "--sql", "SELEC 1")
    assert out.returncode == 1 and out.stderr.startswith("error: Parser Error")
    assert "Traceback" not in out.stderr
    out = run_cli(str(tmp_path / "nope"))
    assert out.returncode == 2 and "is not a results folder" in out.stderr


def test_analysis_imports_neither_torch_nor_ray() -> None:
    code = "import sys, analysis.__main__; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr
