"""A local Ray cluster (`ray start --head`, 2 CPUs) shared by the integration tests of a module,
tiny models saved to folders, and a helper that runs the orchestrator's CLI as a subprocess."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    port = 20000 + os.getpid() % 20000
    # Ray >= 2.59 turns token authentication on for clusters started by `ray start`; a client
    # joining by explicit address sends the token only when told the mode.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        "ray",
        "start",
        "--head",
        "--num-cpus",
        "2",
        f"--port={port}",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(
        [Path(sys.executable).parent / cmd[0], *cmd[1:]], check=True, env=env, capture_output=True
    )
    yield f"127.0.0.1:{port}"
    subprocess.run([Path(sys.executable).parent / "ray", "stop", "--force"], capture_output=True)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


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


def run_cli(spec: Path, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", str(spec), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def start_cli(spec: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", str(spec), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
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
