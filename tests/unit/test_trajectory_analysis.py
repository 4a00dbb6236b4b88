"""Analysis across training on synthetic run folders with known values: the `step` column of old
and new files, the trajectory aggregates against pandas (the run key, the probes' weighted mean,
the shortcut peak, the chain move, the probe's first layer), the charts and the CLI."""

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import charts, connect, queries, trajectory
from analysis.__main__ import CHARTS, main, summary
from analysis.db import EMPTY, PROGRAM_COLUMNS
from tests.parquet_rows import part_folder, view_schema
from tests.unit.test_analysis import PROGRAMS, behavior_table, patching_rows, programs_table


def f32(value: float) -> float:
    """`value` as the float32 the files hold."""
    return float(pa.array([value], pa.float32())[0].as_py())


# Two training runs' checkpoints (the final one of `models/traj` without a suffix) and a model
# without a step, written in files of before the column.
STEPS = {
    "models/traj-step250": 250,
    "models/traj-step1000": 1000,
    "models/traj": 4000,
    "models/other-step500": 500,
    "models/other-step2000": 2000,
    "org/base": None,
}
RUNS = {m: m.split("-step")[0] for m in STEPS}

# Right answers of 4 binding programs at depth 1 and 2, root on line 1-2 (H) or later (N). The
# shortcut leads most at traj's step 1000 (gap 0.75) and, a tie, at other's steps 500 and 2000
# (0.5: the earlier wins); org/base would beat them all (1.0) were it not without a step.
RIGHT = {
    "models/traj-step250": {True: (2, 2), False: (1, 1)},
    "models/traj-step1000": {True: (4, 4), False: (2, 0)},
    "models/traj": {True: (4, 4), False: (4, 3)},
    "models/other-step500": {True: (3, 3), False: (1, 1)},
    "models/other-step2000": {True: (4, 4), False: (2, 2)},
    "org/base": {True: (4, 4), False: (0, 0)},
}


def behaviour_rows(model: str) -> list[dict]:
    rows = []
    for heuristic, counts in RIGHT[model].items():
        for depth, right in zip((1, 2), counts, strict=True):
            for i in range(4):
                rows.append(
                    {
                        "model": model,
                        "task": "binding",
                        "seq_len": 16,
                        "program": len(rows),
                        "depth": depth,
                        "heuristic": heuristic,
                        "expected": "1",
                        "predicted": "1" if i < right else "2",
                        "correct": i < right,
                        "step": STEPS[model],
                    }
                )
    # another family's rows, all right: the binding aggregates leave them out
    rows.append(rows[-1] | {"task": "range", "correct": True, "heuristic": False})
    return rows


# Mean norm_effect of the root-value patch at resid_pre, ref_depth_2_rhs, by layer, before the
# kept programs' offset (0.1 * program: mean +0.05). traj moves at step 1000 (layer 1: 0.55; layer
# 2: 0.45), other never (its largest: 0.35 + 0.05).
HOP = {
    "models/traj-step250": (0.1, 0.3, 0.2),
    "models/traj-step1000": (0.2, 0.5, 0.4),
    "models/traj": (0.3, 0.9, 0.8),
    "models/other-step500": (0.0, 0.1, 0.2),
    "models/other-step2000": (0.1, 0.35, 0.2),
    "org/base": (0.9, 0.9, 0.9),
}
LABELS = ("ref_depth_1_rhs", "ref_depth_2_rhs", "final_colon")
DROPPED = {(4, 0), (8, 1)}  # heuristic (root on line 1-2) and answered wrong: read 9.0


def effect(model: str, layer: int, label: str, program: tuple, kind: str, site: str) -> float:
    seq_len, index = program[1:3]
    if (seq_len, index) in DROPPED:
        return 9.0
    base = {
        "ref_depth_1_rhs": 1.0 - 0.2 * layer,
        "ref_depth_2_rhs": HOP[model][layer],
        "final_colon": 0.1 * layer,
    }[label]
    if kind != "root_value" or site != "resid_pre":
        base += 5.0  # rows the trajectory aggregates must not read
    return f32(base + 0.1 * index)


def patch_rows(model: str, site: str, kind: str) -> list[dict]:
    rows = []
    for program in PROGRAMS:
        task, seq_len, index = program[:3]
        for layer in range(3):
            for pos, label in enumerate(LABELS):
                value = effect(model, layer, label, program, kind, site)
                rows.append(
                    {
                        "model": model,
                        "task": task,
                        "seq_len": seq_len,
                        "program": index,
                        "site": site,
                        "layer": layer,
                        "head": 0 if site == "attn_head" else None,
                        "pos": pos,
                        "token": "x",
                        "label": label,
                        "clean_answer": "1",
                        "cf_answer": "2",
                        "top1_correct": (seq_len, index) != (8, 1),
                        "cf_top1_correct": True,
                        "clean_logit_diff": -1.0,
                        "cf_logit_diff": 1.0,
                        "patched_logit_diff": -1.0 + 2 * value,
                        "norm_effect": value,
                        "flipped": value > 0.5,
                        "counterfactual": kind,
                        "contrast_answer": "2",
                        "contrast_logit_diff": 1.0,
                        "step": STEPS[model],
                    }
                )
    return rows


# Final-colon probe accuracy by layer of two shards, (n_test 30, n_test 10): traj-step1000's layer
# 1 exceeds 0.9 only weighted ((28.8 + 8) / 40 = 0.92; unweighted 0.88), so its first layer is 1;
# traj-step250 never exceeds it; org/base (no step) from layer 2.
N_TEST = (30, 10)
COLON = {
    "models/traj-step250": ((0.2, 0.2), (0.4, 0.5), (0.6, 0.7), (0.8, 0.6)),
    "models/traj-step1000": ((0.3, 0.3), (0.96, 0.8), (0.97, 0.9), (0.99, 0.99)),
    "models/traj": ((0.5, 0.5), (0.99, 0.95), (1.0, 1.0), (1.0, 1.0)),
    "org/base": ((0.1, 0.1), (0.5, 0.5), (0.95, 0.95), (0.92, 0.92)),
}


def probe_rows(model: str, shard: int) -> list[dict]:
    rows = []
    for layer, accuracies in enumerate(COLON[model]):
        for label, target in (("ref_depth_1_rhs", "root_value"), ("final_colon", "answer")):
            accuracy = accuracies[shard] if label == "final_colon" else 0.1 * layer + 0.1 * shard
            rows.append(
                {
                    "model": model,
                    "task": "binding",
                    "seq_len": 8 if shard == 0 else 16,
                    "layer": layer,
                    "label": label,
                    "target": target,
                    "accuracy": accuracy,
                    "control_accuracy": 0.2 + 0.1 * shard,
                    "chance": 0.1 + 0.05 * shard,
                    "control_chance": 0.5,
                    "n_train": 100,
                    "n_test": N_TEST[shard],
                    "n_classes": 10,
                    "step": STEPS[model],
                }
            )
    return rows


def write(root: Path, view: str, model: str, part: str, rows: list[dict], old=False) -> None:
    """One file of `rows` in `view`'s folder for `model`; `old`: without the step column."""
    folder = part_folder(root, view, model, part)
    table = pa.Table.from_pylist(rows, schema=view_schema(view))
    if old:
        table = table.drop_columns(["step"])
    pq.write_table(table, folder / f"{part}-{len(list(folder.iterdir()))}.parquet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trajectory") / "run"
    root.mkdir()
    pq.write_table(programs_table(), root / "programs.parquet")
    for model in STEPS:
        old = STEPS[model] is None
        write(root, "behavior", model, "binding", behaviour_rows(model), old=old)
        write(root, "patching", model, "resid_pre", patch_rows(model, "resid_pre", "root_value"))
        write(root, "patching", model, "resid_pre", patch_rows(model, "resid_pre", "distractor"))
        write(root, "patching", model, "attn_head", patch_rows(model, "attn_head", "root_value"))
        if model in COLON:
            for shard in (0, 1):
                write(root, "probes", model, "binding", probe_rows(model, shard), old=old)
    return root


def frame(root: Path, view: str) -> pd.DataFrame:
    df = pq.read_table(root / view, partitioning=None).to_pandas()
    df["step"] = df.step.astype("Int64")  # NaN in the files without it
    df["run"] = df.model.str.replace(r"-step[0-9]+$", "", regex=True)
    return df


def test_step_reads_null_in_old_files_and_its_value_in_new_ones(run_dir, tmp_path) -> None:
    con = connect(run_dir)
    for view in ("behavior", "patching", "probes"):
        columns = [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]
        # the worker's step, then what `programs` adds that the files lack
        tail = {"behavior": ["step", "root_line"], "patching": ["step", *PROGRAM_COLUMNS]}.get(
            view, ["step"]
        )
        assert columns[-len(tail) :] == tail, view
        got = dict(con.execute(f"SELECT DISTINCT model, step FROM {view}").fetchall())
        want = STEPS if view != "probes" else {m: STEPS[m] for m in COLON}
        assert got == want, view
    assert con.execute("SELECT typeof(step) FROM behavior LIMIT 1").fetchone() == ("BIGINT",)
    # every view has the column, read NULL where no file has it (an old run alone)
    old = tmp_path / "old"
    (old / "behavior").mkdir(parents=True)
    pq.write_table(behavior_table("org/a", [True] * 4), old / "behavior" / "b.parquet")
    pq.write_table(pa.Table.from_pylist(patching_rows("org/a", "resid_pre")), old / "p.parquet")
    con = connect(old)
    for view in EMPTY:
        columns = {r[0]: r[1] for r in con.execute(f"DESCRIBE {view}").fetchall()}
        assert ("step" in columns) == (view != "programs"), view
        if view != "programs":
            assert columns["step"] == "BIGINT"
    assert con.execute("SELECT count(*), count(step) FROM behavior").fetchone() == (4, 0)
    for sql in (trajectory.ACCURACY_BY_STEP, trajectory.SHORTCUT_PEAK, trajectory.PROBES_BY_STEP):
        assert len(queries.run(con, sql)) == 0


def test_the_probes_view_has_the_writers_columns_then_the_step(tmp_path) -> None:
    from actors.probes import PROBES_SCHEMA

    columns = [r[0] for r in connect(tmp_path).execute("DESCRIBE probes").fetchall()]
    assert columns == [*PROBES_SCHEMA.names, "step"]
    assert view_schema("probes").types == [*PROBES_SCHEMA.types, pa.int64()]


def test_accuracy_by_step_matches_pandas_and_leaves_out_models_without_a_step(run_dir) -> None:
    got = queries.run(connect(run_dir), trajectory.ACCURACY_BY_STEP)
    key = ["run", "step", "model", "depth", "heuristic"]
    assert list(got.columns) == [*key, "accuracy", "accuracy_lo", "accuracy_hi", "programs", "n"]
    assert (got.programs == got.n).all(), "one behaviour row a program"
    df = frame(run_dir, "behavior")
    df = df[(df.task == "binding") & df.step.notna()]
    want = df.groupby(key).correct.agg(["mean", "size"]).set_axis(["accuracy", "n"], axis=1)
    pd.testing.assert_frame_equal(
        got.set_index(key)[["accuracy", "n"]],
        want.sort_index(),
        check_dtype=False,
        check_index_type=False,
    )
    assert "org/base" not in set(got.model)
    runs = dict(zip(got.model, got.run, strict=True))
    assert runs == {m: RUNS[m] for m in STEPS if m != "org/base"}, "the -step<N> suffix stripped"
    assert list(dict.fromkeys(got.step)) == [500, 2000, 250, 1000, 4000], "by run, then step"


def kept(root: Path) -> pd.DataFrame:
    """Root-value rows at resid_pre of the kept programs, by pandas."""
    df = frame(root, "patching")
    program = pd.MultiIndex.from_arrays([df.seq_len, df.program])
    heuristic = {(p[1], p[2]) for p in PROGRAMS if p[4]}
    keep = df.top1_correct & df.cf_top1_correct & ~program.isin(heuristic)
    return df[keep & (df.counterfactual == "root_value") & (df.site == "resid_pre")]


def test_root_effect_by_step_matches_pandas(run_dir) -> None:
    got = queries.run(connect(run_dir), trajectory.ROOT_EFFECT_BY_STEP)
    key = ["run", "step", "model", "site", "layer", "label"]
    assert list(got.columns) == [
        *(*key, "mean_effect", "mean_effect_lo", "mean_effect_hi", "programs", "n")
    ]
    df = kept(run_dir)
    df = df[df.step.notna()]
    want = df.groupby(key).norm_effect.agg(["mean", "count"]).set_axis(["mean_effect", "n"], axis=1)
    pd.testing.assert_frame_equal(
        got.set_index(key)[["mean_effect", "n"]].sort_index(),
        want.sort_index(),
        check_dtype=False,
        check_index_type=False,
        atol=1e-6,
    )
    cell = got.set_index(["model", "layer", "label"]).loc[
        ("models/traj-step1000", 1, "ref_depth_2_rhs")
    ]
    assert cell.n == 2 and cell.mean_effect == pytest.approx(0.55, abs=1e-6)
    every = queries.run(connect(run_dir), trajectory.ROOT_EFFECT_BY_STEP, include_all=True)
    assert set(every.n) == {4} and every.mean_effect.max() > 4, "9.0 read in"


def test_probes_average_shards_weighted_by_their_held_out_programs(run_dir) -> None:
    got = queries.run(connect(run_dir), trajectory.PROBES_BY_STEP)
    key = ["run", "step", "model", "layer", "label", "target"]
    assert list(got.columns) == [
        *key,
        *("accuracy", "accuracy_lo", "accuracy_hi"),
        "control_accuracy",
        "selectivity",
        "chance",
        "n_test",
        "programs",
    ]
    df = frame(run_dir, "probes")
    columns = ["accuracy", "control_accuracy", "chance"]
    weighted = df[columns].astype("float64").mul(df.n_test, axis=0).assign(n_test=df.n_test)
    sums = weighted.groupby([df[k] for k in key], dropna=False).sum()
    want = sums[columns].div(sums.n_test, axis=0)
    want.insert(2, "selectivity", want.accuracy - want.control_accuracy)
    want["n_test"] = sums.n_test
    pd.testing.assert_frame_equal(
        got.set_index(key)[list(want.columns)].sort_index(),
        want.sort_index(),
        check_dtype=False,
        check_index_type=False,
        atol=1e-6,
    )
    cell = got.set_index(["model", "layer", "label"]).loc[
        ("models/traj-step1000", 1, "final_colon")
    ]
    assert cell.accuracy == pytest.approx((30 * 0.96 + 10 * 0.8) / 40, abs=1e-6)
    assert cell.n_test == 40 and cell.selectivity == pytest.approx(cell.accuracy - 0.225)
    assert got.step.isna().sum() == 8 and got.step.iloc[-8:].isna().all(), "no step: last"


def test_shortcut_peak_is_the_step_of_the_largest_gap(run_dir) -> None:
    got = queries.run(connect(run_dir), trajectory.SHORTCUT_PEAK)
    rows = {
        r.run: (r.step, r.model, r.heuristic_accuracy, r.non_heuristic_accuracy, r.gap)
        for r in got.itertuples()
    }
    assert rows == {
        "models/traj": (1000, "models/traj-step1000", 1.0, 0.25, 0.75),
        "models/other": (500, "models/other-step500", 0.75, 0.25, 0.5),  # tie: the earlier
    }
    assert list(got.n_heuristic) == list(got.n_non_heuristic) == [8, 8]
    # against pandas: the largest gap's step per run
    df = frame(run_dir, "behavior")
    df = df[(df.task == "binding") & df.step.notna()]
    acc = df.pivot_table(index=["run", "step"], columns="heuristic", values="correct")
    gap = (acc[True] - acc[False]).reset_index(name="gap")
    best = gap.sort_values(["run", "gap", "step"], ascending=[True, False, True])
    best = best.groupby("run").head(1).set_index("run").step.to_dict()
    assert best == dict(zip(got.run, got.step, strict=True))


def test_chain_move_is_the_first_step_past_the_threshold(run_dir) -> None:
    assert trajectory.CHAIN_MOVE_EFFECT == 0.5 and trajectory.CHAIN_MOVE_LABEL == "ref_depth_2_rhs"
    got = queries.run(connect(run_dir), trajectory.CHAIN_MOVE)
    assert list(got.columns) == [
        "run",
        "step",
        "model",
        "layer",
        *("mean_effect", "mean_effect_lo", "mean_effect_hi"),
        "programs",
        "n",
        "max_effect",
        "steps",
    ]
    traj, other = got.set_index("run").loc[["models/traj", "models/other"]].itertuples()
    # layer 1 at 0.55, its largest; layer 2's 0.45 does not cross
    assert (traj.step, traj.model, traj.layer, traj.n) == (1000, "models/traj-step1000", 1, 2)
    assert traj.programs == 2 and traj.mean_effect_lo <= traj.mean_effect <= traj.mean_effect_hi
    assert traj.mean_effect == pytest.approx(0.55, abs=1e-6)
    assert traj.max_effect == pytest.approx(0.95, abs=1e-6) and traj.steps == 3
    assert pd.isna(other.step) and pd.isna(other.layer) and pd.isna(other.mean_effect)
    assert other.max_effect == pytest.approx(0.4, abs=1e-6) and other.steps == 2
    assert set(got.run) == {"models/traj", "models/other"}, "org/base has no step"
    # against pandas, from the kept cells
    cells = kept(run_dir)
    cells = cells[cells.step.notna() & (cells.label == "ref_depth_2_rhs")]
    means = cells.groupby(["run", "step", "layer"]).norm_effect.mean().reset_index()
    crossed = means[means.norm_effect > 0.5].groupby("run").step.min().to_dict()
    assert crossed == {"models/traj": 1000}
    # every program (the dropped ones read 9.0) crosses at the first step
    every = queries.run(connect(run_dir), trajectory.CHAIN_MOVE, include_all=True)
    assert dict(zip(every.run, every.step, strict=True)) == {
        "models/other": 500,
        "models/traj": 250,
    }


def test_probe_first_layer_is_the_first_past_the_threshold(run_dir) -> None:
    assert trajectory.PROBE_ACCURACY == 0.9
    got = queries.run(connect(run_dir), trajectory.PROBE_FIRST_LAYER)
    assert list(got.columns) == [
        "run",
        "step",
        "model",
        "layer",
        *("accuracy", "accuracy_lo", "accuracy_hi"),
        "control_accuracy",
        "selectivity",
        "n_test",
        "max_accuracy",
        "programs",
    ]
    rows = [
        (r.model, None if pd.isna(r.step) else r.step, None if pd.isna(r.layer) else r.layer)
        for r in got.itertuples()
    ]
    assert rows == [
        ("models/traj-step250", 250, None),  # never above 0.9
        ("models/traj-step1000", 1000, 1),  # 0.92 weighted; 0.88 unweighted
        ("models/traj", 4000, 1),
        ("org/base", None, 2),  # no step: read all the same, last
    ]
    first = got.set_index("model")
    assert first.loc["models/traj-step1000", "accuracy"] == pytest.approx(0.92, abs=1e-6)
    assert first.loc["models/traj-step250", "max_accuracy"] == pytest.approx(0.75, abs=1e-6)
    assert first.loc["org/base", "selectivity"] == pytest.approx(0.95 - 0.225, abs=1e-6)
    best = queries.run(connect(run_dir), trajectory.PROBE_BEST_LAYER)
    colon = best[best.label == "final_colon"].set_index("model").layer.to_dict()
    assert colon == {
        "models/traj-step250": 3,  # (0.8 * 30 + 0.6 * 10) / 40 = 0.75
        "models/traj-step1000": 3,
        "models/traj": 2,  # 1.0 at layers 2 and 3: the earlier
        "org/base": 2,
    }
    assert set(best[best.label == "ref_depth_1_rhs"].layer) == {3}


def test_accuracy_by_step_chart(run_dir, tmp_path) -> None:
    assert CHARTS["accuracy_by_step"] == (trajectory.ACCURACY_BY_STEP, trajectory.accuracy_by_step)
    df = queries.run(connect(run_dir), trajectory.ACCURACY_BY_STEP)
    chart = trajectory.accuracy_by_step(df)
    spec = chart.to_dict()
    assert {k: v["field"] for k, v in spec["facet"].items()} == {"row": "run", "column": "root"}
    band, line, few = spec["spec"]["layer"]  # every cell of few programs: no filled points
    assert band["mark"]["type"] == "area" and band["encoding"]["y"]["field"] == "accuracy_lo"
    assert few["mark"]["type"] == "point" and few["mark"]["filled"] is False
    enc = line["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color")} == {
        "x": "step",
        "y": "accuracy",
        "color": "depth",
    }
    assert enc["x"]["scale"] == {"type": "log"} and enc["color"]["type"] == "ordinal"
    colors = enc["color"]["scale"]
    assert colors == {"domain": [1, 2], "range": list(charts.SEQUENTIAL)}, "light to dark"
    rows = spec["datasets"][spec["data"]["name"]]
    assert {r["run"] for r in rows} == {"models/traj", "models/other"}
    assert {r["root"] for r in rows} == {"root on line 1-2", "root later"}
    assert spec["config"]["axis"]["grid"] is False, "the theme is on"
    initial = trajectory.accuracy_by_step(df.assign(step=df.step - 250)).to_dict()
    assert initial["spec"]["layer"][0]["encoding"]["x"]["scale"] == {"type": "symlog"}, "step 0"
    png, svg, _ = charts.save(chart, tmp_path, "accuracy_by_step")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip()[:4] == "<svg"


def test_root_effect_by_step_chart(run_dir, tmp_path) -> None:
    assert CHARTS["root_effect_by_step"] == (
        trajectory.ROOT_EFFECT_BY_STEP,
        trajectory.root_effect_by_step,
    )
    df = queries.run(connect(run_dir), trajectory.ROOT_EFFECT_BY_STEP)
    traj = df[df.run == "models/traj"]
    spec = trajectory.root_effect_by_step(traj).to_dict()
    assert spec["facet"]["field"] == "panel" and spec["columns"] == 5
    assert spec["facet"]["sort"] == ["step 250", "step 1000", "step 4000"], "in step order"
    enc = spec["spec"]["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color")} == {
        "x": "label",
        "y": "layer",
        "color": "mean_effect",
    }
    assert enc["x"]["sort"] == list(LABELS)
    heat = charts.patching_heatmap(traj).to_dict()["spec"]["encoding"]["color"]
    assert enc["color"] == heat, "the patching heatmap's scale"
    assert enc["color"]["scale"]["domain"] == [-1, 1], "whatever the cells' extent (1.05 here)"
    chart = trajectory.root_effect_by_step(df)
    both = chart.to_dict()["facet"]["sort"]
    assert both == [
        "models/other · step 500",
        "models/other · step 2000",
        "models/traj · step 250",
        "models/traj · step 1000",
        "models/traj · step 4000",
    ]
    png, _, _ = charts.save(chart, tmp_path, "root_effect_by_step")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probes_by_step_chart(run_dir, tmp_path) -> None:
    assert CHARTS["probes_by_step"] == (trajectory.PROBES_BY_STEP, trajectory.probes_by_step)
    df = queries.run(connect(run_dir), trajectory.PROBES_BY_STEP)
    chart = trajectory.probes_by_step(df)
    spec = chart.to_dict()
    assert {k: v["field"] for k, v in spec["facet"].items()} == {"row": "run", "column": "label"}
    assert spec["facet"]["column"]["sort"] == ["ref_depth_1_rhs", "final_colon"]
    control, chance, band, line, points = spec["spec"]["layer"]  # n_test >= 10: all filled
    assert band["mark"]["type"] == "area" and band["encoding"]["y2"]["field"] == "accuracy_hi"
    assert points["mark"]["type"] == "point" and "filled" not in points["mark"]
    enc = line["encoding"]
    assert {k: enc[k]["field"] for k in ("x", "y", "color")} == {
        "x": "layer",
        "y": "accuracy",
        "color": "checkpoint",
    }
    assert enc["color"]["type"] == "ordinal"
    assert enc["color"]["sort"] == ["250", "1000", "4000", "no step"], "in step order, not text"
    ramp = enc["color"]["scale"]
    assert ramp["domain"] == enc["color"]["sort"] and len(ramp["range"]) == 4
    assert (ramp["range"][0], ramp["range"][-1]) == charts.SEQUENTIAL, "later: darker"
    assert len(set(ramp["range"])) == 4
    assert control["encoding"]["y"]["field"] == "control_accuracy"
    assert control["mark"]["strokeDash"] and control["mark"]["color"] == "#bbbbbb"
    assert control["encoding"]["detail"]["field"] == "checkpoint", "one per step"
    assert chance["mark"]["type"] == "rule" and chance["encoding"]["y"]["field"] == "chance"
    rows = spec["datasets"][spec["data"]["name"]]
    assert {r["checkpoint"] for r in rows if r["model"] == "org/base"} == {"no step"}
    png, _, _ = charts.save(chart, tmp_path, "probes_by_step")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TRAJECTORY = {"accuracy_by_step", "root_effect_by_step", "probes_by_step"}
TITLES = ("shortcut peak:", "chain move (", "probe first layer:", "probes: the most accurate")


def test_cli_draws_the_trajectory_and_prints_its_tables(run_dir, tmp_path, capsys) -> None:
    assert main([str(run_dir), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    written = {p.stem for p in (tmp_path / "c").glob("*.png")}
    assert written >= TRAJECTORY
    tables = {title: out[out.index(title) :].split("\n\n")[0].splitlines() for title in TITLES}
    peak = tables["shortcut peak:"]
    assert peak[1].split() == [
        *("run", "step", "model"),
        *("heuristic_accuracy", "heuristic_accuracy", "95%", "CI"),
        *("non_heuristic_accuracy", "non_heuristic_accuracy", "95%", "CI"),
        *("gap", "n_heuristic", "n_non_heuristic"),
    ]
    assert peak[2].split()[:3] == ["models/other", "500", "models/other-step500"]
    assert peak[3].split()[:3] == ["models/traj", "1000", "models/traj-step1000"]
    move = tables["chain move ("]
    assert "at ref_depth_2_rhs (resid_pre)" in move[0] and "above 0.5" in move[0]
    assert "programs whose top-1 is the answer in both runs" in move[0]
    assert move[2].split()[:6] == ["models/other", "-", "-", "-", "-", "-"]
    assert move[3].split()[:4] == ["models/traj", "1000", "models/traj-step1000", "1"]
    first = tables["probe first layer:"]
    assert "above 0.9" in first[0]
    assert [line.split()[:4] for line in first[2:]] == [
        ["models/traj", "250", "models/traj-step250", "-"],
        ["models/traj", "1000", "models/traj-step1000", "1"],
        ["models/traj", "4000", "models/traj", "1"],
        ["org/base", "-", "org/base", "2"],
    ]
    assert len(tables["probes: the most accurate"]) == 2 + 4 * 2, "header + checkpoint x label"
    assert out.index("shortcut peak:") < out.index("prompt check:")


def test_a_run_without_steps_draws_and_prints_none_of_it(tmp_path, capsys) -> None:
    root = tmp_path / "run"
    for view in ("behavior", "patching"):
        (root / view).mkdir(parents=True)
    pq.write_table(programs_table(), root / "programs.parquet")
    pq.write_table(
        behavior_table("org/a", [True, False, True, True]), root / "behavior" / "b.parquet"
    )
    for site in ("resid_pre", "attn_head"):
        table = pa.Table.from_pylist(patching_rows("org/a", site))
        pq.write_table(table, root / "patching" / f"{site}.parquet")
    text = summary(connect(root), include_all=False)
    assert "top (site, layer, label) cells" in text
    assert not any(title in text for title in TITLES)
    assert main([str(root), "--out", str(tmp_path / "c")]) == 0
    written = {p.stem for p in (tmp_path / "c").glob("*.png")}
    assert "accuracy_by_depth" in written and "patching_heatmap" in written
    assert not written & TRAJECTORY
    capsys.readouterr()
