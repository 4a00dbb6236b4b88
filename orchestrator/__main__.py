"""The orchestrator's command line.

    python -m orchestrator SPEC [--address A] [--output DIR] [--fresh | --extend] [--dry-run]
    python -m orchestrator status RUN_DIR

Running a sweep prints the plan, one progress bar over shards, then where the results are and
the command that summarises them. Exit status: 0 every shard done; 1 some shards failed (see
failures.jsonl) or a result could not be written; 2 a bad spec, bad arguments, a run folder of
another spec, or a folder another driver holds (nothing written); 3 the cluster was lost
(`run.json`: interrupted); 130 stopped by Ctrl-C or SIGTERM (`run.json`: interrupted). After 3
or 130, rerunning the same command finishes the rest.

`status` exits 0 when every shard is done, 1 when some failed, 3 when some are missing, 2 when
the folder is not a run.
"""

import argparse
import logging
import os
import sys
from pathlib import Path


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Run a behaviour / causal-tracing sweep described by a YAML spec "
        "(or `python -m orchestrator status RUN_DIR` to see where a run stands).",
    )
    p.add_argument("spec", type=Path, help="the sweep spec (see specs/quickstart.yaml)")
    p.add_argument(
        "--address",
        help="Ray cluster to join (auto, or host:port); default: RAY_ADDRESS, else a new "
        "embedded local Ray (never another cluster on this machine)",
    )
    p.add_argument("--output", help="results root (default: the spec's output)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--fresh", action="store_true", help="delete this run's results first")
    again.add_argument(
        "--extend",
        action="store_true",
        help="run a spec that adds work (programs, lengths, models, layers, sites) into a "
        "folder of the spec it extends, keeping every finished shard",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--num-cpus", type=int, help="CPUs for an embedded local Ray")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return p


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator status",
        description="Where a run stands: spec hash, shards done/failed/missing per model and "
        "kind, failures, the driver holding the folder. Exit 0 when complete, 1 when shards "
        "failed, 3 when shards are missing, 2 when RUN_DIR is not a run folder.",
    )
    p.add_argument("run_dir", type=Path, help="a run folder, e.g. results/quickstart")
    return p


def status_main(argv: list[str]) -> int:
    from orchestrator.status import EXIT_NOT_A_RUN, NotARun, format_status, read_status

    args = _status_parser().parse_args(argv)
    try:
        st = read_status(args.run_dir)
    except NotARun as err:
        print(err, file=sys.stderr)
        return EXIT_NOT_A_RUN
    print(format_status(st))
    return st.exit_code()


def main(
    argv: list[str] | None = None, worker_cls: type | None = None, worker_args: tuple = ()
) -> int:
    """Parse the command line and run it.

    Args:
        argv: arguments (default: `sys.argv[1:]`).
        worker_cls: the actor body (default `actors.worker.ModelWorker`); tests pass a
            fault-injecting subclass.
        worker_args: extra constructor arguments for `worker_cls`.

    Returns:
        The exit status (see the module docstring).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    args = _run_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    from orchestrator.sweep import Sweep

    if worker_cls is None:
        from actors.worker import ModelWorker

        worker_cls = ModelWorker
    return Sweep(args, worker_cls, worker_args).main()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
