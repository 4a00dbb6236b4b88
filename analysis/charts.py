"""Altair small multiples, one function per chart, in one registered theme (Tufte's: data ink
only — no grid, no frames, thin muted axes, direct labels instead of legends where they fit).

Every function takes an aggregated DataFrame (from `queries.py`) and returns a chart; `save`
writes PNG, SVG and HTML through vl-convert. One scale per quantity, across every chart: accuracy,
flip rate and share on 0-1, every normalized effect on one diverging scale fixed at -1..1, centred
on 0, values beyond clamped to its ends (so that a colour means one effect on every chart).

Each chart also says how far to trust its numbers, from the columns every aggregate carries
(`programs` behind the row, and each mean `X`'s 95% interval `X_lo`, `X_hi`; see
`analysis.intervals`): a heatmap cell resting on fewer than `MIN_PROGRAMS` programs is light grey
and outlined, never a confident colour; a line carries its interval as a pale band in its colour
and a point of few programs is hollow; tooltips give the interval and `programs` beside the
mean. `subtitle` adds lines under a chart's title (what was filtered, how it was averaged). The
charts across a training run's checkpoints are in `trajectory.py`, in this theme.
"""

from pathlib import Path
from typing import TypeVar

import altair as alt
import pandas as pd

from analysis.intervals import MIN_PROGRAMS
from orchestrator.tasks.counterfactuals import KINDS
from orchestrator.tasks.errors import ERROR_KINDS

THEME = "varbind"
INK = "#333333"
MUTED = "#888888"
FONT = "Helvetica Neue, Helvetica, Arial, sans-serif"
DIVERGING = "blueorange"
# Ordered values (chain depth, training step): light to dark blue, the palest end dark enough to
# read on white; `trajectory._ramp` spreads it over the values present, however few.
SEQUENTIAL = ("#9ecae1", "#08306b")
PANEL = 180
# The shortcut in the project's accent, the other kinds in muted hues, unexplained ones grey.
ERROR_COLORS = {
    "not_a_candidate": INK,
    "stale_binding": "#1b9e77",
    "line_1_2_constant": "#d95f02",
    "distractor_value": "#7570b3",
    "other": "#cccccc",
}
# Every normalized effect on this domain (clamped beyond it): 1 is the whole way from the clean
# answer to the counterfactual one, so a cell past it is as far as the scale need say.
EFFECT_DOMAIN = [-1, 1]
# A cell or point resting on fewer than MIN_PROGRAMS programs: a fixed grey, outlined, so that it
# is told from a near-zero effect (the diverging scale's pale centre); a point hollow.
FEW = f"datum.programs < {MIN_PROGRAMS}"
FEW_FILL = "#e5e5e5"
FEW_STROKE = MUTED
# A line's 95% interval, under it in its colour; the bars of few wrong answers, faded.
BAND_OPACITY = 0.18
FEW_OPACITY = 0.35
FEW_PROGRAMS = f"fewer than {MIN_PROGRAMS} programs"
LINE_KEY = f"band: 95% interval over programs; hollow points: {FEW_PROGRAMS}"

AnyChart = TypeVar("AnyChart", bound=alt.TopLevelMixin)


def use_theme() -> None:
    """Register (once) and enable the project's theme."""
    if THEME not in alt.theme.names():

        @alt.theme.register(THEME, enable=False)
        def _theme() -> alt.theme.ThemeConfig:
            axis = {
                "grid": False,
                "domainColor": MUTED,
                "domainWidth": 0.5,
                "tickColor": MUTED,
                "tickWidth": 0.5,
                "tickSize": 3,
                "labelColor": INK,
                "labelFontSize": 10,
                "titleColor": INK,
                "titleFontSize": 11,
                "titleFontWeight": "normal",
            }
            return {
                "config": {
                    "font": FONT,
                    "background": "white",
                    "view": {"stroke": None},
                    "axis": axis,
                    "header": {
                        "labelFontSize": 11,
                        "titleFontSize": 11,
                        "labelColor": INK,
                        "titleFontWeight": "normal",
                    },
                    "legend": {
                        "labelFontSize": 10,
                        "titleFontSize": 10,
                        "titleFontWeight": "normal",
                        # a swatch in full ink, whichever layer (a pale band) it is drawn from
                        "symbolOpacity": 1,
                    },
                    "title": {
                        "fontSize": 13,
                        "fontWeight": "normal",
                        "anchor": "start",
                        "color": INK,
                    },
                    "line": {"strokeWidth": 1.5},
                    "point": {"size": 18, "filled": True},
                }
            }

    alt.theme.enable(THEME)


def subtitle(chart: AnyChart, lines: list[str], first: bool = False) -> AnyChart:
    """`chart` with `lines` under its title, after the subtitle lines it has (before them if
    `first`), in muted ink.

    Args:
        chart: a top-level chart; its title text (a string, a list of lines or TitleParams) and
            title settings are kept.
        lines: subtitle lines to add, each a string.
        first: put `lines` before the chart's own (a caller's filter above a chart's key).

    Returns:
        A copy of `chart` titled with `alt.TitleParams(text=..., subtitle=[...])`.

    Raises:
        TypeError: `lines` is a string rather than a list of them.
    """
    if isinstance(lines, str):
        raise TypeError(f"subtitle lines must be a list of strings, not the string {lines!r}")
    title = chart.title
    if isinstance(title, alt.TitleParams):
        params = title.to_dict()
    elif isinstance(title, dict):
        params = dict(title)
    else:
        params = {"text": "" if title is alt.Undefined else title}
    before = params.get("subtitle", [])
    before = [before] if isinstance(before, str) else list(before)
    lines = list(lines) + before if first else before + list(lines)
    params |= {"subtitle": lines, "subtitleColor": MUTED, "subtitleFontSize": 10}
    return chart.properties(title=alt.TitleParams(**params))


def _require(df: pd.DataFrame, chart: str, *columns: str) -> None:
    """Raise where `df` lacks a column `chart` draws: without `programs` a thin cell would be
    drawn as confidently as any other."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{chart}: the frame lacks {missing} (it has {list(df.columns)}); select them in its "
            "query: `programs` and each mean's `_lo`, `_hi` (analysis.intervals.summarise)"
        )


def _interval_tooltip(value: str) -> list:
    """The mean `value` with its 95% interval and the programs and rows behind it."""
    return [
        alt.Tooltip(f"{value}:Q", format=".3f"),
        alt.Tooltip(f"{value}_lo:Q", format=".3f"),
        alt.Tooltip(f"{value}_hi:Q", format=".3f"),
        "programs",
        "n",
    ]


def _band(base: alt.Chart, value: str, title: str) -> alt.Chart:
    """`value`'s 95% interval as a pale area in the line's colour, to draw under the line (on the
    line's 0-1 axis; none where the interval is NaN)."""
    return base.mark_area(opacity=BAND_OPACITY).encode(
        y=alt.Y(f"{value}_lo:Q", title=title, scale=alt.Scale(domain=[0, 1])),
        y2=f"{value}_hi:Q",
        tooltip=alt.value(None),
    )


def _points(base: alt.Chart, df: pd.DataFrame) -> list[alt.Chart]:
    """Each row's point: filled, or hollow (white inside, outlined in its colour) where it rests
    on fewer than MIN_PROGRAMS programs, so that such a point never reads like the others. A
    layer that no row of `df` would reach is left out (an empty layer's extent is infinite, and
    Vega warns of it)."""
    few = df["programs"] < MIN_PROGRAMS
    layers = []
    if (~few).any():
        layers.append(base.transform_filter(f"!({FEW})").mark_point())
    if few.any():
        layers.append(
            base.transform_filter(FEW).mark_point(filled=False, fill="white", strokeWidth=1)
        )
    return layers


def accuracy_vs_length(df: pd.DataFrame) -> alt.FacetChart:
    """Accuracy against program length, one panel per task, one line per model, labelled at its
    right end, over its 95% interval band; points of few programs hollow."""
    use_theme()
    _require(df, "accuracy_vs_length", "accuracy_lo", "accuracy_hi", "programs")
    # Layers carry no data of their own, so that the facet splits all of them.
    base = alt.Chart().encode(
        x=alt.X("seq_len:Q", title="program length (lines)", scale=alt.Scale(zero=False)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", legend=None),
        tooltip=["model", "task", "seq_len", *_interval_tooltip("accuracy")],
    )
    labels = (
        base.transform_joinaggregate(longest="max(seq_len)", groupby=["task", "model"])
        .transform_filter("datum.seq_len == datum.longest")
        .mark_text(align="left", dx=5, fontSize=9)
        .encode(text="model:N")
    )
    band = _band(base, "accuracy", "accuracy")
    layered = alt.layer(band, base.mark_line(), *_points(base, df), labels, data=df)
    chart = (
        layered.properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("task:N", title=None), columns=3)
        .properties(title="Accuracy by program length")
    )
    return subtitle(chart, [LINE_KEY])


def accuracy_by_depth(df: pd.DataFrame) -> alt.FacetChart:
    """Binding accuracy by referential depth, heuristic (`root`: root on line 1-2) vs
    non-heuristic programs (root later), per model, each line over its 95% interval band;
    points of few programs hollow."""
    use_theme()
    _require(df, "accuracy_by_depth", "accuracy_lo", "accuracy_hi", "programs")
    data = df.assign(root=df["heuristic"].map({True: "root on line 1-2", False: "root later"}))
    base = alt.Chart().encode(
        x=alt.X("depth:O", title="referential depth", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "root:N",
            title=None,
            scale=alt.Scale(range=[INK, "#d95f02"]),
            legend=alt.Legend(orient="bottom"),
        ),
        tooltip=["model", "depth", "root", *_interval_tooltip("accuracy")],
    )
    # Dashed over solid, so that both show where the two groups coincide (e.g. both at 1.0).
    dash = alt.StrokeDash("root:N", scale=alt.Scale(range=[[1, 0], [5, 4]]), legend=None)
    line = base.mark_line().encode(strokeDash=dash)
    chart = (
        alt.layer(_band(base, "accuracy", "accuracy"), line, *_points(base, data), data=data)
        .properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("model:N", title=None), columns=3)
        .properties(title="Binding accuracy by chain depth, root on line 1-2 or later")
    )
    return subtitle(chart, [LINE_KEY])


def error_kinds(df: pd.DataFrame) -> alt.FacetChart:
    """Share of each kind among the wrong binding answers, stacked by referential depth, one
    panel per model, the number of wrong answers above each bar; the kinds stack in their
    priority order (`ERROR_KINDS`). A bar of fewer than MIN_PROGRAMS wrong answers is faded:
    its shares are a handful of cases."""
    use_theme()
    _require(df, "error_kinds", "wrong", "share_lo", "share_hi")
    assert set(ERROR_COLORS) == set(ERROR_KINDS), f"{sorted(ERROR_COLORS)} != {ERROR_KINDS}"
    rank = {kind: i for i, kind in enumerate(ERROR_KINDS)}
    x = alt.X("depth:O", title="referential depth", axis=alt.Axis(labelAngle=0))
    bars = (
        alt.Chart()
        .mark_bar(width={"band": 0.7})
        .encode(
            x=x,
            y=alt.Y(
                "share:Q",
                title="share of wrong answers",
                stack="zero",
                scale=alt.Scale(domain=[0, 1]),
            ),
            color=alt.Color(
                "error_kind:N",
                title=None,
                scale=alt.Scale(
                    domain=list(ERROR_KINDS), range=[ERROR_COLORS[k] for k in ERROR_KINDS]
                ),
                legend=alt.Legend(orient="bottom"),
            ),
            order=alt.Order("rank:Q"),
            opacity=alt.when(f"datum.wrong < {MIN_PROGRAMS}")
            .then(alt.value(FEW_OPACITY))
            .otherwise(alt.value(1.0)),
            tooltip=["model", "depth", "error_kind", *_interval_tooltip("share"), "wrong"],
        )
    )
    counts = (
        alt.Chart()
        .transform_aggregate(wrong="max(wrong)", groupby=["model", "depth"])
        .mark_text(dy=-6, fontSize=9, color=MUTED)
        .encode(x=x, y=alt.datum(1), text="wrong:Q")
    )
    chart = (
        alt.layer(bars, counts, data=df.assign(rank=df["error_kind"].map(rank)))
        .properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("model:N", title=None), columns=3)
        .properties(title="Wrong binding answers by kind and chain depth (number wrong above)")
    )
    return subtitle(chart, [f"faded: fewer than {MIN_PROGRAMS} wrong answers"])


def _effect_color() -> alt.Color:
    """Mean normalized effect on the diverging scale every effect chart shares (EFFECT_DOMAIN,
    centred on 0, clamped beyond), a cell of few programs in FEW_FILL instead."""
    return (
        alt.when(FEW)
        .then(alt.value(FEW_FILL))
        .otherwise(
            alt.Color(
                "mean_effect:Q",
                # the grey is no colour of the scale: the legend's title says what it means
                title=["mean normalized effect", "(clamped to ±1)", f"grey: {FEW_PROGRAMS}"],
                scale=alt.Scale(scheme=DIVERGING, domain=EFFECT_DOMAIN, domainMid=0, clamp=True),
            )
        )
    )


def _effect_cells(chart: alt.Chart, name: str, df: pd.DataFrame) -> alt.Chart:
    """`chart`'s rects coloured by mean effect, a cell of few programs grey and outlined."""
    _require(df, name, "mean_effect", "mean_effect_lo", "mean_effect_hi", "programs")
    return chart.mark_rect().encode(
        color=_effect_color(),
        stroke=alt.when(FEW).then(alt.value(FEW_STROKE)).otherwise(alt.value(None)),
        strokeWidth=alt.value(0.75),
    )


# Labels after the chain's hops, in program order; the controls' changed digits (`distractor_rhs`,
# `stale_rhs`) beside the chain's constant. Labels not named here come last, sorted.
LABELS_AFTER_HOPS = ("cf_const", "distractor_rhs", "stale_rhs", "query_var", "final_colon", "other")


def _label_order(labels) -> list[str]:
    labels = set(labels)
    refs = sorted(
        (x for x in labels if x.startswith("ref_depth_")), key=lambda x: int(x.split("_")[2])
    )
    rest = [x for x in LABELS_AFTER_HOPS if x in labels]
    return refs + rest + sorted(labels - set(refs) - set(rest))


def _label_heatmap(df: pd.DataFrame, *extra: str, chart: str) -> alt.Chart:
    """One layer x token label panel of `mean_effect` (cells of few programs grey) for the chart
    function named `chart`; `extra` columns join the tooltip."""
    return (
        _effect_cells(alt.Chart(df), chart, df)
        .encode(
            x=alt.X(
                "label:N",
                title=None,
                sort=_label_order(df["label"].unique()) if len(df) else None,
                axis=alt.Axis(labelAngle=-40),
            ),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            tooltip=["model", "site", *extra, "layer", "label", *_interval_tooltip("mean_effect")],
        )
        .properties(width=PANEL, height=PANEL)
    )


def patching_heatmap(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label, colour = mean normalized effect, one panel per model and site."""
    use_theme()
    return (
        _label_heatmap(df, chart="patching_heatmap")
        .facet(row=alt.Row("site:N", title=None), column=alt.Column("model:N", title=None))
        .properties(title="Effect of patching the counterfactual in, by layer and token")
    )


def _per_model(df: pd.DataFrame, panel: pd.Series) -> pd.Series:
    """`panel`, prefixed with the row's model where the frame holds several."""
    return df["model"] + " · " + panel if df["model"].nunique() > 1 else panel


def attribution_heatmap(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label of the mean normalized estimate (`kind` = estimate), beside the exact
    patching effect (`kind` = exact) where the run has it for the site, one row per site; the
    colour scale is the patching heatmap's, shared by both."""
    use_theme()
    data = df.assign(panel=_per_model(df, df["kind"]))
    return (
        _label_heatmap(data, "kind", chart="attribution_heatmap")
        .facet(row=alt.Row("site:N", title=None), column=alt.Column("panel:N", title=None))
        .properties(title="Attribution estimate beside exact patching, by layer and token")
    )


def counterfactual_heatmap(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label of the mean normalized effect, one column per counterfactual kind
    present (in `KINDS` order: root_value, query_swap, distractor, reassign) and one row per site
    (and model, if several), on the patching heatmap's colour scale, shared by every panel. The
    controls' norm_effects are on the root value's scale, so a pale control column is the
    expected result."""
    use_theme()
    data = df.assign(panel=_per_model(df, df["site"]))
    present = set(data["counterfactual"])
    kinds = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    return (
        _label_heatmap(data, "counterfactual", chart="counterfactual_heatmap")
        .facet(
            row=alt.Row("panel:N", title=None),
            column=alt.Column("counterfactual:N", title=None, sort=kinds),
        )
        .properties(
            title="Patching effect by counterfactual: the controls' answer does not change, "
            "so their cells should be ~0"
        )
    )


def _rho(value: float) -> str:
    return "ρ n/a" if pd.isna(value) else f"ρ = {value:.2f}"


def attribution_scatter(df: pd.DataFrame) -> alt.FacetChart:
    """Estimate against exact effect (both in logit-diff units) of the verified cells, one panel
    per site (and model, if several) titled with its Spearman ρ and number of cells `n`; colour:
    why a cell was verified (`top`: among its program's largest estimates, or `random`). The
    dashed diagonal is y = x; each panel has its own scales (heads move less than the stream)."""
    use_theme()
    title = df["site"] + " · " + df["spearman"].map(_rho) + ", n = " + df["n"].astype(str)
    base = alt.Chart()
    points = base.mark_point(opacity=0.6).encode(
        x=alt.X("exact:Q", title="exact effect"),
        y=alt.Y("estimate:Q", title="estimate"),
        color=alt.Color(
            "verify:N",
            title=None,
            scale=alt.Scale(domain=["top", "random"], range=[INK, "#d95f02"]),
            legend=alt.Legend(orient="bottom"),
        ),
        tooltip=["model", "site", "layer", "head", "label", "verify", "estimate", "exact"],
    )
    diagonal = (
        base.transform_calculate(
            low="min(datum.estimate, datum.exact)", high="max(datum.estimate, datum.exact)"
        )
        .transform_aggregate(lo="min(low)", hi="max(high)")
        .mark_rule(color=MUTED, strokeWidth=0.75, strokeDash=[4, 3])
        .encode(x="lo:Q", y="lo:Q", x2="hi:Q", y2="hi:Q")
    )
    return (
        alt.layer(diagonal, points, data=df.assign(panel=_per_model(df, title)))
        .properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("panel:N", title=None), columns=3)
        .resolve_scale(x="independent", y="independent")
        .properties(title="Attribution estimate against exact patching, verified cells")
    )


def flip_rate(df: pd.DataFrame) -> alt.FacetChart:
    """How often the patch makes the counterfactual answer the top token, by layer, one line per
    ref-depth label over its 95% interval band; points of few programs hollow."""
    use_theme()
    _require(df, "flip_rate", "flip_rate_lo", "flip_rate_hi", "programs")
    base = alt.Chart().encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("flip_rate:Q", title="flip rate", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "label:N",
            title=None,
            sort=_label_order(df["label"].unique()) if len(df) else None,
            legend=alt.Legend(orient="bottom"),
        ),
        tooltip=["model", "site", "layer", "label", *_interval_tooltip("flip_rate")],
    )
    band = _band(base, "flip_rate", "flip rate")
    chart = (
        alt.layer(band, base.mark_line(), *_points(base, df), data=df)
        .properties(width=PANEL, height=PANEL)
        .facet(row=alt.Row("site:N", title=None), column=alt.Column("model:N", title=None))
        .properties(title="Flip rate by layer, for each hop of the chain")
    )
    return subtitle(chart, [LINE_KEY])


def heads(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x head grid of the mean normalized effect at the query variable and the final
    colon, on the patching heatmap's colour scale (cells of few programs grey)."""
    use_theme()
    return (
        _effect_cells(alt.Chart(df), "heads", df)
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            tooltip=["model", "layer", "head", "label", *_interval_tooltip("mean_effect")],
        )
        .properties(width=PANEL, height=PANEL)
        .facet(row=alt.Row("label:N", title=None), column=alt.Column("model:N", title=None))
        .properties(title="Effect of patching each attention head at the query")
    )


def routing_map(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x head grid of the mean normalized effect of blocking the head's attention to one
    source position, one column per source label and one row per model and scope; the colour
    scale is the patching heatmap's (cells of few programs grey)."""
    use_theme()
    data = df.assign(panel=_per_model(df, "scope: " + df["scope"]))
    return (
        _effect_cells(alt.Chart(data), "routing_map", data)
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            tooltip=[
                "model",
                "scope",
                "source",
                "layer",
                "head",
                *_interval_tooltip("mean_effect"),
            ],
        )
        .properties(width=PANEL, height=PANEL)
        .facet(
            row=alt.Row("panel:N", title=None),
            column=alt.Column(
                "source:N",
                title=None,
                sort=_label_order(data["source"].unique()) if len(data) else None,
            ),
        )
        .properties(title="Effect of blocking each head's attention to each source")
    )


def save(chart: alt.TopLevelMixin, folder: Path, name: str) -> list[Path]:
    """Write `name`.png, .svg and .html into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg", "html"):
        path = folder / f"{name}.{ext}"
        if ext == "png":
            chart.save(str(path), scale_factor=2)
        else:
            chart.save(str(path))
        paths.append(path)
    return paths
