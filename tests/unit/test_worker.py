"""The actor body without Ray: the typed protocol in and out, and the out-of-memory loop (faults
injected by the test-only subclass, not by anything the production actor reads)."""

import dataclasses
import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from actors.patching import Patcher
from actors.targets import encode_program
from actors.worker import SKIPPED_SCHEMA, STEP_FIELD, ModelWorker
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
                "patching": {
                    "sites": ["resid_pre", "attn_head"],
                    "layers_per_shard": 2,
                    "batch_size": 64,
                    "positions": "all",
                },
                "attribution": {
                    "sites": ["resid_pre", "attn_head"],
                    "batch_size": 8,
                    "verify_top_k": 2,
                },
                "knockout": {"scopes": ["answer", "later"], "batch_size": 16},
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


def _shard(shards: list[Shard], kind: str, site: str = "resid_pre") -> Shard:
    return next(s for s in shards if s.kind == kind and s.site == site)


@pytest.mark.parametrize("site", ["resid_pre", "attn_head"])
def test_worker_runs_an_attribution_shard(spec_and_shards, site) -> None:
    spec, shards = spec_and_shards
    model = spec.models[0].id
    worker = ModelWorker(WorkerConfig.of(spec, model, threads=1))
    shard = _shard(shards, "attribution", site)
    assert shard.layers == (0, 1), "one shard holds every layer"
    result = worker.run(shard)
    assert result.skipped.schema == SKIPPED_SCHEMA.append(STEP_FIELD)
    assert result.skipped.num_rows == 0
    rows = result.table.to_pylist()
    assert {(r["model"], r["site"], r["task"], r["seq_len"]) for r in rows} == {
        (model, site, "binding", 4)
    }
    tokenizer = AutoTokenizer.from_pretrained(model)
    heads = 4 if site == "attn_head" else 1
    for program in worker.programs(shard):
        mine = [r for r in rows if r["program"] == program.index]
        # Every layer x position (x head) of the program as the actor encodes it.
        pair = encode_program(tokenizer, program, mine[0]["answer_prefix"])
        assert len(mine) == 2 * len(pair.clean_ids) * heads
        assert {(r["layer"], r["pos"]) for r in mine} == {
            (layer, pos) for layer in (0, 1) for pos in range(len(pair.clean_ids))
        }
        assert all(r["estimate"] is not None and math.isfinite(r["estimate"]) for r in mine)
        verified = [r for r in mine if r["verify"] is not None]
        assert sorted(r["verify"] for r in verified) == ["random"] * 2 + ["top"] * 2
        assert all((r["exact"] is None) == (r["verify"] is None) for r in mine)
        smallest_top = min(abs(r["estimate"]) for r in verified if r["verify"] == "top")
        others = [abs(r["estimate"]) for r in mine if r["verify"] != "top"]
        assert smallest_top >= max(others), "top: the largest |estimate| of the program"

    # The exact values are the patcher's own, cell for cell (patching here is at every position).
    patched = worker.run(_shard(shards, "patching", site)).table.to_pylist()
    exact = {
        (r["program"], r["layer"], r["pos"], r["head"]): r["patched_logit_diff"]
        - r["clean_logit_diff"]
        for r in patched
    }
    clean = {r["program"]: r["clean_logit_diff"] for r in patched}
    for r in rows:
        assert math.isclose(r["clean_logit_diff"], clean[r["program"]], abs_tol=1e-4)
        if r["verify"] is not None:
            want = exact[(r["program"], r["layer"], r["pos"], r["head"])]
            assert math.isclose(r["exact"], want, abs_tol=1e-4), (r, want)


class AttributionOom(ModelWorker):
    """Every attribution attempt with more than `above` programs per batch (or `auto`) runs out
    of memory; the batch sizes tried are kept."""

    def __init__(self, config: WorkerConfig, above: int) -> None:
        super().__init__(config)
        self.above = above
        self.tried: list = []

    def _attribute(self, attributor, programs, shard):
        self.tried.append(attributor.batch_size)
        if attributor.batch_size == "auto" or attributor.batch_size > self.above:
            raise torch.OutOfMemoryError(f"injected: batch {attributor.batch_size}")
        return super()._attribute(attributor, programs, shard)


def _close(got: pa.Table, want: pa.Table) -> None:
    """Same rows; floats within CPU batch-size noise."""
    assert got.schema == want.schema and got.num_rows == want.num_rows
    for name in want.column_names:
        for a, b in zip(got.column(name).to_pylist(), want.column(name).to_pylist(), strict=True):
            if isinstance(b, float) and a is not None:
                assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (name, a, b)
            else:
                assert a == b, (name, a, b)


def test_attribution_out_of_memory_halves_the_batch_then_asks_for_a_split(
    spec_and_shards,
) -> None:
    spec, shards = spec_and_shards
    config = WorkerConfig.of(spec, spec.models[0].id, threads=1)
    shard = _shard(shards, "attribution")
    halving = AttributionOom(config, above=2)
    got = halving.run(shard).table
    assert halving.tried == [8, 4, 2] and halving._attributor.batch_size == 2
    _close(got, ModelWorker(config).run(shard).table)
    never = AttributionOom(config, above=0)
    with pytest.raises(ShardOutOfMemory, match="out of memory at one program per forward and"):
        never.run(shard)
    assert never.tried == [8, 4, 2, 1]
    auto = dataclasses.replace(
        config, attribution=config.attribution.model_copy(update={"batch_size": "auto"})
    )
    at_once = AttributionOom(auto, above=64)
    with pytest.raises(ShardOutOfMemory, match=r"\(2 layers, 2 programs\)"):
        at_once.run(shard)
    assert at_once.tried == ["auto"], "auto: the attributor has already shrunk its batches"


def test_the_plan_counts_the_attribution_work(spec_and_shards) -> None:
    """The printed plan's cells and exact patches are the rows the worker writes (here the
    sample is every program, and no answer prefix adds positions)."""
    from orchestrator.plan import SAMPLE, make_plan

    spec, _ = spec_and_shards
    model = spec.models[0].id
    data = spec.model_dump()
    data["tasks"][0] |= {"answer_prefix": "", "n": SAMPLE}
    data["experiments"]["attribution"]["positions"] = "targets"
    plain = parse_spec(data)
    plan = make_plan(plain, {model: 2})
    worker = ModelWorker(WorkerConfig.of(plain, model, threads=1))
    rows = [
        r
        for shard in iter_shards(plain, {model: 2})
        if shard.kind == "attribution"
        for r in worker.run(shard).table.to_pylist()
    ]
    assert plan.shards["attribution"] == 2, "one block of programs x 2 sites"
    assert plan.attribution_cells == len(rows) > 0
    verified = sum(r["verify"] is not None for r in rows)
    assert plan.verify_patches == verified == 2 * SAMPLE * 2 * 2, "sites x programs x 2K"


class KnockoutOom(ModelWorker):
    """Every knockout attempt with more than `above` rows per forward (or `auto`) runs out of
    memory; the batch sizes tried are kept."""

    def __init__(self, config: WorkerConfig, above: int) -> None:
        super().__init__(config)
        self.above = above
        self.tried: list = []

    def _knock(self, knocker, programs, shard):
        self.tried.append(knocker.batch_size)
        if knocker.batch_size == "auto" or knocker.batch_size > self.above:
            raise torch.OutOfMemoryError(f"injected: batch {knocker.batch_size}")
        return super()._knock(knocker, programs, shard)


@pytest.mark.parametrize("scope", ["answer", "later"])
def test_worker_runs_a_knockout_shard(spec_and_shards, scope) -> None:
    from actors.knockout import KNOCKOUT_SCHEMA

    spec, shards = spec_and_shards
    model = spec.models[0].id
    config = WorkerConfig.of(spec, model, threads=1)
    shard = _shard(shards, "knockout", scope)
    assert shard.layers == (0, 1)
    result = ModelWorker(config).run(shard)
    assert result.table.schema == KNOCKOUT_SCHEMA.append(STEP_FIELD)
    assert result.skipped.num_rows == 0
    rows = result.table.to_pylist()
    assert {(r["model"], r["scope"], r["seq_len"]) for r in rows} == {(model, scope, 4)}
    tokenizer = AutoTokenizer.from_pretrained(model)
    for program in ModelWorker(config).programs(shard):
        mine = [r for r in rows if r["program"] == program.index]
        pair = encode_program(tokenizer, program, mine[0]["answer_prefix"])
        sources = {
            (pos, label)
            for pos, label in enumerate(pair.labels)
            if label.startswith("ref_depth_") or label == "query_var"
        }
        assert {(r["source_pos"], r["source"]) for r in mine} == sources
        assert len(mine) == len(sources) * 2 * 4, "sources x layers x heads"
        assert all(math.isfinite(r["effect"]) for r in mine)
    # Out of memory: 16 -> 8 -> 4 fits, the same rows; at one row per forward, a split.
    halving = KnockoutOom(config, above=4)
    _close(halving.run(shard).table, result.table)
    assert halving.tried == [16, 8, 4]
    with pytest.raises(ShardOutOfMemory, match="out of memory at one knockout per forward"):
        KnockoutOom(config, above=0).run(shard)


# -- counterfactual kinds -------------------------------------------------------------------


def _with_distractor(spec):
    """The fixture's spec with binding patched against root_value and distractor, and the
    distractor patching shard at resid_pre."""
    data = spec.model_dump()
    data["tasks"][0]["counterfactual"] = ["root_value", "distractor"]
    both = parse_spec(data)
    shards = iter_shards(both, {spec.models[0].id: 2})
    shard = next(s for s in shards if s.counterfactual == "distractor" and s.site == "resid_pre")
    return both, shard


class RecordingPatcher(Patcher):
    """Stands in for `Patcher` (no model): keeps the keyword arguments of each `patch` call."""

    def __init__(self) -> None:  # no super().__init__: nothing is patched
        self.calls: list[dict] = []
        self.skipped: list = []
        self.batch_size = 64

    def patch(self, programs, **kwargs) -> pa.Table:
        self.calls.append({"programs": [p.index for p in programs], **kwargs})
        return pa.table({"program": [p.index for p in programs]})


def test_the_worker_asks_the_patcher_for_the_shards_counterfactual(spec_and_shards) -> None:
    spec, shards = spec_and_shards
    both, shard = _with_distractor(spec)
    worker = ModelWorker(WorkerConfig.of(both, both.models[0].id, threads=1))
    patcher = RecordingPatcher()
    root = next(s for s in shards if s.kind == "patching" and s.site == "resid_pre")
    for s in (root, shard):
        worker._patch(patcher, worker.programs(s), s)
    assert [c["counterfactual"] for c in patcher.calls] == ["root_value", "distractor"]
    assert patcher.calls[1] == {
        "programs": [0, 1],
        "sites": ["resid_pre"],
        "layers": [0, 1],
        "positions": "all",
        "answer_prefix": "auto",
        "counterfactual": "distractor",
    }


def test_worker_runs_a_distractor_patching_shard(spec_and_shards) -> None:
    """Needs `Patcher.patch(..., counterfactual=)` (a TypeError until it takes it). Program 0
    has no digit off its queried chain: it is skipped, with a reason; program 1 is patched."""
    from orchestrator.tasks.counterfactuals import variant

    spec, _ = spec_and_shards
    both, shard = _with_distractor(spec)
    worker = ModelWorker(WorkerConfig.of(both, both.models[0].id, threads=1))
    programs = worker.programs(shard)
    assert [variant(p, "distractor") is not None for p in programs] == [False, True]
    result = worker.run(shard)
    assert set(result.table.column("program").to_pylist()) == {1}
    assert result.skipped.column("program").to_pylist() == [0]
    assert all(result.skipped.column("reason").to_pylist())


def test_the_plan_counts_every_counterfactual_kind(spec_and_shards) -> None:
    """Each kind is counted as root_value's work (an estimate: a kind may skip programs)."""
    from orchestrator.plan import make_plan

    spec, _ = spec_and_shards
    both, _ = _with_distractor(spec)
    layers = {spec.models[0].id: 2}
    one, two = make_plan(spec, layers), make_plan(both, layers)
    assert one.patch_rows > 0 and two.shards["patching"] == 2 * one.shards["patching"]
    assert (two.patch_rows, two.free_rows, two.token_layers) == (
        2 * one.patch_rows,
        2 * one.free_rows,
        2 * one.token_layers,
    )
    assert (two.attribution_cells, two.knockout_rows) == (
        one.attribution_cells,
        one.knockout_rows,
    ), "patching only"
