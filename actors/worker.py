"""The actor body: one model, loaded once, serving every shard of that model.

A plain class (the orchestrator makes it a Ray actor in one place). It speaks the typed
protocol of `orchestrator.protocol`: built from a `WorkerConfig`, `run(Shard)` regenerates the
shard's programs from (seed, task, seq_len, indices) — programs never cross Ray — and returns a
`ShardResult` of Arrow tables.

Out of memory: with a whole-number `batch_size` the worker halves its patching batch and tries
again, and at one patch per forward raises `ShardOutOfMemory`, so the driver splits the shard.
With `batch_size: auto` the engine already sizes and shrinks its chunks, and re-raises only when
one row does not fit: the worker then raises `ShardOutOfMemory` at once.

Tests inject faults through a subclass (`tests/integration/faults.py`), which overrides
`run` and `_patch`; nothing here reads a fault switch.
"""

import logging
import os
import socket
import time
from typing import Any

import pyarrow as pa
import torch

from actors.behavior import HFScorer, VLLMScorer, vllm_available
from actors.execute import is_oom
from actors.loading import LoadedModel, load_model
from actors.patching import Patcher
from orchestrator.protocol import Shard, ShardOutOfMemory, ShardResult, WorkerConfig
from orchestrator.tasks import Program, generate

logger = logging.getLogger(__name__)

SKIPPED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("reason", pa.string()),
    ]
)


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
        self._scorer: Any = None
        behavior = config.behavior
        backend = behavior.backend if behavior is not None else "hf"
        self.backend = (
            "vllm" if backend == "vllm" or (backend == "auto" and vllm_available()) else "hf"
        )
        if config.patching is not None or (behavior is not None and self.backend == "hf"):
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
            Its rows, and for patching the programs that could not be patched.

        Raises:
            ShardOutOfMemory: a patching shard that does not fit one patch per forward.
        """
        start = time.perf_counter()
        programs = self.programs(shard)
        skipped = SKIPPED_SCHEMA.empty_table()
        if shard.kind == "behavior":
            table = self._behavior(programs, shard)
        else:
            table, skipped = self._patching(shard, programs)
        return ShardResult(
            table=table,
            skipped=skipped,
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
        )

    def _patching(self, shard: Shard, programs: list[Program]) -> tuple[pa.Table, pa.Table]:
        spec = self.config.patching
        assert spec is not None, "a patching shard reached a worker without patching settings"
        if self._patcher is None:
            self._patcher = Patcher(self._load(), batch_size=spec.batch_size, metric=spec.metric)
        patcher = self._patcher
        batch = spec.batch_size
        while True:
            if batch != "auto":
                patcher.batch_size = batch
            try:
                table = self._patch(patcher, programs, shard)
                break
            except Exception as err:
                if not is_oom(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if batch == "auto" or batch == 1:
                    # `auto`: the engine has already shrunk its chunks down to one row.
                    raise ShardOutOfMemory(
                        f"shard {shard.file_stem}: out of memory at one patch per forward "
                        f"({len(shard.layers or ())} layers, {len(programs)} programs)"
                    ) from None
                batch = max(1, batch // 2)
                logger.warning("shard %s: out of memory; retrying with batch %d", shard.id, batch)
        skipped = {
            "model": [self.config.model.id] * len(patcher.skipped),
            "task": [p["task"] for p, _ in patcher.skipped],
            "seq_len": [p["seq_len"] for p, _ in patcher.skipped],
            "program": [p["index"] for p, _ in patcher.skipped],
            "reason": [reason for _, reason in patcher.skipped],
        }
        return table, pa.table(skipped, schema=SKIPPED_SCHEMA)
