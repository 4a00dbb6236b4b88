"""Summarise a run, query it in SQL, and draw its charts.

python -m analysis RESULTS_DIR                 # summary tables, the prompt check (is the
                                               # compared token the answer's?), charts in
                                               # RESULTS_DIR/charts
python -m analysis RESULTS_DIR --sql "SELECT model, avg(correct::INT) FROM behavior GROUP BY 1"
python -m analysis RESULTS_DIR --shell         # type SQL at a prompt; views: programs,
                                               # behavior, patching, attribution,
                                               # knockout, probes, skipped
"""

import argparse
import sys
from pathlib import Path

import duckdb
import pandas as pd

from analysis import charts, prompts, queries, trajectory
from analysis.db import connect
from orchestrator.tasks.errors import ERROR_KINDS

CHARTS = {
    "accuracy_vs_length": (queries.ACCURACY_BY_LENGTH, charts.accuracy_vs_length),
    "accuracy_by_depth": (queries.ACCURACY_BY_DEPTH, charts.accuracy_by_depth),
    "error_kinds": (queries.ERROR_KINDS_BY_DEPTH, charts.error_kinds),
    "patching_heatmap": (queries.HEATMAP_BY_LABEL, charts.patching_heatmap),
    "flip_rate": (queries.FLIP_RATE, charts.flip_rate),
    "heads": (queries.HEADS, charts.heads),
    "attribution_scatter": (queries.ATTRIBUTION_VERIFIED, charts.attribution_scatter),
    "attribution_heatmap": (queries.ATTRIBUTION_HEATMAP, charts.attribution_heatmap),
    "routing_map": (queries.ROUTING_MAP, charts.routing_map),
    # rows only where some (model, site) was patched from a kind besides the root value
    "counterfactual_heatmap": (queries.COUNTERFACTUAL_BY_LABEL, charts.counterfactual_heatmap),
    # rows only where the models have a training step (checkpoints); probes: where probed
    "accuracy_by_step": (trajectory.ACCURACY_BY_STEP, trajectory.accuracy_by_step),
    "root_effect_by_step": (trajectory.ROOT_EFFECT_BY_STEP, trajectory.root_effect_by_step),
    "probes_by_step": (trajectory.PROBES_BY_STEP, trajectory.probes_by_step),
}


def show(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return df.to_json(orient="records", lines=True).rstrip("\n")
    with pd.option_context(
        "display.max_rows", 200, "display.width", 120, "display.float_format", "{:.3f}".format
    ):
        return df.to_string(index=False) if len(df) else "(no rows)"


def error_table(con: duckdb.DuckDBPyConnection) -> str | None:
    """Wrong binding answers per (model, depth) and the share of each kind, or None if none."""
    kinds = queries.run(con, queries.ERROR_KINDS_BY_DEPTH)
    if not len(kinds):
        return None
    table = kinds.pivot_table(
        index=["model", "depth", "wrong"], columns="error_kind", values="share", fill_value=0.0
    )
    table = table[[k for k in ERROR_KINDS if k in table.columns]].reset_index()
    table.columns.name = None
    return "wrong binding answers by kind (share of the wrong answers at each depth)\n" + show(
        table, "table"
    )


def root_heads(con: duckdb.DuckDBPyConnection, include_all: bool) -> str | None:
    """One line per model: the three (layer, head) whose knockout of the root edge moves the
    metric most, or None without knockout rows."""
    top = queries.run(con, queries.TOP_ROOT_HEADS, include_all=include_all, k=3)
    if not len(top):
        return None
    kept = "all programs" if include_all else queries.KNOCKOUT_KEPT_DESCRIPTION
    lines = [
        "knockout of the root edge (source ref_depth_1_rhs, scope answer): the (layer, head) "
        f"that move mean norm_effect most ({kept})"
    ]
    for model, rows in top.groupby("model", sort=True):
        cells = ", ".join(
            f"L{r.layer}H{r.head} {r.mean_effect:+.3f} (n={r.n})" for r in rows.itertuples()
        )
        lines.append(f"  {model}: {cells}")
    return "\n".join(lines)


def _dashes(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its missing values (a step or layer that none reached) printed as `-`."""
    out = df.copy()
    for column in out.columns[out.isna().any()]:
        values = out[column]
        if pd.api.types.is_float_dtype(values):
            out[column] = values.map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
        else:
            out[column] = values.astype(object).where(values.notna(), "-")
    return out


def trajectory_tables(con: duckdb.DuckDBPyConnection, include_all: bool) -> list[str]:
    """The numbers across training: where the shortcut leads most, when the root's value moves
    down the chain, from which layer a probe reads the answer, and each probe's best layer; each
    table only where its query has rows."""
    kept = "all programs" if include_all else queries.KEPT_DESCRIPTION
    tables = [
        (
            trajectory.SHORTCUT_PEAK,
            "shortcut peak: per run, the step where binding accuracy with the root on line 1-2 "
            "most exceeds accuracy with it later (gap), over every depth",
        ),
        (
            trajectory.CHAIN_MOVE,
            f"chain move ({kept}): per run, the first step at which patching the root value at "
            f"{trajectory.CHAIN_MOVE_LABEL} (resid_pre) moves some layer's mean norm_effect above "
            f"{trajectory.CHAIN_MOVE_EFFECT}, and the layer of its largest (-: no step does; "
            "max_effect: the largest over every step)",
        ),
        (
            trajectory.PROBE_FIRST_LAYER,
            f"probe first layer: per checkpoint, the first layer from which a linear probe at "
            f"{trajectory.PROBE_LABEL} reads the {trajectory.PROBE_TARGET} with held-out "
            f"accuracy above {trajectory.PROBE_ACCURACY} (-: no layer does; selectivity: above "
            "the control task)",
        ),
        (
            trajectory.PROBE_BEST_LAYER,
            "probes: the most accurate layer per label at each step (selectivity: accuracy above "
            "the control task's; n_test summed over shards)",
        ),
    ]
    out = []
    for sql, title in tables:
        df = queries.run(con, sql, include_all=include_all)
        if len(df):
            out.append(title + "\n" + show(_dashes(df), "table"))
    return out


def summary(con: duckdb.DuckDBPyConnection, include_all: bool) -> str:
    out = []
    acc = queries.run(con, queries.ACCURACY_BY_LENGTH)
    if len(acc):
        table = acc.pivot_table(index=["model", "task"], columns="seq_len", values="accuracy")
        out.append(
            "accuracy by model x task x program length\n" + show(table.reset_index(), "table")
        )
    errors = error_table(con)
    if errors:
        out.append(errors)
    top = queries.run(con, queries.TOP_CELLS, include_all=include_all, k=5)
    cover = queries.run(con, queries.COVERAGE, include_all=include_all).iloc[0]
    kept = (
        "all programs"
        if include_all
        else (
            f"{queries.KEPT_DESCRIPTION}: {cover.programs_kept} of {cover.programs_all}; "
            "--include-all keeps all"
        )
    )
    if len(top):
        out.append(
            f"top (site, layer, label) cells by mean norm_effect ({kept})\n" + show(top, "table")
        )
    elif cover.rows_all:  # every program filtered out: say so, the prompt check says why
        out.append(f"top (site, layer, label) cells: none ({kept})")
    controls = queries.run(con, queries.COUNTERFACTUAL_CONTROL, include_all=include_all)
    if len(controls):
        out.append(
            "patching effect by counterfactual kind: root_value and query_swap change the answer, "
            "the controls distractor and reassign do not, so their norm_effect (on root_value's "
            f"scale) should be ~0 ({'all programs' if include_all else queries.KEPT_DESCRIPTION}; "
            "max_cell_effect: the largest |mean| of a (layer, label, head) cell)\n"
            + show(controls, "table")
        )
    agreement = queries.run(con, queries.AGREEMENT)
    if len(agreement):
        out.append(
            "attribution estimate against exact patching, verified cells (top_k_recall: share "
            "of a program's k largest |exact| within its 2k largest |estimate|)\n"
            + show(agreement, "table")
        )
    every = queries.run(con, queries.AGREEMENT_ALL_CELLS)
    if len(every):
        out.append(
            "attribution estimate against this run's exact patching, every cell both cover "
            "(top10_in_top20: share of a program's 10 largest |exact| within its 20 largest "
            "|estimate|)\n" + show(every, "table")
        )
    heads = root_heads(con, include_all)
    if heads:
        out.append(heads)
    out.extend(trajectory_tables(con, include_all))
    check = prompts.prompt_check(con)
    if check:
        out.append(prompts.format_prompt_check(check))
    return "\n\n".join(out) or "no results yet"


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
    print(summary(con, args.include_all))
    if args.no_charts:
        return 0
    out = args.out or args.results / "charts"
    written = []
    for name, (sql, draw) in CHARTS.items():
        df = queries.run(con, sql, include_all=args.include_all)
        if len(df):
            written.append(charts.save(draw(df), out, name)[0])
    print("\ncharts: " + (", ".join(str(w) for w in written) if written else "none (no rows)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
