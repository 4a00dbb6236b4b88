"""DuckDB views over a results directory: `programs`, `behavior`, `patching`, `skipped`.

Reads only complete shard files (the writers rename into place; temporaries live in `.tmp/`,
outside these globs), so it works on a run that is still being written. Schemas are unioned by
name, so runs written by different versions read together.

The folders are hive-partitioned (`model=<m>/site=<s>`), but the path holds the model id
*escaped* for file names (`Qwen--Qwen3-0.6B`), while every file carries the real values of its
partition columns (`model` = `Qwen/Qwen3-0.6B`). DuckDB lets a hive key override the file's own
column of the same name, so the views read the files' columns (`hive_partitioning = false`);
filters on them still skip data through Parquet row-group statistics.
"""

from pathlib import Path

import duckdb

# Columns of each view when no file exists yet, so that queries run (and return nothing).
EMPTY = {
    "programs": "task VARCHAR, seq_len INTEGER, program BIGINT, text VARCHAR, answer VARCHAR, "
    "query VARCHAR, cf_text VARCHAR, cf_answer VARCHAR, depth INTEGER, root_line INTEGER, "
    "heuristic BOOLEAN, spans MAP(VARCHAR, INTEGER[])",
    "behavior": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, depth INTEGER, "
    "heuristic BOOLEAN, expected VARCHAR, predicted VARCHAR, correct BOOLEAN, backend VARCHAR, "
    "method VARCHAR",
    "patching": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, site VARCHAR, "
    "layer INTEGER, head INTEGER, pos INTEGER, token VARCHAR, label VARCHAR, "
    "clean_answer VARCHAR, cf_answer VARCHAR, clean_correct BOOLEAN, cf_correct BOOLEAN, "
    "clean_logit_diff FLOAT, cf_logit_diff FLOAT, patched_logit_diff FLOAT, norm_effect FLOAT, "
    "flipped BOOLEAN",
    "skipped": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, reason VARCHAR",
}
GLOBS = {
    "programs": "programs.parquet",
    "behavior": "behavior/**/*.parquet",
    "patching": "patching/**/*.parquet",
    "skipped": "skipped/**/*.parquet",
}


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(results: str | Path, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the run's views.

    Raises:
        FileNotFoundError: `results` is not a folder.
    """
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a results folder; give the run's folder, e.g. results/quickstart"
        )
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    for view, pattern in GLOBS.items():
        if any(root.glob(pattern)):
            source = (
                f"read_parquet({_sql_string(str(root / pattern))}, "
                "union_by_name = true, hive_partitioning = false)"
            )
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM {source}")
        else:
            con.execute(f"CREATE TABLE {view} ({EMPTY[view]})")
    return con
