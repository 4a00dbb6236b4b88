"""The driver: schedules shards onto Ray actors that each hold one model, and writes results.

Only this module calls `ray.init`, `ray.wait` and `ray.get`. The loop:

1. Models start while there are free slots (a slot is `gpus_per_actor` GPUs, or one actor on a
   CPU-only cluster): each new model gets a fair share of the free slots, so that every model is
   loaded as few times as possible while all slots stay busy. When a model runs out of work its
   actors are killed and its slots go to the next model, or, once no model waits, to the model
   with the most work left.
2. Each actor holds at most `max_in_flight_per_actor` shards (one running, one queued), so the
   driver's in-flight work is bounded; `ray.wait` returns the first finished one.
3. A finished shard's table is written at once (atomically) and dropped: driver memory does not
   grow with the sweep. Failures: a dead actor's shards are requeued on a fresh actor; an
   out-of-memory shard is split in two parts; any other error is retried up to `max_attempts`
   times and then recorded in `failures.jsonl` while the sweep goes on.
4. `request_stop` (the CLI's SIGINT/SIGTERM handler) ends the loop within a second: finished
   shards stay written, running ones are abandoned (their actors killed), none counts as failed.
   A cluster whose GCS stops answering raises `ClusterLost` the same way, before any shard is
   charged for the actors it took down.

Actors are named `<run>/<model>/<driver pid>/<k>` in the `varbind` namespace, so that tools
(`bench/chaos.py`) find this driver's actors with `ray.util.list_named_actors`.
"""

import collections
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.worker import ModelWorker
from orchestrator.cluster import Cluster
from orchestrator.protocol import Shard, ShardOutOfMemory, ShardResult, WorkerConfig
from orchestrator.shards import escape_model, iter_shards, split
from orchestrator.sink import ResultsDir
from orchestrator.spec import Spec

logger = logging.getLogger(__name__)

MAX_ACTOR_LOSSES = 8  # per model, before its remaining shards are recorded as failed
# Passed from the driver's environment to every actor (a cluster's workers do not inherit it).
FORWARD_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN")
ACTOR_NAMESPACE = "varbind"
WAIT_S = 0.5  # longest ray.wait: how soon a stop request is seen
HEALTH_EVERY_S = 2.0  # how often the GCS is probed
LOST_AFTER_S = 10.0  # GCS unreachable this long: the cluster is gone (Ray aborts after 60 s)


class ClusterLost(RuntimeError):
    """The cluster's GCS stopped answering; finished shards are written, none was failed."""


@dataclasses.dataclass
class Progress:
    total: int
    done_before: int = 0
    finished: int = 0
    failed: int = 0
    running: int = 0
    rows: int = 0
    stopped: str | None = None  # why the loop ended early (a signal's name), else None


@dataclasses.dataclass
class _Actor:
    handle: Any
    model: str
    inflight: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Model:
    """Work and actors of one model."""

    spec: Any
    shards: Iterator[Shard]
    retry: collections.deque = dataclasses.field(default_factory=collections.deque)
    actors: list = dataclasses.field(default_factory=list)
    exhausted: bool = False
    lost_actors: int = 0

    def next_shard(self) -> Shard | None:
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        shard = next(self.shards, None)
        if shard is None:
            self.exhausted = True
        return shard

    def idle(self) -> bool:
        return self.exhausted and not self.retry and not any(a.inflight for a in self.actors)


class Driver:
    """Runs the shards of one spec that are not done yet.

    Args:
        spec: the validated spec.
        n_layers: model id -> layer count.
        results: the run's results folder (already `start`ed).
        total: shards in the plan (for progress).
        cluster: the cluster connected to (for its address and liveness).
        on_progress: called with a `Progress` after every change.
        worker_cls: the actor body (`ModelWorker`; benchmarks pass a trivial one, tests a
            fault-injecting subclass), built as `worker_cls(WorkerConfig, *worker_args)`.
        worker_args: extra constructor arguments for `worker_cls`.
    """

    def __init__(
        self,
        spec: Spec,
        n_layers: dict[str, int],
        results: ResultsDir,
        total: int,
        cluster: Cluster,
        on_progress: Callable[[Progress], None] | None = None,
        worker_cls: type = ModelWorker,
        worker_args: Sequence[Any] = (),
    ) -> None:
        self.spec = spec
        self.cluster = cluster
        self.worker_args = tuple(worker_args)
        self.stop_reason: str | None = None
        self._actors_made = 0
        self._next_probe = 0.0
        self._unreachable_since: float | None = None
        self.n_layers = n_layers
        self.results = results
        self.progress = Progress(total=total)
        self.on_progress = on_progress or (lambda p: None)
        self.attempts: collections.Counter = collections.Counter()
        self.nodes: collections.Counter = collections.Counter()  # node id -> shards run there
        res = spec.resources
        gpus = ray.cluster_resources().get("GPU", 0)
        if res.gpus_per_actor == "auto":
            self.gpus_per_actor = 1.0 if gpus >= 1 else 0.0
        else:
            self.gpus_per_actor = float(res.gpus_per_actor)
        if self.gpus_per_actor > 0:
            self.slots = int(gpus // self.gpus_per_actor)
            if self.slots < 1:
                raise ValueError(
                    f"resources.gpus_per_actor={self.gpus_per_actor} but the cluster has {gpus} "
                    "GPUs; lower gpus_per_actor or add GPU nodes"
                )
        else:
            cpus = ray.cluster_resources().get("CPU", 1)
            # On CPU an actor uses every core it is given threads for; more actors than asked
            # for would only compete. Explicit actors_per_model may still ask for several.
            wanted = 1 if res.actors_per_model == "auto" else res.actors_per_model
            self.slots = max(1, min(wanted * len(spec.models), int(cpus // res.cpus_per_actor)))
        self.free = self.slots
        self.threads = None
        if self.gpus_per_actor == 0:
            cpus = ray.cluster_resources().get("CPU", 1)
            nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
            self.threads = max(1, int(cpus // max(1, math.ceil(self.slots / nodes))))
        self.models: dict[str, _Model] = {}
        self.pending = collections.deque(spec.models)
        self.ref_actor: dict[Any, _Actor] = {}
        self.ref_shard: dict[Any, Shard] = {}
        self.remote = ray.remote(worker_cls)
        self._last_report: tuple = ()

    # -- actors -----------------------------------------------------------------------------
    def _new_actor(self, model: _Model) -> None:
        spec = self.spec
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        config = WorkerConfig.of(spec, model.spec.id, self.threads)
        self._actors_made += 1
        name = f"{spec.run}/{escape_model(model.spec.id)}/{os.getpid()}/{self._actors_made}"
        handle = self.remote.options(
            name=name,
            namespace=ACTOR_NAMESPACE,
            runtime_env={"env_vars": env} if env else None,
            num_gpus=self.gpus_per_actor,
            num_cpus=spec.resources.cpus_per_actor,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        ).remote(config, *self.worker_args)
        model.actors.append(_Actor(handle, model.spec.id))
        self.free -= 1

    def _retire(self, model: _Model) -> None:
        for actor in model.actors:
            ray.kill(actor.handle)
        self.free += len(model.actors)
        model.actors.clear()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to end soon (safe to call from a signal handler: it only sets a flag)."""
        self.stop_reason = reason

    def _start_models(self) -> None:
        res = self.spec.resources
        # A model whose actors all died gets one back first.
        for model in self.models.values():
            if self.free > 0 and not model.actors and not model.idle():
                self._new_actor(model)
        while self.pending and self.free > 0:
            mspec = self.pending.popleft()
            shards = (
                s
                for s in iter_shards(self.spec, self.n_layers, model=mspec.id)
                if not self._skip_done(s)
            )
            model = _Model(mspec, shards)
            self.models[mspec.id] = model
            if res.actors_per_model == "auto":
                share = max(1, self.free // (len(self.pending) + 1))
            else:
                share = min(res.actors_per_model, self.free)
            for _ in range(share):
                self._new_actor(model)
        if res.actors_per_model == "auto" and self.gpus_per_actor > 0:
            # Nobody waits: lend free GPUs to the models that still have work.
            busy = [m for m in self.models.values() if m.actors and not m.exhausted]
            while busy and self.free > 0:
                self._new_actor(min(busy, key=lambda m: len(m.actors)))

    def _skip_done(self, shard: Shard) -> bool:
        if self.results.is_done(shard):
            self.progress.done_before += 1
            return True
        self.results.clear_parts(shard)
        return False

    # -- the loop ---------------------------------------------------------------------------
    def _submit(self) -> None:
        limit = self.spec.resources.max_in_flight_per_actor
        for model in list(self.models.values()):
            for actor in model.actors:
                while len(actor.inflight) < limit:
                    shard = model.next_shard()
                    if shard is None:
                        break
                    ref = actor.handle.run.remote(shard)
                    actor.inflight.add(ref)
                    self.ref_actor[ref] = actor
                    self.ref_shard[ref] = shard
            if model.idle() and model.actors:
                self._retire(model)
        self.progress.running = len(self.ref_shard)

    def run(self) -> Progress:
        """Run until every shard is finished or failed, or a stop is requested.

        Returns:
            The counts; `stopped` says why the loop ended early, if it did.

        Raises:
            ClusterLost: the cluster's GCS stopped answering.
            SinkError: a result could not be written (e.g. a full disk).
        """
        lost = False
        try:
            if self.stop_reason is None:  # a signal may have come before the loop
                self._start_models()
                self._submit()
                self._report()
            while (self.ref_shard or self.pending) and self.stop_reason is None:
                if not self.ref_shard:
                    self._start_models()
                    self._submit()
                    if not self.ref_shard:
                        break
                ready, rest = ray.wait(list(self.ref_shard), num_returns=1, timeout=WAIT_S)
                if ready and rest:  # take everything else that is already done, without waiting
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                for ref in ready:
                    if ref in self.ref_shard:  # not already requeued with its dead actor's others
                        self._finish(ref)
                self._check_cluster()
                if self.stop_reason is None:
                    self._start_models()
                    self._submit()
                self._report()
        except ClusterLost:
            lost = True
            raise
        finally:
            self.progress.stopped = self.stop_reason
            self.progress.running = 0
            if not lost:  # a lost cluster has no actors to kill, and would not answer
                for model in self.models.values():
                    self._retire(model)
        return self.progress

    def _check_cluster(self, now: bool = False) -> None:
        """Probe the GCS every few seconds (or `now`); raise once it is gone for good.

        Raises:
            ClusterLost: unreachable for LOST_AFTER_S, or at once when `now` (an actor died).
        """
        t = time.monotonic()
        if not now and t < self._next_probe:
            return
        self._next_probe = t + HEALTH_EVERY_S
        if self.cluster.reachable():
            self._unreachable_since = None
            return
        since = self._unreachable_since = self._unreachable_since or t
        if now or t - since >= LOST_AFTER_S:
            raise ClusterLost(
                f"the Ray cluster at {self.cluster.address} stopped answering "
                f"({self.cluster.mode}); its actors are gone"
            )

    def _report(self) -> None:
        """Tell the caller about progress, only when a count changed."""
        state = dataclasses.astuple(self.progress)
        if state != self._last_report:
            self._last_report = state
            self.on_progress(self.progress)

    def _finish(self, ref: Any) -> None:
        actor = self.ref_actor.pop(ref)
        shard = self.ref_shard.pop(ref)
        actor.inflight.discard(ref)
        model = self.models[shard.model]
        try:
            out: ShardResult = ray.get(ref, timeout=60)
        except RayActorError as err:
            # A dead GCS takes every actor with it: that is the cluster's loss, not the shard's.
            self._check_cluster(now=True)
            self._actor_lost(actor, model, shard, err)
            return
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, ShardOutOfMemory):
                self._split(model, shard, str(cause))
            else:
                # The error itself first (what `status` shows), then Ray's traceback.
                what = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
                self._retry(model, shard, f"{what}\n{err}")
            return
        except GetTimeoutError as err:  # pragma: no cover - ray.wait said it was ready
            self._retry(model, shard, f"result not retrievable: {err}")
            return
        # Writing is the driver's job: a SinkError (disk full) stops the sweep, with the fix.
        self.results.write_shard(shard, out)
        self.progress.finished += 1
        self.progress.rows += out.table.num_rows
        self.nodes[out.node_id or "local"] += 1
        del out

    def _refresh_capacity(self) -> None:
        """Recount slots from the live cluster (a node may have gone with its GPUs)."""
        if self.gpus_per_actor > 0:
            gpus = ray.cluster_resources().get("GPU", 0)
            self.slots = int(gpus // self.gpus_per_actor)
        live = sum(len(m.actors) for m in self.models.values())
        self.free = max(0, self.slots - live)

    def _actor_lost(self, actor: _Actor, model: _Model, shard: Shard, err: Exception) -> None:
        logger.warning("actor for %s died (%s); requeueing its shards", model.spec.id, err)
        if actor in model.actors:
            model.actors.remove(actor)
            self._refresh_capacity()
            model.lost_actors += 1
            # Every shard it held goes back to the queue; the one that was running counts an
            # attempt (it may be what killed the actor).
            self._retry(model, shard, f"actor died: {type(err).__name__}")
            for other in list(actor.inflight):
                actor.inflight.discard(other)
                self.ref_actor.pop(other, None)
                model.retry.append(self.ref_shard.pop(other))
        else:
            self._retry(model, shard, f"actor died: {type(err).__name__}")
        if model.lost_actors > MAX_ACTOR_LOSSES:
            while (s := model.next_shard()) is not None:
                self._fail(s, f"gave up on {model.spec.id}: {model.lost_actors} actors died")
            return
        if not model.actors and self.free > 0 and not model.idle():
            self._new_actor(model)

    def _split(self, model: _Model, shard: Shard, reason: str) -> None:
        try:
            parts = split(shard)
        except ValueError as err:
            self._fail(shard, f"{reason}; {err}")
            return
        logger.warning("shard %s out of memory; split into %d parts", shard.file_stem, len(parts))
        model.retry.extend(parts)
        self.progress.total += len(parts) - 1

    def _retry(self, model: _Model, shard: Shard, error: str) -> None:
        self.attempts[shard.file_stem] += 1
        if self.attempts[shard.file_stem] >= self.spec.resources.max_attempts:
            self._fail(shard, error)
        else:
            model.retry.append(shard)

    def _fail(self, shard: Shard, error: str) -> None:
        self.results.record_failure(shard, error, self.attempts[shard.file_stem])
        self.progress.failed += 1
        logger.error("shard %s failed: %s", shard.file_stem, error)
