"""A run folder belongs to one spec: its identity, its hash, and what may change under `--extend`.

The identity is everything that decides the folder's rows: the seed; each family's lengths,
count, options and counterfactual kinds (when not root_value alone); each model's dtype,
quantization and training step (when it has one); each experiment's row-deciding settings
(template, backend, positions, metric, sites, layers, tasks; attribution's AtP* switches and
`verify_top_k`; probes' labels, train fraction and l2), each model's answer prefix per task, and
its shard layout (programs and layers per shard: a different layout gives different shard files
over the same programs). It leaves out what only decides how fast rows come (batch sizes,
resources) and where they go (`output`, `run`). Order does not matter: lists that are sets are
sorted.

`run.json` stores the identity and its hash. A spec with another hash is refused, unless
`--extend` and `extension_problems` finds the change only adds work: then every shard of the old
spec is a shard of the new one (same id, so its file stays valid) and every old program is a
new program.
"""

import hashlib
import json
from typing import Any

from orchestrator.protocol import KINDS
from orchestrator.shards import iter_shards
from orchestrator.spec import ModelSpec, Spec, TaskSpec

HASH_LENGTH = 16
MAX_DIFF_LINES = 12


# Each kind's settings in the identity. Lists that are sets (sites, layers, tasks) are added
# sorted by `_experiment`; batch sizes are left out (they decide how fast, not which rows).
SETTINGS: dict[str, tuple[str, ...]] = {
    "behavior": ("backend", "template", "max_new_tokens", "programs_per_shard"),
    "patching": ("layers_per_shard", "positions", "metric", "programs_per_shard"),
    "attribution": (
        "positions",
        "attention_fix",
        "grad_drop",
        "verify_top_k",
        "programs_per_shard",
    ),
    "knockout": ("layers_per_shard", "programs_per_shard"),
    "probes": ("train_fraction", "l2", "programs_per_shard"),
}
SETS = ("sites", "scopes", "layers", "tasks", "labels")


def _experiment(kind: str, experiment: Any) -> dict[str, Any] | None:
    if experiment is None:
        return None
    out = {key: getattr(experiment, key) for key in SETTINGS[kind]}
    for key in SETS:
        if key in type(experiment).model_fields:
            value = getattr(experiment, key)
            out[key] = None if value is None else sorted(set(value))
    return out


def _task(task: TaskSpec) -> dict[str, Any]:
    out = {"seq_lens": sorted(task.seq_lens), "n": task.n, "options": dict(task.options)}
    # Only when not the default, so that specs from before counterfactual kinds keep their hash.
    if task.counterfactuals != ["root_value"]:
        out["counterfactual"] = sorted(task.counterfactuals)
    return out


def _model(spec: Spec, model: ModelSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dtype": model.dtype,
        "quantization": model.quantization,
        "answer_prefix": {t.family: spec.answer_prefix(model.id, t.family) for t in spec.tasks},
    }
    # Only when there is one, so that specs from before training steps keep their hash.
    if model.step is not None:
        out["step"] = model.step
    return out


def identity(spec: Spec) -> dict[str, Any]:
    """The row-deciding content of a spec, as plain JSON-able data."""
    ident: dict[str, Any] = {
        "seed": spec.seed,
        "tasks": {t.family: _task(t) for t in spec.tasks},
        "models": {m.id: _model(spec, m) for m in spec.models},
    }
    for kind in KINDS:
        experiment = getattr(spec.experiments, kind)
        # A kind newer than run folders already on disk is in the identity only when the spec
        # has it, so that their specs keep their hash (`behavior` and `patching` always were).
        if experiment is not None or kind in ("behavior", "patching"):
            ident[kind] = _experiment(kind, experiment)
    return ident


def spec_hash(ident: dict[str, Any]) -> str:
    """A short, stable hash of an identity."""
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_LENGTH]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each leaf that differs (at most MAX_DIFF_LINES lines)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in a and key in b and a[key] == b[key]:
            continue
        before = json.dumps(a[key]) if key in a else "(absent)"
        after = json.dumps(b[key]) if key in b else "(absent)"
        lines.append(f"{key}: {before} -> {after}")
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"... and {len(lines) - MAX_DIFF_LINES} more"]
    return lines


def extension_problems(
    old: Spec, new: Spec, n_layers_old: dict[str, int], n_layers_new: dict[str, int]
) -> list[str]:
    """Why `new` is not `old` plus more work (empty: it is).

    Args:
        old: the spec the folder was run with.
        new: the spec to run into it.
        n_layers_old / n_layers_new: model id -> layer count for each spec's models.
    """
    problems = []
    if old.seed != new.seed:
        problems.append(f"seed changed ({old.seed} -> {new.seed}): every program changes")
    new_tasks = {t.family: t for t in new.tasks}
    for task in old.tasks:
        other = new_tasks.get(task.family)
        if other is None:
            problems.append(f"tasks: {task.family} was removed")
            continue
        if dict(other.options) != dict(task.options):
            problems.append(f"tasks.{task.family}.options changed: its programs change")
        dropped = sorted(set(task.seq_lens) - set(other.seq_lens))
        if dropped:
            problems.append(f"tasks.{task.family}.seq_lens: {dropped} removed")
        if other.n < task.n:
            problems.append(f"tasks.{task.family}.n: {task.n} -> {other.n} removes programs")
        dropped = [c for c in task.counterfactuals if c not in other.counterfactuals]
        if dropped:
            problems.append(f"tasks.{task.family}.counterfactual: {dropped} removed")
    for kind in KINDS:
        if getattr(old.experiments, kind) is not None and getattr(new.experiments, kind) is None:
            problems.append(f"experiments.{kind} was removed")
    removed = sorted({m.id for m in old.models} - {m.id for m in new.models})
    if removed:
        problems.append(f"models: {removed} removed")
    # A shard id names the model by its id alone: a kept model loaded another way would leave
    # its old files standing as if they were the new settings' rows.
    was = {m.id: m for m in old.models}
    for m in new.models:
        for key in ("dtype", "quantization", "step"):
            before, after = (getattr(x, key) for x in (was.get(m.id, m), m))
            if before != after:
                problems.append(
                    f"models.{m.id}.{key} changed ({before} -> {after}): its rows so far "
                    "were computed with the old setting; run it as a new run, or --fresh"
                )
    ob, nb = old.experiments.behavior, new.experiments.behavior
    if ob is not None and nb is not None and ob.backend != nb.backend:
        problems.append(
            f"experiments.behavior.backend changed ({ob.backend} -> {nb.backend}): "
            "old rows would mix two backends"
        )
    if problems:
        return problems
    # The decisive test: a shard id hashes everything that decides the shard's rows, so an old
    # shard whose id is among the new ones keeps a valid file.
    new_ids = {s.id for s in iter_shards(new, n_layers_new)}
    lost = [s for s in iter_shards(old, n_layers_old) if s.id not in new_ids]
    if lost:
        problems.append(
            f"{len(lost)} of the run's shards would not be shards of the new spec (e.g. "
            f"{lost[0].describe()} of {lost[0].model}): a setting that decides rows or the "
            "shard layout changed, or a block of programs grows (extend n by whole multiples "
            "of programs_per_shard)"
        )
    return problems
