"""Chaos, measured: one sweep run while its driver and its actors are killed at random times,
then every row compared with an undisturbed run of the same spec.

    python bench/chaos.py [--spec specs/quickstart.yaml] [--kills 20] [--seed 0] [--keep DIR]

On a Ray cluster of its own (`ray start --head --block` on a free port, its own temp dir and
token, stopped through its own process): first the undisturbed run, then the disturbed one. A
kill is either the driver (SIGKILL; a new driver is started at once, with the same command) or
one of the driver's actors (`ray.kill`, found by name through `ray.util.list_named_actors`:
the driver names them `<run>/<model>/<pid>/<k>`). After the last kill the sweep is run to the
end (rerunning while some shards are recorded as failed). Rows are compared on their key
columns (behaviour, patching, skipped programs, programs.parquet): `missing` keys of the
undisturbed run absent from the disturbed one (or extra ones), `duplicated` keys found twice,
`differing` rows whose values differ (floats by more than 1e-5: CPU reruns may differ in the
last bits). The last line is `kills=N missing=M duplicated=D differing=X`.
"""

import argparse
import collections
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "behavior": ("model", "task", "seq_len", "program"),
    "patching": ("model", "task", "seq_len", "program", "site", "layer", "head", "pos"),
    "skipped": ("model", "task", "seq_len", "program"),
}
ABS_TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block"]
    cmd += [f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    cmd += ["--disable-usage-stats"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            stop_cluster(proc)
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{log.read_text()}")
        time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def stop_cluster(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # this cluster's own process group only


def driver(spec: Path, output: Path, address: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator", str(spec), "--output", str(output)]
    cmd += ["--address", address]
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )


def our_actors(ray, run: str, pid: int) -> list[str]:
    """Names of the live actors of the driver `pid` (named `<run>/<model>/<pid>/<k>`)."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "varbind"
        and a["name"].startswith(f"{run}/")
        and a["name"].split("/")[-2] == str(pid)
    ]


def wait_for_actors(ray, run: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until the driver has an actor; False if the driver ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if our_actors(ray, run, proc.pid):
            return True
        time.sleep(0.5)
    return False


def rows(results: Path) -> tuple[dict, collections.Counter]:
    """Rows by (kind, key), and how often each key was found."""
    keyed: dict = {}
    seen: collections.Counter = collections.Counter()
    for kind, cols in KEYS.items():
        for f in sorted((results / kind).rglob("*.parquet")):
            for row in pq.read_table(f).to_pylist():
                key = (kind, *(row[c] for c in cols))
                seen[key] += 1
                keyed[key] = row
    for row in pq.read_table(results / "programs.parquet").to_pylist():
        key = ("programs", row["task"], row["seq_len"], row["program"])
        seen[key] += 1
        keyed[key] = row
    return keyed, seen


def float_gap(a: dict, b: dict) -> float:
    """The largest difference of a float column between two rows (0.0 when none differ)."""
    gaps = [
        abs(v - b[c])
        for c, v in a.items()
        if isinstance(v, float)
        and isinstance(b.get(c), float)
        and not (math.isnan(v) or math.isnan(b[c]))
    ]
    return max(gaps, default=0.0)


def same(a: dict, b: dict) -> bool:
    for col, value in a.items():
        other = b.get(col)
        if isinstance(value, float) and isinstance(other, float):
            both_nan = math.isnan(value) and math.isnan(other)
            if not (both_nan or math.isclose(value, other, abs_tol=ABS_TOL)):
                return False
        elif value != other:
            return False
    return set(a) == set(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "quickstart.yaml")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gap", type=float, default=2.0, help="seconds between kills, min")
    parser.add_argument("--max-gap", type=float, default=10.0, help="seconds between kills, max")
    parser.add_argument("--keep", type=Path, help="keep the two results folders here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    run = yaml.safe_load(args.spec.read_text())["run"]
    work = Path(args.keep or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="chaosray-", dir="/tmp")
    os.environ.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
    )
    os.environ.pop("RAY_ADDRESS", None)
    print(f"spec: {args.spec} (unchanged); work: {work}", flush=True)
    t_start = time.time()
    cluster, address = start_cluster(work / "ray-start.log")
    import ray

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        t0 = time.time()
        ref = driver(args.spec, work / "reference", address, work / "reference.log")
        assert ref.wait() == 0, (work / "reference.log").read_text()[-3000:]
        print(f"undisturbed run: {time.time() - t0:.0f} s", flush=True)

        t0 = time.time()
        kills = collections.Counter()
        attempts = 0
        proc = driver(args.spec, work / "chaos", address, work / f"chaos-{attempts}.log")
        while sum(kills.values()) < args.kills:
            # A kill lands at a random time while the sweep is at work: once the driver has an
            # actor (model loaded or loading), after a random gap.
            if proc.poll() is not None or not wait_for_actors(ray, run, proc):
                if proc.poll() is not None:  # finished (or gave up) before the next kill
                    attempts += 1
                    log = work / f"chaos-{attempts}.log"
                    proc = driver(args.spec, work / "chaos", address, log)
                continue
            time.sleep(rng.uniform(args.min_gap, args.max_gap))
            actors = our_actors(ray, run, proc.pid)
            if proc.poll() is not None:
                continue
            if actors and rng.random() < 0.5:
                victim = rng.choice(actors)
                with contextlib.suppress(ValueError):  # it ended in the meantime
                    ray.kill(ray.get_actor(victim, namespace="varbind"))
                    kills["actor"] += 1
                    print(f"  kill {sum(kills.values())}: actor {victim}", flush=True)
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills["driver"] += 1
            print(f"  kill {sum(kills.values())}: driver pid {proc.pid}", flush=True)
            attempts += 1
            proc = driver(args.spec, work / "chaos", address, work / f"chaos-{attempts}.log")
        # Run to the end; shards that failed (an actor killed under them too often) are retried.
        for _ in range(5):
            if proc.wait() == 0:
                break
            attempts += 1
            proc = driver(args.spec, work / "chaos", address, work / f"chaos-{attempts}.log")
        else:
            print("the disturbed sweep did not complete in 5 reruns", flush=True)
        print(
            f"disturbed run: {time.time() - t0:.0f} s, {attempts + 1} drivers, "
            f"{kills['driver']} driver kills (SIGKILL), {kills['actor']} actor kills (ray.kill)",
            flush=True,
        )
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        stop_cluster(cluster)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    want, _ = rows(work / "reference" / run)
    got, seen = rows(work / "chaos" / run)
    missing = len(set(want) ^ set(got))
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    both = set(want) & set(got)
    differing = sum(1 for k in both if not same(want[k], got[k]))
    gap = max((float_gap(want[k], got[k]) for k in both), default=0.0)
    counts = collections.Counter(k[0] for k in want)
    by_kind = ", ".join(f"{k} {n:,}" for k, n in counts.items())
    print(
        f"compared {len(want):,} rows by key ({by_kind}); floats within {ABS_TOL:g} "
        f"(largest difference seen: {gap:.3g}); total {time.time() - t_start:.0f} s"
    )
    n = sum(kills.values())
    print(f"kills={n} missing={missing} duplicated={duplicated} differing={differing}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if missing == duplicated == differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
