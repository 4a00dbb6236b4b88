"""The results directory: atomic Parquet writes, resume bookkeeping, run metadata.

    results/<run>/spec.yaml, run.json, programs.parquet, failures.jsonl, .lock
    results/<run>/behavior/model=<m>/task=<t>/<shard>.parquet
    results/<run>/patching/model=<m>/site=<s>/<shard>.parquet
    results/<run>/attribution/model=<m>/site=<s>/<shard>.parquet
    results/<run>/knockout/model=<m>/scope=<s>/<shard>.parquet
    results/<run>/probes/model=<m>/task=<t>/<shard>.parquet
    results/<run>/skipped/model=<m>/<kind>-<shard>.parquet   (pairs left out, with why)

Every file is written under `.tmp/` (outside every reader's glob) and then renamed into place,
so a reader sees a shard's file whole or not at all, and a shard whose file exists is done.
A shard split after running out of memory writes parts `<id>.part<k>of<n>.parquet`; the shard is
done when its parts tile it.

`spec.yaml` is the spec as written, except that `checkpoints` globs are written out as the
models they matched when the run started: the folder's spec names what ran, whatever the globs
match later (a training run keeps adding snapshots; `--extend` takes the new ones in).
"""

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterable
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from orchestrator.lock import LOCK_NAME
from orchestrator.protocol import KINDS, Shard, ShardResult
from orchestrator.shards import escape_model, rel_dir
from orchestrator.spec import Spec, SpecError, parse_spec
from orchestrator.tasks import Program, iter_programs

PROGRAMS_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("text", pa.string()),
        ("answer", pa.string()),
        ("query", pa.string()),
        ("cf_text", pa.string()),
        ("cf_answer", pa.string()),
        ("depth", pa.int32()),
        ("root_line", pa.int32()),
        ("heuristic", pa.bool_()),
        ("spans", pa.map_(pa.string(), pa.list_(pa.int32()))),
    ]
)
logger = logging.getLogger(__name__)
_PART = re.compile(r"[0-9a-f]+\.part(?P<k>\d+)of(?P<of>\d+)\.parquet")
PACKAGES = ("torch", "transformers", "nnsight", "ray", "pyarrow", "duckdb", "vllm", "bitsandbytes")


class SinkError(OSError):
    """A result could not be written; nothing partial was left in place."""


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class ResultsDir:
    """One run's folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self._listing: dict[Path, dict[str, list[str]]] = {}

    # -- atomic writes ----------------------------------------------------------------------
    def _atomic(self, target: Path, write) -> None:
        scratch = self.tmp / f"{target.name}.{uuid.uuid4().hex}"
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            write(scratch)
            os.replace(scratch, target)
        except OSError as err:
            scratch.unlink(missing_ok=True)
            raise SinkError(
                f"could not write {target}: {err.strerror or err}; nothing partial was kept. "
                "Fix: free disk space (or point --output elsewhere) and rerun: finished shards "
                "are kept and skipped"
            ) from err

    def write_table(self, target: Path, table: pa.Table) -> None:
        self._atomic(target, lambda path: pq.write_table(table, path))
        if target.parent in self._listing and _PART.fullmatch(target.name):
            self._listing[target.parent].setdefault(target.name.split(".", 1)[0], []).append(
                target.name
            )

    def write_text(self, target: Path, text: str) -> None:
        self._atomic(target, lambda path: path.write_text(text))

    # -- shards -----------------------------------------------------------------------------
    def shard_path(self, shard: Shard) -> Path:
        return self.root / rel_dir(shard) / f"{shard.file_stem}.parquet"

    def skipped_path(self, shard: Shard) -> Path:
        model = f"model={escape_model(shard.model)}"
        return self.root / "skipped" / model / f"{shard.kind}-{shard.file_stem}.parquet"

    def _parts(self, shard: Shard) -> list[Path]:
        """Part files of a split shard. The folder is listed once per run and kept in step
        with what this object writes, so resume checks stay O(1) per shard."""
        folder = self.root / rel_dir(shard)
        if folder not in self._listing:
            listing: dict[str, list[str]] = {}
            for entry in os.scandir(folder) if folder.is_dir() else ():
                if _PART.fullmatch(entry.name):
                    listing.setdefault(entry.name.split(".", 1)[0], []).append(entry.name)
            self._listing[folder] = listing
        return [folder / n for n in self._listing[folder].get(shard.id, [])]

    def is_done(self, shard: Shard, repair: bool = True) -> bool:
        """The shard's file exists and is whole, or its split parts tile it.

        Args:
            shard: the shard.
            repair: delete a file at the final path that is not valid Parquet (written by
                something other than this sink, or damaged), so the shard runs again. Only a
                driver holding the run's lock may repair; `status` only looks.
        """
        path = self.shard_path(shard)
        if path.exists():
            try:
                pq.read_metadata(path)
                return True
            except (OSError, pa.ArrowInvalid):
                if repair:
                    logger.warning("%s is not valid Parquet; removing it to rerun it", path)
                    path.unlink(missing_ok=True)
        covered = Fraction(0)
        for path in self._parts(shard):
            covered += Fraction(1, int(_PART.fullmatch(path.name)["of"]))
        return covered == 1

    def clear_parts(self, shard: Shard) -> None:
        """Remove part files of a shard about to be run whole (so no row is written twice)."""
        for path in self._parts(shard):
            path.unlink(missing_ok=True)
        self._listing.get(self.root / rel_dir(shard), {}).pop(shard.id, None)

    def write_shard(self, shard: Shard, result: ShardResult) -> Path:
        """Write a finished shard (its skipped programs first, then its rows)."""
        if result.skipped is not None and result.skipped.num_rows:
            self.write_table(self.skipped_path(shard), result.skipped)
        path = self.shard_path(shard)
        self.write_table(path, result.table)
        return path

    def record_failure(self, shard: Shard, error: str, attempts: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "failures.jsonl").open("a") as f:
            row = {
                "shard": shard.file_stem,
                "attempts": attempts,
                "error": error,
                "time": now(),
                **dataclasses.asdict(shard),
            }
            f.write(json.dumps(row, default=list) + "\n")

    # -- run metadata -----------------------------------------------------------------------
    def start(self, spec: Spec, spec_text: str, fresh: bool = False) -> None:
        """Prepare the folder for a driver that holds its lock: wipe it for `--fresh` (all but
        the lock), drop temporaries and old failure records (their shards are retried), write
        `programs.parquet` when it does not hold this spec's programs (new, or extended), and
        save the spec.

        Raises:
            SinkError: a file could not be written.
        """
        if fresh and self.root.exists():
            for entry in self.root.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "failures.jsonl").unlink(missing_ok=True)
        programs = self.root / "programs.parquet"
        wanted = sum(len(t.seq_lens) * t.n for t in spec.tasks)
        try:
            have = pq.read_metadata(programs).num_rows if programs.exists() else -1
        except (OSError, pa.ArrowInvalid):
            have = -1
        # An extended spec has more programs: the file is rewritten (atomically) to cover both.
        if have != wanted:
            self.write_programs(spec)
        self.write_text(self.root / "spec.yaml", recorded_text(spec_text, spec))

    def write_programs(self, spec: Spec) -> None:
        """Every program of the sweep, streamed to Parquet in batches."""
        target = self.root / "programs.parquet"

        def write(path: Path) -> None:
            with pq.ParquetWriter(path, PROGRAMS_SCHEMA) as writer:
                for task in spec.tasks:
                    for seq_len in task.seq_lens:
                        batch = iter_programs(
                            task.family, spec.seed, seq_len, task.n, **task.options
                        )
                        writer.write_table(programs_table(batch))

        self._atomic(target, write)

    def write_run(self, info: dict[str, Any]) -> None:
        self.write_text(self.root / "run.json", json.dumps(info, indent=2, default=str) + "\n")

    def read_run(self) -> dict[str, Any] | None:
        """`run.json`, or None when there is none (or it is not JSON)."""
        try:
            data = json.loads((self.root / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def recorded_spec(self) -> Spec | None:
        """The spec the folder was last run with (its `spec.yaml`), or None if unreadable."""
        try:
            return parse_spec(yaml.safe_load((self.root / "spec.yaml").read_text()))
        except (OSError, yaml.YAMLError, SpecError):
            return None

    def has_results(self) -> bool:
        """Any shard file, program table or run record is here (a folder with only a lock, or
        nothing, is free for any spec)."""
        if not self.root.is_dir():
            return False
        names = {"run.json", "spec.yaml", "programs.parquet", *KINDS}
        return any(entry.name in names for entry in self.root.iterdir())

    def failures(self) -> list[dict[str, Any]]:
        path = self.root / "failures.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recorded_text(spec_text: str, spec: Spec) -> str:
    """The spec text a run folder keeps: `spec_text` itself, unless its models list has
    `checkpoints` entries; then the YAML with `models` replaced by `spec`'s concrete models
    (each with its id and step), since the globs may match other folders later."""
    data = yaml.safe_load(spec_text)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not any(
        isinstance(m, dict) and "checkpoints" in m for m in models
    ):
        return spec_text
    data["models"] = [m.model_dump(exclude_defaults=True) for m in spec.models]
    header = "# models: the folders the checkpoints globs matched when the run started\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def programs_table(programs: Iterable[Program]) -> pa.Table:
    rows: dict[str, list] = {f.name: [] for f in PROGRAMS_SCHEMA}
    for p in programs:
        rows["task"].append(p.task)
        rows["seq_len"].append(p.seq_len)
        rows["program"].append(p.index)
        for key in (
            "text",
            "answer",
            "query",
            "cf_text",
            "cf_answer",
            "depth",
            "root_line",
            "heuristic",
        ):
            rows[key].append(getattr(p, key))
        rows["spans"].append([(k, list(v)) for k, v in p.spans.items()])
    return pa.table(rows, schema=PROGRAMS_SCHEMA)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
