"""Faults of the world: a second node that leaves mid-sweep, a lost cluster, a full disk, a
damaged shard file. (A SIGKILLed driver and Ctrl-C are in test_run_folder.py; an actor that
dies, out-of-memory and always-failing shards in test_orchestrator.py.) Each checks the final
rows: none lost, none duplicated."""

import os
import signal
import subprocess

import pyarrow.parquet as pq
import pytest

from analysis import connect
from tests.integration.conftest import (
    RayCluster,
    patch_keys,
    read_rows,
    report_rows,
    run_cli,
    run_json,
    shard_files,
    start_cli,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.slow


def test_two_nodes_then_one_leaves_mid_sweep(tmp_path, tiny_model) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    second = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        # GPUs declared by the nodes place one actor on each; with no CUDA behind them the
        # actors load their model on the CPU.
        ref = write_spec(tmp_path / "ref", tiny_model)
        out = run_cli(ref, "--address", cluster.address)
        assert out.returncode == 0, out.stdout + out.stderr
        info = run_json(tmp_path / "ref" / "results" / "it")
        assert len(info["nodes"]) == 2, f"actors ran on both nodes: {info['nodes']}"
        want = patch_keys(read_rows(tmp_path / "ref" / "results" / "it", "patching"))

        spec_path = write_spec(tmp_path / "run", tiny_model)
        results = tmp_path / "run" / "results" / "it"
        proc = start_cli(spec_path, "--address", cluster.address, faults={"sleep_s": 0.5})
        assert wait_for(lambda: len(shard_files(results)) >= 4)
        cluster.remove_node(second)
        assert proc.wait(timeout=900) == 0
        info = run_json(results)
        assert info["status"] == "complete" and info["shards"]["failed"] == 0
        got = patch_keys(read_rows(results, "patching"))
        report_rows("second of two nodes removed mid-sweep", got, want)
        assert got == want
    finally:
        cluster.shutdown()


def test_a_failed_ray_start_shows_its_output(tmp_path) -> None:
    with pytest.raises(pytest.fail.Exception) as err:
        RayCluster(tmp_path / "ray-start.log", extra=("--no-such-flag",))
    assert "did not start a cluster" in str(err.value)
    assert "Error: No such option '--no-such-flag'" in str(err.value), "Ray's own words shown"


def test_lost_cluster_ends_with_the_summary_not_a_hang(tmp_path, tiny_model) -> None:
    cluster = RayCluster(tmp_path / "ray-start.log")
    try:
        spec_path = write_spec(tmp_path, tiny_model)
        results = tmp_path / "results" / "it"
        log = tmp_path / "driver.log"
        proc = start_cli(spec_path, "--address", cluster.address, faults={"sleep_s": 0.3}, log=log)
        assert wait_for(lambda: len(shard_files(results)) >= 3)
        os.killpg(cluster.proc.pid, signal.SIGKILL)  # the whole cluster, at once
        assert proc.wait(timeout=120) == 3, log.read_text()
    finally:
        cluster.stop()
    out = log.read_text()
    assert "Traceback" not in out, out
    info = run_json(results)
    done = info["shards"]["done"]
    assert info["status"] == "interrupted" and info["stopped"].startswith("cluster lost")
    assert done == len(shard_files(results)) and info["shards"]["failed"] == 0
    assert f"interrupted (cluster lost: the Ray cluster at {info['cluster']['address']}" in out
    assert f"{done} of 25 shards done" in out and "rerun the same command" in out
    assert not (results / "failures.jsonl").exists(), "no shard charged for the lost cluster"


def test_disk_full_stops_cleanly_and_resumes(tmp_path, ray_address, tiny_model) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        ref = write_spec(tmp_path / "ref", tiny_model)
        assert run_cli(ref, "--address", ray_address).returncode == 0
        want = patch_keys(read_rows(tmp_path / "ref" / "results" / "it", "patching"))

        spec_path = write_spec(tmp_path / "run", tiny_model, output=str(mount))
        out = run_cli(spec_path, "--address", ray_address)
        results = mount / "it"
        assert out.returncode == 1
        assert "No space left on device" in out.stderr
        assert "nothing partial was kept. Fix: free disk space" in out.stderr
        assert "Traceback" not in out.stderr
        written = shard_files(results)
        assert 0 < len(written) < 25, "stopped part-way"
        for f in written:
            pq.read_metadata(f)  # every file in place is whole
        assert not any((results / ".tmp").iterdir())
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        out = run_cli(spec_path, "--address", ray_address)
        assert out.returncode == 0, out.stderr
        assert f"{25 - len(written)} shards run, {len(written)} already done" in out.stdout
        got = patch_keys(read_rows(results, "patching"))
        report_rows(f"disk full after {len(written)} of 25 shards, resumed", got, want)
        assert got == want
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_damaged_or_half_written_files(tmp_path, ray_address, tiny_model) -> None:
    spec_path = write_spec(tmp_path, tiny_model)
    assert run_cli(spec_path, "--address", ray_address).returncode == 0
    results = tmp_path / "results" / "it"
    want = patch_keys(read_rows(results, "patching"))
    # A crash mid-write leaves a temporary: readers never see it.
    (results / ".tmp").mkdir(exist_ok=True)
    (results / ".tmp" / "x.parquet.123").write_bytes(b"PAR1 half")
    con = connect(results)
    assert con.execute("SELECT count(*) FROM patching").fetchone()[0] == sum(want.values())
    # A damaged file in place (not written by the sink) is replaced on resume.
    victim = sorted((results / "patching").rglob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 0, out.stderr
    assert "1 shards run, 24 already done" in out.stdout
    got = patch_keys(read_rows(results, "patching"))
    report_rows("half-written temporary + truncated shard file, resumed", got, want)
    assert got == want
    assert not any((results / ".tmp").iterdir()), "temporaries cleared on resume"
