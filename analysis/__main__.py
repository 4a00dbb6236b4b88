"""Summarise a run, query it in SQL, and draw its charts.

python -m analysis RESULTS_DIR                 # summary tables, the prompt check (is the
                                               # compared token the answer's?), charts in
                                               # RESULTS_DIR/charts
python -m analysis RESULTS_DIR --sql "SELECT model, avg(correct::INT) FROM behavior GROUP BY 1"
python -m analysis RESULTS_DIR --report        # one self-contained HTML page: spec, status,
                                               # tables, charts, diagnostics
python -m analysis RESULTS_DIR --shell         # type SQL at a prompt; views: programs,
                                               # behavior, patching, attribution,
                                               # knockout, probes, skipped
"""

import argparse
import sys
from pathlib import Path

import duckdb

from analysis import charts
from analysis.db import connect
from analysis.summary import CHARTS, FIGURES, figures, sections, show, summary

__all__ = ["CHARTS", "FIGURES", "figures", "main", "sections", "summary"]


def shell(con: duckdb.DuckDBPyConnection, fmt: str) -> int:
    print(
        "views: programs, behavior, patching, attribution, knockout, probes, skipped. "
        "End a query with ';'. Ctrl-D quits."
    )
    buffer = ""
    while True:
        try:
            line = input("sql> " if not buffer else "...> ")
        except EOFError:
            print()
            return 0
        buffer += line + "\n"
        if buffer.strip().endswith(";"):
            try:
                print(show(con.execute(buffer).df(), fmt))
            except duckdb.Error as err:
                print(f"error: {err}")
            buffer = ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a run's folder, e.g. results/quickstart")
    p.add_argument("--sql", help="run one query against the views and print the result")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--shell", action="store_true", help="interactive SQL prompt")
    p.add_argument("--out", type=Path, help="where to write charts (default RESULTS/charts)")
    p.add_argument("--no-charts", action="store_true", help="print the summary only")
    p.add_argument(
        "--include-all",
        action="store_true",
        help="keep wrong and heuristic programs in patching aggregates",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write one self-contained HTML page (spec, status, tables, charts) and exit",
    )
    p.add_argument(
        "--report-path", type=Path, help="where to write it (default RESULTS/report.html)"
    )
    args = p.parse_args(argv)
    try:
        con = connect(args.results)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    if args.sql:
        try:
            print(show(con.execute(args.sql).df(), args.format))
        except duckdb.Error as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.shell:
        return shell(con, args.format)
    if args.report:
        from analysis.report import write_report

        path = write_report(args.results, con, args.include_all, args.report_path)
        print(f"report: {path}")
        return 0
    print(summary(con, args.include_all))
    if args.no_charts:
        return 0
    out = args.out or args.results / "charts"
    drawn = figures(con, args.include_all)
    written = [charts.save(chart, out, name)[0] for name, chart in drawn.items()]
    print("\ncharts: " + (", ".join(str(w) for w in written) if written else "none (no rows)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
