"""`python -m orchestrator status RUN_DIR`: where a run stands, read from its folder alone.

Prints the spec hash, the run's recorded status, the driver holding the folder (if one does),
shards done / failed / missing per model and kind, and each failure with its last error. Reads
only: it never repairs, deletes or locks for longer than a probe.

Exit status: 0 every shard is done; 1 some shards failed (and are not done); 3 some shards are
missing (never run, interrupted, or running now); 2 not a run folder (or its spec unreadable).
"""

import collections
import dataclasses
from pathlib import Path
from typing import Any

from orchestrator.identity import identity, spec_hash
from orchestrator.lock import lock_holder
from orchestrator.shards import iter_shards
from orchestrator.sink import ResultsDir

EXIT_COMPLETE, EXIT_FAILED, EXIT_NOT_A_RUN, EXIT_MISSING = 0, 1, 2, 3


@dataclasses.dataclass
class Counts:
    done: int = 0
    failed: int = 0
    missing: int = 0


@dataclasses.dataclass
class RunStatus:
    """What `status` found.

    Attributes:
        root: the run folder.
        spec_hash: the hash run.json records (None for a folder from before hashes).
        recorded: run.json's `status` (running, complete, incomplete, interrupted, ...).
        holder: the lock holder's record, or None when no driver holds the folder.
        counts: (model, kind) -> shards done / failed / missing.
        failures: shard file stem -> its last failure record.
        note: a remark on the folder (e.g. spec.yaml does not match run.json).
    """

    root: Path
    spec_hash: str | None
    recorded: str | None
    holder: dict[str, Any] | None
    counts: dict[tuple[str, str], Counts]
    failures: dict[str, dict[str, Any]]
    note: str | None = None

    def exit_code(self) -> int:
        totals = self.total()
        if totals.failed:
            return EXIT_FAILED
        return EXIT_MISSING if totals.missing else EXIT_COMPLETE

    def total(self) -> Counts:
        out = Counts()
        for c in self.counts.values():
            out.done, out.failed, out.missing = (
                out.done + c.done,
                out.failed + c.failed,
                out.missing + c.missing,
            )
        return out


class NotARun(ValueError):
    """The folder is not a run folder, or its spec cannot be read."""


def read_status(root: Path) -> RunStatus:
    """Count the run's shards against its files and failure records.

    Raises:
        NotARun: no spec.yaml that parses (the folder was never started by a driver).
    """
    results = ResultsDir(Path(root))
    spec = results.recorded_spec()
    if spec is None:
        raise NotARun(
            f"{root}: not a run folder (no readable spec.yaml); give the folder a driver wrote, "
            "e.g. results/quickstart"
        )
    run = results.read_run() or {}
    note = None
    recorded_hash = run.get("spec_hash")
    if recorded_hash is not None and recorded_hash != spec_hash(identity(spec)):
        note = "spec.yaml does not hash to run.json's spec_hash: a driver was stopped mid-start"
    n_layers = run.get("n_layers")
    if n_layers is None:
        from orchestrator.checks import check_models

        n_layers = check_models(spec, results.root / "spec.yaml")
    failures: dict[str, dict[str, Any]] = {}
    for row in results.failures():
        failures[row["shard"]] = row  # the last record of a shard wins
    failed_ids = {row["id"] for row in failures.values()}
    counts: dict[tuple[str, str], Counts] = collections.defaultdict(Counts)
    for shard in iter_shards(spec, n_layers):
        c = counts[(shard.model, shard.kind)]
        if results.is_done(shard, repair=False):
            c.done += 1
        elif shard.id in failed_ids:
            c.failed += 1
        else:
            c.missing += 1
    return RunStatus(
        root=results.root,
        spec_hash=recorded_hash,
        recorded=run.get("status"),
        holder=lock_holder(results.root),
        counts=dict(counts),
        failures=failures,
        note=note,
    )


def format_status(st: RunStatus) -> str:
    """The report `status` prints."""
    lines = [f"run {st.root}", f"  spec hash: {st.spec_hash or '(not recorded)'}"]
    lines.append(f"  recorded status: {st.recorded or '(no run.json)'}")
    if st.holder is None:
        lines.append("  driver: none holds the folder")
    else:
        h = st.holder
        lines.append(
            f"  driver: pid {h.get('pid')} on {h.get('host')} since {h.get('started')} "
            f"holds the folder ({h.get('command', '?')})"
        )
    if st.note:
        lines.append(f"  note: {st.note}")
    width = max([len(m) for m, _ in st.counts] + [5])
    # As wide as the run's longest kind (`attribution`), at least as wide as `behavior`.
    kinds = max([len(k) for _, k in st.counts] + [8])
    lines.append(
        f"  {'model':<{width}}  {'kind':<{kinds}}  {'done':>6}  {'failed':>6}  {'missing':>7}"
    )
    for (model, kind), c in sorted(st.counts.items()):
        lines.append(
            f"  {model:<{width}}  {kind:<{kinds}}  {c.done:>6}  {c.failed:>6}  {c.missing:>7}"
        )
    t = st.total()
    n = t.done + t.failed + t.missing
    if st.failures:
        lines.append(f"  failures ({len(st.failures)}, from failures.jsonl):")
        for stem, row in sorted(st.failures.items()):
            error = str(row.get("error", "")).splitlines()[0][:200]
            # Shards that differ only in their counterfactual kind are told apart here too.
            kind = row.get("counterfactual", "root_value")
            counterfactual = "" if kind == "root_value" else f" counterfactual={kind}"
            lines.append(
                f"    {stem} {row.get('kind')} {row.get('task')} seq_len={row.get('seq_len')} "
                f"programs {row.get('start')}+{row.get('n')}{counterfactual}: "
                f"{row.get('attempts')} attempts, last error: {error}"
            )
    if t.failed == t.missing == 0:
        lines.append(f"complete: {t.done} of {n} shards done")
    else:
        lines.append(
            f"incomplete: {t.done} of {n} shards done, {t.failed} failed, {t.missing} missing; "
            "rerun the sweep's command to run them"
        )
    return "\n".join(lines)
