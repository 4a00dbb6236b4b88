"""The snapshots of the shipped training run (`models/binding-traj-step*`, written by
`models/binding-traj.yaml`) are what their metadata says: one per step the YAML asks for, each
`training_state.json` holding its step and the log row of its evaluation, the row the run's log
has at that step, and weights that score that row again. `specs/trajectory.yaml` sweeps them."""

import itertools
import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.evaluate import accuracy_report, greedy_next_tokens
from orchestrator.checkpoints import find_checkpoints
from orchestrator.tasks import binding

MODELS = Path(__file__).resolve().parents[2] / "models"
CONFIG = yaml.safe_load((MODELS / "binding-traj.yaml").read_text())
SNAPSHOTS = sorted(MODELS.glob("binding-traj-step*"), key=lambda p: int(p.name.split("step")[1]))


def _state(folder: Path) -> dict:
    return json.loads((folder / "training_state.json").read_text())


def _run_log() -> dict[int, dict]:
    """The run's log as the last snapshot copied it (every row up to its step)."""
    lines = (SNAPSHOTS[-1] / "log.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if "event" not in row}


def test_one_snapshot_per_step_the_config_asks_for() -> None:
    steps = [int(p.name.split("step")[1]) for p in SNAPSHOTS]
    assert steps == CONFIG["snapshot_steps"] and len(steps) >= 8
    found = find_checkpoints(str(MODELS / "binding-traj-step*"))
    assert [step for _, step in found] == steps, "the sweep's glob finds them in step order"


@pytest.mark.parametrize("folder", SNAPSHOTS, ids=lambda p: p.name)
def test_a_snapshot_holds_its_step_and_the_runs_log_row(folder: Path) -> None:
    state, log = _state(folder), _run_log()
    step = int(folder.name.split("step")[1])
    assert state["step"] == step == state["log"]["step"]
    assert state["log"] == log[step]
    assert state["config"]["snapshot_steps"] == CONFIG["snapshot_steps"]


def test_the_snapshots_span_chance_the_jump_and_the_plateau() -> None:
    accuracy = [_state(p)["log"]["all"] for p in SNAPSHOTS]
    assert accuracy[0] < 0.1, "the first snapshot is at chance"
    assert accuracy[-1] >= 0.9 and accuracy[-2] >= 0.9, "the last two are on the plateau"
    jumps = [b - a for a, b in itertools.pairwise(accuracy)]
    assert max(jumps) >= 0.2, f"a jump between two snapshots: {accuracy}"


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, len(SNAPSHOTS) // 2, -1], ids=["first", "middle", "last"])
def test_a_snapshots_weights_score_its_log_row_again(index: int) -> None:
    """The held-out evaluation the trainer ran at the snapshot's step, run again on its files."""
    folder = SNAPSHOTS[index]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    programs = [
        binding.generate(CONFIG["eval_seed"], CONFIG["max_seq_len"], i, style="paper")
        for i in range(CONFIG["eval_n"])
    ]
    report = accuracy_report(
        programs, greedy_next_tokens(model, tokenizer, [p.text for p in programs])
    )
    logged = _state(folder)["log"]
    for key, value in report.items():
        assert abs(round(value, 4) - logged[key]) <= 2 / CONFIG["eval_n"], (key, report, logged)
