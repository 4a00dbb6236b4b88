"""Driver overhead: 10,000 trivial shards (no model) through the real driver, actors and sink.

    python bench/orchestrator.py [--shards 10000] [--actors 2]

Each shard's actor returns a one-row table at once, so what is measured is the driver: shard
expansion, the resume check, submission, `ray.wait`, result transfer and the atomic Parquet
write. Prints the overhead per shard and the driver's peak memory (Python heap, by
tracemalloc, and resident-set growth).
"""

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cluster import connect
from orchestrator.driver import Driver
from orchestrator.protocol import Shard, ShardResult, WorkerConfig
from orchestrator.shards import count_shards
from orchestrator.sink import ResultsDir
from orchestrator.spec import parse_spec


class TrivialWorker:
    """Answers every shard with one row, immediately (the real protocol, no model)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config

    def run(self, shard: Shard) -> ShardResult:
        table = pa.table({"program": [shard.start]})
        return ShardResult(table, None, 0.0, os.getpid(), socket.gethostname())


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    spec = parse_spec(
        {
            "run": "bench",
            "tasks": [{"family": "binding", "seq_lens": [4], "n": args.shards}],
            "models": [{"id": "trivial"}],
            "experiments": {"behavior": {"programs_per_shard": 1}},
            "resources": {"actors_per_model": args.actors, "cpus_per_actor": 0.5},
        }
    )
    n_layers = {"trivial": 1}
    total = sum(count_shards(spec, n_layers).values())
    cluster = connect(None, num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        results = ResultsDir(Path(tmp) / "bench")
        results.root.mkdir(parents=True)
        rss_before = rss_mib()
        tracemalloc.start()
        start = time.perf_counter()
        driver = Driver(spec, n_layers, results, total, cluster, worker_cls=TrivialWorker)
        progress = driver.run()
        wall = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        files = len(list(results.root.rglob("*.parquet")))
    ray.shutdown()
    assert progress.finished == total == files, (progress, total, files)
    print(f"shards: {total} through {args.actors} trivial actors, {files} Parquet files written")
    print(f"wall: {wall:.1f} s; driver overhead per shard: {1000 * wall / total:.2f} ms")
    print(
        f"driver peak Python heap: {peak / 2**20:.1f} MiB; "
        f"resident set grew {rss_mib() - rss_before:.1f} MiB (peak {rss_mib():.0f} MiB)"
    )
    print(f"overhead_ms_per_shard={1000 * wall / total:.2f} peak_heap_mib={peak / 2**20:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
