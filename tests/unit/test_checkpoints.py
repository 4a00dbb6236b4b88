"""Checkpoints as a sweep axis: a glob of snapshot folders becomes plain models, each with its
folder as id and the step its training_state.json holds, in step order; a step reaches shard
ids and the identity only where there is one, so step-less specs keep theirs (no Ray, no
weights: the snapshot folders hold a config and a training state only)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator.checks import check_models
from orchestrator.identity import extension_problems, identity, spec_hash
from orchestrator.protocol import Shard, WorkerConfig
from orchestrator.shards import iter_shards
from orchestrator.sink import ResultsDir, recorded_text
from orchestrator.spec import ModelSpec, SpecError, load_spec, parse_spec
from tests.unit.test_spec_shards import BASE, N_LAYERS, spec_with

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "models" / "binding-tiny-step2500" / "config.json"  # 6 layers
CONFIG_LAYERS = 6

# Computed on the code from before training steps: specs without them keep every shard id and
# their run folder's hash (test_counterfactual_spec.py pins a patching shard and BASE's hash).
PINNED_BEHAVIOR = Shard(
    kind="behavior",
    model="org/model-a",
    task="binding",
    seq_len=4,
    start=0,
    n=4,
    id="0d917afedef2b506",
)
PINNED_KNOCKOUT_ID = "0bf58060a31b8ddc"  # model-a, binding, seq_len 4, programs 0-3, answer
PINNED_ATTRIBUTION_ID = "b452df3234679c58"  # local-b in bfloat16, binding, 4, 0-3, resid_pre
PINNED_FULL_HASH = "b921bc2b0e580c3a"


def full_spec(**changes):
    """BASE with attribution and knockout, and local-b in bfloat16 (the pinned ids' spec)."""
    return spec_with(
        experiments__attribution={"programs_per_shard": 4},
        experiments__knockout={"layers_per_shard": 3, "programs_per_shard": 4},
        models__1__dtype="bfloat16",
        **changes,
    )


def snapshot(folder: Path, state: object = None, step: int | None = None) -> Path:
    """A checkpoint folder: a real config, and a training_state.json holding `{"step": step}`
    (or `state`, written as given; neither: no training state)."""
    folder.mkdir(parents=True)
    shutil.copy(CONFIG, folder / "config.json")
    if step is not None:
        state = {"step": step, "stage": 1}
    if isinstance(state, str):
        (folder / "training_state.json").write_text(state)
    elif state is not None:
        (folder / "training_state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture
def snapshots(tmp_path, monkeypatch) -> Path:
    """Snapshots at steps 20, 300 and 1000 under `ckpt/` of the working directory (names sort
    otherwise: 1000 < 20 < 300), and a file the glob matches too."""
    monkeypatch.chdir(tmp_path)
    for step in (300, 1000, 20):
        snapshot(Path("ckpt") / f"snap-step{step}", step=step)
    Path("ckpt/snap-step9.log").write_text("a file, not a checkpoint")
    return tmp_path


def with_models(models: list[dict], path: str = "spec.yaml", **changes):
    data = copy.deepcopy(BASE)
    data["models"] = models
    data.update(changes)
    return parse_spec(data, path)


def test_a_glob_expands_in_step_order_with_the_steps_of_its_folders(snapshots) -> None:
    spec = with_models(
        [
            {"id": "org/model-a"},
            {"checkpoints": "ckpt/snap-step*", "dtype": "bfloat16", "answer_prefix": " "},
            {"id": "models/local-b", "step": 7},
        ]
    )
    assert [(m.id, m.step) for m in spec.models] == [
        ("org/model-a", None),
        ("ckpt/snap-step20", 20),
        ("ckpt/snap-step300", 300),
        ("ckpt/snap-step1000", 1000),
        ("models/local-b", 7),
    ]
    expanded = spec.models[1:4]
    assert all(type(m) is ModelSpec and m.checkpoints is None for m in spec.models)
    assert {(m.dtype, m.quantization, m.answer_prefix) for m in expanded} == {
        ("bfloat16", "auto", " ")
    }, "the entry's other fields apply to every folder"
    assert spec.answer_prefix("ckpt/snap-step300", "binding") == " "
    # Downstream everything sees plain models: their configs, their actors' settings.
    assert check_models(spec.model_copy(update={"models": expanded})) == {
        m.id: CONFIG_LAYERS for m in expanded
    }
    assert WorkerConfig.of(spec, "ckpt/snap-step1000").model.step == 1000
    # A spec file gives the same, and an absolute glob the absolute folders.
    path = snapshots / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "models": [{"checkpoints": "ckpt/snap-step*"}]}))
    assert [m.id for m in load_spec(path).models] == [m.id for m in expanded]
    absolute = with_models([{"checkpoints": str(snapshots / "ckpt" / "snap-step*0")}])
    assert [(m.id, m.step) for m in absolute.models] == [
        (str(snapshots / "ckpt" / f"snap-step{s}"), s) for s in (20, 300, 1000)
    ]


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        (None, "ckpt/snap-bad has no training_state.json (models/train_binding.py writes one"),
        ({"stage": 2}, "ckpt/snap-bad/training_state.json has no whole-number step (step = None"),
        ({"step": "10"}, "has no whole-number step (step = '10'; it should hold {\"step\": N,"),
        ({"step": 2.5}, "has no whole-number step (step = 2.5;"),
        ({"step": True}, "has no whole-number step (step = True;"),
        ({"step": -1}, "has no whole-number step (step = -1;"),
        ([10], "has no whole-number step (step = None;"),
        ("{not json", "ckpt/snap-bad/training_state.json is not readable JSON ("),
    ],
)
def test_a_folder_without_a_step_names_the_file_and_the_fix(snapshots, state, problem) -> None:
    snapshot(Path("ckpt/snap-bad"), state)
    with pytest.raises(SpecError) as err:
        with_models([{"id": "org/model-a"}, {"checkpoints": "ckpt/snap-*"}])
    message = str(err.value)
    assert message.startswith("spec.yaml: the spec is not valid:\n  models.1.checkpoints = ")
    assert "models.1.checkpoints = 'ckpt/snap-*': " in message
    assert problem in message
    assert message.endswith(
        "fix: narrow the glob to checkpoint folders, or list this folder by id with its step"
    )


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [{"checkpoints": "ckpt/none-*"}],
            "spec.yaml: the spec is not valid:\n  models.0.checkpoints = 'ckpt/none-*': matches "
            "no folder (globbed from {cwd}); fix: check the pattern, or run from the folder it "
            "is relative to",
        ),
        (
            [{"checkpoints": "ckpt/snap-step9.log"}],  # a file is no checkpoint
            "models.0.checkpoints = 'ckpt/snap-step9.log': matches no folder",
        ),
        (
            [{"id": "ckpt/snap-step300"}, {"checkpoints": "ckpt/snap-step*"}],
            "models.1.checkpoints = 'ckpt/snap-step*': matches ckpt/snap-step300, which models.0 "
            "also gives; fix: list each model once (narrow the glob, or drop the other entry)",
        ),
        (
            [{"checkpoints": "ckpt/snap-step*"}, {"id": "./ckpt/snap-step20/"}],
            "models.0.checkpoints = 'ckpt/snap-step*': matches ./ckpt/snap-step20/, which "
            "models.1 also gives",
        ),
        (
            [{"checkpoints": "ckpt/snap-step*"}, {"checkpoints": "ckpt/snap-step1*"}],
            "models.1.checkpoints = 'ckpt/snap-step1*': matches ckpt/snap-step1000, which "
            "models.0 also gives",
        ),
        (
            [{"id": "org/model-a", "checkpoints": "ckpt/snap-step*"}],
            "spec.yaml: the spec is not valid (1 problem(s)):\n  models.0: a model entry needs "
            "exactly one of id (a hub id or a folder) and checkpoints (a glob of checkpoint "
            "folders); fix: write e.g. {id: models/binding-tiny} or "
            "{checkpoints: models/binding-traj-step*}",
        ),
        ([{"dtype": "float32"}], "models.0: a model entry needs exactly one of id"),
        (
            [{"checkpoints": "ckpt/snap-step*", "step": 3}],
            "models.0: step 3 with checkpoints 'ckpt/snap-step*': each folder's step is read "
            "from its training_state.json; fix: drop step, or list the folder by id with its step",
        ),
        ([{"id": "org/model-a", "step": -1}], "models.0.step = -1: Input should be greater"),
        ([{"id": "org/model-a", "step": 1.5}], "models.0.step = 1.5: Input should be a valid"),
    ],
)
def test_bad_checkpoint_entries_name_file_field_value_and_fix(snapshots, models, message) -> None:
    with pytest.raises(SpecError) as err:
        with_models(models)
    assert message.replace("{cwd}", str(snapshots)) in str(err.value)


def test_two_folders_of_one_step_are_refused(snapshots) -> None:
    snapshot(Path("ckpt/snap-again"), step=300)
    with pytest.raises(SpecError) as err:
        with_models([{"checkpoints": "ckpt/snap-*"}])
    assert str(err.value) == (
        "spec.yaml: the spec is not valid:\n  models.0.checkpoints = 'ckpt/snap-*': "
        "ckpt/snap-again and ckpt/snap-step300 both hold step 300, so their rows could not be "
        "told apart by step; fix: narrow the glob to one folder per step"
    )


def test_step_less_shard_ids_and_hashes_are_those_from_before() -> None:
    shards = list(iter_shards(spec_with(), N_LAYERS))
    assert shards[0] == PINNED_BEHAVIOR
    full = list(iter_shards(full_spec(), N_LAYERS))
    knockout = next(s for s in full if s.kind == "knockout")
    assert (knockout.model, knockout.seq_len, knockout.start, knockout.site) == (
        "org/model-a",
        4,
        0,
        "answer",
    )
    assert knockout.id == PINNED_KNOCKOUT_ID
    attribution = next(s for s in full if s.kind == "attribution" and s.model == "models/local-b")
    assert (attribution.start, attribution.site) == (0, "resid_pre")
    assert attribution.id == PINNED_ATTRIBUTION_ID
    assert spec_hash(identity(full_spec())) == PINNED_FULL_HASH
    assert all("step" not in m for m in identity(full_spec())["models"].values())
    # Written out as null, the step changes nothing either.
    written = full_spec(models__0__step=None)
    assert [s.id for s in iter_shards(written, N_LAYERS)] == [s.id for s in full]
    assert identity(written) == identity(full_spec())


def test_a_step_is_hashed_into_its_models_shards_and_the_identity() -> None:
    def ids(spec) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for s in iter_shards(spec, N_LAYERS):
            out.setdefault(s.model, set()).add(s.id)
        return out

    base, five = ids(full_spec()), ids(full_spec(models__1__step=5))
    assert five["org/model-a"] == base["org/model-a"], "the other model's shards stay"
    assert not five["models/local-b"] & base["models/local-b"]
    six = ids(full_spec(models__1__step=6))
    assert not six["models/local-b"] & five["models/local-b"]
    zero = ids(full_spec(models__1__step=0))
    assert not zero["models/local-b"] & base["models/local-b"], "step 0 is a step"
    ident = identity(full_spec(models__1__step=5))
    assert ident["models"]["models/local-b"]["step"] == 5
    assert "step" not in ident["models"]["org/model-a"]
    assert spec_hash(ident) != PINNED_FULL_HASH


PROBES = {"probes": {"programs_per_shard": 20, "tasks": ["binding"]}}


def test_the_run_folder_keeps_the_models_its_glob_matched(snapshots) -> None:
    text = yaml.safe_dump(
        {
            **BASE,
            "experiments": PROBES,
            "models": [{"checkpoints": "ckpt/snap-step*", "dtype": "float32"}],
        }
    )
    Path("sweep.yaml").write_text(text)
    spec = load_spec("sweep.yaml")
    recorded = recorded_text(text, spec)
    assert recorded.startswith("# models: the folders the checkpoints globs matched when")
    assert yaml.safe_load(recorded)["models"] == [
        {"id": f"ckpt/snap-step{s}", "step": s, "dtype": "float32"} for s in (20, 300, 1000)
    ]
    assert recorded_text(yaml.safe_dump(BASE), spec_with()) == yaml.safe_dump(BASE), "as written"
    results = ResultsDir(snapshots / "results" / "unit")
    results.start(spec, text)
    # A snapshot written after the run started is not one of the run's models ...
    snapshot(Path("ckpt/snap-step5000"), step=5000)
    old = results.recorded_spec()
    assert old is not None and old.models == spec.models
    assert identity(old) == identity(spec)
    # ... but the spec now has it: one model more, which only adds work (`--extend`).
    new = load_spec("sweep.yaml")
    assert [m.step for m in new.models] == [20, 300, 1000, 5000]
    layers = {m.id: CONFIG_LAYERS for m in new.models}
    assert extension_problems(old, new, layers, layers) == []
