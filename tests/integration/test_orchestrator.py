"""The orchestrator end to end on a local Ray cluster (2 CPUs) with a tiny model: shards and rows,
resume, `status`, an actor that dies mid-shard, out-of-memory splits, failing shards, a spec
that asks for more GPUs than the cluster has. (Interrupts, locks, changed specs and the embedded
Ray are in test_run_folder.py; faults are injected by the test-only actor of faults.py.)"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from actors.targets import encode_program
from orchestrator.checks import check_models
from orchestrator.shards import count_shards, iter_shards
from orchestrator.spec import load_spec
from orchestrator.sweep import python_launcher
from orchestrator.tasks import iter_programs
from tests.integration.conftest import (
    patch_keys,
    read_rows,
    report_rows,
    run_cli,
    run_json,
    run_status,
    write_spec,
)

pytestmark = pytest.mark.slow


def expected_patch_rows(spec_path: Path, model: str) -> int:
    """Patch rows the spec asks for, counted from the programs and the tokenizer alone."""
    spec = load_spec(spec_path)
    tok = AutoTokenizer.from_pretrained(model)
    n_layers, n_heads = 2, 4
    per_position = n_layers * (1 + n_heads)  # resid_pre + attn_head
    total = 0
    for task in spec.tasks:
        for seq_len in task.seq_lens:
            for p in iter_programs(task.family, spec.seed, seq_len, task.n, **task.options):
                pair = encode_program(tok, p)
                total += len(pair.positions("targets")) * per_position
    return total


def test_full_run_then_resume_recomputes_nothing(tmp_path, ray_address, tiny_model) -> None:
    spec_path = write_spec(tmp_path, tiny_model)
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "behavior shards: 5" in out.stdout and "patching shards: 20" in out.stdout
    # The launcher the test runs under (`uv run python` under uv), as the user would type it.
    assert f"next: {python_launcher()} -m analysis" in out.stdout
    results = tmp_path / "results" / "it"
    spec = load_spec(spec_path)
    counts = count_shards(spec, check_models(spec))
    assert counts == {"behavior": 5, "patching": 20}
    files = sorted(results.rglob("*.parquet"))
    shard_files = [f for f in files if f.parts[-4] in ("behavior", "patching")]
    assert len(shard_files) == sum(counts.values())
    assert {f.stem for f in shard_files} == {s.id for s in iter_shards(spec, {tiny_model: 2})}
    behavior = read_rows(results, "behavior")
    assert len(behavior) == 4 * 2 + 2
    assert all(r["expected"] is not None and r["backend"] == "hf" for r in behavior)
    patching = read_rows(results, "patching")
    keys = patch_keys(patching)
    assert max(keys.values()) == 1, "no duplicated patch"
    assert len(patching) == expected_patch_rows(spec_path, tiny_model)
    assert pq.read_table(results / "programs.parquet").num_rows == 10
    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == 25
    assert info["versions"]["ray"] and info["plan"]["shards"] == counts
    assert len(info["spec_hash"]) == 16 and info["n_layers"] == {tiny_model: 2}
    status = run_status(results)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"spec hash: {info['spec_hash']}" in status.stdout
    assert "driver: none holds the folder" in status.stdout
    assert "behavior       5       0        0" in status.stdout
    assert "patching      20       0        0" in status.stdout
    assert "complete: 25 of 25 shards done" in status.stdout

    mtimes = {f: f.stat().st_mtime_ns for f in shard_files}
    again = run_cli(spec_path, "--address", ray_address)
    assert again.returncode == 0, again.stderr
    assert "0 shards run, 25 already done" in again.stdout
    assert {f: f.stat().st_mtime_ns for f in shard_files} == mtimes
    assert run_json(results)["shards"]["done_before"] == 25


def test_actor_that_dies_mid_shard_is_replaced(tmp_path, ray_address, tiny_model) -> None:
    spec_path = write_spec(tmp_path, tiny_model)
    results = tmp_path / "results" / "it"
    marker = tmp_path / "died"
    # The first actor dies (os._exit, as a killed process does) in its first shard.
    out = run_cli(spec_path, "--address", ray_address, faults={"exit_once": str(marker)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert marker.exists(), "an actor did die"
    rows = read_rows(results, "patching")
    report_rows(
        "actor died mid-shard", patch_keys(rows), expected_patch_rows(spec_path, tiny_model)
    )
    assert max(patch_keys(rows).values()) == 1
    assert len(rows) == expected_patch_rows(spec_path, tiny_model)
    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == 25
    assert not (results / "failures.jsonl").exists()


def test_out_of_memory_splits_the_shard(tmp_path, ray_address, tiny_model) -> None:
    spec_path = write_spec(
        tmp_path,
        tiny_model,
        experiments={
            "patching": {
                "sites": ["resid_pre", "attn_head"],
                "layers_per_shard": 2,
                "positions": "targets",
                "programs_per_shard": 2,
                "batch_size": 64,
            }
        },
    )
    faults = {"oom_layers_above": 1, "oom_batch_above": 16}
    out = run_cli(spec_path, "--address", ray_address, faults=faults)
    assert out.returncode == 0, out.stdout + out.stderr
    results = tmp_path / "results" / "it"
    parts = sorted(p.name for p in (results / "patching").rglob("*.parquet"))
    assert parts and all(".part0of2." in p or ".part1of2." in p for p in parts)
    assert len(parts) == 2 * 10, "every 2-layer shard became two 1-layer parts"
    rows = read_rows(results, "patching")
    report_rows(
        "out of memory, shard split", patch_keys(rows), expected_patch_rows(spec_path, tiny_model)
    )
    assert max(patch_keys(rows).values()) == 1
    assert len(rows) == expected_patch_rows(spec_path, tiny_model)
    rerun = run_cli(spec_path, "--address", ray_address)
    assert "0 shards run, 10 already done" in rerun.stdout, "split parts count as done"


def test_a_shard_that_always_fails_is_recorded_and_the_rest_finish(
    tmp_path, ray_address, tiny_model
) -> None:
    spec_path = write_spec(tmp_path, tiny_model)
    out = run_cli(spec_path, "--address", ray_address, faults={"fail_task": "boolean"})
    assert out.returncode == 1
    results = tmp_path / "results" / "it"
    failures = [json.loads(x) for x in (results / "failures.jsonl").read_text().splitlines()]
    # boolean: 1 behaviour shard + 2 sites x 2 layer blocks x 1 program block
    assert len(failures) == 5 and {f["task"] for f in failures} == {"boolean"}
    assert all("injected failure" in f["error"] and f["attempts"] == 3 for f in failures)
    assert {r["task"] for r in read_rows(results, "patching")} == {"binding"}
    info = run_json(results)
    assert info["status"] == "incomplete" and info["shards"]["failed"] == 5
    assert "failures:" in out.stdout
    status = run_status(results)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "behavior       4       1        0" in status.stdout
    assert "patching      16       4        0" in status.stdout
    assert "failures (5, from failures.jsonl):" in status.stdout
    assert status.stdout.count("3 attempts, last error: RuntimeError: injected failure") == 5
    assert "incomplete: 20 of 25 shards done, 5 failed, 0 missing" in status.stdout


def test_more_gpus_per_actor_than_the_cluster_has_writes_nothing(
    tmp_path, ray_address, tiny_model
) -> None:
    spec_path = write_spec(tmp_path, tiny_model, resources={"gpus_per_actor": 2})
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{spec_path}: the spec is not valid" in out.stderr
    assert "resources.gpus_per_actor = 2: the cluster at" in out.stderr
    assert "has 0 GPUs, at most 0 on one node, so no actor could start; fix: lower" in out.stderr
    assert not (tmp_path / "results").exists(), "nothing written"
