"""The summary of a run: its tables (each mean with its programs and 95% interval) and its
charts (each with a subtitle that names its filter, the programs it keeps of those it could read,
and its aggregation), for the command line (`python -m analysis`) and the report page
(`report.py`)."""

import dataclasses
from collections.abc import Callable

import altair as alt
import duckdb
import pandas as pd

from analysis import charts, prompts, queries, trajectory
from analysis.intervals import HI, LO, MIN_PROGRAMS, RESAMPLES
from orchestrator.tasks.errors import ERROR_KINDS

# The programs behind a chart, per model: `programs` it could read, `kept` by its filter.
_EVERY = "count(DISTINCT (task, seq_len, program))"
BEHAVIOR_COVER = f"""
SELECT model, {_EVERY} AS programs, {_EVERY} AS kept FROM behavior GROUP BY model ORDER BY model
"""
BINDING_COVER = f"""
SELECT model, {_EVERY} AS programs, {_EVERY} AS kept
FROM behavior WHERE task = 'binding' GROUP BY model ORDER BY model
"""
STEP_COVER = f"""
SELECT model, {_EVERY} AS programs, {_EVERY} AS kept
FROM behavior WHERE task = 'binding' AND step IS NOT NULL GROUP BY model ORDER BY model
"""
WRONG_COVER = f"""
SELECT model, {_EVERY} AS programs,
       count(DISTINCT (task, seq_len, program)) FILTER (
           WHERE NOT correct AND error_kind IS NOT NULL
       ) AS kept
FROM behavior WHERE task = 'binding' GROUP BY model ORDER BY model
"""
VERIFIED_COVER = f"""
SELECT model, {_EVERY} AS programs,
       count(DISTINCT (task, seq_len, program)) FILTER (WHERE exact IS NOT NULL) AS kept
FROM attribution GROUP BY model ORDER BY model
"""
KEPT_SHORT = "programs whose top-1 is the answer in both runs, root not on line 1-2"
KNOCKOUT_SHORT = "programs whose top-1 is the answer, root not on line 1-2"


@dataclasses.dataclass(frozen=True)
class Figure:
    """A chart: its query and drawing, and what its subtitle says of the programs behind it.

    Attributes:
        query: the aggregate (`queries.run`).
        draw: frame -> chart.
        cover: SQL of one row per model: `programs` it could read, `kept` by its filter, or
            None where the chart's rows are not programs (probes).
        kept: the filter in words (`$include_all` drops it where `filtered`).
        notes: the aggregation in words, one line each.
        filtered: whether `--include-all` lifts the filter (patching, attribution, knockout).
    """

    query: "str | queries.Sql | queries.Aggregate"
    draw: Callable[[pd.DataFrame], alt.TopLevelMixin]
    cover: str | None
    kept: str
    notes: tuple[str, ...] = ()
    filtered: bool = False


_PATCHED = queries.kept_of("patching")
FIGURES = {
    "accuracy_vs_length": Figure(
        queries.ACCURACY_BY_LENGTH,
        charts.accuracy_vs_length,
        BEHAVIOR_COVER,
        "all programs",
    ),
    "accuracy_by_depth": Figure(
        queries.ACCURACY_BY_DEPTH,
        charts.accuracy_by_depth,
        BINDING_COVER,
        "all binding programs",
    ),
    "error_kinds": Figure(
        queries.ERROR_KINDS_BY_DEPTH,
        charts.error_kinds,
        WRONG_COVER,
        "wrong binding answers (programs)",
    ),
    "patching_heatmap": Figure(
        queries.HEATMAP_BY_LABEL,
        charts.patching_heatmap,
        _PATCHED,
        KEPT_SHORT,
        (queries.BY_LABEL_DESCRIPTION,),
        True,
    ),
    "flip_rate": Figure(
        queries.FLIP_RATE,
        charts.flip_rate,
        _PATCHED,
        KEPT_SHORT,
        ("share of a label's patches that make the counterfactual's answer the top-1",),
        True,
    ),
    "heads": Figure(
        queries.HEADS,
        charts.heads,
        _PATCHED,
        KEPT_SHORT,
        ("mean over programs of each head's patch at the label's position",),
        True,
    ),
    "attribution_scatter": Figure(
        queries.ATTRIBUTION_VERIFIED,
        charts.attribution_scatter,
        VERIFIED_COVER,
        "programs with verified cells, right and wrong alike",
    ),
    "attribution_heatmap": Figure(
        queries.ATTRIBUTION_HEATMAP,
        charts.attribution_heatmap,
        queries.kept_of("attribution"),
        KEPT_SHORT,
        (queries.BY_LABEL_DESCRIPTION,),
        True,
    ),
    "routing_map": Figure(
        queries.ROUTING_MAP,
        charts.routing_map,
        queries.kept_of("knockout", correct=queries.KNOCKOUT_CORRECT),
        KNOCKOUT_SHORT,
        ("mean over programs of blocking the head's attention to the source",),
        True,
    ),
    # rows only where some (model, site) was patched from a kind besides the root value
    "counterfactual_heatmap": Figure(
        queries.COUNTERFACTUAL_BY_LABEL,
        charts.counterfactual_heatmap,
        queries.kept_of("patching", rows="true"),
        KEPT_SHORT + " (every kind)",
        (queries.BY_LABEL_DESCRIPTION,),
        True,
    ),
    # rows only where the models have a training step (checkpoints); probes: where probed
    "accuracy_by_step": Figure(
        trajectory.ACCURACY_BY_STEP,
        trajectory.accuracy_by_step,
        STEP_COVER,
        "all binding programs",
    ),
    "root_effect_by_step": Figure(
        trajectory.ROOT_EFFECT_BY_STEP,
        trajectory.root_effect_by_step,
        _PATCHED,
        KEPT_SHORT,
        ("mean over programs' positions of each label",),
        True,
    ),
    "probes_by_step": Figure(
        trajectory.PROBES_BY_STEP,
        trajectory.probes_by_step,
        None,
        "held-out programs of each probe (n_test)",
    ),
}
# name -> (query, draw), as before `Figure`.
CHARTS = {name: (f.query, f.draw) for name, f in FIGURES.items()}


def count_line(kept: str, cover: pd.DataFrame) -> str:
    """`<kept>: K of N` (`K` where the filter keeps all), per model where there are two or
    three, as a range beyond."""
    if not len(cover):
        return f"{kept}: none"
    pairs = [
        f"{int(r.kept)}" if r.kept == r.programs else f"{int(r.kept)} of {int(r.programs)}"
        for r in cover.itertuples()
    ]
    if len(cover) == 1:
        return f"{kept}: {pairs[0]}"
    if len(cover) <= 3:
        return f"{kept}: " + ", ".join(
            f"{p} ({m})" for p, m in zip(pairs, cover["model"], strict=True)
        )
    return (
        f"{kept}: {int(cover.kept.min())}-{int(cover.kept.max())} of "
        f"{int(cover.programs.min())}-{int(cover.programs.max())} per model "
        f"({len(cover)} models)"
    )


def subtitle_lines(
    con: duckdb.DuckDBPyConnection, figure: Figure, include_all: bool, df: pd.DataFrame
) -> list[str]:
    """The chart's subtitle: its filter with the programs it keeps of those it could read, then
    its aggregation."""
    kept = "all programs" if include_all and figure.filtered else figure.kept
    if figure.cover is None:
        first = f"{kept}: {int(df['programs'].min())}-{int(df['programs'].max())} per probe"
    else:
        first = count_line(kept, queries.run(con, figure.cover, include_all=include_all))
    return [first, *figure.notes]


def figures(con: duckdb.DuckDBPyConnection, include_all: bool) -> dict[str, alt.TopLevelMixin]:
    """Every chart that has rows, with its subtitle, by name."""
    out = {}
    for name, figure in FIGURES.items():
        df = queries.run(con, figure.query, include_all=include_all)
        if len(df):
            lines = subtitle_lines(con, figure, include_all, df)
            out[name] = charts.subtitle(figure.draw(df), lines, first=True)
    return out


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the summary: a title and a table (or a text)."""

    title: str
    table: pd.DataFrame | None = None
    text: str | None = None

    def render(self) -> str:
        if self.table is None:
            return "\n".join(part for part in (self.title, self.text) if part)
        body = show(_dashes(with_intervals(self.table)), "table")
        few = few_programs(self.table)
        note = (
            f"\n({few} of {len(self.table)} rows rest on fewer than {MIN_PROGRAMS} programs)"
            if few
            else ""
        )
        return f"{self.title}\n{body}{note}"


def show(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return df.to_json(orient="records", lines=True).rstrip("\n")
    with pd.option_context(
        "display.max_rows", 200, "display.width", 160, "display.float_format", "{:.3f}".format
    ):
        return df.to_string(index=False) if len(df) else "(no rows)"


def _bounds(lo: float, hi: float, digits: int = 3) -> str:
    return "-" if pd.isna(lo) or pd.isna(hi) else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with each mean's `X_lo`, `X_hi` printed as one column `X 95% CI`, after `X`."""
    out = df.copy()
    for column in list(out.columns):
        lo, hi = column + LO, column + HI
        if lo in out.columns and hi in out.columns:
            text = [_bounds(a, b) for a, b in zip(out[lo], out[hi], strict=True)]
            out = out.drop(columns=[lo, hi])
            out.insert(list(out.columns).index(column) + 1, f"{column} 95% CI", text)
    return out


def few_programs(df: pd.DataFrame) -> int:
    """Rows of `df` that rest on fewer than `MIN_PROGRAMS` programs."""
    return int((df["programs"] < MIN_PROGRAMS).sum()) if "programs" in df.columns else 0


def error_section(con: duckdb.DuckDBPyConnection) -> Section | None:
    """Wrong binding answers per (model, depth), the share of each kind with its interval, or
    None if none."""
    kinds = queries.run(con, queries.ERROR_KINDS_BY_DEPTH)
    if not len(kinds):
        return None
    cell = kinds.assign(
        text=[
            f"{s:.2f} {_bounds(a, b, 2)}".removesuffix(" -")
            for s, a, b in zip(
                kinds["share"], kinds["share" + LO], kinds["share" + HI], strict=True
            )
        ]
    )
    table = cell.pivot_table(
        index=["model", "depth", "wrong"], columns="error_kind", values="text", aggfunc="first"
    )
    table = table[[k for k in ERROR_KINDS if k in table.columns]].reset_index().fillna("0.00")
    table.columns.name = None
    return Section(
        "wrong binding answers by kind (share of the wrong answers at each depth, 95% CI over "
        "them; wrong: their number)",
        table,
    )


def root_heads(con: duckdb.DuckDBPyConnection, include_all: bool) -> Section | None:
    """The three (layer, head) per model whose knockout of the root edge moves the metric most,
    or None without knockout rows."""
    top = queries.run(con, queries.TOP_ROOT_HEADS, include_all=include_all, k=3)
    if not len(top):
        return None
    kept = "all programs" if include_all else queries.KNOCKOUT_KEPT_DESCRIPTION
    return Section(
        "knockout of the root edge (source ref_depth_1_rhs, scope answer): the (layer, head) "
        f"that move mean norm_effect most ({kept})",
        top[
            [
                "model",
                "layer",
                "head",
                "mean_effect",
                "mean_effect" + LO,
                "mean_effect" + HI,
                "programs",
                "n",
            ]
        ],
    )


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


def trajectory_sections(con: duckdb.DuckDBPyConnection, include_all: bool) -> list[Section]:
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
            "the control task; 95% CI: Wilson's, over the n_test held-out programs)",
        ),
        (
            trajectory.PROBE_BEST_LAYER,
            "probes: the most accurate layer per label at each step (selectivity: accuracy above "
            "the control task's; n_test summed over shards; 95% CI: Wilson's over them)",
        ),
    ]
    out = []
    for query, title in tables:
        df = queries.run(con, query, include_all=include_all)
        if len(df):
            out.append(Section(title, df))
    return out


def sections(con: duckdb.DuckDBPyConnection, include_all: bool) -> list[Section]:
    """The summary's parts, in order: each aggregate with its programs and 95% intervals."""
    out = []
    acc = queries.run(con, queries.ACCURACY_BY_LENGTH)
    if len(acc):
        out.append(Section("accuracy by model x task x program length", acc))
    errors = error_section(con)
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
        out.append(Section(f"top (site, layer, label) cells by mean norm_effect ({kept})", top))
    elif cover.rows_all:  # every program filtered out: say so, the prompt check says why
        out.append(Section(f"top (site, layer, label) cells: none ({kept})"))
    kinds_kept = "all programs" if include_all else queries.KEPT_DESCRIPTION
    tables = [
        (
            queries.COUNTERFACTUAL_CONTROL,
            "patching effect by counterfactual kind: root_value and query_swap change the "
            "answer, the controls distractor and reassign do not, so their norm_effect (on "
            f"root_value's scale) should be ~0 ({kinds_kept}; max_cell_effect: the largest "
            "|mean| of a (layer, label, head) cell)",
        ),
        (
            queries.AGREEMENT,
            "attribution estimate against exact patching, verified cells (top_k_recall: share "
            "of a program's k largest |exact| within its 2k largest |estimate|, mean over "
            "programs)",
        ),
        (
            queries.AGREEMENT_ALL_CELLS,
            "attribution estimate against this run's exact patching, every cell both cover "
            "(top10_in_top20: share of a program's 10 largest |exact| within its 20 largest "
            "|estimate|, mean over programs)",
        ),
    ]
    for query, title in tables:
        df = queries.run(con, query, include_all=include_all)
        if len(df):
            out.append(Section(title, df))
    heads = root_heads(con, include_all)
    if heads:
        out.append(heads)
    out.extend(trajectory_sections(con, include_all))
    check = prompts.prompt_check(con)
    if check:
        out.append(Section("", text=prompts.format_prompt_check(check)))
    return out


def summary(con: duckdb.DuckDBPyConnection, include_all: bool) -> str:
    parts = [section.render() for section in sections(con, include_all)]
    if not parts:
        return "no results yet"
    return "\n\n".join(parts) + (
        f"\n\n95% CI: percentile bootstrap over programs, {RESAMPLES} resamples, seeded "
        "(analysis/intervals.py); probes: Wilson's interval over held-out programs"
    )
