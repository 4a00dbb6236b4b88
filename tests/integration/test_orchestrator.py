"""The orchestrator end to end on a local Ray cluster (2 CPUs) with a tiny model: shards and rows,
resume, a SIGKILLed driver, a killed actor, out-of-memory splits, failing shards, bad specs."""

import collections
import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from actors.targets import encode_program
from orchestrator.shards import count_shards, iter_shards
from orchestrator.spec import check_models, load_spec
from orchestrator.tasks import iter_programs
from tests.integration.conftest import (
    report_rows,
    run_cli,
    run_json,
    start_cli,
    wait_for,
    write_spec,
)

pytestmark = pytest.mark.slow


def actor_pids() -> list[int]:
    """Processes whose title Ray set to `ray::ModelWorker...` (the actors)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::ModelWorker"):
                pids.append(int(entry.name))
    return pids


def read_rows(results: Path, kind: str) -> list[dict]:
    files = sorted((results / kind).rglob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def patch_keys(rows: list[dict]) -> collections.Counter:
    return collections.Counter(
        (r["task"], r["seq_len"], r["program"], r["site"], r["layer"], r["head"], r["pos"])
        for r in rows
    )


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
    assert "next: python -m analysis" in out.stdout
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

    mtimes = {f: f.stat().st_mtime_ns for f in shard_files}
    again = run_cli(spec_path, "--address", ray_address)
    assert again.returncode == 0, again.stderr
    assert "0 shards run, 25 already done" in again.stdout
    assert {f: f.stat().st_mtime_ns for f in shard_files} == mtimes
    assert run_json(results)["shards"]["done_before"] == 25


def test_sigkilled_driver_resumes_to_the_same_rows(tmp_path, ray_address, tiny_model) -> None:
    reference = write_spec(tmp_path / "ref", tiny_model)
    assert run_cli(reference, "--address", ray_address).returncode == 0
    want = patch_keys(read_rows(tmp_path / "ref" / "results" / "it", "patching"))

    spec_path = write_spec(tmp_path / "killed", tiny_model)
    results = tmp_path / "killed" / "results" / "it"
    slow = {"VARBIND_FAULTS": json.dumps({"sleep_s": 0.3})}
    for kill_after in (3, 12):  # twice, at different points
        proc = start_cli(spec_path, "--address", ray_address, env=slow)
        assert wait_for(lambda n=kill_after: len(list(results.rglob("*/*/*.parquet"))) >= n)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(results.rglob("*/*/*.parquet")))
    assert 12 <= done < 25, "killed mid-run"
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 0, out.stderr
    assert f"{25 - done} shards run, {done} already done" in out.stdout
    got = patch_keys(read_rows(results, "patching"))
    report_rows("driver SIGKILLed twice, rerun", got, want)
    assert got == want, "exactly the rows of an uninterrupted run, none twice"
    assert not list((results / ".tmp").glob("*")), "no temporary file left"


def test_killed_actor_requeues_its_shard(tmp_path, ray_address, tiny_model) -> None:
    spec_path = write_spec(tmp_path, tiny_model)
    results = tmp_path / "results" / "it"
    proc = start_cli(
        spec_path, "--address", ray_address, env={"VARBIND_FAULTS": json.dumps({"sleep_s": 0.5})}
    )
    # Once two shards are written, the actor is busy with the next ones: kill it mid-shard.
    assert wait_for(lambda: len(list(results.rglob("*/*/*.parquet"))) >= 2 and actor_pids())
    victim = actor_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=900) == 0
    assert victim not in actor_pids()
    rows = read_rows(results, "patching")
    report_rows(
        "actor SIGKILLed mid-shard", patch_keys(rows), expected_patch_rows(spec_path, tiny_model)
    )
    assert max(patch_keys(rows).values()) == 1
    assert len(rows) == expected_patch_rows(spec_path, tiny_model)
    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == 25


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
    faults = {"VARBIND_FAULTS": json.dumps({"oom_layers_above": 1, "oom_batch_above": 16})}
    out = run_cli(spec_path, "--address", ray_address, env=faults)
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
    out = run_cli(
        spec_path,
        "--address",
        ray_address,
        env={"VARBIND_FAULTS": json.dumps({"fail_task": "boolean"})},
    )
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


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["tasks"][0].update(seq_lenz=[4]),
            "tasks.0.seq_lenz = [4]: Extra inputs are not permitted; fix: remove it",
        ),
        (
            lambda s: s["tasks"][0].update(n="many"),
            "tasks.0.n = 'many': Input should be a valid integer",
        ),
        (
            lambda s: s["models"][0].update(id="/nonexistent/model"),
            "models.0.id = '/nonexistent/model': not found",
        ),
        (
            lambda s: s["experiments"]["patching"].update(layers=[0, 7]),
            "experiments.patching.layers = [0, 7]: [7] out of range",
        ),
    ],
)
def test_bad_specs_fail_before_anything_is_written(tmp_path, tiny_model, mutate, message) -> None:
    import yaml

    spec_path = write_spec(tmp_path, tiny_model)
    spec = yaml.safe_load(spec_path.read_text())
    mutate(spec)
    spec_path.write_text(yaml.safe_dump(spec))
    out = run_cli(spec_path)
    assert out.returncode == 2
    assert str(spec_path) in out.stderr and message in out.stderr
    assert not (tmp_path / "results").exists()
