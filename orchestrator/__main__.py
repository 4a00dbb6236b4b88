"""The orchestrator's command line.

    python -m orchestrator SPEC [--address A] [--output DIR] [--fresh | --extend] [--dry-run]
    python -m orchestrator SPEC --check-prompts N [--address A]
    python -m orchestrator status RUN_DIR

Running a sweep prints the plan, one progress bar over shards, then the prompt check (see
`analysis.prompts`), where the results are and the command that summarises them. Exit status:
0 every shard done; 1 some shards failed (see failures.jsonl) or a result could not be written;
2 a bad spec, bad arguments, a run folder of another spec, or a folder another driver holds
(nothing written); 3 the cluster was lost (`run.json`: interrupted); 130 stopped by Ctrl-C or
SIGTERM (`run.json`: interrupted). After 3 or 130, rerunning the same command finishes the rest.

`--check-prompts N`, before a long sweep: N programs of each length of each task of the spec,
on each of its models, through behaviour only (the spec's `behavior` settings, or the defaults
where it has none), in a temporary folder that is removed afterwards (the spec's run folder is
never touched); then the prompt check's table. Exit 0 when no (model, task) has more than
`WRONG_PROMPT_SHARE` of its programs' top-1 outside the task's candidate answers, 1 when some
has (or a behaviour shard failed), 2 for a bad spec or arguments, 3 or 130 as above.

`status` exits 0 when every shard is done, 1 when some failed, 3 when some are missing, 2 when
the folder is not a run.
"""

import argparse
import copy
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


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
        help="run a spec that adds work (programs, lengths, models, layers, sites; the new "
        "folders a checkpoints glob matches) into a folder of the spec it extends, keeping "
        "every finished shard",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument(
        "--check-prompts",
        type=int,
        metavar="N",
        help="before a sweep: score N programs of each length of each task on each model "
        "(behaviour only, in a temporary folder; the run folder is not touched) and print, "
        "per (model, task), the share whose top-1 token is none of the task's answers; exit 1 "
        "when some share is above 20%%",  # analysis.prompts.WRONG_PROMPT_SHARE (a test checks)
    )
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


def check_prompts_spec(data: dict[str, Any], n: int, output: Path) -> dict[str, Any]:
    """The spec `--check-prompts N` runs, derived from the user's (parsed YAML, validated).

    Every task with `n` programs per length; behaviour only (every other experiment is
    dropped), with the spec's behaviour settings (or `behavior: {}`'s defaults) but on every
    task and `n` programs a shard; the run named `<run>-check-prompts` under `output`.
    Everything else (models, their options, seed, resources) as the user wrote it.
    """
    derived = copy.deepcopy(data)
    derived["run"] = f"{data['run']}-check-prompts"
    derived["output"] = str(output)
    derived["tasks"] = [{**task, "n": n} for task in data["tasks"]]
    behavior = dict((data.get("experiments") or {}).get("behavior") or {})
    behavior.pop("tasks", None)
    behavior["programs_per_shard"] = n
    derived["experiments"] = {"behavior": behavior}
    return derived


def check_prompts_main(
    args: argparse.Namespace, worker_cls: type | None, worker_args: tuple
) -> int:
    """`--check-prompts N`: the derived behaviour run in a temporary folder, then the table.

    Returns:
        0 no (model, task) above `WRONG_PROMPT_SHARE`; 1 some (or a shard failed); else the
        sweep's own exit status (2 bad spec, 3 cluster lost, 130 interrupted).
    """
    import yaml

    from analysis.prompts import WRONG_PROMPT_SHARE, format_prompt_check, suspect
    from orchestrator.checks import check_backends, check_models
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.sweep import EXIT_COMPLETE, EXIT_FAILED, EXIT_REFUSED, Sweep

    try:  # the user's spec first, so that its problems name its file
        spec = load_spec(args.spec)
        check_models(spec, args.spec)
        check_backends(spec, args.spec)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_REFUSED
    data = yaml.safe_load(args.spec.read_text())
    models = len(spec.models)
    print(
        f"check-prompts: {args.check_prompts} programs of each length of each task on "
        f"{models} model{'s' * (models != 1)}, behaviour only, in a temporary folder "
        f"({spec.results_dir(args.output)} is not touched)"
    )
    with tempfile.TemporaryDirectory(prefix="check-prompts-") as tmp:
        path = Path(tmp) / "spec.yaml"
        derived = check_prompts_spec(data, args.check_prompts, Path(tmp) / "results")
        path.write_text(yaml.safe_dump(derived, sort_keys=False))
        run_args = argparse.Namespace(
            **{**vars(args), "spec": path, "output": None, "fresh": False, "extend": False}
        )
        sweep = Sweep(run_args, worker_cls, worker_args, quiet=True)
        code = sweep.main()
        rows = sweep.prompt_check
    if rows:
        print(format_prompt_check(rows))
    if code != EXIT_COMPLETE:
        print(
            f"check-prompts: the behaviour run did not complete (exit {code}); the table covers "
            "the programs that were scored",
            file=sys.stderr,
        )
        return code
    if rows is None:
        print("check-prompts: the prompt check failed (see the warning above)", file=sys.stderr)
        return EXIT_FAILED
    if not rows:
        print("check-prompts: no behaviour rows were written; nothing to check", file=sys.stderr)
        return EXIT_FAILED
    if suspect(rows):
        return EXIT_FAILED
    print(f"check-prompts: no (model, task) above {WRONG_PROMPT_SHARE:.0%}")
    return EXIT_COMPLETE


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
    parser = _run_parser()
    args = parser.parse_args(argv)
    if args.check_prompts is not None:
        if args.check_prompts < 1:
            parser.error(f"--check-prompts {args.check_prompts}: give a number of programs >= 1")
        flags = {"fresh": "--fresh", "extend": "--extend", "dry_run": "--dry-run"}
        clash = [flag for key, flag in flags.items() if getattr(args, key)]
        if clash:
            parser.error(
                f"--check-prompts runs in a temporary folder of its own; drop {', '.join(clash)}"
            )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    from orchestrator.sweep import Sweep

    # worker_cls None: the sweep imports the actor body (torch, transformers: seconds) only once
    # the spec has passed its checks, so that a bad spec fails at once.
    if args.check_prompts is not None:
        return check_prompts_main(args, worker_cls, worker_args)
    return Sweep(args, worker_cls, worker_args).main()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
