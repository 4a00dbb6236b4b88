"""The prompt check (analysis/prompts.py) on hand-written run folders, and what the sweep and the
CLI do with it: `run.json`'s `prompt_check`, a failing check that costs nothing, the spec
`--check-prompts` derives, and the launcher the `next:` line names."""

import argparse
import json
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from analysis import connect
from analysis.prompts import (
    WRONG_PROMPT_SHARE,
    check_run,
    format_prompt_check,
    prompt_check,
    suspect,
)
from orchestrator import sweep as sweep_module
from orchestrator.__main__ import check_prompts_spec, main
from orchestrator.sink import ResultsDir
from orchestrator.spec import parse_spec
from tests.parquet_rows import write_part

DIGITS = set("0123456789")


def behavior_table(model: str, task: str, top1: list[str | None], prefix: str = "") -> pa.Table:
    """One behaviour row per program; `top1_candidate` is whether the top-1 is a digit."""
    n = len(top1)
    return pa.table(
        {
            "model": [model] * n,
            "task": [task] * n,
            "seq_len": pa.array([8] * n, pa.int32()),
            "program": pa.array(range(n), pa.int64()),
            "expected": ["5"] * n,
            "predicted": ["5"] * n,
            "correct": [True] * n,
            "answer_prefix": [prefix] * n,
            "top1": top1,
            "top1_candidate": [t in DIGITS if t is not None else None for t in top1],
            "top1_correct": [t == "5" for t in top1],
            "choice_correct": [True] * n,
        }
    )


def patching_table(model: str, programs: list[tuple[int, int, str]], layers: int = 3) -> pa.Table:
    """`layers` rows per (seq_len, program, top1), the clean run's columns repeated on each."""
    rows = [
        {
            "model": model,
            "task": "binding",
            "seq_len": seq_len,
            "program": program,
            "site": "resid_pre",
            "layer": layer,
            "pos": 0,
            "answer_prefix": "",
            "metric": "first_token",
            "top1": top1,
            "top1_candidate": top1 in DIGITS,
            "top1_correct": top1 == "5",
            "cf_top1_correct": True,
            "norm_effect": 0.5,
        }
        for seq_len, program, top1 in programs
        for layer in range(layers)
    ]
    return pa.Table.from_pylist(rows)


def write(root: Path, kind: str, model: str, name: str, table: pa.Table) -> None:
    write_part(root, kind, model, "binding" if kind == "behavior" else "resid_pre", table, name)


# org/a: behaviour rows (4 of 10 top-1s are no digit, 3 of them a space) and patching rows that
# say otherwise (every top-1 a digit), which the behaviour rows override. org/b: patching only,
# 5 programs of 3 rows each (one program of length 4 and one of length 8 share index 0), one
# program's top-1 is `x`: 1 of 5 = exactly the threshold.
A_TOP1 = ["5", "3", " ", " ", " ", "\n", "7", "1", "2", "0"]
B_PROGRAMS = [(4, 0, "5"), (8, 0, "x"), (8, 1, "3"), (8, 2, "4"), (8, 3, "9")]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    write(root, "behavior", "org/a", "b1", behavior_table("org/a", "binding", A_TOP1))
    write(root, "patching", "org/a", "p1", patching_table("org/a", [(8, i, "5") for i in range(6)]))
    write(root, "patching", "org/b", "p1", patching_table("org/b", B_PROGRAMS))
    return root


def test_share_and_most_common_token_per_model_and_task(run_dir) -> None:
    rows = check_run(run_dir)
    assert rows == [
        {
            "model": "org/a",
            "task": "binding",
            "source": "behavior",
            "answer_prefix": "",
            "programs": 10,
            "not_candidate": 4,
            "share": pytest.approx(0.4),
            "top1": " ",
            "top1_count": 3,
        },
        {
            "model": "org/b",
            "task": "binding",
            "source": "patching",
            "answer_prefix": "",
            "programs": 5,  # distinct (seq_len, program), not 15 rows
            "not_candidate": 1,
            "share": pytest.approx(0.2),
            "top1": "x",
            "top1_count": 1,
        },
    ]
    assert json.loads(json.dumps(rows)) == rows, "plain, JSON-able values"
    assert all(type(r["programs"]) is int and type(r["share"]) is float for r in rows)


def test_behaviour_rows_win_over_patching_rows_per_model_and_task(run_dir) -> None:
    # org/b gets behaviour rows too: they, not its patching rows, now decide.
    write(run_dir, "behavior", "org/b", "b1", behavior_table("org/b", "binding", [" "] * 4))
    b = {r["model"]: r for r in check_run(run_dir)}["org/b"]
    assert (b["source"], b["programs"], b["not_candidate"], b["top1"]) == ("behavior", 4, 4, " ")
    # A second task of org/a with no behaviour rows reads its own patching rows.
    table = patching_table("org/a", [(8, 0, "?")])
    table = table.set_column(1, "task", pa.array(["boolean"] * table.num_rows))
    write(run_dir, "patching", "org/a", "p2", table)
    by_task = {(r["model"], r["task"]): r for r in check_run(run_dir)}
    assert by_task["org/a", "boolean"]["source"] == "patching"
    assert by_task["org/a", "boolean"]["top1"] == "?"
    assert by_task["org/a", "binding"]["source"] == "behavior"


def test_the_warning_appears_above_the_threshold_and_not_at_or_below(run_dir) -> None:
    rows = check_run(run_dir)
    assert WRONG_PROMPT_SHARE == 0.2
    assert [r["model"] for r in suspect(rows)] == ["org/a"]  # 0.4 > 0.2; org/b's 0.2 is not
    text = format_prompt_check(rows)
    lines = text.splitlines()
    assert lines[1].split() == [
        "model",
        "task",
        "source",
        "prefix",
        "programs",
        "top-1",
        "not",
        "a",
        "candidate",
        "most",
        "common",
        "such",
        "top-1",
    ]
    assert "  org/a  binding  behavior  ''      10        4 (40%)                ' ' (3)" in lines
    assert "  org/b  binding  patching  ''      5         1 (20%)                'x' (1)" in lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, text
    (warning,) = warnings
    assert warning.startswith("warning: org/a on binding: 4 of 10 programs (40%) have a top-1")
    assert "most often ' '" in warning
    assert 'answer_prefix: " " (or auto) on the task or the model in the spec' in warning
    assert "template: chat" in warning
    assert "(after the answer prefix" not in warning, "nothing was appended to org/a's prompts"
    # A prefix was appended (`auto` or the spec's) and the top-1 still is no answer: said so.
    write(run_dir, "behavior", "org/c", "b1", behavior_table("org/c", "binding", [" "], " "))
    text = format_prompt_check(check_run(run_dir))
    (warning,) = [w for w in text.splitlines() if w.startswith("warning: org/c")]
    assert "most often ' ' (after the answer prefix ' '):" in warning
    # Just above the threshold: org/b with one more off program (2 of 6).
    write(run_dir, "patching", "org/b", "p2", patching_table("org/b", [(8, 9, "y")]))
    assert [r["model"] for r in suspect(check_run(run_dir))] == ["org/a", "org/b", "org/c"]


def test_older_rows_without_the_columns_do_not_crash(tmp_path) -> None:
    root = tmp_path / "old"
    old = behavior_table("org/old", "binding", ["5"] * 3)
    old = old.drop_columns(["answer_prefix", "top1", "top1_candidate", "top1_correct"])
    write(root, "behavior", "org/old", "b1", old)
    old_patch = patching_table("org/old", [(8, 0, "5")]).drop_columns(
        ["top1", "top1_candidate", "answer_prefix", "metric"]
    )
    write(root, "patching", "org/old", "p1", old_patch)
    rows = check_run(root)
    assert rows == [
        {
            "model": "org/old",
            "task": "binding",
            "source": None,
            "answer_prefix": None,
            "programs": 0,
            "not_candidate": 0,
            "share": None,
            "top1": None,
            "top1_count": 0,
        }
    ]
    assert suspect(rows) == []
    text = format_prompt_check(rows)
    assert "org/old  binding  -       -       0         unavailable" in text
    assert "rows written before the top1 and top1_candidate columns" in text
    assert "warning" not in text
    # Next to a new model's rows, the old one is still unavailable and the new one checked.
    write(root, "behavior", "org/new", "b1", behavior_table("org/new", "binding", [" "] * 2))
    by_model = {r["model"]: r for r in check_run(root)}
    assert by_model["org/old"]["programs"] == 0 and by_model["org/new"]["share"] == 1.0


def test_a_run_without_rows(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_run(tmp_path / "empty") == []
    assert format_prompt_check([]) == "prompt check: no behaviour or patching rows yet"
    assert prompt_check(connect(tmp_path / "empty")) == []


# -- what the sweep does with it ------------------------------------------------------------


def test_the_sweep_stores_the_check_in_run_json(run_dir, capsys) -> None:
    results = ResultsDir(run_dir)
    final = {"status": "incomplete", "failures": [{"shard": "x"}]}
    results.write_run(final)
    sweep = sweep_module.Sweep(argparse.Namespace(), object, ())
    sweep._check_prompts(results, final)
    info = results.read_run()
    assert info["status"] == "incomplete" and info["failures"] == [{"shard": "x"}]
    assert info["prompt_check"] == json.loads(json.dumps(check_run(run_dir)))
    assert sweep.prompt_check == check_run(run_dir)
    out = capsys.readouterr().out
    assert out.startswith("prompt check:") and "warning: org/a on binding" in out
    quiet = sweep_module.Sweep(argparse.Namespace(), object, (), quiet=True)
    quiet._check_prompts(results, final)
    assert capsys.readouterr().out == "" and quiet.prompt_check == sweep.prompt_check


def test_a_failing_check_keeps_the_runs_status(run_dir, monkeypatch, caplog, capsys) -> None:
    results = ResultsDir(run_dir)
    final = {"status": "complete"}
    results.write_run(final)

    def broken(root):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("analysis.prompts.check_run", broken)
    sweep = sweep_module.Sweep(argparse.Namespace(), object, ())
    with caplog.at_level(logging.WARNING, logger="orchestrator.sweep"):
        sweep._check_prompts(results, final)
    assert results.read_run() == {"status": "complete"}
    assert sweep.prompt_check is None
    assert "prompt check of" in caplog.text and "disk on fire" in caplog.text
    assert capsys.readouterr().out == ""


# -- `--check-prompts N` ----------------------------------------------------------------------

USER_SPEC = {
    "run": "big",
    "output": "results",
    "seed": 3,
    "tasks": [
        {"family": "binding", "seq_lens": [8, 16], "n": 500, "options": {"style": "paper"}},
        {"family": "boolean", "seq_lens": [4], "n": 200},
    ],
    "models": [{"id": "org/m", "dtype": "bfloat16"}],
    "experiments": {
        "behavior": {"backend": "hf", "template": "chat", "tasks": ["binding"]},
        "patching": {"sites": ["resid_pre"], "programs_per_shard": 20},
    },
    "resources": {"cpus_per_actor": 0.25},
}


def test_the_derived_spec_is_behaviour_only_with_n_programs(tmp_path) -> None:
    derived = check_prompts_spec(USER_SPEC, 8, tmp_path / "out")
    assert derived["run"] == "big-check-prompts" and derived["output"] == str(tmp_path / "out")
    assert [t["n"] for t in derived["tasks"]] == [8, 8]
    assert [t["seq_lens"] for t in derived["tasks"]] == [[8, 16], [4]]
    # The user's behaviour settings, on every task, 8 programs a shard; no patching.
    assert derived["experiments"] == {
        "behavior": {"backend": "hf", "template": "chat", "programs_per_shard": 8}
    }
    assert derived["models"] == USER_SPEC["models"] and derived["seed"] == 3
    assert derived["resources"] == USER_SPEC["resources"]
    assert USER_SPEC["tasks"][0]["n"] == 500, "the user's spec is not changed"
    spec = parse_spec(derived)
    assert [t.family for t in spec.tasks_for("behavior")] == ["binding", "boolean"]
    # No behaviour section: behaviour's defaults.
    patch_only = {**USER_SPEC, "experiments": {"patching": {"sites": ["resid_pre"]}}}
    derived = check_prompts_spec(patch_only, 2, tmp_path)
    assert derived["experiments"] == {"behavior": {"programs_per_shard": 2}}
    assert parse_spec(derived).experiments.behavior.template == "raw"


def test_the_help_names_the_threshold(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"exit 1 when some share is above {WRONG_PROMPT_SHARE:.0%}" in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--check-prompts", "0"], "give a number of programs >= 1"),
        (["--check-prompts", "4", "--fresh"], "drop --fresh"),
        (["--check-prompts", "4", "--dry-run"], "drop --dry-run"),
    ],
)
def test_check_prompts_arguments_are_checked(tmp_path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "spec.yaml"), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# -- the `next:` line -------------------------------------------------------------------------


def venv(folder: Path, uv: bool) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").touch()
    cfg = "home = /usr/bin\nimplementation = CPython\n" + ("uv = 0.13.9\n" if uv else "")
    (folder / "pyvenv.cfg").write_text(cfg + "version_info = 3.11.7\n")
    return folder


@pytest.mark.parametrize(
    ("uv_env", "uv_venv", "in_venv", "activated", "want"),
    [
        (True, False, False, False, "uv run python"),  # `uv run` sets UV
        (False, True, True, False, "uv run python"),  # a venv uv made, run by its path
        (False, True, True, True, "uv run python"),  # ... or activated
        (False, False, True, False, ".venv/bin/python"),  # pip's venv, not activated
        (False, False, True, True, "python"),  # pip's venv, activated
        (False, False, False, False, "python"),  # no venv (system, pyenv, conda)
    ],
)
def test_the_next_line_names_the_launcher(
    tmp_path, monkeypatch, uv_env, uv_venv, in_venv, activated, want
) -> None:
    prefix = venv(tmp_path / ".venv", uv=uv_venv)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UV", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    if uv_env:
        monkeypatch.setenv("UV", "/usr/local/bin/uv")
    if activated:
        monkeypatch.setenv("VIRTUAL_ENV", str(prefix))
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setattr(sys, "prefix", str(prefix if in_venv else base))
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "executable", str(prefix / "bin" / "python"))
    assert sweep_module.python_launcher() == want
    assert sweep_module.analysis_command(Path("results/q")) == f"{want} -m analysis results/q"


def test_a_venv_outside_the_working_folder_is_named_by_its_full_path(tmp_path, monkeypatch) -> None:
    prefix = venv(tmp_path / "envs" / "my env", uv=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for var in ("UV", "VIRTUAL_ENV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", str(prefix / "bin" / "python"))
    assert sweep_module.python_launcher() == f"'{prefix}/bin/python'"
