"""Expand a spec into shards: the units of scheduling and of resume.

A behaviour shard is (model, task, seq_len, a block of program indices); a patching shard adds
one site and a block of consecutive layers. A shard's id is a hash of everything that decides
its rows — the model as given, the experiment's result-affecting settings, the task's family
options, the seed, the program block, the site and layers — and of nothing else (not the batch
size, not the output path), so the same spec yields the same ids on every run and machine.

Expansion is lazy (`iter_shards`) and its size is arithmetic (`count_shards`), so a sweep of any
size costs the driver no memory for its plan.
"""

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from orchestrator.protocol import Shard
from orchestrator.spec import Spec, TaskSpec

ID_LENGTH = 16
__all__ = [
    "Shard",
    "count_shards",
    "escape_model",
    "iter_shards",
    "layer_blocks",
    "rel_dir",
    "split",
]


def rel_dir(shard: Shard) -> str:
    """Folder of a shard's file under the run directory (hive partitions, model id escaped)."""
    model = escape_model(shard.model)
    if shard.kind == "behavior":
        return f"behavior/model={model}/task={shard.task}"
    return f"patching/model={model}/site={shard.site}"


def escape_model(model: str) -> str:
    """`Qwen/Qwen3-0.6B` -> `Qwen--Qwen3-0.6B`; a local path keeps its last two parts."""
    parts = [p for p in model.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "--".join(parts[-2:]) if parts else "model"


def shard_id(spec: Spec, task: TaskSpec, fields: dict[str, Any]) -> str:
    """Hash of the spec fields that affect this shard's rows, and the shard's own fields."""
    model = next(m for m in spec.models if m.id == fields["model"])
    experiment = getattr(spec.experiments, fields["kind"])
    affecting = {
        "seed": spec.seed,
        "family_options": task.options,
        "model": model.model_dump(exclude={"answer_prefix"}),
        "answer_prefix": spec.answer_prefix(fields["model"], task.family),
        **fields,
    }
    if fields["kind"] == "behavior":
        affecting |= {"template": experiment.template, "max_new_tokens": experiment.max_new_tokens}
    else:
        affecting |= {"positions": experiment.positions, "metric": experiment.metric}
    blob = json.dumps(affecting, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:ID_LENGTH]


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


def iter_shards(spec: Spec, n_layers: dict[str, int], model: str | None = None) -> Iterator[Shard]:
    """Every shard of the spec (or of one model), behaviour first, in a stable order.

    Args:
        spec: the validated spec.
        n_layers: model id -> layer count (from `check_models`).
        model: only this model's shards.
    """
    for m in spec.models:
        if model is not None and m.id != model:
            continue
        behavior = spec.experiments.behavior
        for task in spec.tasks_for("behavior"):
            for seq_len in task.seq_lens:
                for start, n in _blocks(task.n, behavior.programs_per_shard):
                    fields = {
                        "kind": "behavior",
                        "model": m.id,
                        "task": task.family,
                        "seq_len": seq_len,
                        "start": start,
                        "n": n,
                    }
                    yield Shard(**fields, id=shard_id(spec, task, fields))
        patching = spec.experiments.patching
        if patching is None:
            continue
        blocks = layer_blocks(n_layers[m.id], patching.layers, patching.layers_per_shard)
        for task in spec.tasks_for("patching"):
            for seq_len in task.seq_lens:
                for start, n in _blocks(task.n, patching.programs_per_shard):
                    for site in patching.sites:
                        for layers in blocks:
                            fields = {
                                "kind": "patching",
                                "model": m.id,
                                "task": task.family,
                                "seq_len": seq_len,
                                "start": start,
                                "n": n,
                                "site": site,
                                "layers": layers,
                            }
                            yield Shard(**fields, id=shard_id(spec, task, fields))


def count_shards(spec: Spec, n_layers: dict[str, int]) -> dict[str, int]:
    """Shards by kind, computed without expanding them."""
    counts = {"behavior": 0, "patching": 0}
    for m in spec.models:
        if spec.experiments.behavior is not None:
            per = spec.experiments.behavior.programs_per_shard
            counts["behavior"] += sum(
                len(t.seq_lens) * -(-t.n // per) for t in spec.tasks_for("behavior")
            )
        patching = spec.experiments.patching
        if patching is not None:
            blocks = len(layer_blocks(n_layers[m.id], patching.layers, patching.layers_per_shard))
            per = patching.programs_per_shard
            counts["patching"] += sum(
                len(t.seq_lens) * -(-t.n // per) * len(patching.sites) * blocks
                for t in spec.tasks_for("patching")
            )
    return counts


def split(shard: Shard) -> list[Shard]:
    """Two halves of a shard (by layers if it has several, else by programs), as parts.

    Raises:
        ValueError: a single-layer, single-program shard cannot be split.
    """
    k, of = shard.part or (0, 1)
    if shard.layers is not None and len(shard.layers) > 1:
        mid = len(shard.layers) // 2
        halves = [
            dataclasses.replace(shard, layers=shard.layers[:mid]),
            dataclasses.replace(shard, layers=shard.layers[mid:]),
        ]
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
