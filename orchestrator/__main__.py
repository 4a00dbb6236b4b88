"""Run a sweep: `python -m orchestrator SPEC [--address A] [--output DIR] [--fresh] [--dry-run]`.

Prints the plan, then one progress bar over shards, then where the results are and the command
that summarises them. Exit status: 0 every shard done; 1 some shards failed (see failures.jsonl);
2 a bad spec or bad arguments (nothing written).
"""

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from orchestrator.plan import Plan, make_plan
from orchestrator.sink import ResultsDir, SinkError, git_commit, now, versions
from orchestrator.spec import SpecError, check_models, load_spec

logger = logging.getLogger("orchestrator")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Run a behaviour / causal-tracing sweep described by a YAML spec.",
    )
    p.add_argument("spec", type=Path, help="the sweep spec (see specs/quickstart.yaml)")
    p.add_argument(
        "--address",
        help="Ray cluster to join (e.g. auto); default: RAY_ADDRESS, else an embedded local Ray",
    )
    p.add_argument("--output", help="results root (default: the spec's output)")
    p.add_argument("--fresh", action="store_true", help="delete this run's results first")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--num-cpus", type=int, help="CPUs for an embedded local Ray")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return p


def print_plan(plan: Plan, out_dir: Path) -> None:
    print(f"sweep {plan.run}: {out_dir}")
    for model in plan.models:
        print(f"  model {model}")
    print(f"  programs: {plan.programs}")
    for kind, n in plan.shards.items():
        if n:
            print(f"  {kind} shards: {n}")
    if plan.shards.get("patching"):
        print(f"  patch rows: ~{plan.patch_rows:,} (estimated from a sample of programs)")
        print(f"  patched forward passes: ~{plan.forward_passes:,} (estimated)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        spec = load_spec(args.spec)
        n_layers = check_models(spec, args.spec)
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    results = ResultsDir(spec.results_dir(args.output))
    plan = make_plan(spec, n_layers)
    print_plan(plan, results.root)
    if args.dry_run:
        return 0

    from tqdm import tqdm

    from orchestrator.driver import Driver, connect

    started = now()
    t0 = time.time()
    try:
        results.start(spec, args.spec.read_text(), fresh=args.fresh)
    except SinkError as err:
        print(err, file=sys.stderr)
        return 1
    how = connect(args.address, num_cpus=args.num_cpus)
    print(f"ray: {how}")
    total = sum(plan.shards.values())
    bar = tqdm(total=total, unit="shard", dynamic_ncols=True, file=sys.stdout)

    def show(progress) -> None:
        bar.total = progress.total
        bar.n = progress.done_before + progress.finished + progress.failed
        bar.set_postfix_str(
            f"finished={progress.finished} failed={progress.failed} running={progress.running}"
            + (f" skipped(done)={progress.done_before}" if progress.done_before else "")
        )
        bar.refresh()

    run_info = {
        "spec": str(args.spec),
        "started": started,
        "versions": versions(),
        "git_commit": git_commit(),
        "ray": how,
        "plan": plan.as_dict(),
    }
    results.write_run({**run_info, "status": "running"})
    driver = Driver(spec, n_layers, results, total, on_progress=show)
    try:
        progress = driver.run()
    except SinkError as err:
        bar.close()
        print(err, file=sys.stderr)
        with contextlib.suppress(SinkError):  # the disk may still be full
            results.write_run({**run_info, "status": "stopped: " + str(err).splitlines()[0]})
        return 1
    bar.close()
    failures = results.failures()
    status = "complete" if not failures and progress.failed == 0 else "incomplete"
    results.write_run(
        {
            **run_info,
            "status": status,
            "finished": now(),
            "wall_s": round(time.time() - t0, 1),
            "shards": {
                "total": progress.total,
                "done_before": progress.done_before,
                "finished": progress.finished,
                "failed": progress.failed,
            },
            "rows_written": progress.rows,
            "nodes": dict(driver.nodes),
            "failures": failures,
        }
    )
    print(
        f"{status}: {progress.finished} shards run, {progress.done_before} already done, "
        f"{progress.failed} failed, {progress.rows:,} rows in {time.time() - t0:.0f} s"
    )
    print(f"results: {results.root}")
    if failures:
        print(f"failures: {results.root / 'failures.jsonl'} (rerun the same command to retry them)")
    print(f"next: python -m analysis {results.root}")
    return 0 if status == "complete" else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
