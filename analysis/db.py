"""DuckDB views over a results directory: `programs`, `behavior`, `patching`, `attribution`,
`knockout`, `probes`, `skipped`.

Reads only complete shard files (the writers rename into place; temporaries live in `.tmp/`,
outside these globs), so it works on a run that is still being written. Schemas are unioned by
name, and every view has every column of `EMPTY`, so runs written by different versions read
together: where a file lacks a column, its rows read the column's `FALLBACK` (an SQL expression
over the file's own columns: its old name, or what the column meant before it was written), or
NULL where there is none; where files of both versions are read together, each row reads its
own value, else the fallback.

Every view but `programs` ends with `step`: the training step of the row's model, which the
worker appends to every table it writes (models in a sweep may be checkpoints of one training
run, each its own model id). It is NULL for a model without one and in files written before the
column, which have no fallback.

The folders are hive-partitioned (`model=<m>/site=<s>`; knockout's `model=<m>/scope=<s>`,
probes' `model=<m>/task=<t>`), but the path holds the model id *escaped* for file names
(`Qwen--Qwen3-0.6B`), while every file carries the real values of its partition columns (`model`
= `Qwen/Qwen3-0.6B`). DuckDB lets a hive key override the file's own column of the same name, so
the views read the files' columns (`hive_partitioning = false`); filters on them still skip data
through Parquet row-group statistics.

The views with programs (`behavior`, `patching`, `attribution`, `knockout`, `skipped`) also carry
the program's `depth`, `heuristic` (root value on line 1 or 2) and `root_line`, read from
`programs` by the program's key (`task`, `seq_len`, `program`; `programs` has no model column: a
program is the same text for every model), so a query can filter on them without a join. The
files as written are the views `<view>_files`.
"""

from pathlib import Path

import duckdb

from analysis.intervals import PROGRAM

# Columns of each view when no file exists yet, so that queries run (and return nothing). Files of
# older runs that lack some of them read those columns' `FALLBACK`, or NULL, so one query serves
# runs written by every version.
EMPTY = {
    "programs": "task VARCHAR, seq_len INTEGER, program BIGINT, text VARCHAR, answer VARCHAR, "
    "query VARCHAR, cf_text VARCHAR, cf_answer VARCHAR, depth INTEGER, root_line INTEGER, "
    "heuristic BOOLEAN, spans MAP(VARCHAR, INTEGER[])",
    "behavior": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, depth INTEGER, "
    "heuristic BOOLEAN, expected VARCHAR, predicted VARCHAR, correct BOOLEAN, "
    "error_kind VARCHAR, backend VARCHAR, method VARCHAR, answer_prefix VARCHAR, top1 VARCHAR, "
    "top1_candidate BOOLEAN, top1_correct BOOLEAN, choice_correct BOOLEAN",
    "patching": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, site VARCHAR, "
    "layer INTEGER, head INTEGER, pos INTEGER, token VARCHAR, label VARCHAR, "
    "clean_answer VARCHAR, cf_answer VARCHAR, answer_prefix VARCHAR, metric VARCHAR, "
    "top1 VARCHAR, top1_candidate BOOLEAN, top1_correct BOOLEAN, choice_correct BOOLEAN, "
    "cf_top1_correct BOOLEAN, cf_choice_correct BOOLEAN, "
    "clean_logit_diff FLOAT, cf_logit_diff FLOAT, patched_logit_diff FLOAT, norm_effect FLOAT, "
    "flipped BOOLEAN, counterfactual VARCHAR, contrast_answer VARCHAR, contrast_logit_diff FLOAT",
    "attribution": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, site VARCHAR, "
    "layer INTEGER, head INTEGER, pos INTEGER, token VARCHAR, label VARCHAR, "
    "clean_answer VARCHAR, cf_answer VARCHAR, answer_prefix VARCHAR, "
    "top1_correct BOOLEAN, cf_top1_correct BOOLEAN, clean_logit_diff FLOAT, cf_logit_diff FLOAT, "
    "estimate FLOAT, norm_estimate FLOAT, grad_drop FLOAT, attention_fix BOOLEAN, "
    "verify VARCHAR, exact FLOAT, norm_exact FLOAT, exact_flipped BOOLEAN, counterfactual VARCHAR",
    # One row per program x (layer, head) x source position x scope: the head's attention from
    # the answer (`answer`) or from every later position (`later`) to `source` blocked.
    "knockout": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, layer INTEGER, "
    "head INTEGER, source VARCHAR, source_pos INTEGER, scope VARCHAR, token VARCHAR, "
    "clean_answer VARCHAR, cf_answer VARCHAR, answer_prefix VARCHAR, top1_correct BOOLEAN, "
    "clean_logit_diff FLOAT, cf_logit_diff FLOAT, knocked_logit_diff FLOAT, effect FLOAT, "
    "norm_effect FLOAT, top1_changed BOOLEAN, counterfactual VARCHAR",
    # One row per probe fitted: a shard's programs x layer x position label, the held-out
    # accuracy of a linear probe on the residual stream entering `layer` for `target`
    # (`root_value` at `ref_depth_<k>_rhs`, `answer` at `final_colon`), beside a control task's
    # (labels a random function of the position's variable, Hewitt & Liang) and majority-class
    # chance.
    "probes": "model VARCHAR, task VARCHAR, seq_len INTEGER, layer INTEGER, label VARCHAR, "
    "target VARCHAR, accuracy FLOAT, control_accuracy FLOAT, chance FLOAT, "
    "control_chance FLOAT, n_train INTEGER, n_test INTEGER, n_classes INTEGER",
    "skipped": "model VARCHAR, task VARCHAR, seq_len INTEGER, program BIGINT, reason VARCHAR, "
    "counterfactual VARCHAR",
}
# The model's training step ends every view but `programs` (which has no model): no fallback, so
# files written before it, and models without one, read NULL.
EMPTY |= {view: f"{columns}, step BIGINT" for view, columns in EMPTY.items() if view != "programs"}
# Columns that older runs wrote under another name with the same meaning: the clean and the
# counterfactual run's top-1 over the whole vocabulary is the answer's token.
RENAMED = {
    "patching": {"top1_correct": "clean_correct", "cf_top1_correct": "cf_correct"},
}
# Columns whose value older runs did not write but fixed, as SQL over their files' columns: before
# the counterfactual kinds, every patching row was the root value's, whose logit diffs contrast the
# clean answer with its own answer (`cf_answer`).
DERIVED = {
    "patching": {
        "counterfactual": "'root_value'",
        "contrast_answer": "cf_answer",
        "contrast_logit_diff": "cf_logit_diff",
    },
    # Attribution, knockout and skipped rows are of the root value's counterfactual, as every
    # row was before the kinds.
    **{view: {"counterfactual": "'root_value'"} for view in ("attribution", "knockout", "skipped")},
}
# What a file that lacks a column reads in it (a renamed column: its old name), used where the
# expression binds over the file's columns.
FALLBACK = {view: RENAMED.get(view, {}) | DERIVED.get(view, {}) for view in EMPTY}
GLOBS = {
    "programs": "programs.parquet",
    "behavior": "behavior/**/*.parquet",
    "patching": "patching/**/*.parquet",
    "attribution": "attribution/**/*.parquet",
    "knockout": "knockout/**/*.parquet",
    "probes": "probes/**/*.parquet",
    "skipped": "skipped/**/*.parquet",
}


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
        files = f"{view}_files" if view in WITH_PROGRAMS else view
        if any(root.glob(pattern)):
            source = (
                f"read_parquet({_sql_string(str(root / pattern))}, "
                "union_by_name = true, hive_partitioning = false)"
            )
            con.execute(f"CREATE VIEW {files} AS {_complete(con, view, source)}")
        else:
            con.execute(f"CREATE TABLE {files} ({EMPTY[view]})")
        if files != view:
            con.execute(f"CREATE VIEW {view} AS {_with_program(con, files)}")
    return con


# What every view with programs gains from `programs`, by the program's key (`probes` rows are
# fitted over many programs and have none).
WITH_PROGRAMS = ("behavior", "patching", "attribution", "knockout", "skipped")
PROGRAM_COLUMNS = ("depth", "heuristic", "root_line")


def _with_program(con: duckdb.DuckDBPyConnection, files: str) -> str:
    """`SELECT` over `files` with the `PROGRAM_COLUMNS` it lacks, from `programs` (NULL for a
    program not there); one row per row of `files`, as `programs` has one row per key."""
    have = _columns(con, files)
    added = [f"g.{c}" for c in PROGRAM_COLUMNS if c not in have]
    return (
        f"SELECT f.*, {', '.join(added)} FROM {files} AS f "
        f"LEFT JOIN programs AS g USING ({', '.join(PROGRAM)})"
    )


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    """Column name -> type of a query or table."""
    return {row[0]: row[1] for row in con.execute(f"DESCRIBE {relation}").fetchall()}


def _binds(con: duckdb.DuckDBPyConnection, expression: str, have: dict[str, str]) -> bool:
    """Whether `expression` reads only columns in `have` (name -> type), checked over no rows."""
    columns = ", ".join(f"NULL::{kind} AS {_sql_name(name)}" for name, kind in have.items())
    try:
        con.execute(f"DESCRIBE SELECT {expression} FROM (SELECT {columns})")
    except duckdb.BinderException:
        return False
    return True


def _complete(con: duckdb.DuckDBPyConnection, view: str, source: str) -> str:
    """`SELECT` over `source` with every column of `EMPTY[view]`: a column the files lack reads
    as its `FALLBACK` where the files have the columns that reads, else as NULL; where files of
    both versions are read together, the column falls back row by row (`coalesce`)."""
    con.execute(f"CREATE TEMP TABLE _shape ({EMPTY[view]})")
    try:
        wanted = _columns(con, "_shape")
    finally:
        con.execute("DROP TABLE _shape")
    have = _columns(con, f"SELECT * FROM {source}")
    replace, extra = [], []
    for name, kind in wanted.items():
        fallback = FALLBACK[view].get(name)
        if fallback is not None and not _binds(con, fallback, have):
            fallback = None
        if name in have:
            if fallback is not None:
                replace.append(f"coalesce({name}, CAST({fallback} AS {kind})) AS {name}")
        elif fallback is not None:
            extra.append(f"CAST({fallback} AS {kind}) AS {name}")
        else:
            extra.append(f"NULL::{kind} AS {name}")
    star = f"* REPLACE ({', '.join(replace)})" if replace else "*"
    return f"SELECT {', '.join([star, *extra])} FROM {source}"
