"""Fault injection for tests: a subclass of the production actor, and nothing in production.

`FaultyWorker(config, Faults(...))` behaves as `ModelWorker` except where a fault says:
- `sleep_s`: wait this long before each shard (to make a sweep slow enough to interrupt);
- `fail_task`: shards of this task raise;
- `oom_batch_above`: a patching attempt with more rows per forward runs out of memory;
- `oom_layers_above`: a patching shard with more layers always runs out of memory;
- `exit_once`: a marker path; the first actor to start a shard while it is absent creates it
  and dies at once (as a killed actor does), mid-shard;
- `hold_until`: a path; every shard waits until it exists (the test decides when work goes on).

`tests/integration/faulty_cli.py` runs the orchestrator's CLI with this actor.
"""

import dataclasses
import os
import time

import torch

from actors.patching import Patcher
from actors.worker import ModelWorker
from orchestrator.protocol import Shard, ShardResult, WorkerConfig
from orchestrator.tasks import Program


@dataclasses.dataclass(frozen=True)
class Faults:
    sleep_s: float = 0.0
    fail_task: str | None = None
    oom_batch_above: int | None = None
    oom_layers_above: int | None = None
    exit_once: str | None = None
    hold_until: str | None = None


class FaultyWorker(ModelWorker):
    """`ModelWorker` with the faults of `faults` injected."""

    def __init__(self, config: WorkerConfig, faults: Faults) -> None:
        super().__init__(config)
        self.faults = faults

    def run(self, shard: Shard) -> ShardResult:
        if self.faults.sleep_s:
            time.sleep(self.faults.sleep_s)
        while self.faults.hold_until is not None and not os.path.exists(self.faults.hold_until):
            time.sleep(0.05)
        if self.faults.exit_once is not None:
            try:
                os.close(os.open(self.faults.exit_once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        if self.faults.fail_task == shard.task:
            raise RuntimeError(f"injected failure for task {shard.task} (FaultyWorker)")
        return super().run(shard)

    def _patch(self, patcher: Patcher, programs: list[Program], shard: Shard):
        above = self.faults.oom_batch_above
        if above is not None and patcher.batch_size > above:
            raise torch.OutOfMemoryError(f"injected: batch {patcher.batch_size} > {above}")
        above = self.faults.oom_layers_above
        if above is not None and len(shard.layers or ()) > above:
            raise torch.OutOfMemoryError(f"injected: {len(shard.layers)} layers > {above}")
        return super()._patch(patcher, programs, shard)
