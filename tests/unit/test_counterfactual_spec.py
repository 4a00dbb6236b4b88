"""A task's counterfactual kinds in the spec, the patching shards, the identity and `--extend`
(no Ray, no model weights)."""

import dataclasses
from typing import get_args

import pytest

from orchestrator.identity import extension_problems, identity, spec_hash
from orchestrator.protocol import Shard
from orchestrator.shards import count_shards, iter_shards, split
from orchestrator.spec import Counterfactual, SpecError
from orchestrator.tasks.counterfactuals import KINDS
from tests.unit.test_spec_shards import N_LAYERS, spec_with

# Computed on the code from before counterfactual kinds: a spec without them must keep every
# shard id and its run folder's hash, or finished run folders would run again.
PINNED_SHARD = Shard(
    kind="patching",
    model="org/model-a",
    task="binding",
    seq_len=4,
    start=0,
    n=5,
    site="resid_pre",
    layers=(0, 1, 2),
    id="321d2d165269db4e",
)
PINNED_HASH = "0d3659dc7db9296b"
BOTH = ["root_value", "distractor"]


def patching(spec) -> list[Shard]:
    return [s for s in iter_shards(spec, N_LAYERS) if s.kind == "patching"]


def test_the_spec_literal_is_the_tasks_kinds() -> None:
    assert get_args(Counterfactual) == KINDS


@pytest.mark.parametrize(
    ("value", "kinds"),
    [
        ("root_value", ["root_value"]),
        ("distractor", ["distractor"]),
        (BOTH, BOTH),
        (["reassign", "root_value", "query_swap"], ["reassign", "root_value", "query_swap"]),
    ],
)
def test_counterfactual_is_a_kind_or_a_list_of_kinds(value, kinds) -> None:
    task = spec_with(tasks__0__counterfactual=value).tasks[0]
    assert task.counterfactual == value
    assert task.counterfactuals == kinds
    assert spec_with().tasks[1].counterfactuals == ["root_value"], "the default"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"tasks__0__counterfactual": "swap"},
            "tasks.0.counterfactual = 'swap': unknown counterfactual kind 'swap'; fix: use one "
            "of ['root_value', 'query_swap', 'distractor', 'reassign']",
        ),
        (
            {"tasks__0__counterfactual": ["root_value", "swap"]},
            "tasks.0.counterfactual: unknown counterfactual kind 'swap'; fix: use one of",
        ),
        (
            {"tasks__0__counterfactual": ["distractor", "distractor"]},
            "tasks.0.counterfactual: counterfactuals ['distractor', 'distractor'] repeat a "
            "counterfactual (each would run twice); fix: list each counterfactual once",
        ),
        (
            {"tasks__0__counterfactual": []},
            "tasks.0.counterfactual: counterfactual [] names no kind; fix: write e.g. root_value",
        ),
        (
            {"tasks__0__counterfactual": 2},
            "tasks.0.counterfactual = 2: counterfactual must be a kind or a list of kinds",
        ),
        (
            {"tasks__1__counterfactual": ["root_value", "distractor"]},
            "tasks.1: counterfactual ['distractor'] is defined for binding programs only, not "
            "range; fix: use root_value for this task",
        ),
    ],
)
def test_bad_counterfactuals_name_field_value_and_fix(changes, message) -> None:
    with pytest.raises(SpecError) as err:
        spec_with(**changes)
    assert str(err.value).startswith("unit.yaml: the spec is not valid (1 problem(s))")
    assert message in str(err.value)


def test_root_value_shard_ids_and_hash_are_those_from_before() -> None:
    spec = spec_with()
    assert patching(spec)[0] == PINNED_SHARD
    assert spec_hash(identity(spec)) == PINNED_HASH
    # Written out as the default, the field changes nothing either.
    for same in ("root_value", ["root_value"]):
        written = spec_with(tasks__0__counterfactual=same)
        assert patching(written)[0] == PINNED_SHARD
        assert identity(written) == identity(spec)
    assert "counterfactual" not in identity(spec)["tasks"]["binding"]


def test_each_kind_is_patched_in_shards_of_its_own() -> None:
    base, spec = spec_with(), spec_with(tasks__0__counterfactual=BOTH)
    shards = patching(spec)
    assert len(shards) == 2 * len(patching(base))
    roots = [s for s in shards if s.counterfactual == "root_value"]
    assert roots == patching(base), "the root_value shards are the same shards, ids and all"
    distractor = [s for s in shards if s.counterfactual == "distractor"]
    assert len(distractor) == len(roots)
    assert not {s.id for s in distractor} & {s.id for s in roots}
    assert len({s.id for s in shards}) == len(shards)
    same_place = next(s for s in distractor if s.start == 0 and s.seq_len == 4)
    assert dataclasses.replace(same_place, id="", counterfactual="root_value") == (
        dataclasses.replace(PINNED_SHARD, id="")
    )
    assert same_place.id != PINNED_SHARD.id
    assert same_place.describe() == (
        "patching binding seq_len=4 programs 0-4 site=resid_pre layers 0-2 "
        "counterfactual=distractor"
    )
    assert PINNED_SHARD.describe().endswith("layers 0-2"), "root_value is not said"
    # Order: per program block, each kind's sites and layers in turn.
    first = shards[: 2 * 2 * 3]  # model-a, seq_len 4, block 0: 2 kinds x 2 sites x 3 layer blocks
    assert [s.counterfactual for s in first] == ["root_value"] * 6 + ["distractor"] * 6
    assert {(s.start, s.seq_len) for s in first} == {(0, 4)}
    # A kind other than root_value hashes its kind alone: the same id wherever it is listed.
    alone = patching(spec_with(tasks__0__counterfactual="distractor"))
    assert [s.id for s in alone] == [s.id for s in distractor]


def test_counts_agree_with_the_shards_and_only_patching_multiplies() -> None:
    spec = spec_with(
        tasks__0__counterfactual=["root_value", "query_swap", "reassign"],
        experiments__patching__tasks=None,
        experiments__attribution={"programs_per_shard": 4},
        experiments__knockout={"layers_per_shard": 3, "programs_per_shard": 4},
    )
    plain = spec_with(
        experiments__patching__tasks=None,
        experiments__attribution={"programs_per_shard": 4},
        experiments__knockout={"layers_per_shard": 3, "programs_per_shard": 4},
    )
    counts, before = count_shards(spec, N_LAYERS), count_shards(plain, N_LAYERS)
    assert counts == {
        kind: len([s for s in iter_shards(spec, N_LAYERS) if s.kind == kind]) for kind in counts
    }
    assert sum(counts.values()) == len(list(iter_shards(spec, N_LAYERS)))
    # binding: 2 lengths x 2 blocks, range: 1 length x 1 block; 2 sites; layer blocks 3 + 1.
    assert before["patching"] == (2 * 2 + 1) * 2 * (3 + 1)
    assert counts["patching"] == (3 * 2 * 2 + 1) * 2 * (3 + 1), "binding's 3 kinds, range's 1"
    for kind in ("behavior", "attribution", "knockout"):
        assert counts[kind] == before[kind], kind
    others = {s.counterfactual for s in iter_shards(spec, N_LAYERS) if s.kind != "patching"}
    assert others == {"root_value"}
    ids = {s.id for s in iter_shards(plain, N_LAYERS)}
    assert ids <= {s.id for s in iter_shards(spec, N_LAYERS)}, "old shards stay shards"


def test_a_split_part_keeps_its_kind() -> None:
    shard = next(
        s
        for s in patching(spec_with(tasks__0__counterfactual=BOTH))
        if s.counterfactual != "root_value"
    )
    for part in split(shard) + split(split(shard)[0]):
        assert (part.counterfactual, part.id) == ("distractor", shard.id)


def test_identity_names_the_kinds_sorted() -> None:
    listed = identity(spec_with(tasks__0__counterfactual=["root_value", "distractor"]))
    assert listed["tasks"]["binding"]["counterfactual"] == ["distractor", "root_value"]
    assert "counterfactual" not in listed["tasks"]["range"]
    reordered = identity(spec_with(tasks__0__counterfactual=["distractor", "root_value"]))
    assert reordered == listed, "order does not decide rows"
    assert spec_hash(listed) != PINNED_HASH
    alone = identity(spec_with(tasks__0__counterfactual="distractor"))
    assert alone["tasks"]["binding"]["counterfactual"] == ["distractor"]
    assert spec_hash(alone) not in (PINNED_HASH, spec_hash(listed))


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("root_value", BOTH, None),
        (["distractor"], ["query_swap", "distractor"], None),
        (BOTH, ["distractor", "root_value"], None),
        (BOTH, "root_value", "tasks.binding.counterfactual: ['distractor'] removed"),
        ("root_value", "distractor", "tasks.binding.counterfactual: ['root_value'] removed"),
    ],
)
def test_extend_may_add_a_kind_but_not_remove_one(old, new, problem) -> None:
    problems = extension_problems(
        spec_with(tasks__0__counterfactual=old),
        spec_with(tasks__0__counterfactual=new),
        N_LAYERS,
        N_LAYERS,
    )
    assert problems == ([] if problem is None else [problem])
