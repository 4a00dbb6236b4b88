"""Probes over checkpoints end to end on a local Ray cluster (2 CPUs): a checkpoints glob over
two tiny snapshots of a training run (steps 10 and 20) is two models; the CLI runs behaviour and
probes on each, the probe files land under probes/model=.../task=binding/, every row carries
its model's step, and a rerun recomputes nothing. A snapshot written later changes the spec:
the folder refuses it until `--extend`, which runs the new snapshot's shards alone."""

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.shards import escape_model, iter_shards
from orchestrator.spec import load_spec
from tests.integration.conftest import read_rows, run_cli, run_json, run_status, write_spec
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.slow

N = 20  # programs: one probes shard per model, the fewest a probe takes


def save_snapshot(folder: Path, step: int, seed: int) -> Path:
    """A tiny 2-layer model (its own random weights) with a training state at `step`."""
    save_tiny_model(folder, "llama", n_layers=2, seed=seed)
    (folder / "training_state.json").write_text(json.dumps({"step": step, "stage": 0}))
    return folder


def test_probes_over_checkpoints_write_stepped_rows_then_resume(tmp_path, ray_address) -> None:
    ckpt = tmp_path / "ckpt"
    models = [
        str(save_snapshot(ckpt / f"snap-step{s}", s, seed)) for seed, s in enumerate((10, 20))
    ]
    spec_path = write_spec(
        tmp_path,
        "(the checkpoints below)",
        tasks=[{"family": "binding", "seq_lens": [4], "n": N, "options": {"style": "paper"}}],
        models=[{"checkpoints": str(ckpt / "snap-step*")}],
        experiments={
            "behavior": {"backend": "hf", "programs_per_shard": N},
            "probes": {"programs_per_shard": N, "batch_size": 8},
        },
    )
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"  model {models[0]}\n  model {models[1]}\n" in out.stdout, "in step order"
    assert "probes shards: 2" in out.stdout and f"probe programs: {2 * N}" in out.stdout

    results = tmp_path / "results" / "it"
    spec = load_spec(spec_path)
    assert [(m.id, m.step) for m in spec.models] == [(models[0], 10), (models[1], 20)]
    shards = list(iter_shards(spec, dict.fromkeys(models, 2)))
    probes = [s for s in shards if s.kind == "probes"]
    assert [(s.model, s.layers, s.n) for s in probes] == [(m, (0, 1, 2), N) for m in models]
    files = sorted((results / "probes").rglob("*.parquet"))
    assert files == sorted(
        results / "probes" / f"model={escape_model(s.model)}" / "task=binding" / f"{s.id}.parquet"
        for s in probes
    )
    step_of = {models[0]: 10, models[1]: 20}
    rows = read_rows(results, "probes")
    assert {(r["model"], r["step"]) for r in rows} == set(step_of.items())
    assert {(r["layer"], r["label"]) for r in rows} >= {(x, "final_colon") for x in (0, 1, 2)}
    assert all(0 <= r["accuracy"] <= 1 and r["n_train"] + r["n_test"] <= N for r in rows)
    behavior = read_rows(results, "behavior")
    assert sorted((r["model"], r["program"]) for r in behavior) == [
        (m, i) for m in models for i in range(N)
    ]
    assert all(r["step"] == step_of[r["model"]] for r in behavior)

    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == 4
    assert info["plan"]["shards"] == {"behavior": 2, "probes": 2}
    assert {m: v["step"] for m, v in info["identity"]["models"].items()} == step_of
    assert info["identity"]["probes"]["programs_per_shard"] == N
    # The folder's spec names the snapshots that ran, not the glob.
    recorded = yaml.safe_load((results / "spec.yaml").read_text())["models"]
    assert recorded == [{"id": m, "step": s} for m, s in step_of.items()]
    status = run_status(results)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "complete: 4 of 4 shards done" in status.stdout

    files += sorted((results / "behavior").rglob("*.parquet"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = run_cli(spec_path, "--address", ray_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 shards run, 4 already done" in again.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes, "no shard recomputed"

    # A later snapshot is one model more: refused as another spec, then added by --extend.
    later = str(save_snapshot(ckpt / "snap-step30", 30, seed=2))
    refused = run_cli(spec_path, "--address", ray_address)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"models.{later}.step: (absent) -> 30" in refused.stderr
    assert "--extend         adds the new shards and keeps every finished one" in refused.stderr
    extended = run_cli(spec_path, "--address", ray_address, "--extend")
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert "2 shards run, 4 already done" in extended.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes, "the old shards are kept"
    rows = read_rows(results, "probes")
    assert {(r["model"], r["step"]) for r in rows} == {*step_of.items(), (later, 30)}
