"""The binding-model trainer: batches drawn ahead by workers, the curriculum, resuming a run,
the learning-rate schedule, and fitting a session to a time budget (on a tiny model, CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tokenizer import build_char_tokenizer
from models.train_binding import (
    BatchPrefetcher,
    Stage,
    TrainConfig,
    Trainer,
    draw_batch,
    learning_rate,
    log_steps,
)


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    fields = dict(
        out_dir=str(tmp_path / "out"),
        run_dir=str(tmp_path / "run"),
        eval_n=16,
        n_layers=2,
        d_model=32,
        n_heads=2,
        d_mlp=64,
        batch_size=8,
        eval_every=3,
        warmup_steps=2,
        max_seq_len=6,
        advance_window=2,
        threads=1,
        snapshot_at={},
        snapshot_steps=[],
        stages=[
            Stage(name="recall", max_depth=1, min_len=2, max_len=4, advance_at=0.0),
            Stage(name="full", max_depth=2, min_len=2, max_len=6, advance_at=2.0),
        ],
    )
    return TrainConfig(**{**fields, **overrides})


def test_workers_draw_the_batches_the_trainer_would(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    tokenizer = build_char_tokenizer()
    prefetch = BatchPrefetcher(cfg, workers=2)
    try:
        for step in range(3):
            assert prefetch.get(0, step) == draw_batch(cfg, 0, step, tokenizer)
        # The curriculum moved on: batches drawn ahead for stage 0 are dropped.
        assert prefetch.get(1, 3) == draw_batch(cfg, 1, 3, tokenizer)
        assert prefetch.get(1, 4) == draw_batch(cfg, 1, 4, tokenizer)
    finally:
        prefetch.close()
    ids, labels, finals = draw_batch(cfg, 1, 0, tokenizer)
    assert len(ids) == len(labels) == len(finals) == cfg.batch_size
    for row, final in zip(labels, finals, strict=True):
        assert row[final + 1] != -100, "the final answer is supervised"


def test_a_batch_that_does_not_come_in_time_is_an_error(tmp_path) -> None:
    cfg = tiny_config(tmp_path, batch_size=100_000)  # far longer to draw than the timeout
    prefetch = BatchPrefetcher(cfg, workers=1, timeout_s=0.5)
    try:
        with pytest.raises(RuntimeError, match=r"stage 0, step 0.*data_workers: 0"):
            prefetch.get(0, 0)
    finally:
        prefetch.close()


def test_a_resumed_run_ends_where_an_unbroken_one_does(tmp_path) -> None:
    whole = Trainer(tiny_config(tmp_path / "a", data_workers=1))
    whole.run(6)
    first = Trainer(tiny_config(tmp_path / "b"))
    first.run(3)
    second = Trainer(tiny_config(tmp_path / "b"))  # reads run/checkpoint.pt
    assert second.step == 3 and second.stage == first.stage
    second.run(6)
    assert whole.stage == second.stage == 1, "stage recall (advance_at 0) gives way to full"
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[key], value, rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "b/run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    assert {"all", "depth_1", "lr", "device", "batch_size"} <= set(log[-1])
    out = tmp_path / "b/out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("a=1")["input_ids"][0] == tokenizer.bos_token_id
    assert json.loads((out / "training_state.json").read_text())["step"] in (3, 6)


def test_learning_rate_warms_up_holds_then_decays_on_a_cosine(tmp_path) -> None:
    cfg = tiny_config(tmp_path, lr=1e-3, warmup_steps=10, decay_start=100, decay_steps=50)
    cfg = cfg.model_copy(update={"lr_min": 1e-4})
    assert math.isclose(learning_rate(cfg, 0), 1e-4)
    assert learning_rate(cfg, 50) == 1e-3
    assert math.isclose(learning_rate(cfg, 125), (1e-3 + 1e-4) / 2)
    assert math.isclose(learning_rate(cfg, 150), 1e-4)
    assert math.isclose(learning_rate(cfg, 10_000), 1e-4)
    assert learning_rate(tiny_config(tmp_path), 10_000) == tiny_config(tmp_path).lr


def test_a_session_fitted_to_a_time_budget_logs_its_schedule_and_stops(tmp_path) -> None:
    trainer = Trainer(tiny_config(tmp_path, lr_min=1e-5))
    trainer.run(10**9, fit_minutes=0.1, decay_fraction=0.5, probe_steps=2)
    cfg = trainer.cfg
    assert 2 < trainer.step <= cfg.max_steps < 10**9
    assert cfg.decay_start + cfg.decay_steps == cfg.max_steps
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    fit = [r for r in log if r.get("event") == "fit"]
    assert len(fit) == 1 and fit[0]["step"] == 2 and fit[0]["max_steps"] == cfg.max_steps
    assert log[-1]["step"] == trainer.step, "the session ends with an evaluation"
    saved = torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)
    assert saved["step"] == trainer.step and saved["config"]["decay_start"] == cfg.decay_start


def test_log_steps_are_two_per_octave_rounded() -> None:
    assert log_steps(500, 12_847) == [500, 710, 1000, 1400, 2000, 2800, 4000, 5700, 8000, 11000]
    assert log_steps(3, 10) == [3, 4, 6, 8]
    cfg = TrainConfig(eval_every=500, max_steps=2000)
    assert cfg.snapshot_plan() == [500, 710, 1000, 1400, 2000], "log by default"


def test_snapshots_at_their_steps_carry_their_log_row(tmp_path) -> None:
    """A snapshot is kept at each of `snapshot_steps`, evaluated there even off the evaluation
    grid, and its training_state.json holds the step and the log row written at that step."""
    cfg = tiny_config(tmp_path, snapshot_steps=[2, 4], eval_every=3)
    Trainer(cfg).run(6)
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6]
    for step in (2, 4):
        folder = tmp_path / f"out-step{step}"
        state = json.loads((folder / "training_state.json").read_text())
        assert state["step"] == step
        assert state["log"] == next(r for r in log if r["step"] == step)
        assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.glob("out-step*")) == ["out-step2", "out-step4"]
