"""The worker on a checkpoint (a tiny model with a training_state.json, found through a
checkpoints glob): every table it returns ends with the model's `step`; and the probes kind,
wired like the others (a stand-in prober for the wiring and out of memory, then the real
`actors.probes.Prober` on a real shard)."""

import dataclasses
import json
import math
from typing import ClassVar

import pyarrow as pa
import pytest
import torch

from actors import worker
from actors.probes import Prober
from actors.worker import SKIPPED_SCHEMA, STEP_FIELD, ModelWorker
from orchestrator.experiments import PROBE_LABELS
from orchestrator.protocol import ShardOutOfMemory, WorkerConfig
from orchestrator.shards import iter_shards
from orchestrator.spec import parse_spec
from tests.tiny import save_tiny_model

STEP = 10
N = 20  # programs: one probes shard (the fewest a probe takes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(spec, shards) of a sweep over one tiny checkpoint at step 10, every kind."""
    folder = tmp_path_factory.mktemp("ckpt") / f"snap-step{STEP}"
    save_tiny_model(folder, "llama", n_layers=2)
    (folder / "training_state.json").write_text(json.dumps({"step": STEP, "stage": 0}))
    spec = parse_spec(
        {
            "run": "steps",
            "tasks": [
                {"family": "binding", "seq_lens": [4], "n": N, "options": {"style": "paper"}}
            ],
            "models": [{"checkpoints": str(folder.parent / "snap-step*")}],
            "experiments": {
                "behavior": {"backend": "hf", "programs_per_shard": 2},
                "patching": {"layers_per_shard": 2, "programs_per_shard": 2, "batch_size": 64},
                "attribution": {"programs_per_shard": 2, "batch_size": 8, "verify_top_k": 1},
                "knockout": {"programs_per_shard": 2, "batch_size": 16},
                "probes": {"programs_per_shard": N, "batch_size": 8},
            },
        }
    )
    assert [(m.id, m.step) for m in spec.models] == [(str(folder), STEP)]
    return spec, list(iter_shards(spec, {str(folder): 2}))


def _config(spec, step: int | None = STEP, **probes) -> WorkerConfig:
    config = WorkerConfig.of(spec, spec.models[0].id, threads=1)
    return dataclasses.replace(
        config,
        model=config.model.model_copy(update={"step": step}),
        probes=config.probes.model_copy(update=probes),
    )


def _first(shards, kind):
    return next(s for s in shards if s.kind == kind)


@pytest.mark.parametrize("kind", ["behavior", "patching", "attribution", "knockout"])
def test_every_table_ends_with_the_models_step(checkpoint, kind) -> None:
    spec, shards = checkpoint
    shard = _first(shards, kind)
    result = ModelWorker(_config(spec)).run(shard)
    for table in (result.table, result.skipped):
        assert table.schema.field(table.num_columns - 1) == STEP_FIELD
        assert table.column("step").to_pylist() == [STEP] * table.num_rows
    assert result.table.num_rows > 0
    assert result.skipped.schema == SKIPPED_SCHEMA.append(STEP_FIELD)
    # Without a step: nulls, and every other column as it was.
    plain = ModelWorker(_config(spec, step=None)).run(shard)
    assert plain.table.column("step").null_count == plain.table.num_rows
    assert plain.table.schema == result.table.schema
    assert plain.table.drop_columns(["step"]).equals(result.table.drop_columns(["step"]))


class RecordingProber(Prober):
    """Stands in for `actors.probes.Prober` (no fitting; a subclass, so that the worker's type
    checks pass): keeps its arguments and each call's; a batch above `above` runs out of
    memory; every call skips its first program."""

    made: ClassVar[list["RecordingProber"]] = []
    above: ClassVar[int | None] = None

    def __init__(self, lm, batch_size: int = 64, l2: float = 1e-3, train_fraction: float = 0.5):
        self.args = {"lm": lm, "batch_size": batch_size, "l2": l2, "train_fraction": train_fraction}
        self.batch_size = batch_size
        self.skipped: list = []
        self.calls: list[dict] = []
        RecordingProber.made.append(self)

    def probe(self, programs, layers=None, labels=None, seed=0) -> pa.Table:
        self.calls.append(
            {"batch": self.batch_size, "programs": [p.index for p in programs], "layers": layers}
            | {"labels": labels, "seed": seed}
        )
        first = programs[0]
        self.skipped.append(({"task": first.task, "seq_len": first.seq_len, "index": 0}, "why"))
        if self.above is not None and self.batch_size > self.above:
            raise torch.OutOfMemoryError(f"injected: batch {self.batch_size}")
        return pa.table({"layer": list(layers), "accuracy": [1.0] * len(layers)})


@pytest.fixture
def recording(monkeypatch):
    """The worker's `Prober` replaced by `RecordingProber`."""
    monkeypatch.setattr(worker, "Prober", RecordingProber)
    monkeypatch.setattr(RecordingProber, "made", [])
    return RecordingProber


def test_the_worker_makes_one_prober_and_asks_it_for_the_shard(checkpoint, recording) -> None:
    spec, shards = checkpoint
    labels = ["final_colon", "ref_depth_1_rhs"]
    worker = ModelWorker(_config(spec, l2=0.25, train_fraction=0.7, labels=labels))
    shard = _first(shards, "probes")
    assert (shard.layers, shard.site, shard.n) == ((0, 1, 2), None, N)
    result = worker.run(shard)
    worker.run(shard)
    (prober,) = recording.made
    assert prober.args == {"lm": worker._lm, "batch_size": 8, "l2": 0.25, "train_fraction": 0.7}
    assert prober.calls[0] == {
        "batch": 8,
        "programs": list(range(N)),
        "layers": [0, 1, 2],
        "labels": labels,
        "seed": spec.seed,
    }
    assert len(prober.calls) == 2, "one prober, reused"
    assert result.table.column_names == ["layer", "accuracy", "step"]
    assert result.table.column("step").to_pylist() == [STEP] * 3
    assert result.skipped.to_pylist() == [
        {
            "model": spec.models[0].id,
            "task": "binding",
            "seq_len": 4,
            "program": 0,
            "reason": "why",
            "counterfactual": "root_value",
            "step": STEP,
        }
    ]


def test_probes_out_of_memory_halves_the_batch_then_asks_for_a_split(
    checkpoint, recording, monkeypatch
) -> None:
    spec, shards = checkpoint
    shard = _first(shards, "probes")
    monkeypatch.setattr(RecordingProber, "above", 2)
    result = ModelWorker(_config(spec)).run(shard)
    assert [c["batch"] for c in recording.made[0].calls] == [8, 4, 2]
    assert result.skipped.num_rows == 1, "each attempt starts its skipped list afresh"
    monkeypatch.setattr(RecordingProber, "above", 0)
    worker = ModelWorker(_config(spec))
    with pytest.raises(ShardOutOfMemory, match=r"out of memory at one program per forward \(3 l"):
        worker.run(shard)
    assert [c["batch"] for c in worker._prober.calls] == [8, 4, 2, 1]


def test_a_probes_only_worker_loads_its_model(checkpoint, recording) -> None:
    spec, _ = checkpoint
    config = dataclasses.replace(
        _config(spec), behavior=None, patching=None, attribution=None, knockout=None
    )
    assert ModelWorker(config)._lm is not None


def test_worker_runs_a_probes_shard(checkpoint) -> None:
    """The real `actors.probes.Prober` (an ImportError until actors/probes.py is in)."""
    from actors.probes import PROBES_SCHEMA

    spec, shards = checkpoint
    shard = _first(shards, "probes")
    worker = ModelWorker(_config(spec))
    result = worker.run(shard)
    assert result.table.schema == PROBES_SCHEMA.append(STEP_FIELD)
    assert result.skipped.schema == SKIPPED_SCHEMA.append(STEP_FIELD)
    rows = result.table.to_pylist()
    assert {(r["model"], r["task"], r["seq_len"], r["step"]) for r in rows} == {
        (spec.models[0].id, "binding", 4, STEP)
    }
    assert {r["layer"] for r in rows} == {0, 1, 2}
    labels = {r["label"] for r in rows}
    assert labels <= set(PROBE_LABELS)
    assert {"ref_depth_1_rhs", "final_colon"} <= labels, "in every binding program"
    kept = N - result.skipped.num_rows
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["control_accuracy"] <= 1, r
        assert 0 < r["chance"] <= 1 and 0 < r["control_chance"] <= 1, r
        assert r["n_train"] > 0 and r["n_test"] > 0 and r["n_train"] + r["n_test"] <= kept, r
        assert r["n_classes"] >= 1
        if r["label"] == "final_colon":  # every kept program has one: the split is 0.5
            assert r["n_train"] + r["n_test"] == kept, r
            assert math.isclose(r["n_train"], kept / 2, abs_tol=1), r
    # Seeded: the same shard gives the same rows.
    assert ModelWorker(_config(spec)).run(shard).table.equals(result.table)
