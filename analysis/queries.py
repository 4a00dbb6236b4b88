"""The aggregates behind the summary and the charts, as named SQL over the views of `db.py`.

Patching aggregates read `kept`: by default only programs whose top-1 token over the whole
vocabulary is the answer's in both the clean and the counterfactual run (`top1_correct`,
`cf_top1_correct`), and not heuristic ones (root value on line 1 or 2), as the method says;
`$include_all = true` keeps every program. `KEPT_DESCRIPTION` says so in words for the summary.

A program is patched from up to four counterfactuals (`counterfactual`, the kinds of
`orchestrator.tasks.counterfactuals`): `root_value` and `query_swap` change the answer, the
controls `distractor` and `reassign` do not. Every patching aggregate reads the `root_value`
rows only, `$include_all` or not; the `COUNTERFACTUAL_*` ones set the kinds side by side, over
the same kept programs, on one scale (a control's norm_effect is normalized by the root value's
logit diffs, so ~0 means no effect).

Knockout aggregates keep the programs whose clean top-1 is the answer (`top1_correct`; a knockout
row has no counterfactual run's top-1) and not heuristic ones, through the same filter.

Attribution aggregates compare the first-order estimates with exact patching. The estimate
heatmap keeps the programs patching keeps (the same filter, over `attribution`); the agreement
of estimate and exact reads every verified cell (`exact` not NULL), of right and wrong
programs alike: it judges the estimate against exact patching, not the model's answer.

The aggregates across a training run's checkpoints are in `trajectory.py`, built on `_with` and
`_kept` from here.
"""

import duckdb
import pandas as pd

from orchestrator.tasks.counterfactuals import KINDS

# At most this many verified cells per (model, site) in the scatter (a fixed pseudo-random
# sample: `save` inlines every row); the correlations are over all of them.
SCATTER_POINTS = 5000


def _with(**ctes: str) -> str:
    """A `WITH` clause of the named common table expressions, in order."""
    return "\nWITH " + ",\n".join(f"{name} AS ({body})" for name, body in ctes.items()) + "\n"


# The runs whose top-1 must be the answer for a program to be kept: the clean and the
# counterfactual one. Knockout rows ask only the clean run (`KNOCKOUT_CORRECT`).
CORRECT = ("top1_correct", "cf_top1_correct")
KNOCKOUT_CORRECT = ("top1_correct",)


# The rows of a view that its aggregates read whatever `$include_all` says: patching's of the
# root value's counterfactual, the one every chart shows (the other kinds are read by the
# `COUNTERFACTUAL_*` queries). Views not named here read every row.
ROOT_VALUE = "p.counterfactual = 'root_value'"
ROWS = {"patching": ROOT_VALUE}


def _kept(
    view: str,
    columns: str = "p.*",
    correct: tuple[str, ...] = CORRECT,
    rows: str | None = None,
) -> str:
    """The rows of `view` (`patching`, `attribution` or `knockout`) of the programs the method
    keeps: every column of `correct` true, the root not on line 1 or 2. `rows`: the condition
    that every row meets, `$include_all` or not (default: the view's in `ROWS`, if any)."""
    rows = ROWS.get(view, "true") if rows is None else rows
    right = " AND ".join(f"p.{column}" for column in correct)
    return f"""
    SELECT {columns}
    FROM {view} AS p
    LEFT JOIN programs AS g USING (task, seq_len, program)
    WHERE ({rows})
      AND ($include_all OR ({right} AND NOT coalesce(g.heuristic, false)))
"""


def _by_label(relation: str, value: str, kind: str | None = None) -> str:
    """Mean and count of `value` by (model, site, layer, label): over programs, positions of one
    label and, at `attn_head`, heads; `kind` names the rows in a `kind` column."""
    tag = f"'{kind}' AS kind, " if kind else ""
    return f"""
SELECT model, site, layer, label, {tag}avg({value}) AS mean_effect, count({value}) AS n
FROM {relation}
GROUP BY model, site, layer, label
"""


KEPT = _with(kept=_kept("patching"))

KEPT_DESCRIPTION = (
    "programs whose top-1 is the answer in both runs (top1_correct, cf_top1_correct), "
    "root not on line 1-2"
)

ACCURACY_BY_LENGTH = """
SELECT model, task, seq_len, avg(correct::INTEGER) AS accuracy, count(*) AS n
FROM behavior
GROUP BY model, task, seq_len
ORDER BY model, task, seq_len
"""

ACCURACY_BY_DEPTH = """
SELECT model, depth, heuristic, avg(correct::INTEGER) AS accuracy, count(*) AS n
FROM behavior
WHERE task = 'binding'
GROUP BY model, depth, heuristic
ORDER BY model, depth, heuristic
"""

# Wrong binding answers by kind (`orchestrator.tasks.errors`) and depth: `n` of the `wrong`
# answers at that (model, depth), and their `share`. Runs written before the column read NULL
# kinds and have no rows here.
ERROR_KINDS_BY_DEPTH = """
SELECT model, depth, error_kind, count(*) AS n,
       (sum(count(*)) OVER (PARTITION BY model, depth))::BIGINT AS wrong,
       count(*) / sum(count(*)) OVER (PARTITION BY model, depth) AS share
FROM behavior
WHERE task = 'binding' AND NOT correct AND error_kind IS NOT NULL
GROUP BY model, depth, error_kind
ORDER BY model, depth, error_kind
"""

HEATMAP_BY_LABEL = KEPT + _by_label("kept", "norm_effect") + "ORDER BY model, site, layer, label\n"

HEATMAP_BY_POSITION = (
    KEPT
    + """
SELECT model, site, seq_len, layer, pos, any_value(token) AS token,
       avg(norm_effect) AS mean_effect, count(norm_effect) AS n
FROM kept
GROUP BY model, site, seq_len, layer, pos
ORDER BY model, site, seq_len, layer, pos
"""
)

FLIP_RATE = (
    KEPT
    + """
SELECT model, site, layer, label, avg(flipped::INTEGER) AS flip_rate, count(*) AS n
FROM kept
WHERE label LIKE 'ref_depth_%' AND site <> 'attn_head'
GROUP BY model, site, layer, label
ORDER BY model, site, layer, label
"""
)

HEADS = (
    KEPT
    + """
SELECT model, layer, head, label, avg(norm_effect) AS mean_effect, count(norm_effect) AS n
FROM kept
WHERE site = 'attn_head' AND label IN ('final_colon', 'query_var')
GROUP BY model, layer, head, label
ORDER BY model, layer, head, label
"""
)

# Per model, the $k cells of largest mean effect (ties: by site, layer, label).
TOP_CELLS = (
    KEPT
    + """
SELECT model, site, layer, label, avg(norm_effect) AS mean_effect, count(norm_effect) AS n
FROM kept
WHERE norm_effect IS NOT NULL
GROUP BY model, site, layer, label
QUALIFY row_number() OVER (PARTITION BY model ORDER BY mean_effect DESC, site, layer, label) <= $k
ORDER BY model, mean_effect DESC, site, layer, label
"""
)

# The root-value rows and programs that the aggregates above could read, and those they keep
# (rows of the other kinds are counted in COUNTERFACTUAL_CONTROL).
COVERAGE = (
    _with(kept=_kept("patching"), patched=f"SELECT * FROM patching AS p WHERE {ROOT_VALUE}")
    + """
SELECT (SELECT count(*) FROM patched) AS rows_all,
       (SELECT count(*) FROM kept) AS rows_kept,
       (SELECT count(DISTINCT (task, seq_len, program)) FROM patched) AS programs_all,
       (SELECT count(DISTINCT (task, seq_len, program)) FROM kept) AS programs_kept
"""
)

# The kept rows of every counterfactual kind, of the (model, site) pairs that were patched from
# some kind besides the root value: a run of root-value patching alone has no rows here.
_KINDS_SQL = "[" + ", ".join(f"'{kind}'" for kind in KINDS) + "]"
_KIND_ORDER = f"coalesce(list_position({_KINDS_SQL}, counterfactual), {len(KINDS) + 1})"
_COMPARED = {
    "kept": _kept("patching", rows="true"),
    "compared": """
    SELECT * FROM kept
    WHERE (model, site) IN (
        SELECT DISTINCT model, site FROM patching WHERE counterfactual <> 'root_value'
    )
""",
}

# Per (model, site, counterfactual) over the kept programs: the mean |norm_effect| and the mean
# norm_effect of every patched cell, the largest |mean norm_effect| of one (layer, label, head)
# cell, the flip rate, and the programs and rows. A control's are ~0 where patching moves only
# what the answer depends on. Kinds in `KINDS` order, root_value first.
COUNTERFACTUAL_CONTROL = (
    _with(
        **_COMPARED,
        cells="""
    SELECT model, site, counterfactual, abs(avg(norm_effect)) AS effect
    FROM compared
    GROUP BY model, site, counterfactual, layer, label, head
""",
        peaks="""
    SELECT model, site, counterfactual, max(effect) AS max_cell_effect
    FROM cells
    GROUP BY model, site, counterfactual
""",
    )
    + f"""
SELECT model, site, counterfactual,
       count(DISTINCT (task, seq_len, program)) AS programs, count(*) AS rows,
       avg(norm_effect) AS mean_effect, avg(abs(norm_effect)) AS mean_abs_effect,
       any_value(max_cell_effect) AS max_cell_effect, avg(flipped::INTEGER) AS flip_rate
FROM compared
JOIN peaks USING (model, site, counterfactual)
GROUP BY model, site, counterfactual
ORDER BY model, site, {_KIND_ORDER}, counterfactual
"""
)

# HEATMAP_BY_LABEL of every kind, of the same (model, site) pairs: mean norm_effect by (model,
# counterfactual, site, layer, label), over programs, positions and, at `attn_head`, heads.
COUNTERFACTUAL_BY_LABEL = (
    _with(**_COMPARED)
    + f"""
SELECT model, counterfactual, site, layer, label, avg(norm_effect) AS mean_effect,
       count(norm_effect) AS n
FROM compared
GROUP BY model, counterfactual, site, layer, label
ORDER BY model, {_KIND_ORDER}, counterfactual, site, layer, label
"""
)


# Attribution rows of the kept programs; unlabelled positions (NULL or '') read as `other`, the
# patching rows' label for them, so that the estimate and the exact heatmaps share their columns.
_ESTIMATED = _kept("attribution", "p.* REPLACE (coalesce(nullif(p.label, ''), 'other') AS label)")

ATTRIBUTION_BY_LABEL = (
    _with(estimated=_ESTIMATED)
    + _by_label("estimated", "norm_estimate")
    + "ORDER BY model, site, layer, label\n"
)

# The estimate heatmap beside the exact one (`kind` = estimate | exact): exact rows only for the
# (model, site) pairs that have estimates, on the same colour scale (both are norm_effects).
ATTRIBUTION_HEATMAP = (
    _with(
        kept=_kept("patching"),
        estimated=_ESTIMATED,
        patched=(
            "SELECT * FROM kept WHERE (model, site) IN (SELECT DISTINCT model, site FROM estimated)"
        ),
    )
    + _by_label("estimated", "norm_estimate", "estimate")
    + "UNION ALL"
    + _by_label("patched", "norm_effect", "exact")
    + "ORDER BY model, site, kind, layer, label\n"
)

# Verified cells, each ranked among its (model, site)'s: average ranks for ties (Spearman's).
_VERIFIED = "SELECT * FROM attribution WHERE exact IS NOT NULL AND estimate IS NOT NULL"
_RANKED = """
    SELECT *,
           rank() OVER (PARTITION BY model, site ORDER BY estimate)
             + (count(*) OVER (PARTITION BY model, site, estimate) - 1) / 2 AS estimate_rank,
           rank() OVER (PARTITION BY model, site ORDER BY exact)
             + (count(*) OVER (PARTITION BY model, site, exact) - 1) / 2 AS exact_rank
    FROM verified
"""
_CORRELATION = """
    SELECT model, site, count(*) AS n, corr(estimate_rank, exact_rank) AS spearman,
           corr(estimate, exact) AS pearson
    FROM ranked
    GROUP BY model, site
"""
_CORRELATED = {"verified": _VERIFIED, "ranked": _RANKED, "correlation": _CORRELATION}

# Top-k recall per program and site: of the k cells with the largest |exact| among the
# program's verified ones, the share within the 2k largest |estimate| of all its cells. k is the
# number of cells verified as the program's top (`verify = 'top'`, the K of the spec): a perfect
# estimate finds all k, and a verified random cell that turns out larger than a top one is missed
# unless it too ranks within 2k. Programs with no `top` cell are left out; ties break by
# (layer, pos, head).
_PROGRAM = "model, site, task, seq_len, program"
_BY_ESTIMATE = f"""
    SELECT *, row_number() OVER (
               PARTITION BY {_PROGRAM} ORDER BY abs(estimate) DESC, layer, pos, head
           ) AS estimate_place
    FROM attribution
    WHERE estimate IS NOT NULL
"""
_BY_EXACT = f"""
    SELECT *, row_number() OVER (
               PARTITION BY {_PROGRAM} ORDER BY abs(exact) DESC, layer, pos, head
           ) AS exact_place,
           (count_if(verify = 'top') OVER (PARTITION BY {_PROGRAM}))::INTEGER AS k
    FROM by_estimate
    WHERE exact IS NOT NULL
"""
_FOUND = f"""
    SELECT {_PROGRAM}, any_value(k) AS k, avg((estimate_place <= 2 * k)::INTEGER) AS found
    FROM by_exact
    WHERE exact_place <= k
    GROUP BY {_PROGRAM}
"""
_RECALL = """
    SELECT model, site, count(*) AS programs, mode(k) AS k, avg(found) AS top_k_recall
    FROM found
    GROUP BY model, site
"""

# Per (model, site): verified cells, Spearman and Pearson correlation of estimate and exact, and
# the mean top-k recall over programs (`k`: the most common k; `programs`: those with one).
AGREEMENT = (
    _with(**_CORRELATED, by_estimate=_BY_ESTIMATE, by_exact=_BY_EXACT, found=_FOUND, recall=_RECALL)
    + """
SELECT model, site, c.n, r.programs, c.spearman, c.pearson, r.k, r.top_k_recall
FROM correlation AS c
LEFT JOIN recall AS r USING (model, site)
ORDER BY model, site
"""
)

# Every cell that the run both estimated and patched exactly (a spec with `patching` over the
# same sites and positions as `attribution`): estimate against `patched - clean` of the patching
# row, its Spearman and Pearson correlation, and per program the share of its 10 largest |exact|
# within its 20 largest |estimate| (ties broken by layer, pos, head). Only the root value's
# patching rows (the counterfactual the estimates are of); not filtered otherwise, like
# AGREEMENT: it judges the estimate.
_JOINED = f"""
    SELECT a.model, a.site, a.task, a.seq_len, a.program, a.layer, a.pos, a.head, a.estimate,
           p.patched_logit_diff - p.clean_logit_diff AS exact
    FROM attribution AS a
    JOIN patching AS p
      ON a.model = p.model AND a.task = p.task AND a.seq_len = p.seq_len
     AND a.program = p.program AND a.site = p.site AND a.layer = p.layer AND a.pos = p.pos
     AND a.head IS NOT DISTINCT FROM p.head
    WHERE a.estimate IS NOT NULL AND p.patched_logit_diff IS NOT NULL AND {ROOT_VALUE}
"""
_PLACED = f"""
    SELECT *,
           row_number() OVER (
               PARTITION BY {_PROGRAM} ORDER BY abs(estimate) DESC, layer, pos, head
           ) AS estimate_place,
           row_number() OVER (
               PARTITION BY {_PROGRAM} ORDER BY abs(exact) DESC, layer, pos, head
           ) AS exact_place
    FROM verified
"""
_FOUND_10 = f"""
    SELECT {_PROGRAM}, avg((estimate_place <= 20)::INTEGER) AS found
    FROM placed
    WHERE exact_place <= 10
    GROUP BY {_PROGRAM}
"""
AGREEMENT_ALL_CELLS = (
    _with(
        verified=_JOINED,
        ranked=_RANKED,
        correlation=_CORRELATION,
        placed=_PLACED,
        found=_FOUND_10,
    )
    + """
SELECT model, site, c.n AS cells, count(f.program) AS programs, any_value(c.spearman) AS spearman,
       any_value(c.pearson) AS pearson, avg(f.found) AS top10_in_top20
FROM correlation AS c
JOIN found AS f USING (model, site)
GROUP BY model, site, c.n
ORDER BY model, site
"""
)

# The verified cells for the scatter, with their (model, site)'s Spearman and count.
ATTRIBUTION_VERIFIED = (
    _with(**_CORRELATED)
    + f"""
SELECT model, site, v.layer, v.head, v.label, v.verify, v.estimate, v.exact, c.spearman, c.n
FROM verified AS v
JOIN correlation AS c USING (model, site)
QUALIFY row_number() OVER (
    PARTITION BY model, site ORDER BY hash(v.task, v.seq_len, v.program, v.layer, v.pos, v.head)
) <= {SCATTER_POINTS}
ORDER BY model, site, v.verify, v.exact
"""
)


# Knockout rows of the kept programs (only the clean run's top-1 is asked), and the mean
# normalized effect of blocking each head's attention to each source, per scope.
KNOCKOUT_KEPT_DESCRIPTION = (
    "programs whose top-1 is the answer (top1_correct), root not on line 1-2"
)
_KNOCKED = {
    "kept": _kept("knockout", correct=KNOCKOUT_CORRECT),
    "routes": """
    SELECT model, scope, source, layer, head, avg(norm_effect) AS mean_effect,
           count(norm_effect) AS n
    FROM kept
    GROUP BY model, scope, source, layer, head
""",
}

ROUTING_MAP = (
    _with(**_KNOCKED) + "SELECT * FROM routes ORDER BY model, scope, source, layer, head\n"
)

# Per model, the $k (layer, head) whose knockout of the root edge (attention from the answer to
# the root value) moves the metric most, either way (ties: by layer, head).
TOP_ROOT_HEADS = (
    _with(**_KNOCKED)
    + """
SELECT model, layer, head, mean_effect, n
FROM routes
WHERE source = 'ref_depth_1_rhs' AND scope = 'answer' AND mean_effect IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY model ORDER BY abs(mean_effect) DESC, layer, head) <= $k
ORDER BY model, abs(mean_effect) DESC, layer, head
"""
)


def run(
    con: duckdb.DuckDBPyConnection, sql: str, include_all: bool = False, k: int = 5
) -> pd.DataFrame:
    """Run a named query with its parameters bound; returns a DataFrame (aggregated rows)."""
    params = {}
    if "$include_all" in sql:
        params["include_all"] = include_all
    if "$k" in sql:
        params["k"] = k
    return con.execute(sql, params).df()
