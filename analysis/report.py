"""`python -m analysis RUN --report`: one self-contained HTML page of a run.

The page holds, in order: the run (its folder, status, timings, versions and commit from
`run.json`, and `spec.yaml` as written), the summary tables (`summary.sections`), every chart
(`summary.figures`), the failed shards and skipped programs, and a footer on the intervals. It
works offline: the Vega, Vega-Lite and vega-embed JavaScript is inlined once (vl-convert's
bundle, as Altair's `chart.save(..., inline=True)` does), and each chart is drawn from its
Vega-Lite JSON into its own `<div class="chart">`, as SVG, with tooltips. A chart that fails to
draw says so in its div and on the browser's console (`console.error`), so that a glance at the
page or a headless browser's log finds it.
"""

import functools
import html
import json
import logging
import numbers
import os
import uuid
from pathlib import Path
from typing import Any

import altair as alt
import duckdb
import pandas as pd
import vl_convert

from analysis.intervals import MIN_PROGRAMS, RESAMPLES
from analysis.summary import Section, few_programs, figures, sections, with_intervals

logger = logging.getLogger(__name__)

SKIPPED = """
SELECT model, task, counterfactual, reason, count(*) AS programs
FROM skipped GROUP BY ALL ORDER BY ALL
"""
FOOTER = (
    f"95% CI: percentile bootstrap over programs, {RESAMPLES} resamples, seeded; probes: Wilson's "
    "interval over held-out programs."
)
# SVG so that a test can count what was drawn; no actions menu (it would add an SVG icon).
EMBED_OPTIONS = {"renderer": "svg", "actions": False, "tooltip": True}
# run.json's fields shown in the run's list, in this order, where the run has them.
RUN_FIELDS = (
    ("status", "status"),
    ("stopped", "stopped by"),
    ("started", "started"),
    ("finished", "finished"),
    ("wall_s", "wall time (s)"),
    ("shards", "shards"),
    ("rows_written", "rows written"),
    ("spec", "spec file"),
    ("spec_hash", "spec hash"),
    ("git_commit", "git commit"),
    ("versions", "versions"),
    ("ray", "ray"),
)

CSS = """
body { margin: 2.5rem auto; max-width: 68rem; padding: 0 1.5rem; background: #fff; color: #222;
  font-family: Georgia, "Iowan Old Style", "Palatino Linotype", Palatino, serif;
  line-height: 1.45; }
h1 { font-weight: normal; font-size: 2rem; margin-bottom: 0.2rem; }
h2 { font-weight: normal; font-style: italic; font-size: 1.5rem; margin-top: 2.5rem; }
h3 { font-weight: normal; font-size: 1.05rem; margin: 1.6rem 0 0.3rem; }
a { color: #2a5db0; }
nav ol { padding-left: 1.4rem; } nav ol ol { font-size: 0.9rem; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1.2rem; }
dt { color: #666; } dd { margin: 0; }
pre { font-size: 0.8rem; line-height: 1.35; background: #fafafa; padding: 0.6rem 0.8rem;
  overflow-x: auto; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums;
  margin: 0.4rem 0; }
thead th { font-weight: normal; text-align: left; border-bottom: 1px solid #777;
  vertical-align: bottom; }
tbody tr:last-child td { border-bottom: 1px solid #777; }
th, td { padding: 0.12rem 0.7rem 0.12rem 0; }
.num { text-align: right; }
tr.few td { color: #9a9a9a; }
.note, footer { color: #666; font-size: 0.85rem; }
.chart { margin: 0.4rem 0 1.2rem; }
.chart-error { color: #a00000; font-family: ui-monospace, monospace; font-size: 0.85rem; }
footer { margin-top: 3rem; border-top: 1px solid #ddd; padding-top: 0.6rem; }
"""

# Draws each chart div from its spec (a `<script type="application/json">` named by the div's
# `data-spec`). A failure (the bundle missing, a spec Vega-Lite rejects, nothing drawn) is written
# into the div and to the console; an error Vega meets while running the drawn view's dataflow
# goes to the console through Vega's own logger (the bundle exposes no `vega` to replace it with).
RENDER = """
(function () {
  const options = %s;
  function fail(div, error) {
    const message = "chart " + div.dataset.chart + " failed to render: " +
      (error && error.message ? error.message : String(error));
    const p = document.createElement("p");
    p.className = "chart-error";
    p.textContent = message;
    div.prepend(p);
    console.error(message);
  }
  for (const div of document.querySelectorAll("div.chart")) {
    try {
      const spec = JSON.parse(document.getElementById(div.dataset.spec).textContent);
      vegaEmbed(div, spec, options)
        .then(function () {
          if (!div.querySelector("svg")) fail(div, "no SVG was drawn");
        })
        .catch(function (error) { fail(div, error); });
    } catch (error) {
      fail(div, error);
    }
  }
})();
"""


def write_report(
    results: Path, con: duckdb.DuckDBPyConnection, include_all: bool, path: Path | None = None
) -> Path:
    """Write the run's page, atomically (a temporary file in the same folder, then renamed).

    Args:
        results: the run's folder (holds `run.json` and `spec.yaml` where a driver wrote them).
        con: `analysis.connect(results)`.
        include_all: keep wrong and heuristic programs in the patching aggregates.
        path: where to write it; default `results / "report.html"`.

    Returns:
        The page's path.

    Raises:
        OSError: the page cannot be written there (nothing partial is left).
    """
    results = Path(results)
    path = Path(path) if path is not None else results / "report.html"
    text = page(results, con, include_all)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (a rename within one file system), hidden, and unique to this writer.
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d bytes)", path, len(text.encode()))
    return path


def page(results: Path, con: duckdb.DuckDBPyConnection, include_all: bool) -> str:
    """The page's HTML: the run, the tables, the charts, the failures and skips, the footer."""
    run = read_run(results)
    drawn = figures(con, include_all)
    parts = [
        ("run", "The run", run_part(results, run)),
        ("tables", "Summary tables", tables_part(sections(con, include_all))),
        ("charts", "Charts", charts_part(drawn)),
        ("failures", "Failures and skips", failures_part(results, run, con)),
    ]
    toc = "".join(
        f'<li><a href="#{key}">{title}</a>'
        + (
            "<ol>" + "".join(f'<li><a href="#chart-{n}">{_e(n)}</a></li>' for n in drawn) + "</ol>"
            if key == "charts" and drawn
            else ""
        )
        + "</li>"
        for key, title, _ in parts
    )
    body = "\n".join(
        f'<section id="{key}">\n<h2>{title}</h2>\n{content}\n</section>'
        for key, title, content in parts
    )
    bundle = javascript_bundle() if drawn else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>run {_e(results.name)}</title>
<style>{CSS}</style>
<script>{bundle}</script>
</head>
<body>
<h1>run {_e(results.name)}</h1>
<p class="note">{_e(str(results.resolve()))}</p>
<nav><ol>{toc}</ol></nav>
{body}
<footer>{_e(FOOTER)}</footer>
<script>{RENDER % json.dumps(EMBED_OPTIONS)}</script>
</body>
</html>
"""


def read_run(results: Path) -> dict[str, Any]:
    """`run.json`, or {} where there is none or it is not a JSON object."""
    try:
        data = json.loads((results / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_part(results: Path, run: dict[str, Any]) -> str:
    """Folder, status, timings, versions and commit, then run.json in full and the spec."""
    items = [("folder", str(results.resolve()))]
    items += [(label, _flat(run[key])) for key, label in RUN_FIELDS if key in run]
    out = ["<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"]
    if run:
        full = json.dumps(run, indent=2, default=str)
        out.append(f"<details><summary>run.json</summary><pre>{_e(full)}</pre></details>")
    elif (results / "run.json").exists():
        out.append('<p class="note">run.json is there but is not a JSON object</p>')
    else:
        out.append('<p class="note">no run.json (a driver writes it when a run starts)</p>')
    spec = results / "spec.yaml"
    out.append("<h3>spec.yaml</h3>")
    if spec.is_file():
        out.append(f"<pre>{_e(spec.read_text())}</pre>")
    else:
        out.append('<p class="note">no spec.yaml in the folder</p>')
    return "\n".join(out)


def tables_part(parts: list[Section]) -> str:
    """Each section's title and table (or its text, preformatted)."""
    if not parts:
        return '<p class="note">no results yet</p>'
    out = []
    for section in parts:
        if section.title:
            out.append(f"<h3>{_e(section.title)}</h3>")
        elif section.text:  # the prompt check: its text begins with its own title
            out.append("<h3>prompt check</h3>")
        if section.table is not None:
            out.append(table_html(section.table))
        if section.text:
            out.append(f"<pre>{_e(section.text)}</pre>")
    return "\n".join(out)


def table_html(table: pd.DataFrame) -> str:
    """`table` with its intervals as text (`with_intervals`), numbers to 3 decimals, missing
    values as `-`, and the rows that rest on fewer than `MIN_PROGRAMS` programs in grey, with a
    footnote."""
    if not len(table):
        return '<p class="note">none</p>'
    few_rows = (
        (table["programs"] < MIN_PROGRAMS).fillna(False).to_list()
        if "programs" in table.columns
        else [False] * len(table)
    )
    shown = with_intervals(table)
    head = "".join(f"<th>{_e(str(c))}</th>" for c in shown.columns)
    rows = []
    for few, values in zip(few_rows, shown.itertuples(index=False), strict=True):
        cells = []
        for value in values:
            text, number = _cell(value)
            cells.append(f'<td class="num">{_e(text)}</td>' if number else f"<td>{_e(text)}</td>")
        rows.append(('<tr class="few">' if few else "<tr>") + "".join(cells) + "</tr>")
    out = f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>'
    out += "".join(rows) + "</tbody></table></div>"
    few = few_programs(table)
    if few:
        out += (
            f'<p class="note">grey: the row rests on fewer than {MIN_PROGRAMS} programs '
            f"({few} of {len(table)} rows)</p>"
        )
    return out


def charts_part(drawn: dict[str, alt.TopLevelMixin]) -> str:
    """One heading and div per chart, its Vega-Lite spec beside it as JSON."""
    if not drawn:
        return '<p class="note">none (no rows)</p>'
    out = []
    for name, chart in drawn.items():
        spec = json.dumps(chart.to_dict(), allow_nan=False)
        out.append(
            f'<section id="chart-{_e(name)}" class="wide"><h3>{_e(name)}</h3>\n'
            f'<div class="chart" data-chart="{_e(name)}" data-spec="spec-{_e(name)}"></div>\n'
            f'<script type="application/json" id="spec-{_e(name)}">{_script_safe(spec)}</script>'
            "</section>"
        )
    return "\n".join(out)


def failures_part(results: Path, run: dict[str, Any], con: duckdb.DuckDBPyConnection) -> str:
    """The failed shards (the last record of each) and the skipped programs, each "none" when
    there are none."""
    records = run.get("failures")
    if records is None:  # a run still going (or stopped hard) has only failures.jsonl yet
        records = _jsonl(results / "failures.jsonl")
    last = {str(r.get("shard", r.get("id", i))): r for i, r in enumerate(records)}
    out = ["<h3>failed shards</h3>"]
    if last:
        rows = [
            {
                "shard": stem,
                "kind": r.get("kind"),
                "model": r.get("model"),
                "task": r.get("task"),
                "seq_len": r.get("seq_len"),
                "programs": f"{r.get('start')}+{r.get('n')}" if "start" in r else None,
                "site": r.get("site"),
                "layers": _flat(r["layers"]) if r.get("layers") else None,
                "counterfactual": r.get("counterfactual"),
                "attempts": r.get("attempts"),
                "time": r.get("time"),
                "last error": (str(r.get("error") or "").splitlines() or [""])[0][:300],
            }
            for stem, r in last.items()
        ]
        # `programs` here is a range of program indices, not a count: no greying.
        out.append(table_html(pd.DataFrame(rows).rename(columns={"programs": "program range"})))
    else:
        out.append('<p class="note">none</p>')
    out.append("<h3>skipped programs</h3>")
    skipped = con.execute(SKIPPED).df()
    if len(skipped):
        out.append(_plain_table(skipped))
    else:
        out.append('<p class="note">none</p>')
    return "\n".join(out)


@functools.cache
def javascript_bundle() -> str:
    """vega-embed, Vega-Lite (Altair's version) and Vega in one script, as Altair inlines them,
    made safe to sit inside a `<script>` element."""
    vl_version = "_".join(alt.SCHEMA_VERSION.split(".")[:2])  # v6.4.1 -> v6_4
    return vl_convert.javascript_bundle(vl_version=vl_version).replace("</script", "<\\/script")


def _plain_table(df: pd.DataFrame) -> str:
    """`df` as a table with no greying (its `programs` is a count of skips, not of support)."""
    return table_html(df.rename(columns={"programs": "skipped programs"}))


def _cell(value: Any) -> tuple[str, bool]:
    """A cell's text, and whether it is a number (aligned right)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "-", False
    if isinstance(value, bool | str):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}", True
    return _flat(value), False


def _flat(value: Any) -> str:
    """A run.json value on one line: a dict as `key value, ...`, a list joined by commas."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_flat(v) for v in value)
    return str(value)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _script_safe(text: str) -> str:
    """JSON that cannot end its `<script>` element early: `<` only occurs inside JSON strings,
    where `\\u003c` reads the same."""
    return text.replace("<", "\\u003c")


def _e(text: str) -> str:
    return html.escape(text, quote=True)
