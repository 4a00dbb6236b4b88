"""Spec validation and shard expansion (no Ray, no model weights)."""

import copy
import dataclasses
import re
from pathlib import Path

import pyarrow as pa
import pytest

from orchestrator.shards import count_shards, escape_model, iter_shards, layer_blocks, split
from orchestrator.sink import ResultsDir, SinkError
from orchestrator.spec import SpecError, load_spec, parse_spec

BASE = {
    "run": "unit",
    "seed": 3,
    "tasks": [
        {"family": "binding", "seq_lens": [4, 8], "n": 10, "options": {"style": "paper"}},
        {"family": "range", "seq_lens": [5], "n": 3},
    ],
    "models": [{"id": "org/model-a"}, {"id": "models/local-b"}],
    "experiments": {
        "behavior": {"programs_per_shard": 4},
        "patching": {
            "sites": ["resid_pre", "attn_head"],
            "layers_per_shard": 3,
            "programs_per_shard": 5,
            "tasks": ["binding"],
        },
    },
}
N_LAYERS = {"org/model-a": 7, "models/local-b": 2}


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return parse_spec(data, "unit.yaml")


def test_valid_spec_is_frozen() -> None:
    spec = spec_with()
    assert spec.experiments.patching.positions == "targets"
    with pytest.raises(Exception, match="frozen"):
        spec.run = "other"
    assert [t.family for t in spec.tasks_for("patching")] == ["binding"]
    assert [t.family for t in spec.tasks_for("behavior")] == ["binding", "range"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"tasks__0__famliy": "binding"},
            "tasks.0.famliy = 'binding': Extra inputs are not permitted; fix: remove it, or check "
            "its spelling against the allowed keys: family, seq_lens, n, options",
        ),
        (
            {"tasks__0__n": 0},
            "tasks.0.n = 0: Input should be greater than or equal to 1; fix: use a larger value",
        ),
        ({"tasks__0__seq_lens": [4, 4]}, "seq_lens [4, 4] repeats a length"),
        (
            {"tasks__1__seq_lens": [2]},
            "seq_lens [2] are too short for range: it needs at least 3 lines",
        ),
        ({"tasks__0__options": {"style": "wide"}}, "style='wide' is not one of ['seed', 'paper']"),
        (
            {"experiments__patching__sites": ["resid_post"]},
            "experiments.patching.sites.0 = 'resid_post': Input should be 'resid_pre', "
            "'attn_head' or 'mlp_out'",
        ),
        (
            {"experiments__patching__tasks": ["boolean"]},
            "experiments.patching.tasks names ['boolean'], which are not in tasks",
        ),
        (
            {"experiments__behavior__backend": "tgi"},
            "experiments.behavior.backend = 'tgi': Input should be 'hf', 'vllm' or 'auto'",
        ),
        ({"models__0__quantization": "int4"}, "models.0.quantization = 'int4'"),
        ({"run": "my run"}, "run = 'my run': String should match pattern"),
        ({"resources": {"gpus_per_actor": "many"}}, "resources.gpus_per_actor"),
        (
            {"models__0__answer_prefix": {"boolean": " "}},
            "models[org/model-a].answer_prefix names ['boolean'], which are not in tasks",
        ),
        (
            {"experiments__patching__metric": "logprob"},
            "experiments.patching.metric = 'logprob': Input should be 'first_token' or "
            "'answer_logprob'",
        ),
        (
            {"tasks__1__counterfactual": "distractor"},
            "tasks.1: counterfactual ['distractor'] is defined for binding programs only, not "
            "range; fix: use root_value for this task",
        ),
        (
            {"tasks__0__counterfactual": "swap"},
            "tasks.0.counterfactual = 'swap': unknown counterfactual kind 'swap'; fix: use one "
            "of ['root_value', 'query_swap', 'distractor', 'reassign']",
        ),
    ],
)
def test_bad_specs_name_field_value_and_fix(changes, message) -> None:
    with pytest.raises(SpecError) as err:
        spec_with(**changes)
    assert str(err.value).startswith("unit.yaml: the spec is not valid")
    assert message in str(err.value)


def test_load_spec_file_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping, got list"):
        load_spec(bad)


def test_layer_blocks_are_consecutive_runs() -> None:
    assert layer_blocks(7, None, 3) == [(0, 1, 2), (3, 4, 5), (6,)]
    assert layer_blocks(10, [0, 1, 2, 5, 6, 9], 4) == [(0, 1, 2), (5, 6), (9,)]


def test_shards_expand_and_count() -> None:
    spec = spec_with()
    shards = list(iter_shards(spec, N_LAYERS))
    counts = count_shards(spec, N_LAYERS)
    assert counts == {
        "behavior": 2 * ((3 + 3) + 1),  # models x (binding 2 lens x 3 blocks + range 1 block)
        "patching": (2 * 2 * 2 * 3) + (2 * 2 * 2 * 1),  # lens x blocks x sites x layer blocks
    }
    assert len(shards) == sum(counts.values())
    assert len({s.id for s in shards}) == len(shards), "ids are unique"
    covered = {
        (s.model, s.task, s.seq_len, i)
        for s in shards
        if s.kind == "behavior"
        for i in range(s.start, s.start + s.n)
    }
    assert len(covered) == 2 * (2 * 10 + 3), "every program of every model, once"
    layers = {s.layers for s in shards if s.model == "org/model-a" and s.kind == "patching"}
    assert layers == {(0, 1, 2), (3, 4, 5), (6,)}
    # Each counterfactual kind of a task has patching shards of its own; behaviour has none.
    kinds = spec_with(tasks__0__counterfactual=["root_value", "query_swap", "distractor"])
    counted = count_shards(kinds, N_LAYERS)
    assert counted == {"behavior": counts["behavior"], "patching": 3 * counts["patching"]}
    assert len(list(iter_shards(kinds, N_LAYERS))) == sum(counted.values())


def test_shard_ids_are_stable_and_depend_only_on_what_changes_rows() -> None:
    ids = [s.id for s in iter_shards(spec_with(), N_LAYERS)]
    assert ids == [s.id for s in iter_shards(spec_with(), N_LAYERS)]
    # Batch size and output path change nothing in the rows: same ids.
    same = spec_with(experiments__patching__batch_size=8, output="elsewhere")
    assert ids == [s.id for s in iter_shards(same, N_LAYERS)]
    # The seed, a family option or the positions change rows: new ids.
    for changed in (
        spec_with(seed=4),
        spec_with(experiments__patching__positions="all"),
        spec_with(tasks__0__options={"style": "seed"}),
        spec_with(tasks__0__answer_prefix=" "),
        spec_with(models__0__answer_prefix=""),
        spec_with(experiments__patching__metric="answer_logprob"),
    ):
        new = {s.id for s in iter_shards(changed, N_LAYERS)}
        assert new != set(ids)
    assert all(len(i) == 16 for i in ids)


def test_answer_prefix_is_the_tasks_unless_a_model_overrides_it() -> None:
    spec = spec_with(
        tasks__1__answer_prefix=" ",
        models__0__answer_prefix={"binding": ""},
        models__1__answer_prefix="\n",
    )
    assert spec.answer_prefix("org/model-a", "binding") == ""
    assert spec.answer_prefix("org/model-a", "range") == " "
    assert spec.answer_prefix("models/local-b", "binding") == "\n"
    assert spec_with().answer_prefix("org/model-a", "binding") == "auto"


def test_split_halves_layers_then_programs() -> None:
    shard = next(
        s
        for s in iter_shards(spec_with(), N_LAYERS)
        if s.kind == "patching" and s.layers == (0, 1, 2)
    )
    a, b = split(shard)
    assert (a.layers, b.layers, a.part, b.part) == ((0,), (1, 2), (0, 2), (1, 2))
    c, d = split(b)
    assert (c.layers, d.layers, c.part, d.part) == ((1,), (2,), (2, 4), (3, 4))
    e, f = split(c)
    assert (e.start, e.n, f.start, f.n) == (c.start, 2, c.start + 2, 3)
    with pytest.raises(ValueError, match="one layer and one program; cannot split"):
        split(dataclasses.replace(e, n=1))


def test_escape_model() -> None:
    assert escape_model("Qwen/Qwen3-0.6B") == "Qwen--Qwen3-0.6B"
    assert escape_model("/abs/path/to/models/binding-tiny") == "models--binding-tiny"
    assert escape_model("gpt2") == "gpt2"


def test_sink_parts_tile_and_atomic_writes(tmp_path) -> None:
    spec = spec_with()
    shard = next(s for s in iter_shards(spec, N_LAYERS) if s.kind == "patching")
    sink = ResultsDir(tmp_path / "run")
    table = pa.table({"x": [1, 2]})
    a, b = split(shard)
    b1, b2 = split(b)
    sink.write_table(sink.shard_path(a), table)
    sink.write_table(sink.shard_path(b1), table)
    assert not sink.is_done(shard), "1/2 + 1/4 does not tile the shard"
    sink.write_table(sink.shard_path(b2), table)
    assert sink.is_done(shard)
    sink.clear_parts(shard)
    assert not sink.is_done(shard)
    assert not list((tmp_path / "run" / ".tmp").iterdir()), "temporaries renamed away"
    # A write that fails leaves nothing behind and says what to do.
    blocked = tmp_path / "run" / "blocked"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(SinkError, match=r"nothing partial was kept\. Fix: free disk space"):
        sink.write_table(blocked / "x.parquet", table)
    assert not list((tmp_path / "run" / ".tmp").iterdir())


# -- attribution ------------------------------------------------------------------------------

ATTRIBUTION = {"sites": ["resid_pre", "attn_head"], "programs_per_shard": 4, "verify_top_k": 3}


def attribution_spec(**changes):
    """BASE with an attribution block (`changes` are its fields)."""
    return spec_with(experiments__attribution={**ATTRIBUTION, **changes})


def test_attribution_block_defaults_and_alone() -> None:
    a = spec_with(experiments__attribution={}).experiments.attribution
    assert (a.sites, a.layers, a.positions, a.batch_size) == (["resid_pre"], None, "all", "auto")
    assert (a.programs_per_shard, a.tasks, a.verify_top_k) == (20, None, 0)
    assert (a.attention_fix, a.grad_drop) == (False, False)
    alone = spec_with(experiments={"attribution": {"batch_size": 2, "grad_drop": True}})
    assert alone.experiments.behavior is None and alone.experiments.patching is None
    assert alone.experiments.attribution.batch_size == 2
    assert [t.family for t in alone.tasks_for("attribution")] == ["binding", "range"]
    with pytest.raises(SpecError, match=r"no experiment: add behavior: \{\}, patching: \{\}, "):
        spec_with(experiments={})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"sites": ["attn_head", "attn_head"]},
            "experiments.attribution.sites: sites ['attn_head', 'attn_head'] repeat a site "
            "(each would run twice); fix: list each site once",
        ),
        ({"sites": []}, "experiments.attribution.sites = []: List should have at least 1 item"),
        (
            {"sites": ["resid_post"]},
            "experiments.attribution.sites.0 = 'resid_post': Input should be 'resid_pre', "
            "'attn_head' or 'mlp_out'",
        ),
        (
            {"batch_size": 0},
            "experiments.attribution.batch_size = 0: programs per forward and backward must be "
            "a whole number >= 1 or 'auto'; fix: write e.g. 4, or auto",
        ),
        (
            {"verify_top_k": -1},
            "experiments.attribution.verify_top_k = -1: Input should be greater than or equal "
            "to 0; fix: use a larger value",
        ),
        (
            {"verify_top_k": 2.5},
            "experiments.attribution.verify_top_k = 2.5: Input should be a valid integer",
        ),
        (
            {"grad_drop": 1},
            "experiments.attribution.grad_drop = 1: Input should be a valid boolean; fix: write "
            "true or false",
        ),
        (
            {"positions": "labels"},
            "experiments.attribution.positions = 'labels': Input should be 'all' or 'targets'",
        ),
        ({"layers": [-1]}, "experiments.attribution.layers.0 = -1: Input should be greater"),
        (
            {"programs_per_shard": 0},
            "experiments.attribution.programs_per_shard = 0: Input should be greater than",
        ),
        (
            {"tasks": ["boolean"]},
            "experiments.attribution.tasks names ['boolean'], which are not in tasks",
        ),
        (
            {"verify_topk": 2},
            "experiments.attribution.verify_topk = 2: Extra inputs are not permitted; fix: remove "
            "it, or check its spelling against the allowed keys: sites, layers, "
            "programs_per_shard, tasks, positions, batch_size, attention_fix, grad_drop, "
            "verify_top_k",
        ),
        (
            {"layers_per_shard": 2},
            "experiments.attribution.layers_per_shard = 2: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_attribution_blocks_name_field_value_and_fix(changes, message) -> None:
    with pytest.raises(SpecError) as err:
        attribution_spec(**changes)
    assert str(err.value).startswith("unit.yaml: the spec is not valid")
    assert message in str(err.value)


def test_attribution_shards_hold_every_layer_per_site() -> None:
    spec = attribution_spec(tasks=["binding"])
    shards = [s for s in iter_shards(spec, N_LAYERS) if s.kind == "attribution"]
    # models x (binding: 2 lengths x 3 blocks of 4 programs) x 2 sites, never cut by layers
    assert len(shards) == 2 * 2 * 3 * 2
    assert count_shards(spec, N_LAYERS) == {"behavior": 14, "patching": 32, "attribution": 24}
    assert len(list(iter_shards(spec, N_LAYERS))) == sum(count_shards(spec, N_LAYERS).values())
    by_model = {m: {s.layers for s in shards if s.model == m} for m in N_LAYERS}
    assert by_model == {"org/model-a": {tuple(range(7))}, "models/local-b": {(0, 1)}}
    first = shards[0]
    assert (first.model, first.task, first.seq_len, first.start, first.n) == (
        "org/model-a",
        "binding",
        4,
        0,
        4,
    )
    assert [s.site for s in shards[:2]] == ["resid_pre", "attn_head"]
    assert {(s.start, s.n) for s in shards} == {(0, 4), (4, 4), (8, 2)}
    sink = ResultsDir(Path("/results/run"))
    assert sink.shard_path(first) == Path(
        f"/results/run/attribution/model=org--model-a/site=resid_pre/{first.id}.parquet"
    )
    patching = {s.id for s in iter_shards(spec, N_LAYERS) if s.kind == "patching"}
    assert not patching & {s.id for s in shards}, "a kind's ids are its own"
    assert patching == {s.id for s in iter_shards(spec_with(), N_LAYERS) if s.kind == "patching"}
    # Chosen layers, not consecutive: still one shard per site, layers sorted and once each.
    chosen = [s for s in iter_shards(attribution_spec(layers=[5, 0, 5]), N_LAYERS)]
    assert {s.layers for s in chosen if s.kind == "attribution"} == {(0, 5)}
    assert chosen[-1].describe().endswith("site=attn_head layers 0,5")


def test_attribution_shard_ids_change_with_what_changes_rows() -> None:
    def ids(spec) -> list[str]:
        return [s.id for s in iter_shards(spec, N_LAYERS) if s.kind == "attribution"]

    base = ids(attribution_spec())
    assert base == ids(attribution_spec()) and len(set(base)) == len(base)
    assert ids(attribution_spec(batch_size=3)) == base, "the batch size decides no row"
    assert ids(spec_with(experiments__attribution={**ATTRIBUTION, "batch_size": "auto"})) == base
    for changed in (
        {"attention_fix": True},
        {"grad_drop": True},
        {"verify_top_k": 4},
        {"positions": "targets"},
    ):
        new = ids(attribution_spec(**changed))
        assert len(new) == len(base) and not set(new) & set(base), changed

    # programs_per_shard counts only through the blocks it makes: the same block, the same id.
    def blocks(spec) -> dict[tuple, str]:
        return {
            (s.model, s.task, s.seq_len, s.start, s.n, s.site): s.id
            for s in iter_shards(spec, N_LAYERS)
            if s.kind == "attribution"
        }

    old, new = blocks(attribution_spec()), blocks(attribution_spec(programs_per_shard=5))
    same = old.keys() & new.keys()
    assert {key[1:5] for key in same} == {("range", 5, 0, 3)}, "only range's one block of 3"
    assert all(old[key] == new[key] for key in same)
    assert not {old[k] for k in old.keys() - same} & set(new.values())


def test_an_attribution_shard_splits_by_layers_then_programs() -> None:
    shard = next(
        s
        for s in iter_shards(attribution_spec(), N_LAYERS)
        if s.kind == "attribution" and s.model == "models/local-b"
    )
    assert shard.layers == (0, 1) and shard.n == 4
    a, b = split(shard)
    assert (a.layers, b.layers, a.part, b.part) == ((0,), (1,), (0, 2), (1, 2))
    c, d = split(a)
    assert (c.layers, c.start, c.n, d.start, d.n) == ((0,), 0, 2, 2, 2)
    assert {c.id, d.id} == {shard.id}, "parts keep the shard's id"


KNOCKOUT = {"scopes": ["answer", "later"], "layers_per_shard": 3, "programs_per_shard": 4}


def knockout_spec(**changes):
    return spec_with(experiments__knockout={**KNOCKOUT, **changes})


def test_knockout_shards_are_scope_and_layer_blocks() -> None:
    spec = knockout_spec(tasks=["binding"])
    shards = [s for s in iter_shards(spec, N_LAYERS) if s.kind == "knockout"]
    # model-a: 7 layers in blocks of 3 (3 blocks), local-b: 2 layers (1 block); binding: 2
    # lengths x 3 blocks of programs; 2 scopes.
    assert len(shards) == (3 + 1) * 2 * 3 * 2
    counts = count_shards(spec, N_LAYERS)
    assert counts["knockout"] == len(shards)
    assert len(list(iter_shards(spec, N_LAYERS))) == sum(counts.values())
    assert {s.layers for s in shards if s.model == "org/model-a"} == {(0, 1, 2), (3, 4, 5), (6,)}
    assert {s.site for s in shards} == {"answer", "later"}
    first = shards[0]
    assert ResultsDir(Path("/r/run")).shard_path(first) == Path(
        f"/r/run/knockout/model=org--model-a/scope=answer/{first.id}.parquet"
    )
    assert first.describe().endswith("scope=answer layers 0-2")
    other = {s.id for s in iter_shards(spec, N_LAYERS) if s.kind != "knockout"}
    assert not other & {s.id for s in shards}
    ids = [s.id for s in shards]
    assert ids == [
        s.id
        for s in iter_shards(knockout_spec(tasks=["binding"], batch_size=2), N_LAYERS)
        if s.kind == "knockout"
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scopes": ["answer", "answer"]}, "scopes ['answer', 'answer'] repeat a scope"),
        ({"scopes": ["everywhere"]}, "experiments.knockout.scopes.0 = 'everywhere'"),
        ({"scopes": []}, "experiments.knockout.scopes"),
        ({"batch_size": 0}, "knockout rows per forward pass must be a whole number"),
        ({"layers_per_shard": 0}, "experiments.knockout.layers_per_shard = 0"),
        ({"sites": ["resid_pre"]}, "experiments.knockout.sites"),
    ],
)
def test_bad_knockout_blocks_name_field_value_and_fix(changes, message) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec({**BASE, "experiments": {"knockout": {**KNOCKOUT, **changes}}})


def test_knockout_alone_is_an_experiment() -> None:
    spec = parse_spec({**BASE, "experiments": {"knockout": {}}})
    assert spec.experiments.knockout.scopes == ["answer"]
    assert spec.experiments.knockout.places == ["answer"]
    assert set(count_shards(spec, N_LAYERS)) == {"knockout"}
