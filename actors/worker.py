"""The actor body: one model, loaded once, serving every shard of that model.

A plain class (the orchestrator makes it a Ray actor in one place). It speaks the typed
protocol of `orchestrator.protocol`: built from a `WorkerConfig`, `run(Shard)` regenerates the
shard's programs from (seed, task, seq_len, indices) — programs never cross Ray — and returns a
`ShardResult` of Arrow tables. Every table it returns, whatever the kind (and the skipped
programs'), ends with a `step` column: the model's training step, null where the spec gives none,
so that rows of the checkpoints of one training run can be compared.

Out of memory, the same for patching, attribution, knockout and probes: with a whole-number
`batch_size` the worker halves its batch (patches, programs per forward and backward,
knockouts, or programs per forward) and tries again, and at a batch of one raises
`ShardOutOfMemory`, so the driver splits the shard. With `batch_size: auto` the patcher,
attributor or knocker already sizes and shrinks its batches, and re-raises only when one does
not fit: the worker then raises `ShardOutOfMemory` at once.

Tests inject faults through a subclass (`tests/integration/faults.py`), which overrides
`run`, `_patch`, `_attribute`, `_knock` or `_probe`; nothing here reads a fault switch.
"""

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
import torch

from actors.attribution import Attributor
from actors.behavior import HFScorer, VLLMScorer, vllm_available
from actors.execute import is_oom
from actors.knockout import Knocker
from actors.loading import LoadedModel, load_model
from actors.patching import Patcher
from actors.probes import Prober
from orchestrator.protocol import Shard, ShardOutOfMemory, ShardResult, WorkerConfig
from orchestrator.tasks import Program, generate
from orchestrator.tasks.counterfactuals import ROOT_VALUE

logger = logging.getLogger(__name__)

SKIPPED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("reason", pa.string()),
        # Where the patched activations came from (patching's kinds; root_value elsewhere).
        ("counterfactual", pa.string()),
    ]
)
# Appended to every table a shard returns (`with_step`).
STEP_FIELD = pa.field("step", pa.int64())


def with_step(table: pa.Table, step: int | None) -> pa.Table:
    """`table` with a last column `step`: the model's training step on every row (null when
    the model has none)."""
    assert STEP_FIELD.name not in table.column_names, f"a step column already: {table.schema}"
    return table.append_column(STEP_FIELD, pa.array([step] * table.num_rows, pa.int64()))


def _node_id() -> str | None:
    """The Ray node this runs on, when it runs as an actor."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ModelWorker:
    """Owns one model and runs shards on it.

    Args:
        config: the model, the experiment settings, the seed and the family options.
    """

    def __init__(self, config: WorkerConfig) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self._lm: LoadedModel | None = None
        self._patcher: Patcher | None = None
        self._attributor: Attributor | None = None
        self._knocker: Knocker | None = None
        self._prober: Prober | None = None
        self._scorer: Any = None
        behavior = config.behavior
        backend = behavior.backend if behavior is not None else "hf"
        self.backend = (
            "vllm" if backend == "vllm" or (backend == "auto" and vllm_available()) else "hf"
        )
        on_weights = ("patching", "attribution", "knockout", "probes")  # kinds run here, on HF
        needs_model = any(getattr(config, kind) is not None for kind in on_weights)
        if needs_model or (behavior is not None and self.backend == "hf"):
            self._load()

    def _load(self) -> LoadedModel:
        if self._lm is None:
            m = self.config.model
            self._lm = load_model(m.id, dtype=m.dtype, quantization=m.quantization)
        return self._lm

    def info(self) -> dict[str, Any]:
        """Where this actor runs and what it loaded."""
        lm = self._lm
        return {
            "model": self.config.model.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": _node_id(),
            "device": str(lm.device) if lm else None,
            "quantization": lm.quantization if lm else None,
            "weight_bytes": lm.weight_bytes if lm else None,
        }

    def programs(self, shard: Shard) -> list[Program]:
        options = self.config.task_options.get(shard.task, {})
        return [
            generate(shard.task, self.config.seed, shard.seq_len, i, **options)
            for i in range(shard.start, shard.start + shard.n)
        ]

    def run(self, shard: Shard) -> ShardResult:
        """Run one shard.

        Returns:
            Its rows, and for every kind but behaviour the programs left out, with why; both
            with the model's `step` as their last column.

        Raises:
            ShardOutOfMemory: a patching or knockout shard that does not fit one row per
                forward, an attribution shard that does not fit one program per forward and
                backward, or a probes shard that does not fit one program per forward.
        """
        start = time.perf_counter()
        programs = self.programs(shard)
        skipped = SKIPPED_SCHEMA.empty_table()
        if shard.kind == "behavior":
            table = self._behavior(programs, shard)
        elif shard.kind == "patching":
            table, skipped = self._patching(shard, programs)
        elif shard.kind == "attribution":
            table, skipped = self._attribution(shard, programs)
        elif shard.kind == "knockout":
            table, skipped = self._knockout(shard, programs)
        else:
            table, skipped = self._probes(shard, programs)
        step = self.config.model.step
        return ShardResult(
            table=with_step(table, step),
            skipped=with_step(skipped, step),
            seconds=time.perf_counter() - start,
            pid=os.getpid(),
            host=socket.gethostname(),
            node_id=_node_id(),
        )

    def _prefix(self, shard: Shard) -> str:
        return self.config.answer_prefix.get(shard.task, "auto")

    def _behavior(self, programs: list[Program], shard: Shard) -> pa.Table:
        if self._scorer is None:
            b = self.config.behavior
            assert b is not None, "a behaviour shard reached a worker without behaviour settings"
            if self.backend == "vllm":
                self._scorer = VLLMScorer(self.config.model.id, b.template, b.max_new_tokens)
            else:
                self._scorer = HFScorer(self._load(), b.template, b.batch_size, b.max_new_tokens)
        return self._scorer.score(programs, self._prefix(shard))

    def _patch(self, patcher: Patcher, programs: list[Program], shard: Shard) -> pa.Table:
        """One attempt at the shard with the patcher's current batch size (tests override this
        to run out of memory on purpose)."""
        assert self.config.patching is not None and shard.layers is not None, shard
        patcher.skipped = []
        return patcher.patch(
            programs,
            sites=[shard.site],
            layers=list(shard.layers),
            positions=self.config.patching.positions,
            answer_prefix=self._prefix(shard),
            counterfactual=shard.counterfactual,
        )

    def _patching(self, shard: Shard, programs: list[Program]) -> tuple[pa.Table, pa.Table]:
        spec = self.config.patching
        assert spec is not None, "a patching shard reached a worker without patching settings"
        if self._patcher is None:
            self._patcher = Patcher(self._load(), batch_size=spec.batch_size, metric=spec.metric)
        patcher = self._patcher
        table = self._fit(
            patcher,
            spec.batch_size,
            lambda: self._patch(patcher, programs, shard),
            f"shard {shard.file_stem}: out of memory at one patch per forward",
            shard,
        )
        return table, self._skipped(patcher.skipped, shard.counterfactual)

    def _attribute(self, attributor: Attributor, programs: list[Program], shard: Shard) -> pa.Table:
        """One attempt at the shard with the attributor's current batch size (tests override
        this to run out of memory on purpose)."""
        spec = self.config.attribution
        assert spec is not None and shard.layers is not None, shard
        return attributor.attribute(
            programs,
            sites=[shard.site],
            layers=list(shard.layers),
            positions=spec.positions,
            answer_prefix=self._prefix(shard),
            verify_top_k=spec.verify_top_k,
            seed=self.config.seed,
        )

    def _attribution(self, shard: Shard, programs: list[Program]) -> tuple[pa.Table, pa.Table]:
        spec = self.config.attribution
        assert spec is not None, "an attribution shard reached a worker without its settings"
        if self._attributor is None:
            self._attributor = Attributor(
                self._load(),
                batch_size=spec.batch_size,
                attention_fix=spec.attention_fix,
                grad_drop=spec.grad_drop,
            )
        attributor = self._attributor
        table = self._fit(
            attributor,
            spec.batch_size,
            lambda: self._attribute(attributor, programs, shard),
            f"shard {shard.file_stem}: out of memory at one program per forward and backward",
            shard,
        )
        return table, self._skipped(attributor.skipped)

    def _knock(self, knocker: Knocker, programs: list[Program], shard: Shard) -> pa.Table:
        """One attempt at the shard with the knocker's current batch size (tests override this
        to run out of memory on purpose)."""
        assert shard.layers is not None and shard.site is not None, shard
        return knocker.knockout(
            programs,
            layers=list(shard.layers),
            scope=shard.site,
            answer_prefix=self._prefix(shard),
        )

    def _knockout(self, shard: Shard, programs: list[Program]) -> tuple[pa.Table, pa.Table]:
        spec = self.config.knockout
        assert spec is not None, "a knockout shard reached a worker without its settings"
        if self._knocker is None:
            self._knocker = Knocker(self._load(), batch_size=spec.batch_size)
        knocker = self._knocker
        table = self._fit(
            knocker,
            spec.batch_size,
            lambda: self._knock(knocker, programs, shard),
            f"shard {shard.file_stem}: out of memory at one knockout per forward",
            shard,
        )
        return table, self._skipped(knocker.skipped)

    def _probe(self, prober: Prober, programs: list[Program], shard: Shard) -> pa.Table:
        """One attempt at the shard with the prober's current batch size (tests override this
        to run out of memory on purpose)."""
        spec = self.config.probes
        assert spec is not None and shard.layers is not None, shard
        prober.skipped = []  # a retry after out of memory starts its list afresh
        return prober.probe(
            programs, layers=list(shard.layers), labels=spec.labels, seed=self.config.seed
        )

    def _probes(self, shard: Shard, programs: list[Program]) -> tuple[pa.Table, pa.Table]:
        spec = self.config.probes
        assert spec is not None, "a probes shard reached a worker without its settings"
        if self._prober is None:
            self._prober = Prober(
                self._load(),
                batch_size=spec.batch_size,
                l2=spec.l2,
                train_fraction=spec.train_fraction,
            )
        prober = self._prober
        table = self._fit(
            prober,
            spec.batch_size,
            lambda: self._probe(prober, programs, shard),
            f"shard {shard.file_stem}: out of memory at one program per forward",
            shard,
        )
        return table, self._skipped(prober.skipped)

    def _fit(
        self,
        tool: Any,
        batch: int | Literal["auto"],
        attempt: Callable[[], pa.Table],
        too_big: str,
        shard: Shard,
    ) -> pa.Table:
        """`attempt()` with `tool.batch_size` set from `batch`, halving it on out of memory.

        Args:
            tool: the patcher, attributor, knocker or prober (its `batch_size` is set before
                each attempt).
            batch: the spec's batch size; `auto` leaves the tool's own sizing alone.
            attempt: runs the shard once.
            too_big: the start of the message when not even a batch of one fits.
            shard: the shard (for the messages).

        Raises:
            ShardOutOfMemory: out of memory at batch 1, or at once under `auto` (the tool has
                already shrunk its own batches as far as they go).
        """
        while True:
            if batch != "auto":
                tool.batch_size = batch
            try:
                return attempt()
            except Exception as err:
                if not is_oom(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if batch == "auto" or batch == 1:
                    raise ShardOutOfMemory(
                        f"{too_big} ({len(shard.layers or ())} layers, {shard.n} programs)"
                    ) from None
                batch = max(1, batch // 2)
                logger.warning("shard %s: out of memory; retrying with batch %d", shard.id, batch)

    def _skipped(self, skipped: list[tuple[dict, str]], kind: str = ROOT_VALUE) -> pa.Table:
        """The programs a tool left out, with the reason, as rows of `SKIPPED_SCHEMA`."""
        rows = {
            "model": [self.config.model.id] * len(skipped),
            "task": [p["task"] for p, _ in skipped],
            "seq_len": [p["seq_len"] for p, _ in skipped],
            "program": [p["index"] for p, _ in skipped],
            "reason": [reason for _, reason in skipped],
            "counterfactual": [kind] * len(skipped),
        }
        return pa.table(rows, schema=SKIPPED_SCHEMA)
