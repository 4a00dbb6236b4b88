"""The actor body: one model, loaded once, serving every shard of that model.

A plain class (the orchestrator makes it a Ray actor in one place). `run(shard)` regenerates the
shard's programs from (seed, task, seq_len, indices) — programs never cross Ray — and returns
Arrow tables. Out of memory, it halves its patching batch and tries again; at a batch of one it
raises `ShardOutOfMemory`, and the driver splits the shard.

Fault injection for tests (never set in production): the environment variable `VARBIND_FAULTS`
holds JSON with any of `oom_batch_above` (rows per forward beyond which a patching batch raises
out-of-memory), `oom_layers_above` (a patching shard with more layers always runs out of
memory), `fail_task` (shards of this task raise), `sleep_s` (seconds to wait in each shard).
"""

import json
import logging
import os
import socket
import time
from typing import Any

import pyarrow as pa
import torch

from actors.behavior import HFScorer, VLLMScorer, vllm_available
from actors.loading import LoadedModel, load_model
from actors.patching import Patcher
from orchestrator.tasks import generate

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


class ShardOutOfMemory(RuntimeError):
    """The shard does not fit even one patch per forward; split it."""


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class ModelWorker:
    """Owns one model and runs shards on it.

    Args:
        model: the spec's model entry (`id`, `dtype`, `quantization`).
        experiments: the spec's `experiments` mapping.
        seed: the sweep seed.
        task_options: family -> generator options.
        threads: torch CPU threads (None: leave as is).
    """

    def __init__(
        self,
        model: dict[str, Any],
        experiments: dict[str, Any],
        seed: int,
        task_options: dict[str, dict[str, Any]],
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model_spec = model
        self.experiments = experiments
        self.seed = seed
        self.task_options = task_options
        self.faults = json.loads(os.environ.get("VARBIND_FAULTS", "{}"))
        self._lm: LoadedModel | None = None
        self._patcher: Patcher | None = None
        self._scorer: Any = None
        behavior = experiments.get("behavior") or {}
        backend = behavior.get("backend", "auto")
        self.backend = (
            "vllm" if backend == "vllm" or (backend == "auto" and vllm_available()) else "hf"
        )
        if experiments.get("patching") or (behavior and self.backend == "hf"):
            self._load()

    def _load(self) -> LoadedModel:
        if self._lm is None:
            m = self.model_spec
            self._lm = load_model(m["id"], dtype=m["dtype"], quantization=m["quantization"])
        return self._lm

    def info(self) -> dict[str, Any]:
        """Where this actor runs and what it loaded."""
        lm = self._lm
        return {
            "model": self.model_spec["id"],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": _node_id(),
            "device": str(lm.device) if lm else None,
            "quantization": lm.quantization if lm else None,
            "weight_bytes": lm.weight_bytes if lm else None,
        }

    def programs(self, shard: dict[str, Any]) -> list:
        options = self.task_options.get(shard["task"], {})
        return [
            generate(shard["task"], self.seed, shard["seq_len"], i, **options)
            for i in range(shard["start"], shard["start"] + shard["n"])
        ]

    def run(self, shard: dict[str, Any]) -> dict[str, Any]:
        """Run one shard.

        Returns:
            `{"table": pa.Table, "skipped": pa.Table, "seconds": float, "pid": int}`.

        Raises:
            ShardOutOfMemory: a patching shard that does not fit at batch size 1.
        """
        start = time.perf_counter()
        if self.faults.get("sleep_s"):
            time.sleep(float(self.faults["sleep_s"]))
        if self.faults.get("fail_task") == shard["task"]:
            raise RuntimeError(f"injected failure for task {shard['task']} (VARBIND_FAULTS)")
        programs = self.programs(shard)
        skipped = SKIPPED_SCHEMA.empty_table()
        if shard["kind"] == "behavior":
            table = self._behavior(programs)
        else:
            table, skipped = self._patching(shard, programs)
        return {
            "table": table,
            "skipped": skipped,
            "seconds": time.perf_counter() - start,
            "pid": os.getpid(),
            "node_id": _node_id(),
        }

    def _behavior(self, programs: list) -> pa.Table:
        if self._scorer is None:
            b = self.experiments["behavior"]
            if self.backend == "vllm":
                self._scorer = VLLMScorer(self.model_spec["id"], b["template"], b["max_new_tokens"])
            else:
                self._scorer = HFScorer(
                    self._load(), b["template"], b["batch_size"], b["max_new_tokens"]
                )
        return self._scorer.score(programs)

    def _patching(self, shard: dict[str, Any], programs: list) -> tuple[pa.Table, pa.Table]:
        spec = self.experiments["patching"]
        if self._patcher is None:
            self._patcher = Patcher(self._load(), batch_size=spec["batch_size"])
        patcher = self._patcher
        layers = list(shard["layers"])
        batch = spec["batch_size"]
        while True:
            patcher.batch_size = batch
            patcher.skipped = []
            try:
                self._inject_oom(batch, layers)
                table = patcher.patch(
                    programs, sites=[shard["site"]], layers=layers, positions=spec["positions"]
                )
                break
            except Exception as err:
                if not _is_oom(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if batch == 1:
                    raise ShardOutOfMemory(
                        f"shard {shard['id']}: out of memory at one patch per forward "
                        f"({len(layers)} layers, {len(programs)} programs)"
                    ) from None
                batch = max(1, batch // 2)
                logger.warning(
                    "shard %s: out of memory; retrying with batch %d", shard["id"], batch
                )
        skipped = {
            "model": [self.model_spec["id"]] * len(patcher.skipped),
            "task": [p["task"] for p, _ in patcher.skipped],
            "seq_len": [p["seq_len"] for p, _ in patcher.skipped],
            "program": [p["index"] for p, _ in patcher.skipped],
            "reason": [reason for _, reason in patcher.skipped],
        }
        return table, pa.table(skipped, schema=SKIPPED_SCHEMA)

    def _inject_oom(self, batch: int, layers: list[int]) -> None:
        above = self.faults.get("oom_batch_above")
        if above is not None and batch > int(above):
            raise torch.OutOfMemoryError(f"injected: batch {batch} > {above} (VARBIND_FAULTS)")
        above = self.faults.get("oom_layers_above")
        if above is not None and len(layers) > int(above):
            raise torch.OutOfMemoryError(
                f"injected: {len(layers)} layers > {above} (VARBIND_FAULTS)"
            )
