"""Result files written by hand for the analysis tests, in a run folder's layout
(`orchestrator.sink`): `<run>/<view>/model=<model>/<key>=<part>/<name>.parquet`, the model id
escaped as the sink does for `org/name` ids (`org--name`), and a view's columns as the schema of
such files. No torch, no ray."""

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.db import EMPTY

# The partition key under `model=` of each view's folder.
KEYS = {
    "behavior": "task",
    "patching": "site",
    "attribution": "site",
    "knockout": "scope",
    "probes": "task",
}

TYPES = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "BOOLEAN": pa.bool_(),
}


def view_schema(view: str) -> pa.Schema:
    """A view's columns (`EMPTY`) as the Parquet schema of the files to write (maps left out)."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE {view} ({EMPTY[view]})")
    rows = con.execute(f"DESCRIBE {view}").fetchall()
    return pa.schema([(r[0], TYPES[r[1]]) for r in rows if r[1] in TYPES])


def part_folder(root: Path, view: str, model: str, part: str) -> Path:
    """The folder of `model`'s `view` files whose partition key (`KEYS`) is `part`, made."""
    folder = root / view / f"model={model.replace('/', '--')}" / f"{KEYS[view]}={part}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_part(
    root: Path,
    view: str,
    model: str,
    part: str,
    rows: pa.Table | list[dict],
    name: str,
    schema: pa.Schema | None = None,
) -> Path:
    """Write `rows` (a table, or dicts made into one with `schema`, inferred if None) as
    `name`.parquet in `part_folder(root, view, model, part)`; returns the file's path."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    path = part_folder(root, view, model, part) / f"{name}.parquet"
    pq.write_table(table, path)
    return path
