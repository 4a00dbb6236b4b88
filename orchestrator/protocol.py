"""What the driver and an actor say to each other: one module, imported by both sides.

    driver --WorkerConfig--> ModelWorker(config)       (once per actor)
    driver --Shard---------> ModelWorker.run(shard)    (once per shard)
    driver <-ShardResult---- ModelWorker.run           (or a raised ShardOutOfMemory)

Everything here is a frozen dataclass of plain data (or an Arrow table), so it pickles across
Ray and compares by value in tests. Programs never cross: the actor regenerates a shard's
programs from (seed, task, seq_len, indices).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

import pyarrow as pa

from orchestrator.experiments import (
    AttributionSpec,
    BehaviorSpec,
    KnockoutSpec,
    PatchingSpec,
    ProbesSpec,
)
from orchestrator.spec import ModelSpec, Spec

# An experiment kind: a spec section (`experiments.<kind>`), a shard kind and a results folder.
Kind = Literal["behavior", "patching", "attribution", "knockout", "probes"]
KINDS: tuple[Kind, ...] = get_args(Kind)
# The kinds that intervene at (site, layers): their shards carry both (knockout's `site` is its
# scope).
INTERVENTIONS: tuple[Kind, ...] = ("patching", "attribution", "knockout")
# The kinds whose shards carry layers: the interventions, and probes (which read every requested
# layer from one forward pass, and intervene nowhere: their shards have no site).
LAYERED: tuple[Kind, ...] = (*INTERVENTIONS, "probes")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work for one model.

    Attributes:
        kind: `behavior`, `patching`, `attribution`, `knockout` or `probes`.
        model: the model id as the spec gives it.
        task: family name.
        seq_len: program length.
        start / n: program indices `start .. start+n-1` of the (seed, task, seq_len) stream.
        site: the site patched or attributed, or the knockout's scope (interventions only).
        layers: layer indices (patching and knockout: consecutive; attribution and probes:
            every requested layer).
        id: content hash; the shard's file is `<id>.parquet`.
        part: `(k, of)` when the shard is a split part of shard `id` (after out-of-memory).
        counterfactual: the counterfactual kind patched (`orchestrator.tasks.counterfactuals`;
            patching only: every other kind's shards are `root_value`).
    """

    kind: Kind
    model: str
    task: str
    seq_len: int
    start: int
    n: int
    site: str | None = None
    layers: tuple[int, ...] | None = None
    id: str = ""
    part: tuple[int, int] | None = None
    counterfactual: str = "root_value"

    @property
    def file_stem(self) -> str:
        return self.id if self.part is None else f"{self.id}.part{self.part[0]}of{self.part[1]}"

    def describe(self) -> str:
        """`patching binding seq_len=4 programs 0-1 site=resid_pre layers 0-1` (for people)."""
        text = f"{self.kind} {self.task} seq_len={self.seq_len} programs {self.start}-"
        text += str(self.start + self.n - 1)
        if self.site is not None:
            text += f" {'scope' if self.kind == 'knockout' else 'site'}={self.site}"
        if self.layers:
            first, last = self.layers[0], self.layers[-1]
            if self.layers == tuple(range(first, last + 1)):
                text += f" layers {first}-{last}"
            else:  # attribution's and probes' layers need not be consecutive
                text += " layers " + ",".join(map(str, self.layers))
        if self.counterfactual != "root_value":
            text += f" counterfactual={self.counterfactual}"
        return text


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What an actor needs to serve every shard of one model.

    Attributes:
        model: the spec's model entry.
        behavior: the behaviour settings, or None when the sweep scores no behaviour.
        patching: the patching settings, or None when the sweep patches nothing.
        attribution: the attribution settings, or None when the sweep estimates nothing.
        knockout: the knockout settings, or None when the sweep knocks nothing out.
        probes: the probe settings, or None when the sweep fits no probes.
        seed: the sweep seed (programs are regenerated from it).
        task_options: family -> generator options.
        answer_prefix: family -> the answer prefix on this model (a string or `auto`).
        threads: torch CPU threads for the actor (None: leave torch's default).
    """

    model: ModelSpec
    behavior: BehaviorSpec | None
    patching: PatchingSpec | None
    attribution: AttributionSpec | None
    seed: int
    task_options: Mapping[str, Mapping[str, Any]]
    answer_prefix: Mapping[str, str] = dataclasses.field(default_factory=dict)
    threads: int | None = None
    knockout: KnockoutSpec | None = None
    probes: ProbesSpec | None = None

    @classmethod
    def of(cls, spec: Spec, model_id: str, threads: int | None = None) -> "WorkerConfig":
        """The config of `model_id`'s actors under `spec`.

        Raises:
            KeyError: `model_id` is not one of the spec's models.
        """
        models = {m.id: m for m in spec.models}
        return cls(
            model=models[model_id],
            behavior=spec.experiments.behavior,
            patching=spec.experiments.patching,
            attribution=spec.experiments.attribution,
            knockout=spec.experiments.knockout,
            seed=spec.seed,
            task_options={t.family: dict(t.options) for t in spec.tasks},
            answer_prefix={t.family: spec.answer_prefix(model_id, t.family) for t in spec.tasks},
            threads=threads,
            probes=spec.experiments.probes,
        )


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """A finished shard.

    Attributes:
        table: its rows (the kind's schema, and a `step` column: the model's training step).
        skipped: programs that could not be patched, attributed, knocked out or probed, with
            the reason (may have no rows).
        seconds: time the actor spent on it.
        pid / host / node_id: where it ran (node_id: the Ray node, None outside Ray).
    """

    table: pa.Table
    skipped: pa.Table | None
    seconds: float
    pid: int
    host: str
    node_id: str | None = None


class ShardOutOfMemory(RuntimeError):
    """The shard does not fit even one patch (or one program) per forward; the driver splits
    it."""
