"""Expand a spec into shards: the units of scheduling and of resume.

A behaviour shard is (model, task, seq_len, a block of program indices); a patching shard adds
one counterfactual kind of the task, one site and a block of consecutive layers; an attribution
shard one site and every requested layer (one backward pass gives them all); a knockout shard
one scope and a block of layers; a probes shard every requested layer (one forward pass gives
them all) and no site. A shard's id is a hash of everything that decides its rows — the model as
given (and its training step, where it has one), the experiment's result-affecting settings, the
task's family options, the seed, the program block, the counterfactual kind (when not
root_value), the site (or scope) and layers — and of nothing else (not the batch size, not the
output path), so the same spec yields the same ids on every run and machine.

Expansion is lazy (`iter_shards`) and its size is arithmetic (`count_shards`), so a sweep of any
size costs the driver no memory for its plan.
"""

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

from orchestrator.protocol import INTERVENTIONS, KINDS, LAYERED, Shard
from orchestrator.spec import Spec, TaskSpec

ID_LENGTH = 16
__all__ = [
    "Shard",
    "count_shards",
    "counterfactuals",
    "escape_model",
    "iter_shards",
    "layer_blocks",
    "layer_groups",
    "places",
    "rel_dir",
    "split",
]


def rel_dir(shard: Shard) -> str:
    """Folder of a shard's file under the run directory (hive partitions, model id escaped)."""
    model = escape_model(shard.model)
    if shard.kind in ("behavior", "probes"):
        return f"{shard.kind}/model={model}/task={shard.task}"
    place = "scope" if shard.kind == "knockout" else "site"
    return f"{shard.kind}/model={model}/{place}={shard.site}"


def escape_model(model: str) -> str:
    """`Qwen/Qwen3-0.6B` -> `Qwen--Qwen3-0.6B`; a local path keeps its last two parts."""
    parts = [p for p in model.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "--".join(parts[-2:]) if parts else "model"


# Each kind's settings that decide its rows. Not the batch size, and not the shard sizes: the
# shard's own fields (programs, layers) already say what it covers.
ROW_SETTINGS: dict[str, tuple[str, ...]] = {
    "behavior": ("template", "max_new_tokens"),
    "patching": ("positions", "metric"),
    "attribution": ("positions", "attention_fix", "grad_drop", "verify_top_k"),
    "knockout": (),
    "probes": ("labels", "train_fraction", "l2"),
}


def shard_id(spec: Spec, task: TaskSpec, fields: dict[str, Any]) -> str:
    """Hash of the spec fields that affect this shard's rows, and the shard's own fields."""
    model = next(m for m in spec.models if m.id == fields["model"])
    experiment = getattr(spec.experiments, fields["kind"])
    # The model is hashed by its id (`fields`), as it always was: its dtype and quantization
    # are in the run's identity, not in shard ids (hashing them now would change every id).
    affecting = {
        "seed": spec.seed,
        "family_options": task.options,
        "answer_prefix": spec.answer_prefix(fields["model"], task.family),
        **fields,
        **{key: _setting(experiment, key) for key in ROW_SETTINGS[fields["kind"]]},
    }
    # Only where there is one, so that the ids of step-less models stay what they were.
    if model.step is not None:
        affecting["step"] = model.step
    blob = json.dumps(affecting, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:ID_LENGTH]


def _setting(experiment: Any, key: str) -> Any:
    """A row-deciding setting as hashed: a list (probes' labels) is a set, its order decides
    no row."""
    value = getattr(experiment, key)
    return sorted(value) if isinstance(value, list) else value


def counterfactuals(kind: str, task: TaskSpec) -> list[str]:
    """The counterfactual kinds `kind` runs on `task`'s programs, each in shards of its own: the
    task's for patching, root_value alone for every other kind."""
    return task.counterfactuals if kind == "patching" else ["root_value"]


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(size, n - start)


def layer_blocks(n_layers: int, layers: list[int] | None, per_shard: int) -> list[tuple[int, ...]]:
    """Consecutive runs of the wanted layers, at most `per_shard` long."""
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    blocks: list[list[int]] = []
    for layer in wanted:
        if blocks and layer == blocks[-1][-1] + 1 and len(blocks[-1]) < per_shard:
            blocks[-1].append(layer)
        else:
            blocks.append([layer])
    return [tuple(b) for b in blocks]


def layer_groups(kind: str, experiment: Any, n_layers: int) -> list[tuple[int, ...]]:
    """The layers of each shard of a layered kind, per (program block, site): patching's (and
    knockout's) consecutive blocks of `layers_per_shard`; attribution's wanted layers all in one
    shard, since one backward pass gives every layer's gradient, and probes' likewise, since
    one forward pass gives every layer's activations (out of memory still splits either by
    layers, `split`)."""
    if kind in ("attribution", "probes"):
        # Probes also read the stream leaving the last layer (layer `n_layers`).
        every = range(n_layers + 1) if kind == "probes" else range(n_layers)
        wanted = every if experiment.layers is None else experiment.layers
        return [tuple(sorted(set(wanted)))]
    return layer_blocks(n_layers, experiment.layers, experiment.layers_per_shard)


def places(kind: str, experiment: Any, n_layers: int) -> list[dict[str, Any]]:
    """The (site, layers) fields of each shard of `kind` per program block: none for behaviour
    (its ids hash no site or layers), layers alone for probes (they intervene nowhere)."""
    if kind not in LAYERED:
        return [{}]
    groups = layer_groups(kind, experiment, n_layers)
    if kind not in INTERVENTIONS:
        return [{"layers": g} for g in groups]
    return [{"site": s, "layers": g} for s in experiment.places for g in groups]


def iter_shards(spec: Spec, n_layers: dict[str, int], model: str | None = None) -> Iterator[Shard]:
    """Every shard of the spec (or of one model), per model behaviour first, then patching,
    attribution, knockout and probes, in a stable order: per (task, seq_len, program block,
    counterfactual kind, site or scope, layers).

    Args:
        spec: the validated spec.
        n_layers: model id -> layer count (from `check_models`).
        model: only this model's shards.
    """
    for m in spec.models:
        if model is not None and m.id != model:
            continue
        for kind in KINDS:
            experiment = getattr(spec.experiments, kind)
            if experiment is None:
                continue
            where = places(kind, experiment, n_layers[m.id]) if kind in LAYERED else [{}]
            for task in spec.tasks_for(kind):
                # The kind is hashed only when not root_value, so that the ids of shards from
                # before counterfactual kinds (all root_value) stay what they were.
                variants = [
                    {} if c == "root_value" else {"counterfactual": c}
                    for c in counterfactuals(kind, task)
                ]
                for seq_len in task.seq_lens:
                    for start, n in _blocks(task.n, experiment.programs_per_shard):
                        for counterfactual, place in itertools.product(variants, where):
                            fields = {
                                "kind": kind,
                                "model": m.id,
                                "task": task.family,
                                "seq_len": seq_len,
                                "start": start,
                                "n": n,
                                **counterfactual,
                                **place,
                            }
                            yield Shard(**fields, id=shard_id(spec, task, fields))


def count_shards(spec: Spec, n_layers: dict[str, int]) -> dict[str, int]:
    """Shards of each kind the spec runs, computed without expanding them."""
    counts: dict[str, int] = {}
    for kind in KINDS:
        experiment = getattr(spec.experiments, kind)
        if experiment is None:
            continue
        per = experiment.programs_per_shard
        blocks = sum(
            len(t.seq_lens) * -(-t.n // per) * len(counterfactuals(kind, t))
            for t in spec.tasks_for(kind)
        )
        counts[kind] = 0
        for m in spec.models:
            per_block = len(places(kind, experiment, n_layers[m.id])) if kind in LAYERED else 1
            counts[kind] += blocks * per_block
    return counts


def split(shard: Shard) -> list[Shard]:
    """Two halves of a shard (by layers if it has several, else by programs), as parts.

    A probes shard is split by layers only: its probe is fitted on all of its programs, and
    halves of them would fit other probes, on half the data.

    Raises:
        ValueError: a single-layer, single-program shard, or a single-layer probes shard,
            cannot be split.
    """
    k, of = shard.part or (0, 1)
    if shard.layers is not None and len(shard.layers) > 1:
        mid = len(shard.layers) // 2
        halves = [
            dataclasses.replace(shard, layers=shard.layers[:mid]),
            dataclasses.replace(shard, layers=shard.layers[mid:]),
        ]
    elif shard.kind == "probes":
        raise ValueError(
            f"probes shard {shard.file_stem} has one layer, and its programs are its probe's "
            "data, so it is not split by programs; fix: lower experiments.probes."
            "programs_per_shard (the activations it keeps), or give the actors more memory"
        )
    elif shard.n > 1:
        mid = shard.n // 2
        halves = [
            dataclasses.replace(shard, n=mid),
            dataclasses.replace(shard, start=shard.start + mid, n=shard.n - mid),
        ]
    else:
        raise ValueError(f"shard {shard.file_stem} has one layer and one program; cannot split")
    # Part k of `of` becomes parts 2k and 2k+1 of 2*of: the set of parts still tiles the shard.
    return [dataclasses.replace(h, part=(2 * k + i, 2 * of)) for i, h in enumerate(halves)]
