"""The `probes` kind in the spec, its shards, their ids and counts, the identity and the plan
(no Ray, no model weights)."""

import dataclasses
import re
from pathlib import Path

import pytest

from orchestrator.checks import check_models
from orchestrator.experiments import PROBE_LABELS
from orchestrator.identity import identity, spec_hash
from orchestrator.plan import make_plan
from orchestrator.protocol import KINDS, WorkerConfig
from orchestrator.shards import count_shards, iter_shards, rel_dir, split
from orchestrator.sink import ResultsDir
from orchestrator.spec import SpecError
from tests.unit.test_checkpoints import CONFIG_LAYERS, snapshot
from tests.unit.test_counterfactual_spec import PINNED_HASH
from tests.unit.test_spec_shards import BASE, N_LAYERS, spec_with

# binding: 50 programs per length (3 blocks of 20), lengths 4 and 8; range is not probed.
PROBES = {"programs_per_shard": 20, "tasks": ["binding"]}


def probes_spec(**changes):
    return spec_with(tasks__0__n=50, experiments__probes={**PROBES, **changes})


def probes(spec) -> list:
    return [s for s in iter_shards(spec, N_LAYERS) if s.kind == "probes"]


def test_probes_block_defaults_and_alone() -> None:
    p = spec_with(experiments__probes={"tasks": ["binding"]}).experiments.probes
    assert (p.layers, p.labels, p.batch_size, p.programs_per_shard) == (None, None, 64, 200)
    assert (p.train_fraction, p.l2, p.tasks) == (0.5, 1e-3, ["binding"])
    assert "probes" in KINDS
    alone = spec_with(experiments={"probes": {"tasks": ["binding"], "l2": 0, "layers": [1]}})
    assert alone.experiments.behavior is None and alone.experiments.probes.l2 == 0.0
    assert [t.family for t in alone.tasks_for("probes")] == ["binding"]
    # With binding the only task, `tasks` may be left out.
    only = spec_with(tasks=BASE["tasks"][:1], experiments={"probes": {"train_fraction": 0.8}})
    assert only.experiments.probes.train_fraction == 0.8
    assert [t.family for t in only.tasks_for("probes")] == ["binding"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"programs_per_shard": 19},
            "experiments.probes.programs_per_shard = 19: a probe is fitted on its shard's "
            "programs alone, and 19 programs split into too few to train on and to score; fix: "
            "use programs_per_shard >= 20 (the default is 200)",
        ),
        ({"programs_per_shard": 0}, "experiments.probes.programs_per_shard = 0: Input should be"),
        (
            {"train_fraction": 0},
            "experiments.probes.train_fraction = 0: Input should be greater than 0; fix: use a "
            "larger value",
        ),
        (
            {"train_fraction": 1},
            "experiments.probes.train_fraction = 1: Input should be less than 1; fix: use a "
            "smaller value",
        ),
        ({"train_fraction": 1.5}, "experiments.probes.train_fraction = 1.5: Input should be less"),
        (
            {"train_fraction": True},
            "experiments.probes.train_fraction = True: Input should be a valid number; fix: "
            "write a number",
        ),
        (
            {"l2": -0.1},
            "experiments.probes.l2 = -0.1: Input should be greater than or equal to 0",
        ),
        ({"l2": ".1"}, "experiments.probes.l2 = '.1': Input should be a valid number"),
        ({"l2": float("inf")}, "experiments.probes.l2 = inf: Input should be a finite number"),
        (
            {"labels": ["query_var", "final_colon"]},
            "experiments.probes.labels: labels ['query_var'] are not labelled positions of a "
            "binding program; fix: use some of ['ref_depth_1_rhs', 'ref_depth_2_rhs', "
            "'ref_depth_3_rhs', 'ref_depth_4_rhs', 'final_colon'], or omit labels for all of them",
        ),
        ({"labels": ["ref_depth_5_rhs"]}, "labels ['ref_depth_5_rhs'] are not labelled"),
        (
            {"labels": ["final_colon", "final_colon"]},
            "experiments.probes.labels: labels ['final_colon', 'final_colon'] repeat a label "
            "(each would run twice); fix: list each label once",
        ),
        ({"labels": []}, "experiments.probes.labels = []: List should have at least 1 item"),
        ({"batch_size": 0}, "experiments.probes.batch_size = 0: Input should be greater than"),
        ({"batch_size": "auto"}, "experiments.probes.batch_size = 'auto': Input should be a"),
        ({"layers": [-1]}, "experiments.probes.layers.0 = -1: Input should be greater"),
        (
            {"tasks": ["boolean"]},
            "experiments.probes.tasks names ['boolean'], which are not in tasks",
        ),
        (
            {"tasks": ["binding", "range"]},
            "experiments.probes would probe ['range']: probes read binding programs' labelled "
            "positions only; fix: list only binding under experiments.probes.tasks",
        ),
        (
            {"tasks": None},  # every task of the spec, range among them
            "experiments.probes would probe ['range']: probes read binding programs'",
        ),
        (
            {"sites": ["resid_pre"]},
            "experiments.probes.sites = ['resid_pre']: Extra inputs are not permitted; fix: "
            "remove it, or check its spelling against the allowed keys: layers, labels, "
            "batch_size, programs_per_shard, train_fraction, l2, tasks",
        ),
    ],
)
def test_bad_probes_blocks_name_field_value_and_fix(changes, message) -> None:
    with pytest.raises(SpecError) as err:
        probes_spec(**changes)
    assert str(err.value).startswith("unit.yaml: the spec is not valid (1 problem(s))")
    assert message in str(err.value)


def test_probe_labels_are_the_binding_programs_labels() -> None:
    assert PROBE_LABELS[-1] == "final_colon"
    assert PROBE_LABELS[:-1] == tuple(f"ref_depth_{k}_rhs" for k in (1, 2, 3, 4))
    spec = probes_spec(labels=["final_colon", "ref_depth_2_rhs"])
    assert spec.experiments.probes.labels == ["final_colon", "ref_depth_2_rhs"], "as given"


def test_probes_shards_hold_every_layer_and_no_site() -> None:
    spec = probes_spec()
    shards = probes(spec)
    # models x binding (2 lengths x 3 blocks of 20, 20, 10 programs), never cut by layers
    assert len(shards) == 2 * 2 * 3
    counts = count_shards(spec, N_LAYERS)
    assert counts["probes"] == len(shards)
    assert sum(counts.values()) == len(list(iter_shards(spec, N_LAYERS)))
    assert {s.model: s.layers for s in shards} == {
        "org/model-a": tuple(range(8)),  # 7 layers, and the stream leaving the last
        "models/local-b": (0, 1, 2),
    }
    assert {(s.site, s.counterfactual, s.task) for s in shards} == {(None, "root_value", "binding")}
    assert [(s.seq_len, s.start, s.n) for s in shards[:6]] == [
        (4, 0, 20),
        (4, 20, 20),
        (4, 40, 10),
        (8, 0, 20),
        (8, 20, 20),
        (8, 40, 10),
    ]
    first = shards[0]
    assert rel_dir(first) == "probes/model=org--model-a/task=binding"
    assert ResultsDir(Path("/r/run")).shard_path(first) == Path(
        f"/r/run/probes/model=org--model-a/task=binding/{first.id}.parquet"
    )
    assert first.describe() == "probes binding seq_len=4 programs 0-19 layers 0-7"
    assert len({s.id for s in shards}) == len(shards)
    others = {s.id for s in iter_shards(spec, N_LAYERS) if s.kind != "probes"}
    assert not others & {s.id for s in shards}, "a kind's ids are its own"
    assert others == {s.id for s in iter_shards(spec_with(tasks__0__n=50), N_LAYERS)}
    # Chosen layers, in any order and repeated: one shard, sorted, once each.
    chosen = probes(probes_spec(layers=[5, 0, 5]))
    assert {s.layers for s in chosen} == {(0, 5)}
    assert chosen[0].describe().endswith("layers 0,5")
    # Counted per model, layers or not; range is never probed.
    assert count_shards(probes_spec(tasks=["binding"], layers=[1]), N_LAYERS)["probes"] == 12


def test_probes_shard_ids_change_with_what_changes_rows() -> None:
    base = [s.id for s in probes(probes_spec())]
    assert base == [s.id for s in probes(probes_spec())]
    for same in ({"batch_size": 8}, {"train_fraction": 0.5}, {"l2": 1e-3}):
        assert [s.id for s in probes(probes_spec(**same))] == base, same
    for changed in (
        {"labels": ["final_colon"]},
        {"train_fraction": 0.6},
        {"l2": 0.01},
        {"layers": [0]},
    ):
        new = [s.id for s in probes(probes_spec(**changed))]
        assert len(new) == len(base) and not set(new) & set(base), changed
    # Layers count through the shard's own: 0-2 are all of local-b's (two, and the last out).
    two = {s.id: s.model for s in probes(probes_spec(layers=[0, 1, 2]))}
    assert {i for i, m in two.items() if m == "models/local-b"} <= set(base)
    assert not {i for i, m in two.items() if m == "org/model-a"} & set(base)
    # The order of the labels decides no row.
    ab = probes(probes_spec(labels=["final_colon", "ref_depth_1_rhs"]))
    ba = probes(probes_spec(labels=["ref_depth_1_rhs", "final_colon"]))
    assert [s.id for s in ab] == [s.id for s in ba]

    # programs_per_shard counts only through the blocks it makes: the same block, the same id.
    def blocks(spec) -> dict[tuple, str]:
        return {(s.model, s.seq_len, s.start, s.n): s.id for s in probes(spec)}

    old, new = blocks(probes_spec()), blocks(probes_spec(programs_per_shard=40))
    same = old.keys() & new.keys()
    assert {key[2:] for key in same} == {(40, 10)}, "blocks 0-39 and 40-49 of 40"
    assert all(old[key] == new[key] for key in same)
    assert not {old[key] for key in old.keys() - same} & set(new.values())


def test_a_probes_shard_splits_by_layers_never_by_programs() -> None:
    shard = next(s for s in probes(probes_spec()) if s.model == "models/local-b")
    a, b = split(shard)
    assert (a.layers, b.layers, a.n, b.n) == ((0,), (1, 2), 20, 20)
    assert (a.part, b.part, a.id, b.id) == ((0, 2), (1, 2), shard.id, shard.id)
    message = (
        f"probes shard {a.file_stem} has one layer, and its programs are its probe's data, so "
        "it is not split by programs; fix: lower experiments.probes.programs_per_shard"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        split(a)


def test_the_identity_has_probes_only_when_the_spec_does() -> None:
    assert "probes" not in identity(spec_with())
    assert spec_hash(identity(spec_with())) == PINNED_HASH
    ident = identity(probes_spec(labels=["final_colon", "ref_depth_1_rhs"], layers=[1, 0]))
    assert ident["probes"] == {
        "train_fraction": 0.5,
        "l2": 1e-3,
        "programs_per_shard": 20,
        "layers": [0, 1],
        "tasks": ["binding"],
        "labels": ["final_colon", "ref_depth_1_rhs"],
    }
    reordered = identity(probes_spec(labels=["ref_depth_1_rhs", "final_colon"], layers=[0, 1]))
    assert reordered == ident
    assert identity(probes_spec(batch_size=3)) == identity(probes_spec()), "speed only"
    assert identity(probes_spec(l2=0.5)) != identity(probes_spec())


def test_probe_layers_are_checked_against_each_model(tmp_path) -> None:
    model = str(snapshot(tmp_path / "six", step=1))
    spec = spec_with(models=[{"id": model}], experiments__probes={**PROBES, "layers": [2, 6]})
    assert check_models(spec) == {model: CONFIG_LAYERS}, "6: the stream out of the last layer"
    spec = spec_with(models=[{"id": model}], experiments__probes={**PROBES, "layers": [2, 7]})
    with pytest.raises(SpecError) as err:
        check_models(spec, "unit.yaml")
    assert (
        f"  experiments.probes.layers = [2, 7]: [7] out of range for {model} (layers 0..6); "
        "fix: drop them, or omit layers to use every layer"
    ) in str(err.value)


def test_workers_get_the_probe_settings_and_the_plan_counts_programs() -> None:
    spec = probes_spec(l2=0.25)
    config = WorkerConfig.of(spec, "org/model-a")
    assert config.probes == spec.experiments.probes and config.probes.l2 == 0.25
    assert WorkerConfig.of(spec_with(), "org/model-a").probes is None
    alone = spec_with(tasks__0__n=50, experiments={"probes": PROBES})
    plan = make_plan(alone, N_LAYERS)  # no tokenizer needed: no model is read
    assert plan.shards == {"probes": 12}
    assert plan.probe_programs == 2 * (2 * 50), "models x binding's programs"
    behavior = spec_with(experiments={"behavior": {}})  # no tokenizer either
    assert make_plan(behavior, N_LAYERS).probe_programs == 0
    assert dataclasses.asdict(plan)["probe_programs"] == plan.probe_programs
