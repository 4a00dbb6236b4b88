"""The aggregates behind the summary and the charts, as named SQL over the views of `db.py`.

Patching aggregates read `kept`: by default only programs whose top-1 token over the whole
vocabulary is the answer's in both the clean and the counterfactual run (`top1_correct`,
`cf_top1_correct`), and not heuristic ones (root value on line 1 or 2), as the method says;
`$include_all = true` keeps every program. `KEPT_DESCRIPTION` says so in words for the summary.
"""

import duckdb
import pandas as pd

KEPT = """
WITH kept AS (
    SELECT p.*
    FROM patching AS p
    LEFT JOIN programs AS g USING (task, seq_len, program)
    WHERE $include_all
       OR (p.top1_correct AND p.cf_top1_correct AND NOT coalesce(g.heuristic, false))
)
"""

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

HEATMAP_BY_LABEL = (
    KEPT
    + """
SELECT model, site, layer, label, avg(norm_effect) AS mean_effect, count(norm_effect) AS n
FROM kept
GROUP BY model, site, layer, label
ORDER BY model, site, layer, label
"""
)

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

TOP_CELLS = (
    KEPT
    + """
SELECT model, site, layer, label, avg(norm_effect) AS mean_effect, count(norm_effect) AS n
FROM kept
WHERE norm_effect IS NOT NULL
GROUP BY model, site, layer, label
QUALIFY row_number() OVER (PARTITION BY model ORDER BY mean_effect DESC) <= $k
ORDER BY model, mean_effect DESC
"""
)

COVERAGE = (
    KEPT
    + """
SELECT (SELECT count(*) FROM patching) AS rows_all,
       (SELECT count(*) FROM kept) AS rows_kept,
       (SELECT count(DISTINCT (task, seq_len, program)) FROM patching) AS programs_all,
       (SELECT count(DISTINCT (task, seq_len, program)) FROM kept) AS programs_kept
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
