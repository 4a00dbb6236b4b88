"""Aggregation speed: 10 million synthetic patching rows into the heatmap's cells, in DuckDB,
each cell with its programs and 95% bootstrap interval over them (`analysis/intervals.py`).

    python bench/analysis.py [--rows 10000000] [--threads 2]

Writes the rows as Parquet shard files (as a sweep would), opens the run through
`analysis.connect`, and times the heatmap query (mean norm_effect by model, site, layer and
token label, after joining programs to drop wrong and heuristic ones).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import connect, queries

LABELS = [
    "ref_depth_1_rhs",
    "ref_depth_2_rhs",
    "ref_depth_3_rhs",
    "ref_depth_4_rhs",
    "query_var",
    "final_colon",
    "other",
]


def synthetic(n: int, seed: int, model: str, n_programs: int = 1000) -> pa.Table:
    rng = np.random.default_rng(seed)
    program = rng.integers(0, n_programs, n)
    effect = rng.normal(0, 0.3, n).astype(np.float32)
    return pa.table(
        {
            "model": pa.array([model] * n).dictionary_encode(),
            "task": pa.array(["binding"] * n).dictionary_encode(),
            "seq_len": pa.array(np.full(n, 16, np.int32)),
            "program": pa.array(program.astype(np.int64)),
            "site": pa.array(
                np.where(rng.random(n) < 0.2, "resid_pre", "attn_head")
            ).dictionary_encode(),
            "layer": pa.array(rng.integers(0, 28, n).astype(np.int32)),
            "head": pa.array(rng.integers(0, 16, n).astype(np.int32)),
            "pos": pa.array(rng.integers(0, 100, n).astype(np.int32)),
            "label": pa.array(
                np.array(LABELS)[rng.integers(0, len(LABELS), n)]
            ).dictionary_encode(),
            "top1_correct": pa.array(rng.random(n) < 0.9),
            "cf_top1_correct": pa.array(rng.random(n) < 0.9),
            "norm_effect": pa.array(effect),
            "flipped": pa.array(effect > 0.5),
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    per_file = 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        programs = pa.table(
            {
                "task": ["binding"] * 1000,
                "seq_len": pa.array(np.full(1000, 16, np.int32)),
                "program": pa.array(np.arange(1000, dtype=np.int64)),
                "heuristic": pa.array(np.arange(1000) % 2 == 0),
            }
        )
        root.mkdir()
        pq.write_table(programs, root / "programs.parquet")
        start = time.perf_counter()
        for i, first in enumerate(range(0, args.rows, per_file)):
            n = min(per_file, args.rows - first)
            model = f"org/model-{i % 4}"
            folder = root / "patching" / f"model={model.replace('/', '--')}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(synthetic(n, i, model), folder / f"shard{i}.parquet")
        t_write = time.perf_counter() - start
        con = connect(root, threads=args.threads)
        start = time.perf_counter()
        cells = queries.run(con, queries.HEATMAP_BY_LABEL)
        t_agg = time.perf_counter() - start
        start = time.perf_counter()
        queries.run(con, queries.HEATMAP_BY_LABEL)
        t_again = time.perf_counter() - start
    print(
        f"rows: {args.rows:,} in {len(range(0, args.rows, per_file))} files "
        f"(written in {t_write:.1f} s); threads {args.threads}"
    )
    print(f"heatmap cells: {len(cells):,}; aggregation {t_agg:.2f} s (again: {t_again:.2f} s)")
    print(f"rows_per_s={args.rows / t_agg:,.0f} seconds={t_agg:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
