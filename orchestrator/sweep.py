"""`python -m orchestrator SPEC`: check everything, take the run folder, run the shards, report.

The order is what makes the promises hold:

1. The spec, its models' configs, its backends: a bad spec exits 2 before anything is written.
2. The run folder, read only: a folder made by another spec is refused (exit 2, nothing
   touched) with the diff and the ways out. If the folder exists its lock is taken now, so a
   second driver is refused at once.
3. Ray: embedded unless an address is given; the spec's resources against the cluster (exit 2,
   still nothing written).
4. Under the lock, the folder is checked again and prepared; then the shards run.

Ctrl-C or SIGTERM stops the sweep cleanly (exit 130, `run.json` status `interrupted`); a lost
cluster likewise (exit 3). A second Ctrl-C stops at once.

A sweep that ran to its end (complete or incomplete) then runs the prompt check
(`analysis.prompts`: is the clean top-1 one of the task's candidate answers?) over the folder,
prints it and stores it in `run.json` under `prompt_check`; a check that fails is logged and
changes neither the status nor the results. The last line names the command that summarises
the run, with the launcher this process was started by (`uv run python`, a venv's python by
its path, or `python`).
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.checks import check_backends, check_models, check_resources
from orchestrator.identity import diff, extension_problems, identity, spec_hash
from orchestrator.lock import LockError, LockHeld, RunLock
from orchestrator.plan import Plan, make_plan
from orchestrator.sink import ResultsDir, SinkError, git_commit, now, versions
from orchestrator.spec import Spec, SpecError, load_spec

EXIT_COMPLETE, EXIT_FAILED, EXIT_REFUSED, EXIT_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
logger = logging.getLogger(__name__)


def _uv_venv(prefix: Path) -> bool:
    """`prefix` is a virtual environment uv made (its `pyvenv.cfg` has a `uv = VERSION` key)."""
    try:
        lines = (prefix / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return False
    return any(line.partition("=")[0].strip() == "uv" for line in lines)


def python_launcher() -> str:
    """How to start this Python again from the shell the user is in.

    `uv run python` under `uv run` (uv sets `UV`, the path of its binary, for every process it
    starts) or in a virtual environment uv manages; a virtual environment's interpreter that is
    not activated, by its path (`.venv/bin/python`, as the README's pip recipe runs it), since a
    plain `python` would be another one; else `python`.
    """
    prefix = Path(sys.prefix)
    if os.environ.get("UV") or _uv_venv(prefix):
        return "uv run python"
    active = os.environ.get("VIRTUAL_ENV")
    in_venv = sys.prefix != sys.base_prefix
    if in_venv and not (active and os.path.realpath(active) == os.path.realpath(prefix)):
        exe = Path(sys.executable)
        with contextlib.suppress(ValueError):
            exe = exe.relative_to(Path.cwd())
        shown = str(exe) if "/" in str(exe) else f"./{exe}"
        return shlex.quote(shown)
    return "python"


def analysis_command(root: Path) -> str:
    """The command that summarises the run in `root` (the sweep's `next:` line)."""
    return f"{python_launcher()} -m analysis {shlex.quote(str(root))}"


def run_prompt_check(root: Path) -> list[dict[str, Any]] | None:
    """The prompt check of a run folder (`analysis.prompts.check_run`), or None, with a logged
    warning, when it could not be computed: it must never cost the run its status."""
    from analysis.prompts import check_run

    try:
        return check_run(root)
    except Exception as err:  # any failure of the diagnostic is reported, never raised
        logger.warning("prompt check of %s failed, results are unaffected: %s", root, err)
        return None


def print_plan(plan: Plan, out_dir: Path) -> None:
    print(f"sweep {plan.run}: {out_dir}")
    for model in plan.models:
        print(f"  model {model}")
    print(f"  programs: {plan.programs}")
    for kind, n in plan.shards.items():
        if n:
            print(f"  {kind} shards: {n}")
    if plan.shards.get("patching"):
        share = plan.free_rows / max(1, plan.patch_rows)
        print(f"  patch rows: ~{plan.patch_rows:,} (estimated from a sample of programs)")
        print(
            f"  engine work: ~{plan.token_layers:,} token-layers; {share:.0%} of the patches "
            "need no forward"
        )
    if plan.shards.get("attribution"):
        print(
            f"  attribution cells: ~{plan.attribution_cells:,} estimated (from a sample of "
            "programs)"
        )
        if plan.verify_patches:
            print(f"  verified exactly: ~{plan.verify_patches:,} patches (verify_top_k)")
    if plan.shards.get("knockout"):
        print(f"  knockout rows: ~{plan.knockout_rows:,} (estimated from a sample of programs)")
    if plan.shards.get("probes"):
        print(
            f"  probe programs: {plan.probe_programs:,} (a probe per shard, layer and label, "
            "fitted on the shard's programs)"
        )


def folder_refusal(
    results: ResultsDir, spec: Spec, n_layers: dict[str, int], fresh: bool, extend: bool
) -> str | None:
    """Why `spec` may not run into this folder (None: it may). Reads, never writes."""
    if fresh or not results.has_results():
        return None
    run = results.read_run() or {}
    old_ident = run.get("identity")
    old_spec = results.recorded_spec()
    if old_ident is None and old_spec is not None:  # a driver killed before run.json
        old_ident = identity(old_spec)
    root = results.root
    if old_ident is None:
        return (
            f"{root}: holds results but no record of the spec that wrote them (no run.json "
            "identity, no readable spec.yaml), so new rows could not be told apart from them. "
            "Nothing was touched. Fix: --fresh to start over, or another run: name"
        )
    new_ident = identity(spec)
    if old_ident == new_ident:
        return None
    problems = ["spec.yaml, the spec the folder was last run with, is missing or unreadable"]
    if old_spec is not None:
        old_layers = run.get("n_layers") or n_layers
        problems = extension_problems(old_spec, spec, old_layers, n_layers)
    if extend and not problems:
        return None
    changes = "\n".join(f"  {line}" for line in diff(old_ident, new_ident))
    if problems:
        why = "; ".join(problems)
        how = f"not possible here, the change does not only add work: {why}"
    else:
        how = "adds the new shards and keeps every finished one (the change only adds work)"
    return (
        f"{root}: this run folder holds results of another spec (spec {spec_hash(old_ident)}; "
        f"this spec is {spec_hash(new_ident)}). What changed:\n{changes}\n"
        "Nothing was touched; old and new rows are never mixed. Ways out:\n"
        "  --fresh          delete this run's results and start over\n"
        "  run: NAME        give the spec another run name (or --output DIR): a new folder\n"
        f"  --extend         {how}"
    )


class Sweep:
    """One invocation of the run command (see the module docstring for the order).

    Args:
        args: the parsed command line.
        worker_cls / worker_args: the actor body (None: `actors.worker.ModelWorker`, imported
            only once the spec has passed its checks) and its extra constructor arguments.
        quiet: print no plan, progress bar or report (`--check-prompts` prints its own);
            errors still go to stderr.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        worker_cls: type | None,
        worker_args: tuple,
        quiet: bool = False,
    ) -> None:
        self.args = args
        self.worker_cls = worker_cls
        self.worker_args = worker_args
        self.quiet = quiet
        self.driver: Any = None
        self.prompt_check: list[dict[str, Any]] | None = None

    def _say(self, text: str) -> None:
        """A line for the user on stdout (none when quiet; problems go to stderr regardless)."""
        if not self.quiet:
            print(text)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.driver is None or self.driver.stop_reason is not None:
            raise KeyboardInterrupt  # before the loop, or a second Ctrl-C: stop now
        self.driver.request_stop(signal.Signals(signum).name)

    def _handle_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def main(self) -> int:
        """Run the sweep; returns the exit status (the caller's signal handlers are restored)."""
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._handle_signals()
        try:
            return self._main()
        except KeyboardInterrupt:
            print("interrupted before the sweep started; nothing was run", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _main(self) -> int:
        args = self.args
        try:
            spec = load_spec(args.spec)
            n_layers = check_models(spec, args.spec)
            check_backends(spec, args.spec)
        except SpecError as err:
            print(err, file=sys.stderr)
            return EXIT_REFUSED
        results = ResultsDir(spec.results_dir(args.output))
        lock = RunLock(results.root)
        try:
            refusal = folder_refusal(results, spec, n_layers, args.fresh, args.extend)
            if refusal:
                print(refusal, file=sys.stderr)
                return EXIT_REFUSED
            if results.root.is_dir() and not args.dry_run:
                lock.acquire()
            plan = make_plan(spec, n_layers)
            if not self.quiet:
                print_plan(plan, results.root)
            if args.dry_run:
                return EXIT_COMPLETE
            return self._run(spec, n_layers, results, lock, plan)
        except LockHeld as err:
            print(err, file=sys.stderr)
            return EXIT_REFUSED
        except LockError as err:
            print(err, file=sys.stderr)
            return EXIT_FAILED
        finally:
            lock.release()

    def _run(
        self, spec: Spec, n_layers: dict[str, int], results: ResultsDir, lock: RunLock, plan: Plan
    ) -> int:
        from orchestrator.cluster import connect

        args = self.args
        cluster = connect(args.address, num_cpus=args.num_cpus)
        self._handle_signals()  # ray.init installs its own SIGTERM handler
        try:
            check_resources(spec, cluster, args.spec)
        except SpecError as err:
            print(err, file=sys.stderr)
            return EXIT_REFUSED
        self._say(f"ray: {cluster.describe()}")
        lock.acquire()
        if lock.stale:
            self._say(
                f"lock: took over from a driver that is gone (pid {lock.stale.get('pid')} on "
                f"{lock.stale.get('host')}, since {lock.stale.get('started')})"
            )
        refusal = folder_refusal(results, spec, n_layers, args.fresh, args.extend)
        if refusal:  # another driver ran a different spec here between the checks
            print(refusal, file=sys.stderr)
            return EXIT_REFUSED
        from orchestrator.driver import Driver

        # None: the driver's own default, `ModelWorker` (imported with the driver, only now).
        body = {"worker_cls": self.worker_cls} if self.worker_cls is not None else {}
        # Made before any file is written, so that a signal from here on stops it cleanly.
        self.driver = Driver(
            spec,
            n_layers,
            results,
            sum(plan.shards.values()),
            cluster,
            worker_args=self.worker_args,
            **body,
        )
        ident = identity(spec)
        run_info = {
            "spec": str(args.spec),
            "spec_hash": spec_hash(ident),
            "started": now(),
            "versions": versions(),
            "git_commit": git_commit(),
            "ray": cluster.describe(),
            "cluster": dataclasses.asdict(cluster),
            "plan": plan.as_dict(),
            "n_layers": n_layers,
            "identity": ident,
        }
        try:
            results.start(spec, args.spec.read_text(), fresh=args.fresh)
            results.write_run({**run_info, "status": "running"})
        except SinkError as err:
            print(err, file=sys.stderr)
            return EXIT_FAILED
        return self._loop(results, run_info)

    def _loop(self, results: ResultsDir, run_info: dict[str, Any]) -> int:
        from tqdm import tqdm

        from orchestrator.driver import ClusterLost

        driver = self.driver
        t0 = time.time()
        bar = tqdm(
            total=driver.progress.total,
            unit="shard",
            dynamic_ncols=True,
            file=sys.stdout,
            disable=self.quiet,
        )

        def show(progress) -> None:
            bar.total = progress.total
            bar.n = progress.done_before + progress.finished + progress.failed
            bar.set_postfix_str(
                f"finished={progress.finished} failed={progress.failed} running={progress.running}"
                + (f" skipped(done)={progress.done_before}" if progress.done_before else "")
            )
            bar.refresh()

        driver.on_progress = show
        stopped: str | None = None
        try:
            progress = driver.run()
            stopped = progress.stopped
        except SinkError as err:
            bar.close()
            print(err, file=sys.stderr)
            with contextlib.suppress(SinkError):  # the disk may still be full
                results.write_run({**run_info, "status": "stopped: " + str(err).splitlines()[0]})
            return EXIT_FAILED
        except ClusterLost as err:
            progress, stopped = driver.progress, f"cluster lost: {err}"
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop ran
            progress, stopped = driver.progress, "SIGINT"
        bar.close()
        failures = results.failures()
        if stopped is not None:
            status = "interrupted"
        else:
            status = "complete" if not failures and progress.failed == 0 else "incomplete"
        done = progress.done_before + progress.finished
        final = {
            **run_info,
            "status": status,
            "stopped": stopped,
            "finished": now(),
            "wall_s": round(time.time() - t0, 1),
            "shards": {
                "total": progress.total,
                "done": done,
                "done_before": progress.done_before,
                "finished": progress.finished,
                "failed": progress.failed,
            },
            "rows_written": progress.rows,
            "nodes": dict(driver.nodes),
            "failures": failures,
        }
        results.write_run(final)
        if stopped is not None:
            failed = f"{progress.failed} failed" if progress.failed else "none failed"
            self._say(
                f"interrupted ({stopped}): {done} of {progress.total} shards done "
                f"({progress.finished} this run), {failed}; rerun the same command to finish "
                f"the other {progress.total - done}"
            )
        else:
            self._say(
                f"{status}: {progress.finished} shards run, {progress.done_before} already done, "
                f"{progress.failed} failed, {progress.rows:,} rows in {time.time() - t0:.0f} s"
            )
            self._check_prompts(results, final)
        self._say(f"results: {results.root}")
        if failures:
            self._say(
                f"failures: {results.root / 'failures.jsonl'} (rerun the same command to retry)"
            )
        if stopped is not None:
            return EXIT_LOST if stopped.startswith("cluster lost") else EXIT_INTERRUPTED
        self._say(f"next: {analysis_command(results.root)}")
        return EXIT_COMPLETE if status == "complete" else EXIT_FAILED

    def _check_prompts(self, results: ResultsDir, final: dict[str, Any]) -> None:
        """Run the prompt check, print it, and add it to `run.json` (already written with the
        run's status, which a failure here leaves as it is)."""
        from analysis.prompts import format_prompt_check

        self.prompt_check = run_prompt_check(results.root)
        if self.prompt_check is None:
            return
        self._say(format_prompt_check(self.prompt_check))
        try:
            results.write_run({**final, "prompt_check": self.prompt_check})
        except SinkError as err:
            logger.warning("could not add the prompt check to run.json: %s", err)
