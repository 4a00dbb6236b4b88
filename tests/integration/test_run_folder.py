"""A run folder belongs to one spec and one driver; the driver stops cleanly and never joins a
cluster it was not given. One `ray start` cluster per module (2 CPUs), a tiny model, and one
undisturbed reference run that the disturbed runs are compared with, row by row."""

import json
import os
import signal
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import (
    all_rows,
    assert_same_rows,
    run_cli,
    run_json,
    run_status,
    shard_files,
    snapshot,
    start_cli,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.slow
SHARDS = 25  # of write_spec's default spec: 5 behaviour + 20 patching
SLOW = {"sleep_s": 0.3}  # faults: a sweep slow enough to interrupt part-way


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_address, tiny_model) -> Path:
    """The default spec, run once, undisturbed."""
    folder = tmp_path_factory.mktemp("reference")
    out = run_cli(write_spec(folder, tiny_model), "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    return folder / "results" / "it"


def programs(results: Path) -> list[dict]:
    rows = pq.read_table(results / "programs.parquet").to_pylist()
    return sorted(rows, key=lambda r: (r["task"], r["seq_len"], r["program"]))


def lock_pid(results: Path) -> int | None:
    try:
        return json.loads((results / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_embedded_driver_ignores_a_ray_start_cluster(tmp_path, ray_cluster, tiny_model) -> None:
    # The module's `ray start` cluster is "the latest cluster on the machine": a plain
    # ray.init() in this environment would join it.
    latest = Path(os.environ["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    port = str(ray_cluster.port)
    assert latest.read_text().strip().rpartition(":")[2] == port
    spec = write_spec(
        tmp_path, tiny_model, experiments={"behavior": {"backend": "hf", "programs_per_shard": 4}}
    )
    out = run_cli(spec, "--num-cpus", "2")  # no --address, no RAY_ADDRESS
    assert out.returncode == 0, out.stdout + out.stderr
    info = run_json(tmp_path / "results" / "it")
    assert info["cluster"]["mode"] == "embedded"
    assert info["cluster"]["address"].rpartition(":")[2] != port
    assert f"ray: started an embedded local Ray at {info['cluster']['address']}" in out.stdout
    assert ray_cluster.alive(), "the other cluster is still up"
    assert latest.read_text().strip().rpartition(":")[2] == port, "and still the latest"


def test_sigint_stops_cleanly_and_a_rerun_finishes(tmp_path, ray_address, tiny_model, reference):
    spec = write_spec(tmp_path, tiny_model)
    results = tmp_path / "results" / "it"
    # Embedded, in its own session: the signal goes to the whole group, as Ctrl-C in a
    # terminal does (the embedded Ray's processes get it too).
    proc = start_cli(spec, "--num-cpus", "2", faults=SLOW, log=tmp_path / "driver.log")
    assert wait_for(lambda: len(shard_files(results)) >= 3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "driver.log").read_text()
    assert "Traceback" not in log, log
    info = run_json(results)
    done = info["shards"]["done"]
    assert 3 <= done < SHARDS, "stopped part-way"
    assert done == len(shard_files(results)), "every finished shard was kept"
    assert f"interrupted (SIGINT): {done} of {SHARDS} shards done" in log
    assert f"none failed; rerun the same command to finish the other {SHARDS - done}" in log
    assert info["status"] == "interrupted" and info["shards"]["failed"] == 0
    assert not (results / "failures.jsonl").exists(), "no shard recorded as failed"

    status = run_status(results)
    assert status.returncode == 3, status.stdout + status.stderr
    assert "recorded status: interrupted" in status.stdout
    assert f"incomplete: {done} of {SHARDS} shards done, 0 failed, {SHARDS - done} missing" in (
        status.stdout
    )

    out = run_cli(spec, "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{SHARDS - done} shards run, {done} already done" in out.stdout
    assert_same_rows(results, reference)


def test_sigkilled_driver_resumes_to_the_same_rows(tmp_path, ray_address, tiny_model, reference):
    spec = write_spec(tmp_path, tiny_model)
    results = tmp_path / "results" / "it"
    proc = start_cli(spec, "--address", ray_address, faults=SLOW)
    assert wait_for(lambda: len(shard_files(results)) >= 6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(shard_files(results))
    assert 6 <= done < SHARDS, "killed mid-run"
    assert lock_pid(results) == proc.pid, "the dead driver's lock record is still there"
    out = run_cli(spec, "--address", ray_address)
    assert out.returncode == 0, out.stderr
    assert f"lock: took over from a driver that is gone (pid {proc.pid} on" in out.stdout
    assert f"{SHARDS - done} shards run, {done} already done" in out.stdout
    assert_same_rows(results, reference)
    assert not list((results / ".tmp").glob("*")), "no temporary file left"


def test_second_driver_is_refused_while_the_first_finishes(
    tmp_path, ray_address, tiny_model, reference
) -> None:
    spec = write_spec(tmp_path, tiny_model)
    results = tmp_path / "results" / "it"
    go = tmp_path / "go"
    # The first driver's shards wait for `go`, which appears once the second was refused.
    first = start_cli(spec, "--address", ray_address, faults={"hold_until": str(go)})
    assert wait_for(lambda: lock_pid(results) == first.pid and (results / "spec.yaml").exists())
    spec_before = (results / "spec.yaml").read_text()
    second = run_cli(spec, "--address", ray_address)
    status = run_status(results)
    assert first.poll() is None, "the first driver was still running"
    go.touch()
    assert status.returncode == 3, status.stdout + status.stderr
    assert f"driver: pid {first.pid} on {socket.gethostname()} since" in status.stdout
    assert second.returncode == 2, second.stdout + second.stderr
    holder = f"pid {first.pid} on host {socket.gethostname()}"
    assert holder in second.stderr and f"kill -INT {first.pid}" in second.stderr
    assert "ray:" not in second.stdout, "refused before joining Ray"
    assert first.wait(timeout=600) == 0
    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == SHARDS
    assert (results / "spec.yaml").read_text() == spec_before
    assert_same_rows(results, reference)


def test_changed_seed_is_refused_with_the_diff(tmp_path, tiny_model, reference) -> None:
    before = snapshot(reference)
    spec = write_spec(tmp_path, tiny_model, seed=1, output=str(reference.parent))
    out = run_cli(spec)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{reference}: this run folder holds results of another spec" in out.stderr
    assert "  seed: 0 -> 1" in out.stderr
    for way in ("--fresh", "run: NAME", "--extend         not possible here"):
        assert way in out.stderr
    assert "ray:" not in out.stdout
    assert snapshot(reference) == before, "nothing was touched"


def test_extend_adds_lengths_and_keeps_every_finished_shard(
    tmp_path, ray_address, tiny_model, reference
) -> None:
    tasks = [
        {"family": "binding", "seq_lens": [4], "n": 4, "options": {"style": "paper"}},
        {"family": "boolean", "seq_lens": [4], "n": 2},
    ]
    spec_a = write_spec(tmp_path / "a", tiny_model, tasks=tasks, output=str(tmp_path))
    first = run_cli(spec_a, "--address", ray_address)
    assert first.returncode == 0, first.stdout + first.stderr
    results = tmp_path / "it"
    first_files = {f: f.stat().st_mtime_ns for f in shard_files(results)}
    first_rows = all_rows(results)

    # The reference's spec: binding at lengths 4 and 6.
    spec = write_spec(tmp_path / "b", tiny_model, output=str(tmp_path))
    refused = run_cli(spec, "--address", ray_address)
    assert refused.returncode == 2
    assert "tasks.binding.seq_lens: [4] -> [4, 6]" in refused.stderr
    assert "--extend         adds the new shards" in refused.stderr
    out = run_cli(spec, "--address", ray_address, "--extend")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{SHARDS - len(first_files)} shards run, {len(first_files)} already done" in out.stdout
    assert {f: f.stat().st_mtime_ns for f in first_files} == first_files, "old files untouched"
    # Exactly the union: the first run's rows, plus new rows for new keys only, equal to an
    # undisturbed run of the extended spec.
    rows = all_rows(results)
    for kind in ("behavior", "patching"):
        assert set(first_rows[kind]) < set(rows[kind])
        assert all(rows[kind][k] == v for k, v in first_rows[kind].items())
    assert_same_rows(results, reference)
    assert programs(results) == programs(reference)
    assert len(programs(results)) == 4 * 2 + 2
    assert run_json(results)["spec_hash"] == run_json(reference)["spec_hash"]
