"""Preview programs as JSON lines.

python -m orchestrator.tasks binding --seq-len 16 -n 3 --seed 0 --style paper
python -m orchestrator.tasks binding --seq-len 8 -n 8 --stratify depth,heuristic
"""

import argparse
import json
import sys

from orchestrator.tasks import FAMILIES, STYLES, get_family, iter_programs


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.tasks",
        description="Print N programs of a family as JSON lines (one object per program).",
    )
    parser.add_argument("family", choices=sorted(FAMILIES), help="program family")
    parser.add_argument("--seq-len", type=_positive, default=16, help="statement lines (16)")
    parser.add_argument("-n", type=_positive, default=5, help="number of programs (5)")
    parser.add_argument("--seed", type=int, default=0, help="sweep seed (0)")
    parser.add_argument("--start", type=int, default=0, help="first program index (0)")
    parser.add_argument("--style", choices=STYLES, default="seed", help="`a = 5` or `a=5`")
    parser.add_argument("--max-depth", type=_positive, help="binding: deepest chain (1-4)")
    parser.add_argument(
        "--stratify",
        help="binding: cells to balance, comma-separated (depth,heuristic), as the spec's option",
    )
    args = parser.parse_args(argv)
    family = get_family(args.family)
    if args.seq_len < family.min_seq_len:
        parser.error(
            f"--seq-len {args.seq_len} is too short for {args.family}: it needs at least "
            f"{family.min_seq_len} lines"
        )
    options = {"style": args.style}
    if args.max_depth is not None:
        if args.family != "binding":
            parser.error("--max-depth applies to the binding family only")
        if args.max_depth > 4:
            parser.error(f"--max-depth {args.max_depth} is too deep; the binding task has 1-4")
        options["max_depth"] = args.max_depth
    if args.stratify is not None:
        if args.family != "binding":
            parser.error("--stratify applies to the binding family only")
        options["stratify"] = [x.strip() for x in args.stratify.split(",") if x.strip()]
    if args.start < 0:
        parser.error(f"--start {args.start} must be >= 0")
    try:
        for program in iter_programs(
            args.family, args.seed, args.seq_len, args.n, args.start, **options
        ):
            sys.stdout.write(json.dumps(program.to_dict()) + "\n")
    except ValueError as err:  # a bad option value: the family's message names the fix
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
