"""The aggregates behind the summary and the charts, as named SQL over the views of `db.py`.

Every mean is an `Aggregate`: SQL sums each program's rows per cell, and `intervals.summarise`
turns those sums into the cell's mean, its 95% interval over programs and its program count
(`run` returns them; `Aggregate.sql` is the same means in plain SQL). Queries whose numbers are
not means (correlations, counts, the scatter's points) stay plain SQL.

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

The aggregates across a training run's checkpoints are in `trajectory.py`, built on `_with`,
`_kept` and `Aggregate` from here.
"""

import dataclasses
from collections.abc import Callable

import duckdb
import pandas as pd

from analysis.intervals import COUNT, PROGRAM, SUM, summarise
from orchestrator.tasks.counterfactuals import KINDS

# At most this many verified cells per (model, site) in the scatter (a fixed pseudo-random
# sample: `save` inlines every row); the correlations are over all of them.
SCATTER_POINTS = 5000


def _with(**ctes: str) -> str:
    """A `WITH` clause of the named common table expressions, in order."""
    return "\nWITH " + ",\n".join(f"{name} AS ({body})" for name, body in ctes.items()) + "\n"


_KEY = ", ".join(PROGRAM)


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """The mean of each of `values` per cell (`by`) over the rows of `relation` that meet
    `where`, with the cell's program count and a 95% bootstrap interval over programs
    (`intervals.py`); `run` returns `by`, `first`, then per value `v`: `v`, `v_lo`, `v_hi`, then
    `programs` and `n` (rows), then what `post` adds.

    Attributes:
        ctes: a `WITH` clause (`_with`) that defines `relation`, or "".
        relation: the rows, one or more per program (`task`, `seq_len`, `program`).
        by: the cell's columns.
        values: output column -> SQL over a row (a 0/1 for a rate); NULLs are not counted.
        where: SQL condition on the rows.
        first: columns read once per cell (its first program's value), e.g. a position's token.
        order: the output's sort (default `by`).
        post: `(frame, connection, params) -> frame`, applied last: a top-k, or columns joined
            from another query.
    """

    ctes: str
    relation: str
    by: tuple[str, ...]
    values: dict[str, str]
    where: str = "true"
    first: tuple[str, ...] = ()
    order: tuple[str, ...] | None = None
    post: Callable[[pd.DataFrame, duckdb.DuckDBPyConnection, dict], pd.DataFrame] | None = None

    @property
    def partial(self) -> str:
        """One row per (cell, program): each value's sum (`<v>__sum`) and count (`<v>__n`)."""
        sums = ", ".join(
            f'sum(({e})::DOUBLE) AS "{v}{SUM}", count({e}) AS "{v}{COUNT}"'
            for v, e in self.values.items()
        )
        firsts = "".join(f", any_value({c}) AS {c}" for c in self.first)
        cell = ", ".join([*self.by, *self.unit])
        return (
            f"{self.ctes}SELECT {cell}{firsts}, {sums}\nFROM {self.relation}\n"
            f"WHERE {self.where}\nGROUP BY {cell}\n"
        )

    @property
    def unit(self) -> tuple[str, ...]:
        """The program's key columns that are not already cell columns."""
        return tuple(c for c in PROGRAM if c not in self.by)

    @property
    def sql(self) -> str:
        """The same means in plain SQL, without intervals: to read, or to paste into `--sql`."""
        means = ", ".join(f"avg({e}) AS {v}" for v, e in self.values.items())
        firsts = "".join(f", any_value({c}) AS {c}" for c in self.first)
        cell = ", ".join(self.by)
        first_value = next(iter(self.values.values()))
        return (
            f"{self.ctes}SELECT {cell}{firsts}, {means}, "
            f"count(DISTINCT ({_KEY})) FILTER (WHERE ({first_value}) IS NOT NULL) AS programs, "
            f"count({first_value}) AS n\nFROM {self.relation}\nWHERE {self.where}\n"
            f"GROUP BY {cell}\nORDER BY {', '.join(self.order or self.by)}\n"
        )

    def frame(self, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
        partial = con.execute(self.partial, _bound(self.partial, params)).df()
        out = summarise(partial, list(self.by), list(self.values), self.unit, self.first)
        order = list(self.order or self.by)
        out = out.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)
        return self.post(out, con, params) if self.post else out


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
    keeps: every column of `correct` true, the root not on line 1 or 2 (the view's `heuristic`,
    from `programs`). `rows`: the condition that every row meets, `$include_all` or not
    (default: the view's in `ROWS`, if any)."""
    rows = ROWS.get(view, "true") if rows is None else rows
    right = " AND ".join(f"p.{column}" for column in correct)
    return f"""
    SELECT {columns}
    FROM {view} AS p
    WHERE ({rows})
      AND ($include_all OR ({right} AND NOT coalesce(p.heuristic, false)))
"""


def _top(
    value: str, ties: tuple[str, ...], absolute: bool = False
) -> Callable[[pd.DataFrame, duckdb.DuckDBPyConnection, dict], pd.DataFrame]:
    """A `post` that keeps, per model, the `$k` rows of largest `value` (of largest |value| if
    `absolute`), ties broken by `ties`; rows in that order."""

    def top(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
        df = df[df[value].notna()]
        key = df[value].abs() if absolute else df[value]
        ranked = df.assign(_key=-key).sort_values(["model", "_key", *ties], kind="stable")
        return ranked.groupby("model").head(params["k"]).drop(columns="_key").reset_index(drop=True)

    return top


def _in_kind_order(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """`df` sorted by `by`, with `counterfactual` in `KINDS` order (others after, by name)."""
    rank = df["counterfactual"].map({kind: i for i, kind in enumerate(KINDS)}).fillna(len(KINDS))
    out = df.assign(_rank=rank).sort_values(
        [c if c != "counterfactual" else "_rank" for c in by]
        + (["counterfactual"] if "counterfactual" in by else []),
        kind="stable",
    )
    return out.drop(columns="_rank").reset_index(drop=True)


KEPT = _with(kept=_kept("patching"))


def kept_of(view: str, correct: tuple[str, ...] = CORRECT, rows: str | None = None) -> str:
    """Per model: the `programs` that the aggregates of `view` could read (the rows every one
    reads, as in `_kept`) and those they keep (`kept`; `$include_all` keeps all)."""
    rows = ROWS.get(view, "true") if rows is None else rows
    every = ", ".join(f"e.{c}" for c in PROGRAM)
    return (
        _with(
            kept=_kept(view, correct=correct, rows=rows),
            every=f"SELECT * FROM {view} AS p WHERE {rows}",
        )
        + f"""
SELECT e.model, count(DISTINCT ({every})) AS programs,
       (SELECT count(DISTINCT ({_KEY})) FROM kept AS k WHERE k.model = e.model) AS kept
FROM every AS e
GROUP BY e.model
ORDER BY e.model
"""
    )


KEPT_DESCRIPTION = (
    "programs whose top-1 is the answer in both runs (top1_correct, cf_top1_correct), "
    "root not on line 1-2"
)

# The aggregations the patching charts state under their titles.
BY_LABEL_DESCRIPTION = "mean over programs' positions of each label and, at attn_head, over heads"

# Accuracy: the share of programs answered right (`correct`), per cell.
ACCURACY_BY_LENGTH = Aggregate(
    "", "behavior", ("model", "task", "seq_len"), {"accuracy": "correct::INTEGER"}
)

ACCURACY_BY_DEPTH = Aggregate(
    "",
    "behavior",
    ("model", "depth", "heuristic"),
    {"accuracy": "correct::INTEGER"},
    where="task = 'binding'",
)


def _wrong_counts(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
    """`wrong`: the wrong answers at the row's (model, depth) (its programs); `n`: those of the
    row's kind."""
    wrong = df["programs"]
    return df.assign(n=(df["share"] * wrong).round().astype("int64"), wrong=wrong)


# Wrong binding answers by kind (`orchestrator.tasks.errors`) and depth: of the `wrong` answers
# at a (model, depth), the `share` of each kind present there (its interval over those
# programs) and their number `n`. Runs written before the column read NULL kinds and have no
# rows here.
ERROR_KINDS_BY_DEPTH = Aggregate(
    _with(
        wrong="""
    SELECT * FROM behavior
    WHERE task = 'binding' AND NOT correct AND error_kind IS NOT NULL
""",
        kinds="SELECT DISTINCT model, depth, error_kind AS kind FROM wrong",
        marked="""
    SELECT w.* REPLACE (k.kind AS error_kind), (w.error_kind = k.kind)::INTEGER AS is_kind
    FROM wrong AS w
    JOIN kinds AS k USING (model, depth)
""",
    ),
    "marked",
    ("model", "depth", "error_kind"),
    {"share": "is_kind"},
    post=_wrong_counts,
)

# Mean normalized effect by (model, site, layer, label): over programs, positions of one label
# and, at `attn_head`, heads.
HEATMAP_BY_LABEL = Aggregate(
    KEPT, "kept", ("model", "site", "layer", "label"), {"mean_effect": "norm_effect"}
)

HEATMAP_BY_POSITION = Aggregate(
    KEPT,
    "kept",
    ("model", "site", "seq_len", "layer", "pos"),
    {"mean_effect": "norm_effect"},
    first=("token",),
)

FLIP_RATE = Aggregate(
    KEPT,
    "kept",
    ("model", "site", "layer", "label"),
    {"flip_rate": "flipped::INTEGER"},
    where="label LIKE 'ref_depth_%' AND site <> 'attn_head'",
)

HEADS = Aggregate(
    KEPT,
    "kept",
    ("model", "layer", "head", "label"),
    {"mean_effect": "norm_effect"},
    where="site = 'attn_head' AND label IN ('final_colon', 'query_var')",
)

# Per model, the $k cells of largest mean effect (ties: by site, layer, label).
TOP_CELLS = dataclasses.replace(
    HEATMAP_BY_LABEL,
    where="norm_effect IS NOT NULL",
    post=_top("mean_effect", ("site", "layer", "label")),
)

# The root-value rows and programs that the aggregates above could read, and those they keep
# (rows of the other kinds are counted in COUNTERFACTUAL_CONTROL).
COVERAGE = (
    _with(kept=_kept("patching"), patched=f"SELECT * FROM patching AS p WHERE {ROOT_VALUE}")
    + f"""
SELECT (SELECT count(*) FROM patched) AS rows_all,
       (SELECT count(*) FROM kept) AS rows_kept,
       (SELECT count(DISTINCT ({_KEY})) FROM patched) AS programs_all,
       (SELECT count(DISTINCT ({_KEY})) FROM kept) AS programs_kept
"""
)

# The kept rows of every counterfactual kind, of the (model, site) pairs that were patched from
# some kind besides the root value: a run of root-value patching alone has no rows here.
_COMPARED = {
    "kept": _kept("patching", rows="true"),
    "compared": """
    SELECT * FROM kept
    WHERE (model, site) IN (
        SELECT DISTINCT model, site FROM patching WHERE counterfactual <> 'root_value'
    )
""",
}
# The largest |mean norm_effect| of one (layer, label, head) cell per (model, site, kind).
_PEAKS = (
    _with(
        **_COMPARED,
        cells="""
    SELECT model, site, counterfactual, abs(avg(norm_effect)) AS effect
    FROM compared
    GROUP BY model, site, counterfactual, layer, label, head
""",
    )
    + "SELECT model, site, counterfactual, max(effect) AS max_cell_effect FROM cells GROUP BY ALL\n"
)


def _with_peaks(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
    peaks = con.execute(_PEAKS, _bound(_PEAKS, params)).df()
    key = ["model", "site", "counterfactual"]
    out = df.rename(columns={"n": "rows"}).merge(peaks, on=key, how="left")
    means = [c for c in out.columns if c not in [*key, "programs", "rows", "max_cell_effect"]]
    at = means.index("flip_rate")
    columns = [*key, "programs", "rows", *means[:at], "max_cell_effect", *means[at:]]
    return _in_kind_order(out[columns], key)


# Per (model, site, counterfactual) over the kept programs: the mean norm_effect and the mean
# |norm_effect| of every patched cell, the flip rate, the programs and rows, and the largest
# |mean norm_effect| of one (layer, label, head) cell. A control's are ~0 where patching moves
# only what the answer depends on. Kinds in `KINDS` order, root_value first.
COUNTERFACTUAL_CONTROL = Aggregate(
    _with(**_COMPARED),
    "compared",
    ("model", "site", "counterfactual"),
    {
        "mean_effect": "norm_effect",
        "mean_abs_effect": "abs(norm_effect)",
        "flip_rate": "flipped::INTEGER",
    },
    post=_with_peaks,
)

# HEATMAP_BY_LABEL of every kind, of the same (model, site) pairs: mean norm_effect by (model,
# counterfactual, site, layer, label), over programs, positions and, at `attn_head`, heads.
COUNTERFACTUAL_BY_LABEL = Aggregate(
    _with(**_COMPARED),
    "compared",
    ("model", "counterfactual", "site", "layer", "label"),
    {"mean_effect": "norm_effect"},
    post=lambda df, con, params: _in_kind_order(
        df, ["model", "counterfactual", "site", "layer", "label"]
    ),
)


# Attribution rows of the kept programs; unlabelled positions (NULL or '') read as `other`, the
# patching rows' label for them, so that the estimate and the exact heatmaps share their columns.
_ESTIMATED = _kept("attribution", "p.* REPLACE (coalesce(nullif(p.label, ''), 'other') AS label)")

ATTRIBUTION_BY_LABEL = Aggregate(
    _with(estimated=_ESTIMATED),
    "estimated",
    ("model", "site", "layer", "label"),
    {"mean_effect": "norm_estimate"},
)

# The estimate heatmap beside the exact one (`kind` = estimate | exact): exact rows only for the
# (model, site) pairs that have estimates, on the same colour scale (both are norm_effects).
_CELL = f"model, site, layer, label, {_KEY}"
ATTRIBUTION_HEATMAP = Aggregate(
    _with(
        kept=_kept("patching"),
        estimated=_ESTIMATED,
        patched=(
            "SELECT * FROM kept WHERE (model, site) IN (SELECT DISTINCT model, site FROM estimated)"
        ),
        side_by_side=f"""
    SELECT {_CELL}, 'estimate' AS kind, norm_estimate AS value FROM estimated
    UNION ALL
    SELECT {_CELL}, 'exact' AS kind, norm_effect AS value FROM patched
""",
    ),
    "side_by_side",
    ("model", "site", "kind", "layer", "label"),
    {"mean_effect": "value"},
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


def _beside(
    correlations: str, columns: list[str], how: str
) -> Callable[[pd.DataFrame, duckdb.DuckDBPyConnection, dict], pd.DataFrame]:
    """A `post` that sets a (model, site) mean over programs beside the query `correlations`
    (one row per (model, site)), joined `how`, `columns` first, by (model, site)."""

    def beside(df: pd.DataFrame, con: duckdb.DuckDBPyConnection, params: dict) -> pd.DataFrame:
        out = con.execute(correlations).df().merge(df.drop(columns="n"), on=KEY_SITE, how=how)
        rest = [c for c in out.columns if c not in columns]
        return out[columns + rest].sort_values(KEY_SITE).reset_index(drop=True)

    return beside


KEY_SITE = ["model", "site"]
# Every (model, site) with verified cells: their number `n` and correlations, and `k`, the most
# common k of its programs (NULL where no program has a `top` cell).
_CORRELATIONS = (
    _with(**_CORRELATED, by_estimate=_BY_ESTIMATE, by_exact=_BY_EXACT, found=_FOUND)
    + """
SELECT c.*, k.k
FROM correlation AS c
LEFT JOIN (SELECT model, site, mode(k) AS k FROM found GROUP BY model, site) AS k
  USING (model, site)
"""
)

# Per (model, site): verified cells, Spearman and Pearson correlation of estimate and exact, and
# the mean top-k recall over programs, with its interval (`k`: the most common k; `programs`:
# those with one).
AGREEMENT = Aggregate(
    _with(by_estimate=_BY_ESTIMATE, by_exact=_BY_EXACT, found=_FOUND),
    "found",
    ("model", "site"),
    {"top_k_recall": "found"},
    post=_beside(
        _CORRELATIONS, ["model", "site", "n", "programs", "spearman", "pearson", "k"], "left"
    ),
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
_JOINED_CELLS = {"verified": _JOINED, "ranked": _RANKED, "correlation": _CORRELATION}
_JOINED_CORRELATIONS = (
    _with(**_JOINED_CELLS) + "SELECT model, site, n AS cells, spearman, pearson FROM correlation\n"
)


AGREEMENT_ALL_CELLS = Aggregate(
    _with(verified=_JOINED, placed=_PLACED, found=_FOUND_10),
    "found",
    ("model", "site"),
    {"top10_in_top20": "found"},
    post=_beside(
        _JOINED_CORRELATIONS, ["model", "site", "cells", "programs", "spearman", "pearson"], "inner"
    ),
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

ROUTING_MAP = Aggregate(
    _with(kept=_kept("knockout", correct=KNOCKOUT_CORRECT)),
    "kept",
    ("model", "scope", "source", "layer", "head"),
    {"mean_effect": "norm_effect"},
)

# Per model, the $k (layer, head) whose knockout of the root edge (attention from the answer to
# the root value) moves the metric most, either way (ties: by layer, head).
TOP_ROOT_HEADS = dataclasses.replace(
    ROUTING_MAP,
    where="source = 'ref_depth_1_rhs' AND scope = 'answer' AND norm_effect IS NOT NULL",
    post=_top("mean_effect", ("layer", "head"), absolute=True),
)


@dataclasses.dataclass(frozen=True)
class Sql:
    """A query whose result `post` completes (e.g. with intervals computed from its columns)."""

    sql: str
    post: Callable[[pd.DataFrame], pd.DataFrame]


def _bound(sql: str, params: dict) -> dict:
    """The parameters that `sql` names."""
    return {name: value for name, value in params.items() if f"${name}" in sql}


def run(
    con: duckdb.DuckDBPyConnection,
    query: "str | Sql | Aggregate",
    include_all: bool = False,
    k: int = 5,
) -> pd.DataFrame:
    """Run a named query (SQL; `Sql`; or an `Aggregate`: means with their program counts and
    intervals) with its parameters bound; returns a DataFrame (aggregated rows)."""
    params = {"include_all": include_all, "k": k}
    if isinstance(query, Aggregate):
        return query.frame(con, params)
    if isinstance(query, Sql):
        return query.post(con.execute(query.sql, _bound(query.sql, params)).df())
    return con.execute(query, _bound(query, params)).df()
