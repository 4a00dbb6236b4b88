"""Attribution and knockout end to end on a local Ray cluster (2 CPUs) with a tiny model: the
CLI plans and runs a sweep of attribution with exact checks (`verify_top_k`) and attention
knockout, its Parquet files land under attribution/model=.../site=... and
knockout/model=.../scope=..., a rerun recomputes nothing, and `status` counts the kinds."""

import collections
import math

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from actors.targets import encode_program
from orchestrator.shards import escape_model, iter_shards
from orchestrator.spec import load_spec
from orchestrator.tasks import iter_programs
from tests.integration.conftest import read_rows, run_cli, run_json, run_status, write_spec

pytestmark = pytest.mark.slow  # about 45 s here: two CLI runs and a status

K = 2
HEADS = 4  # tests.tiny: 4 attention heads, 2 layers
ATTRIBUTION = {
    "sites": ["resid_pre", "attn_head"],
    "programs_per_shard": 2,
    "batch_size": 2,
    "verify_top_k": K,
}
KNOCKOUT = {"programs_per_shard": 4, "layers_per_shard": 2}  # one shard: scope answer


def test_attribution_and_knockout_sweep_writes_its_rows_then_resumes(
    tmp_path, ray_address, tiny_model
) -> None:
    spec_path = write_spec(
        tmp_path,
        tiny_model,
        tasks=[{"family": "binding", "seq_lens": [4], "n": 4, "options": {"style": "paper"}}],
        experiments={"attribution": ATTRIBUTION, "knockout": KNOCKOUT},
    )
    out = run_cli(spec_path, "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "attribution shards: 4" in out.stdout  # 2 blocks of programs x 2 sites
    assert "knockout shards: 1" in out.stdout and "knockout rows: ~" in out.stdout
    assert "attribution cells: ~" in out.stdout and "verified exactly: ~" in out.stdout

    results = tmp_path / "results" / "it"
    spec = load_spec(spec_path)
    every = list(iter_shards(spec, {tiny_model: 2}))
    shards = [s for s in every if s.kind == "attribution"]
    assert {s.layers for s in shards} == {(0, 1)}, "one shard holds every layer"
    model_dir = results / "attribution" / f"model={escape_model(tiny_model)}"
    files = sorted(model_dir.glob("site=*/*.parquet"))
    assert {(f.parent.name, f.stem) for f in files} == {(f"site={s.site}", s.id) for s in shards}

    rows = read_rows(results, "attribution")
    keys = collections.Counter(
        (r["program"], r["site"], r["layer"], r["head"], r["pos"]) for r in rows
    )
    assert max(keys.values()) == 1, "no cell twice"
    assert {r["model"] for r in rows} == {tiny_model}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for program in iter_programs("binding", 0, 4, 4, style="paper"):
        for site in ATTRIBUTION["sites"]:
            mine = [r for r in rows if r["program"] == program.index and r["site"] == site]
            pair = encode_program(tokenizer, program, mine[0]["answer_prefix"])
            per_position = 2 * (HEADS if site == "attn_head" else 1)
            assert len(mine) == len(pair.clean_ids) * per_position, (program.index, site)
            assert all(r["estimate"] is not None and math.isfinite(r["estimate"]) for r in mine)
            exact = [r for r in mine if r["exact"] is not None]
            assert len(exact) == 2 * K, "the top K and K random cells, patched exactly"
            assert collections.Counter(r["verify"] for r in exact) == {"top": K, "random": K}
            assert all(math.isfinite(r["exact"]) for r in exact)
            assert all(r["verify"] is None for r in mine if r["exact"] is None)

    (knock,) = [s for s in every if s.kind == "knockout"]
    knock_dir = results / "knockout" / f"model={escape_model(tiny_model)}" / "scope=answer"
    assert [f.stem for f in knock_dir.glob("*.parquet")] == [knock.id]
    knocked = read_rows(results, "knockout")
    assert {r["program"] for r in knocked} == {0, 1, 2, 3}
    assert {(r["layer"], r["head"]) for r in knocked} == {(x, h) for x in (0, 1) for h in range(4)}
    assert all(math.isfinite(r["effect"]) for r in knocked)
    files += [knock_dir / f"{knock.id}.parquet"]

    info = run_json(results)
    assert info["status"] == "complete" and info["shards"]["finished"] == 5
    assert info["plan"]["shards"] == {"attribution": 4, "knockout": 1}
    assert info["plan"]["knockout_rows"] == len(knocked)
    assert info["plan"]["verify_patches"] == 4 * 2 * 2 * K, "programs x sites x 2K"
    assert info["plan"]["attribution_cells"] > 0
    assert info["identity"]["attribution"]["verify_top_k"] == K
    assert pq.read_table(results / "programs.parquet").num_rows == 4
    status = run_status(results)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "attribution       4       0        0" in status.stdout
    assert "knockout          1       0        0" in status.stdout
    assert "complete: 5 of 5 shards done" in status.stdout

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = run_cli(spec_path, "--address", ray_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 shards run, 5 already done" in again.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes, "no shard recomputed"
