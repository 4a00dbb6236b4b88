"""The actor body without Ray: the typed protocol in and out, and the out-of-memory loop (faults
injected by the test-only subclass, not by anything the production actor reads)."""

import dataclasses

import pytest

from actors.worker import ModelWorker
from orchestrator.protocol import Shard, ShardOutOfMemory, ShardResult, WorkerConfig
from orchestrator.shards import iter_shards
from orchestrator.spec import parse_spec
from tests.integration.faults import Faults, FaultyWorker
from tests.tiny import save_tiny_model


@pytest.fixture(scope="module")
def spec_and_shards(tmp_path_factory):
    model = str(save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", n_layers=2))
    spec = parse_spec(
        {
            "run": "w",
            "tasks": [
                {"family": "binding", "seq_lens": [4], "n": 2, "options": {"style": "paper"}}
            ],
            "models": [{"id": model}],
            "experiments": {
                "behavior": {"backend": "hf"},
                "patching": {"sites": ["resid_pre"], "layers_per_shard": 2, "batch_size": 64},
            },
        }
    )
    return spec, list(iter_shards(spec, {model: 2}))


def test_worker_speaks_the_typed_protocol(spec_and_shards) -> None:
    spec, shards = spec_and_shards
    config = WorkerConfig.of(spec, spec.models[0].id, threads=1)
    assert dataclasses.is_dataclass(config) and config.patching.batch_size == 64
    worker = ModelWorker(config)
    behavior = next(s for s in shards if s.kind == "behavior")
    result = worker.run(behavior)
    assert isinstance(result, ShardResult)
    assert result.table.column("program").to_pylist() == [0, 1]
    assert set(result.table.column("model").to_pylist()) == {spec.models[0].id}
    patching = next(s for s in shards if s.kind == "patching")
    assert isinstance(patching, Shard) and patching.layers == (0, 1)
    rows = worker.run(patching).table
    assert set(rows.column("layer").to_pylist()) == {0, 1}
    assert set(rows.column("program").to_pylist()) == {0, 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        patching.n = 3


def test_out_of_memory_halves_the_batch_then_asks_for_a_split(spec_and_shards) -> None:
    spec, shards = spec_and_shards
    config = WorkerConfig.of(spec, spec.models[0].id, threads=1)
    patching = next(s for s in shards if s.kind == "patching")
    halving = FaultyWorker(config, Faults(oom_batch_above=10))
    want = ModelWorker(config).run(patching).table
    got = halving.run(patching).table
    assert halving._patcher.batch_size == 8, "64 -> 32 -> 16 -> 8 fits"
    assert got.equals(want), "a smaller batch gives the same rows"
    too_big = FaultyWorker(config, Faults(oom_layers_above=1))
    with pytest.raises(ShardOutOfMemory, match="out of memory at one patch per forward"):
        too_big.run(patching)
