"""The queries and charts of a sweep across a training run's checkpoints: how behaviour, the
root value's patching effect and linear probes change with the training step.

Each checkpoint is its own model id (`models/binding-traj-step1000`) with its training `step`;
`run` is the model id without its `-step<N>` suffix, so that a sweep over two training runs'
checkpoints draws one series per run. Behaviour and patching aggregates (`*_BY_STEP` and the
summary's `SHORTCUT_PEAK`, `CHAIN_MOVE`) read only models with a step; probe ones
(`PROBES_BY_STEP`, `PROBE_BEST_LAYER`, `PROBE_FIRST_LAYER`) read every model (step NULL, sorted
last, for one without), a probe's layer profile being worth reading at one step too. Patching
ones keep the programs `queries.py` keeps (`$include_all` as there); run them with
`queries.run`. The charts share the theme and scales of `charts.py`, and draw how far to
trust each number as its charts do (interval bands, hollow or grey where programs are few).
"""

import dataclasses

import altair as alt
import duckdb
import pandas as pd

from analysis.charts import (
    FEW_PROGRAMS,
    LINE_KEY,
    MUTED,
    PANEL,
    SEQUENTIAL,
    _band,
    _interval_tooltip,
    _label_heatmap,
    _label_order,
    _points,
    _require,
    subtitle,
    use_theme,
)
from analysis.intervals import HI, LO, wilson
from analysis.queries import Aggregate, Sql, _kept, _with

# The training run a checkpoint belongs to: its model id without the `-step<N>` suffix.
RUN = "regexp_replace(model, '-step[0-9]+$', '')"

# Binding accuracy by (run, step, model, depth, heuristic), over the models with a step.
ACCURACY_BY_STEP = Aggregate(
    "",
    f"(SELECT *, {RUN} AS run FROM behavior)",
    ("run", "step", "model", "depth", "heuristic"),
    {"accuracy": "correct::INTEGER"},
    where="task = 'binding' AND step IS NOT NULL",
)

# Patching the root value's counterfactual into the residual stream (`resid_pre`), over the kept
# programs of each checkpoint: mean norm_effect by (run, step, model, layer, label).
ROOT_EFFECT_BY_STEP = Aggregate(
    _with(kept=_kept("patching"), runs=f"SELECT *, {RUN} AS run FROM kept"),
    "runs",
    ("run", "step", "model", "site", "layer", "label"),
    {"mean_effect": "norm_effect"},
    where="site = 'resid_pre' AND step IS NOT NULL",
    order=("run", "step", "model", "layer", "label"),
)


def _with_wilson(df: pd.DataFrame) -> pd.DataFrame:
    """`accuracy_lo`, `accuracy_hi`: Wilson's interval over the `n_test` held-out programs
    (`intervals.wilson`), and `programs` = `n_test`."""
    lo, hi = wilson(df["accuracy"], df["n_test"])
    at = list(df.columns).index("accuracy") + 1
    out = df.copy()
    out.insert(at, "accuracy" + LO, lo)
    out.insert(at + 1, "accuracy" + HI, hi)
    return out.assign(programs=out["n_test"])


# Probes by (run, step, model, layer, label, target): a probe is fitted per shard (one task and
# program length), so accuracies are averaged over shards and lengths weighted by their held-out
# programs (`n_test`, summed); selectivity is accuracy above the control task's.
_PROBED = f"""
    SELECT {RUN} AS run, step, model, layer, label, target,
           sum(accuracy::DOUBLE * n_test) / sum(n_test) AS accuracy,
           sum(control_accuracy::DOUBLE * n_test) / sum(n_test) AS control_accuracy,
           sum(chance::DOUBLE * n_test) / sum(n_test) AS chance,
           sum(n_test)::BIGINT AS n_test
    FROM probes
    GROUP BY run, step, model, layer, label, target
"""
_ACCURACIES = """accuracy, control_accuracy, accuracy - control_accuracy AS selectivity, chance,
       n_test"""
PROBES_BY_STEP = Sql(
    _with(probed=_PROBED)
    + f"""
SELECT run, step, model, layer, label, target, {_ACCURACIES}
FROM probed
ORDER BY run, step NULLS LAST, model, label, target, layer
""",
    _with_wilson,
)

# Per (run, step, model, label, target), the layer whose probe is most accurate (ties: the
# earliest).
PROBE_BEST_LAYER = Sql(
    _with(probed=_PROBED)
    + f"""
SELECT run, step, model, label, target, layer, {_ACCURACIES}
FROM probed
QUALIFY row_number() OVER (
    PARTITION BY run, step, model, label, target ORDER BY accuracy DESC, layer
) = 1
ORDER BY run, step NULLS LAST, model, label, target
""",
    _with_wilson,
)

_GROUP_COUNTS = f"""
SELECT {RUN} AS run, step, model, count(*) FILTER (WHERE heuristic) AS n_heuristic,
       count(*) FILTER (WHERE NOT heuristic) AS n_non_heuristic
FROM behavior
WHERE task = 'binding' AND step IS NOT NULL
GROUP BY ALL
"""


def _peak(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
    """Per run, the step of the largest gap (ties: the earliest step), with each group's count."""
    counts = con.execute(_GROUP_COUNTS).df()
    both = df.dropna(subset=["heuristic_accuracy", "non_heuristic_accuracy"])
    both = both.assign(gap=both["heuristic_accuracy"] - both["non_heuristic_accuracy"])
    peaks = (
        both.sort_values(["run", "gap", "step", "model"], ascending=[True, False, True, True])
        .groupby("run")
        .head(1)
        .drop(columns=["programs", "n"])
        .merge(counts, on=["run", "step", "model"], how="left")
    )
    return peaks.sort_values("run").reset_index(drop=True)


# Per run, the step at which binding accuracy on heuristic programs (root on line 1 or 2, where
# "answer the constant of line 1-2" is right) most exceeds accuracy on the others, over every
# depth: where the shortcut leads the lookup most (ties: the earliest step); each accuracy with
# its interval over its programs (the gap, a difference of two, has none). Runs whose steps lack
# either kind of program have no row.
SHORTCUT_PEAK = dataclasses.replace(
    ACCURACY_BY_STEP,
    by=("run", "step", "model"),
    values={
        "heuristic_accuracy": "CASE WHEN heuristic THEN correct::INTEGER END",
        "non_heuristic_accuracy": "CASE WHEN NOT heuristic THEN correct::INTEGER END",
    },
    post=_peak,
)

# The root's value has moved down the chain once patching it at the second hop's right-hand side
# (the variable the root is copied into) moves some layer's mean norm_effect above this: half of
# the way from the clean answer to the counterfactual one.
CHAIN_MOVE_LABEL = "ref_depth_2_rhs"
CHAIN_MOVE_EFFECT = 0.5


def _first_move(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
    hop = df[df["mean_effect"].notna()]
    runs = hop.groupby("run", as_index=False).agg(
        max_effect=("mean_effect", "max"), steps=("step", "nunique")
    )
    moved = (
        hop[hop["mean_effect"] > CHAIN_MOVE_EFFECT]
        .assign(_key=lambda d: -d["mean_effect"])
        .sort_values(["run", "step", "_key", "layer"])
        .groupby("run")
        .head(1)
    )
    columns = ["step", "model", "layer", "mean_effect", "mean_effect" + LO, "mean_effect" + HI]
    columns += ["programs", "n"]
    out = runs.merge(moved[["run", *columns]], on="run", how="left")
    # whole numbers stay whole where a run has no step past the threshold (NULL)
    out = out.astype({c: "Int64" for c in ("step", "layer", "programs", "n")})
    return out[["run", *columns, "max_effect", "steps"]].sort_values("run")


# Per run with CHAIN_MOVE_LABEL cells: the first step at which some layer's mean norm_effect there
# exceeds CHAIN_MOVE_EFFECT, with the layer of its largest, that mean, its interval and programs
# (ties: the earliest layer); step, model, layer and mean_effect are NULL where no step does.
# `max_effect`: the largest mean at the label over every step and layer; `steps`: the steps with
# cells there.
CHAIN_MOVE = dataclasses.replace(
    ROOT_EFFECT_BY_STEP,
    where=f"{ROOT_EFFECT_BY_STEP.where} AND label = '{CHAIN_MOVE_LABEL}'",
    post=_first_move,
)

# The answer can be read off the final colon by a linear probe from the first layer whose
# held-out accuracy exceeds this (the control task's accuracy and the selectivity are printed
# beside it, to judge whether the probe reads the answer or memorizes).
PROBE_ACCURACY = 0.9
PROBE_LABEL, PROBE_TARGET = "final_colon", "answer"

# Per (run, step, model) with PROBE_LABEL probes of PROBE_TARGET: the first layer whose accuracy
# exceeds PROBE_ACCURACY, with its accuracies and interval (NULL where no layer's does);
# `max_accuracy`: the best layer's.
PROBE_FIRST_LAYER = Sql(
    _with(
        probed=_PROBED,
        colon=f"""
    SELECT * FROM probed
    WHERE label = '{PROBE_LABEL}' AND target = '{PROBE_TARGET}' AND accuracy IS NOT NULL
""",
        checkpoints="""
    SELECT run, step, model, max(accuracy) AS max_accuracy FROM colon GROUP BY run, step, model
""",
        crossing=f"""
    SELECT * FROM colon
    WHERE accuracy > {PROBE_ACCURACY}
    QUALIFY row_number() OVER (PARTITION BY run, step, model ORDER BY layer) = 1
""",
    )
    + """
SELECT c.run, c.step, c.model, f.layer, f.accuracy, f.control_accuracy,
       f.accuracy - f.control_accuracy AS selectivity, f.n_test, c.max_accuracy
FROM checkpoints AS c
LEFT JOIN crossing AS f
  ON c.run = f.run AND c.step IS NOT DISTINCT FROM f.step AND c.model = f.model
ORDER BY c.run, c.step NULLS LAST, c.model
""",
    _with_wilson,
)


def _ramp(domain: list) -> alt.Scale:
    """An ordinal colour scale over `domain`, in its order, from the light to the dark end of
    `SEQUENTIAL` (the dark end alone for one value)."""
    light, dark = ([int(color[i : i + 2], 16) for i in (1, 3, 5)] for color in SEQUENTIAL)

    def mix(t: float) -> str:
        return "#" + "".join(
            f"{round(a + (b - a) * t):02x}" for a, b in zip(light, dark, strict=True)
        )

    n = len(domain)
    return alt.Scale(domain=domain, range=[mix(i / (n - 1) if n > 1 else 1.0) for i in range(n)])


def _step_scale(df: pd.DataFrame) -> alt.Scale:
    """Steps are log-spaced: a log axis, or a symmetric-log one where step 0 (the initial
    weights) is among them, which no log axis can place."""
    return alt.Scale(type="log") if (df["step"] > 0).all() else alt.Scale(type="symlog")


def _checkpoints(df: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Each row's step as a label (`no step` for a model without one), and the labels in step
    order, for an ordinal encoding that sorts as the steps do."""
    labels = df["step"].map(lambda s: "no step" if pd.isna(s) else str(int(s)))
    steps = sorted(df["step"].dropna().unique())
    order = [str(int(s)) for s in steps] + (["no step"] if df["step"].isna().any() else [])
    return labels, order


def accuracy_by_step(df: pd.DataFrame) -> alt.FacetChart:
    """Binding accuracy against training step (log axis), one line per referential depth (darker:
    deeper) over its 95% interval band, points of few programs hollow; one column (`root`) for
    programs with the root on line 1-2 (where the shortcut answers right) and one for the
    others, one row per training run."""
    use_theme()
    _require(df, "accuracy_by_step", "accuracy_lo", "accuracy_hi", "programs")
    data = df.assign(root=df["heuristic"].map({True: "root on line 1-2", False: "root later"}))
    depths = sorted(int(d) for d in df["depth"].unique())
    base = alt.Chart().encode(
        x=alt.X("step:Q", title="training step", scale=_step_scale(df)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        # a legend, not labels at the lines' ends: the depths often end at one accuracy
        color=alt.Color(
            "depth:O", title="depth", scale=_ramp(depths), legend=alt.Legend(orient="bottom")
        ),
        tooltip=["model", "step", "depth", "root", *_interval_tooltip("accuracy")],
    )
    band = _band(base, "accuracy", "accuracy")
    chart = (
        alt.layer(band, base.mark_line(), *_points(base, data), data=data)
        .properties(width=PANEL, height=PANEL)
        .facet(
            row=alt.Row("run:N", title=None),
            column=alt.Column("root:N", title=None, sort=["root on line 1-2", "root later"]),
        )
        .properties(title="Binding accuracy across training, by chain depth")
    )
    return subtitle(chart, [LINE_KEY])


def root_effect_by_step(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label of the mean normalized effect of patching the root value into the
    residual stream, one panel per checkpoint in step order (prefixed with the run where there
    are several), on the patching heatmap's colour scale, shared by every panel (cells of few
    programs grey)."""
    use_theme()
    panel = "step " + df["step"].astype("int64").astype(str)
    if df["run"].nunique() > 1:
        panel = df["run"] + " · " + panel
    data = df.assign(panel=panel)
    order = list(dict.fromkeys(data.sort_values(["run", "step"])["panel"]))
    return (
        _label_heatmap(data, "step", chart="root_effect_by_step")
        .facet(facet=alt.Facet("panel:N", title=None, sort=order), columns=5)
        .properties(title="Effect of patching the root value into the residual stream, by step")
    )


def probes_by_step(df: pd.DataFrame) -> alt.FacetChart:
    """Held-out accuracy of a linear probe on the residual stream entering each layer, one line
    per step (darker: later) over its 95% Wilson interval band over the held-out programs
    (`programs` = `n_test`), points of few programs hollow; one column per position label, one
    row per training run; the control task's accuracy in grey dashes (one per step),
    majority-class chance dotted."""
    use_theme()
    _require(df, "probes_by_step", "accuracy_lo", "accuracy_hi", "programs")
    labels, order = _checkpoints(df)
    data = df.assign(checkpoint=labels)
    title = "layer (residual stream entering it; the last: leaving the last layer)"
    x = alt.X("layer:Q", title=title, axis=alt.Axis(tickMinStep=1))
    accuracy = alt.Chart().encode(
        x=x,
        y=alt.Y("accuracy:Q", title="probe accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "checkpoint:O",
            title="step",
            sort=order,
            scale=_ramp(order),
            legend=alt.Legend(orient="bottom"),
        ),
        tooltip=[
            "model",
            "step",
            "layer",
            "label",
            "target",
            alt.Tooltip("accuracy:Q", format=".3f"),
            alt.Tooltip("accuracy_lo:Q", format=".3f"),
            alt.Tooltip("accuracy_hi:Q", format=".3f"),
            alt.Tooltip("control_accuracy:Q", format=".3f"),
            alt.Tooltip("chance:Q", format=".3f"),
            "n_test",
        ],
    )
    control = (
        alt.Chart()
        .mark_line(color="#bbbbbb", strokeWidth=0.75, strokeDash=[4, 3])
        .encode(x=x, y="control_accuracy:Q", detail="checkpoint:N")
    )
    chance = (
        alt.Chart()
        .transform_aggregate(chance="mean(chance)", groupby=["run", "label"])
        .mark_rule(color=MUTED, strokeWidth=0.75, strokeDash=[1, 2])
        .encode(y="chance:Q")
    )
    band = _band(accuracy, "accuracy", "probe accuracy")
    layers = (control, chance, band, accuracy.mark_line(), *_points(accuracy, data))
    chart = (
        alt.layer(*layers, data=data)
        .properties(width=PANEL, height=PANEL)
        .facet(
            row=alt.Row("run:N", title=None),
            column=alt.Column(
                "label:N", title=None, sort=_label_order(df["label"].unique()) if len(df) else None
            ),
        )
        .properties(
            title="Linear probe accuracy by layer across training (grey dashes: control task; "
            "dotted: chance)"
        )
    )
    key = f"band: 95% Wilson interval over held-out programs; hollow points: {FEW_PROGRAMS}"
    return subtitle(chart, [key])
