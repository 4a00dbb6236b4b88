"""Integration set-up that touches only what it starts.

- `ray_env` (session, autouse): every Ray the tests start lives in a temp dir of their own
  (`RAY_TMPDIR`) with a token of their own (`RAY_AUTH_TOKEN`), so no test reads or writes
  `/tmp/ray` or `~/.ray` and no test joins another Ray running on the machine.
- `ray_cluster` (module): one `ray start --head --block` cluster (2 CPUs, a port the OS gave),
  shared by a module's tests, stopped through its own process (SIGTERM, then its own process
  group), never by `ray stop`. A failed start shows Ray's output.
- Tiny models saved to folders, and helpers that run the CLI (optionally with the
  fault-injecting actor of `faults.py`) as a subprocess.
"""

import collections
import contextlib
import json
import math
import os
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
import pytest
import yaml

from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="session", autouse=True)
def ray_env():
    """Own Ray temp dir and auth token for every Ray process the tests start."""
    # Short path: Ray puts Unix sockets under it (107-byte limit).
    temp = tempfile.mkdtemp(prefix="vbray-", dir="/tmp")
    env = {
        "RAY_TMPDIR": temp,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    saved = {k: os.environ.get(k) for k in (*env, "RAY_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)  # a stranger's address must not leak into tests
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


class RayCluster:
    """A `ray start --head --block` process this test module owns."""

    def __init__(self, log: Path, num_cpus: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(RAY), "start", "--head", "--block", f"--port={self.port}"]
        cmd += [f"--num-cpus={num_cpus}"]
        cmd += ["--include-dashboard=false", "--disable-usage-stats", *extra]
        with log.open("w") as out:
            # Its own session: its children share its process group, which teardown may kill.
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.time() + 180
        while not (port_open(self.address) and "Ray runtime started" in log.read_text()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"`{' '.join(cmd)}` did not start a cluster:\n{log.read_text()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc.poll() is None and port_open(self.address)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # --block: Ray drains (up to 30 s when it waits for workers), then stops what it
            # started; the tests need no drain, so it gets a few seconds.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Stragglers of this cluster only: its own process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, ray_env):
    cluster = RayCluster(tmp_path_factory.mktemp("ray") / "ray-start.log")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", n_layers=2))


def write_spec(folder: Path, model: str, **overrides) -> Path:
    spec = {
        "run": "it",
        "output": str(folder / "results"),
        "seed": 0,
        "tasks": [
            {"family": "binding", "seq_lens": [4, 6], "n": 4, "options": {"style": "paper"}},
            {"family": "boolean", "seq_lens": [4], "n": 2},
        ],
        "models": [{"id": model}],
        "experiments": {
            "behavior": {"backend": "hf", "programs_per_shard": 2},
            "patching": {
                "sites": ["resid_pre", "attn_head"],
                "layers_per_shard": 1,
                "positions": "targets",
                "programs_per_shard": 2,
            },
        },
    }
    for key, value in overrides.items():
        spec[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cmd(spec: Path, args: tuple[str, ...], faults: dict | None) -> list[str]:
    if faults is None:
        return [sys.executable, "-m", "orchestrator", str(spec), *args]
    module = "tests.integration.faulty_cli"
    return [sys.executable, "-m", module, json.dumps(faults), str(spec), *args]


def run_cli(spec: Path, *args: str, faults: dict | None = None, timeout: float = 600):
    """Run the CLI to the end; `faults` (fields of `faults.Faults`) use the faulty actor."""
    return subprocess.run(
        _cmd(spec, args, faults),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=timeout,
    )


def start_cli(spec: Path, *args: str, faults: dict | None = None, log: Path | None = None):
    """Start the CLI in its own session (so a signal to its group reaches what it started, as
    Ctrl-C in a terminal does); its output goes to `log`."""
    out = log.open("w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        _cmd(spec, args, faults),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ),
        start_new_session=True,
    )


def run_status(results: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", str(results)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def wait_for(predicate, timeout: float = 300, every: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def run_json(results: Path) -> dict:
    return json.loads((results / "run.json").read_text())


def shard_files(results: Path) -> list[Path]:
    return [f for f in results.rglob("*.parquet") if f.parts[-4] in ("behavior", "patching")]


def read_rows(results: Path, kind: str) -> list[dict]:
    files = sorted((results / kind).rglob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def patch_keys(rows: list[dict]) -> collections.Counter:
    return collections.Counter(
        (r["task"], r["seq_len"], r["program"], r["site"], r["layer"], r["head"], r["pos"])
        for r in rows
    )


def all_rows(results: Path) -> dict[str, dict[tuple, dict]]:
    """Every behaviour and patching row by its key (a duplicated key fails the test)."""
    keyed: dict[str, dict[tuple, dict]] = {}
    for kind, key_cols in (
        ("behavior", ("model", "task", "seq_len", "program")),
        ("patching", ("model", "task", "seq_len", "program", "site", "layer", "head", "pos")),
    ):
        keyed[kind] = {}
        for row in read_rows(results, kind):
            key = tuple(row[c] for c in key_cols)
            assert key not in keyed[kind], f"{kind} row {key} written twice"
            keyed[kind][key] = row
    return keyed


def report_rows(fault: str, got, want) -> None:
    """Print one line on the final patch rows of a faulted run against an unfaulted one
    (`pytest tests/integration -s | grep 'fault report'` gives the table)."""
    missing = sum((want - got).values()) if hasattr(want, "keys") else want - len(got)
    extra = sum(c - 1 for c in got.values() if c > 1)
    total = sum(want.values()) if hasattr(want, "keys") else want
    print(
        f"\nfault report | {fault} | {sum(got.values())} rows | unfaulted {total} "
        f"| {missing} missing | {extra} duplicated"
    )


def assert_same_rows(results: Path, reference: Path, abs_tol: float = 1e-5) -> None:
    """Every behaviour and patching row of `results` equals the reference's, key by key: none
    missing, none extra, none twice; floats within `abs_tol` (CPU reruns may differ in the
    last bits), everything else exactly."""
    got, want = all_rows(results), all_rows(reference)
    for kind in ("behavior", "patching"):
        missing = set(want[kind]) - set(got[kind])
        extra = set(got[kind]) - set(want[kind])
        assert not missing and not extra, f"{kind}: {len(missing)} missing, {len(extra)} extra"
        for key, row in want[kind].items():
            for col, value in row.items():
                other = got[kind][key][col]
                if isinstance(value, float) and isinstance(other, float):
                    assert math.isclose(other, value, abs_tol=abs_tol), (kind, key, col)
                else:
                    assert other == value, (kind, key, col, other, value)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (to show nothing was
    touched)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
