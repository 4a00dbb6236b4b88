"""Altair small multiples, one function per chart, in one registered theme (Tufte's: data ink
only — no grid, no frames, thin muted axes, direct labels instead of legends where they fit).

Every function takes an aggregated DataFrame (from `queries.py`) and returns a chart; `save`
writes PNG, SVG and HTML through vl-convert. Scales are shared across panels where the panels
are compared (accuracy 0-1; effects on one diverging scale centred on 0). The charts across a
training run's checkpoints are in `trajectory.py`, in this theme.
"""

from pathlib import Path

import altair as alt
import pandas as pd

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


def accuracy_vs_length(df: pd.DataFrame) -> alt.FacetChart:
    """Accuracy against program length, one panel per task, one line per model, labelled at its
    right end."""
    use_theme()
    # Layers carry no data of their own, so that the facet splits all of them.
    base = alt.Chart().encode(
        x=alt.X("seq_len:Q", title="program length (lines)", scale=alt.Scale(zero=False)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", legend=None),
    )
    labels = (
        base.transform_joinaggregate(longest="max(seq_len)", groupby=["task", "model"])
        .transform_filter("datum.seq_len == datum.longest")
        .mark_text(align="left", dx=5, fontSize=9)
        .encode(text="model:N")
    )
    layered = alt.layer(base.mark_line(), base.mark_point(), labels, data=df)
    return (
        layered.properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("task:N", title=None), columns=3)
        .properties(title="Accuracy by program length")
    )


def accuracy_by_depth(df: pd.DataFrame) -> alt.FacetChart:
    """Binding accuracy by referential depth, heuristic vs non-heuristic programs, per model."""
    use_theme()
    data = df.assign(programs=df["heuristic"].map({True: "root on line 1-2", False: "root later"}))
    base = alt.Chart().encode(
        x=alt.X("depth:O", title="referential depth", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "programs:N",
            title=None,
            scale=alt.Scale(range=[INK, "#d95f02"]),
            legend=alt.Legend(orient="bottom"),
        ),
    )
    # Dashed over solid, so that both show where the two groups coincide (e.g. both at 1.0).
    dash = alt.StrokeDash("programs:N", scale=alt.Scale(range=[[1, 0], [5, 4]]), legend=None)
    return (
        alt.layer(base.mark_line().encode(strokeDash=dash), base.mark_point(), data=data)
        .properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("model:N", title=None), columns=3)
        .properties(title="Binding accuracy by chain depth, root on line 1-2 or later")
    )


def error_kinds(df: pd.DataFrame) -> alt.FacetChart:
    """Share of each kind among the wrong binding answers, stacked by referential depth, one
    panel per model, the number of wrong answers above each bar; the kinds stack in their
    priority order (`ERROR_KINDS`)."""
    use_theme()
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
            tooltip=["model", "depth", "error_kind", alt.Tooltip("share:Q", format=".2f"), "n"],
        )
    )
    counts = (
        alt.Chart()
        .transform_aggregate(wrong="max(wrong)", groupby=["model", "depth"])
        .mark_text(dy=-6, fontSize=9, color=MUTED)
        .encode(x=x, y=alt.datum(1), text="wrong:Q")
    )
    return (
        alt.layer(bars, counts, data=df.assign(rank=df["error_kind"].map(rank)))
        .properties(width=PANEL, height=PANEL)
        .facet(facet=alt.Facet("model:N", title=None), columns=3)
        .properties(title="Wrong binding answers by kind and chain depth (number wrong above)")
    )


def _effect_color(df: pd.DataFrame) -> alt.Color:
    """Mean normalized effect on a diverging scale centred on 0, symmetric about it."""
    extent = max(0.05, float(df["mean_effect"].abs().max() or 0)) if len(df) else 1.0
    return alt.Color(
        "mean_effect:Q",
        title="mean normalized effect",
        scale=alt.Scale(scheme=DIVERGING, domain=[-extent, extent], domainMid=0),
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


def _label_heatmap(df: pd.DataFrame, *extra: str) -> alt.Chart:
    """One layer x token label panel of `mean_effect`; `extra` columns join the tooltip."""
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X(
                "label:N",
                title=None,
                sort=_label_order(df["label"].unique()) if len(df) else None,
                axis=alt.Axis(labelAngle=-40),
            ),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=_effect_color(df),
            tooltip=[
                "model",
                "site",
                *extra,
                "layer",
                "label",
                alt.Tooltip("mean_effect:Q", format=".3f"),
                "n",
            ],
        )
        .properties(width=PANEL, height=PANEL)
    )


def patching_heatmap(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label, colour = mean normalized effect, one panel per model and site."""
    use_theme()
    return (
        _label_heatmap(df)
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
        _label_heatmap(data, "kind")
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
        _label_heatmap(data, "counterfactual")
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
    ref-depth label."""
    use_theme()
    base = alt.Chart().encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("flip_rate:Q", title="flip rate", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "label:N",
            title=None,
            sort=_label_order(df["label"].unique()) if len(df) else None,
            legend=alt.Legend(orient="bottom"),
        ),
    )
    return (
        alt.layer(base.mark_line(), base.mark_point(), data=df)
        .properties(width=PANEL, height=PANEL)
        .facet(row=alt.Row("site:N", title=None), column=alt.Column("model:N", title=None))
        .properties(title="Flip rate by layer, for each hop of the chain")
    )


def heads(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x head grid of mean effect at the query variable and the final colon."""
    use_theme()
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=_effect_color(df),
            tooltip=["model", "layer", "head", "label", alt.Tooltip("mean_effect:Q", format=".3f")],
        )
        .properties(width=PANEL, height=PANEL)
        .facet(row=alt.Row("label:N", title=None), column=alt.Column("model:N", title=None))
        .properties(title="Effect of patching each attention head at the query")
    )


def routing_map(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x head grid of the mean normalized effect of blocking the head's attention to one
    source position, one column per source label and one row per model and scope; the colour
    scale is the patching heatmap's."""
    use_theme()
    data = df.assign(panel=_per_model(df, "scope: " + df["scope"]))
    return (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=_effect_color(data),
            tooltip=[
                "model",
                "scope",
                "source",
                "layer",
                "head",
                alt.Tooltip("mean_effect:Q", format=".3f"),
                "n",
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
