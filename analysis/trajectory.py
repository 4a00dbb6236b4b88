"""The queries and charts of a sweep across a training run's checkpoints: how behaviour, the
root value's patching effect and linear probes change with the training step.

Each checkpoint is its own model id (`models/binding-traj-step1000`) with its training `step`;
`run` is the model id without its `-step<N>` suffix, so that a sweep over two training runs'
checkpoints draws one series per run. Behaviour and patching aggregates (`*_BY_STEP` and the
summary's `SHORTCUT_PEAK`, `CHAIN_MOVE`) read only models with a step; probe ones
(`PROBES_BY_STEP`, `PROBE_BEST_LAYER`, `PROBE_FIRST_LAYER`) read every model (step NULL, sorted
last, for one without), a probe's layer profile being worth reading at one step too. Patching
ones keep the programs `queries.py` keeps (`$include_all` as there); run them with
`queries.run`. The charts share the theme and scales of `charts.py`.
"""

import altair as alt
import pandas as pd

from analysis.charts import MUTED, PANEL, SEQUENTIAL, _label_heatmap, _label_order, use_theme
from analysis.queries import _kept, _with

# The training run a checkpoint belongs to: its model id without the `-step<N>` suffix.
RUN = "regexp_replace(model, '-step[0-9]+$', '')"

# Binding accuracy by (run, step, model, depth, heuristic), over the models with a step.
ACCURACY_BY_STEP = f"""
SELECT {RUN} AS run, step, model, depth, heuristic, avg(correct::INTEGER) AS accuracy,
       count(*) AS n
FROM behavior
WHERE task = 'binding' AND step IS NOT NULL
GROUP BY run, step, model, depth, heuristic
ORDER BY run, step, model, depth, heuristic
"""

# Patching the root value's counterfactual into the residual stream (`resid_pre`), over the kept
# programs of each checkpoint: mean norm_effect by (run, step, model, layer, label).
_ROOT_CELLS = {
    "kept": _kept("patching"),
    "cells": f"""
    SELECT {RUN} AS run, step, model, site, layer, label, avg(norm_effect) AS mean_effect,
           count(norm_effect) AS n
    FROM kept
    WHERE site = 'resid_pre' AND step IS NOT NULL
    GROUP BY run, step, model, site, layer, label
""",
}
ROOT_EFFECT_BY_STEP = (
    _with(**_ROOT_CELLS) + "SELECT * FROM cells ORDER BY run, step, model, layer, label\n"
)

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
PROBES_BY_STEP = (
    _with(probed=_PROBED)
    + """
SELECT run, step, model, layer, label, target, accuracy, control_accuracy,
       accuracy - control_accuracy AS selectivity, chance, n_test
FROM probed
ORDER BY run, step NULLS LAST, model, label, target, layer
"""
)

# Per (run, step, model, label, target), the layer whose probe is most accurate (ties: the
# earliest).
PROBE_BEST_LAYER = (
    _with(probed=_PROBED)
    + """
SELECT run, step, model, label, target, layer, accuracy, control_accuracy,
       accuracy - control_accuracy AS selectivity, chance, n_test
FROM probed
QUALIFY row_number() OVER (
    PARTITION BY run, step, model, label, target ORDER BY accuracy DESC, layer
) = 1
ORDER BY run, step NULLS LAST, model, label, target
"""
)

# Per run, the step at which binding accuracy on heuristic programs (root on line 1 or 2, where
# "answer the constant of line 1-2" is right) most exceeds accuracy on the others, over every
# depth: where the shortcut leads the lookup most (ties: the earliest step). Runs whose steps
# lack either kind of program have no row.
SHORTCUT_PEAK = f"""
WITH accuracy AS (
    SELECT {RUN} AS run, step, model,
           avg(correct::INTEGER) FILTER (WHERE heuristic) AS heuristic_accuracy,
           avg(correct::INTEGER) FILTER (WHERE NOT heuristic) AS non_heuristic_accuracy,
           count(*) FILTER (WHERE heuristic) AS n_heuristic,
           count(*) FILTER (WHERE NOT heuristic) AS n_non_heuristic
    FROM behavior
    WHERE task = 'binding' AND step IS NOT NULL
    GROUP BY run, step, model
)
SELECT run, step, model, heuristic_accuracy, non_heuristic_accuracy,
       heuristic_accuracy - non_heuristic_accuracy AS gap, n_heuristic, n_non_heuristic
FROM accuracy
WHERE heuristic_accuracy IS NOT NULL AND non_heuristic_accuracy IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY run ORDER BY gap DESC, step, model) = 1
ORDER BY run
"""

# The root's value has moved down the chain once patching it at the second hop's right-hand side
# (the variable the root is copied into) moves some layer's mean norm_effect above this: half of
# the way from the clean answer to the counterfactual one.
CHAIN_MOVE_LABEL = "ref_depth_2_rhs"
CHAIN_MOVE_EFFECT = 0.5

# Per run with CHAIN_MOVE_LABEL cells: the first step at which some layer's mean norm_effect there
# exceeds CHAIN_MOVE_EFFECT, with the layer of its largest and that mean (ties: the earliest
# layer); step, model, layer and mean_effect are NULL where no step does. `max_effect`: the
# largest mean at the label over every step and layer; `steps`: the steps with cells there.
CHAIN_MOVE = (
    _with(
        **_ROOT_CELLS,
        hop=f"SELECT * FROM cells WHERE label = '{CHAIN_MOVE_LABEL}' AND mean_effect IS NOT NULL",
        runs="""
    SELECT run, max(mean_effect) AS max_effect, count(DISTINCT step) AS steps
    FROM hop
    GROUP BY run
""",
        moved=f"""
    SELECT run, step, model, layer, mean_effect, n
    FROM hop
    WHERE mean_effect > {CHAIN_MOVE_EFFECT}
    QUALIFY row_number() OVER (PARTITION BY run ORDER BY step, mean_effect DESC, layer) = 1
""",
    )
    + """
SELECT run, m.step, m.model, m.layer, m.mean_effect, m.n, r.max_effect, r.steps
FROM runs AS r
LEFT JOIN moved AS m USING (run)
ORDER BY run
"""
)

# The answer can be read off the final colon by a linear probe from the first layer whose
# held-out accuracy exceeds this (the control task's accuracy and the selectivity are printed
# beside it, to judge whether the probe reads the answer or memorizes).
PROBE_ACCURACY = 0.9
PROBE_LABEL, PROBE_TARGET = "final_colon", "answer"

# Per (run, step, model) with PROBE_LABEL probes of PROBE_TARGET: the first layer whose accuracy
# exceeds PROBE_ACCURACY, with its accuracies (NULL where no layer's does); `max_accuracy`: the
# best layer's.
PROBE_FIRST_LAYER = (
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
       f.accuracy - f.control_accuracy AS selectivity, c.max_accuracy
FROM checkpoints AS c
LEFT JOIN crossing AS f
  ON c.run = f.run AND c.step IS NOT DISTINCT FROM f.step AND c.model = f.model
ORDER BY c.run, c.step NULLS LAST, c.model
"""
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
    deeper), one column for programs with the root on line 1-2 (where the shortcut answers
    right) and one for the others, one row per training run."""
    use_theme()
    data = df.assign(programs=df["heuristic"].map({True: "root on line 1-2", False: "root later"}))
    depths = sorted(int(d) for d in df["depth"].unique())
    base = alt.Chart().encode(
        x=alt.X("step:Q", title="training step", scale=_step_scale(df)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        # a legend, not labels at the lines' ends: the depths often end at one accuracy
        color=alt.Color(
            "depth:O", title="depth", scale=_ramp(depths), legend=alt.Legend(orient="bottom")
        ),
        tooltip=[
            "model",
            "step",
            "depth",
            "programs",
            alt.Tooltip("accuracy:Q", format=".3f"),
            "n",
        ],
    )
    return (
        alt.layer(base.mark_line(), base.mark_point(), data=data)
        .properties(width=PANEL, height=PANEL)
        .facet(
            row=alt.Row("run:N", title=None),
            column=alt.Column("programs:N", title=None, sort=["root on line 1-2", "root later"]),
        )
        .properties(title="Binding accuracy across training, by chain depth")
    )


def root_effect_by_step(df: pd.DataFrame) -> alt.FacetChart:
    """Layer x token label of the mean normalized effect of patching the root value into the
    residual stream, one panel per checkpoint in step order (prefixed with the run where there
    are several), on the patching heatmap's colour scale, shared by every panel."""
    use_theme()
    panel = "step " + df["step"].astype("int64").astype(str)
    if df["run"].nunique() > 1:
        panel = df["run"] + " · " + panel
    data = df.assign(panel=panel)
    order = list(dict.fromkeys(data.sort_values(["run", "step"])["panel"]))
    return (
        _label_heatmap(data, "step")
        .facet(facet=alt.Facet("panel:N", title=None, sort=order), columns=5)
        .properties(title="Effect of patching the root value into the residual stream, by step")
    )


def probes_by_step(df: pd.DataFrame) -> alt.FacetChart:
    """Held-out accuracy of a linear probe on the residual stream entering each layer, one line
    per step (darker: later), one column per position label, one row per training run; the
    control task's accuracy in grey dashes (one per step), majority-class chance dotted."""
    use_theme()
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
    return (
        alt.layer(control, chance, accuracy.mark_line(), accuracy.mark_point(), data=data)
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
