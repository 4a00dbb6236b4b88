"""The prompt diagnostic: does the prompt end where the answer begins?

A model is asked for a value by the token that follows the prompt (and the answer prefix, if
any: `actors/answers.py`). Real BPE vocabularies (Qwen3, Llama) write `#b: 5` as `#`, `b`, `:`,
` `, `5`: after the prompt `#b:` such a model's top-1 is a space, not a digit, so the compared
token is not the one the model would write, every program can come out wrong and every
patching chart empty. The rows say where it happens: `top1` is the clean run's top-1 token over
the whole vocabulary at the answer position and `top1_candidate` whether it is the first token
of one of the family's candidate answers. For each (model, task) this module counts the
programs whose top-1 is no candidate and names the most common such token; above
`WRONG_PROMPT_SHARE` it warns, with the fixes.

The rows come from behaviour where the (model, task) has any, else from patching (one per
program: the clean run is the same on all of a program's rows). Runs written before these
columns read them as NULL (`analysis.db`), and their (model, task) is reported as unavailable.
"""

from pathlib import Path
from typing import Any

import duckdb

from analysis.db import connect

# Above this share of programs whose top-1 is none of the candidates, the prompt is suspect.
WRONG_PROMPT_SHARE = 0.2

PROMPT_CHECK = """
WITH scored AS (
    SELECT 'behavior' AS source, model, task, answer_prefix, top1, top1_candidate
    FROM behavior
    WHERE top1_candidate IS NOT NULL
),
traced AS (  -- the clean run's top-1 is repeated on every row of a program: one row each
    SELECT 'patching' AS source, model, task, any_value(answer_prefix) AS answer_prefix,
           any_value(top1) AS top1, bool_and(top1_candidate) AS top1_candidate
    FROM patching AS p
    WHERE top1_candidate IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM scored AS s WHERE s.model = p.model AND s.task = p.task)
    GROUP BY model, task, seq_len, program
),
clean AS (
    SELECT * FROM scored
    UNION ALL
    SELECT * FROM traced
),
stray AS (  -- the most common top-1 that is no candidate (ties: the first in sort order)
    SELECT model, task, top1, count(*) AS n
    FROM clean
    WHERE NOT top1_candidate
    GROUP BY model, task, top1
    QUALIFY row_number() OVER (PARTITION BY model, task ORDER BY count(*) DESC, top1) = 1
),
stats AS (
    SELECT model, task, any_value(source) AS source, mode(answer_prefix) AS answer_prefix,
           count(*) AS programs, count_if(NOT top1_candidate) AS not_candidate
    FROM clean
    GROUP BY model, task
),
pairs AS (
    SELECT DISTINCT model, task FROM behavior
    UNION
    SELECT DISTINCT model, task FROM patching
)
SELECT pairs.model, pairs.task, stats.source, stats.answer_prefix,
       coalesce(stats.programs, 0) AS programs, coalesce(stats.not_candidate, 0) AS not_candidate,
       stats.not_candidate / stats.programs AS share,
       stray.top1 AS top1, coalesce(stray.n, 0) AS top1_count
FROM pairs
LEFT JOIN stats ON stats.model = pairs.model AND stats.task = pairs.task
LEFT JOIN stray ON stray.model = pairs.model AND stray.task = pairs.task
ORDER BY pairs.model, pairs.task
"""

FIX = (
    'Fix: answer_prefix: " " (or auto) on the task or the model in the spec; for a chat model, '
    "template: chat in experiments.behavior, or a template in the chat model's own format"
)


def prompt_check(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The diagnostic over a run's views, one row per (model, task) with results.

    Args:
        con: a connection from `analysis.db.connect`.

    Returns:
        Plain dicts (JSON-able): `model`, `task`, `source` (`behavior` or `patching`; None when
        no row has the columns), `answer_prefix` (the most common), `programs` (those with a
        top-1 recorded), `not_candidate` (of them, whose top-1 is none of the family's candidate
        answers), `share` (not_candidate / programs; None when programs is 0), `top1` (the most
        common such token, None when there is none) and `top1_count`.
    """
    cursor = con.execute(PROMPT_CHECK)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def check_run(results: str | Path) -> list[dict[str, Any]]:
    """`prompt_check` of a run folder.

    Raises:
        FileNotFoundError: `results` is not a folder.
    """
    con = connect(results)
    try:
        return prompt_check(con)
    finally:
        con.close()


def suspect(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose share of no-candidate top-1 tokens is above `WRONG_PROMPT_SHARE`."""
    return [r for r in rows if r["share"] is not None and r["share"] > WRONG_PROMPT_SHARE]


def format_prompt_check(rows: list[dict[str, Any]]) -> str:
    """The diagnostic as a table for people, then one warning line per suspect (model, task).

    Tokens are shown with `repr()`, so that a space reads `' '`.
    """
    if not rows:
        return "prompt check: no behaviour or patching rows yet"
    header = (
        "model",
        "task",
        "source",
        "prefix",
        "programs",
        "top-1 not a candidate",
        "most common such top-1",
    )
    table = [header]
    for r in rows:
        if not r["programs"]:
            table.append((r["model"], r["task"], "-", "-", "0", "unavailable", "-"))
            continue
        common = f"{r['top1']!r} ({r['top1_count']})" if r["top1"] is not None else "-"
        prefix = repr(r["answer_prefix"]) if r["answer_prefix"] is not None else "-"
        share = f"{r['not_candidate']} ({r['share']:.0%})"
        table.append(
            (r["model"], r["task"], r["source"], prefix, str(r["programs"]), share, common)
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["prompt check: the clean top-1 over the whole vocabulary at the answer position"]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
    if any(not r["programs"] for r in rows):
        lines.append(
            "  unavailable: no row records a top-1 (rows written before the top1 and "
            "top1_candidate columns, or programs that could not be asked)"
        )
    for r in suspect(rows):
        after = f" (after the answer prefix {r['answer_prefix']!r})" if r["answer_prefix"] else ""
        lines.append(
            f"warning: {r['model']} on {r['task']}: {r['not_candidate']} of {r['programs']} "
            f"programs ({r['share']:.0%}) have a top-1 that is none of the task's answers, most "
            f"often {r['top1']!r}{after}: the prompt likely ends a token before the answer (BPE "
            "vocabularies write `#b: 5` as `:`, ` `, `5`), so accuracy and patching effects "
            f"compare a token the model would not write next. {FIX}"
        )
    return "\n".join(lines)
