"""The report page (`python -m analysis RUN --report`) on a small run folder written by hand:
what it holds, read as text, and what a real headless browser draws of it.

The browser is Debian's Chromium, run with `--dump-dom` (the DOM after the page's scripts ran)
and `--enable-logging=stderr` (its console, one `CONSOLE` line per message). That log gives no
level (`console.log` and `console.error` read alike), so every console message counts as an
error but Vega's warnings, which Vega's logger writes as `WARN ...`.
"""

import html
import json
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import connect
from analysis.__main__ import main
from analysis.intervals import MIN_PROGRAMS
from analysis.report import FOOTER
from analysis.summary import few_programs, figures, sections
from tests.parquet_rows import view_schema
from tests.unit.test_analysis import write_run

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--dump-dom",
    "--virtual-time-budget=10000",
    "--enable-logging=stderr",
    "--v=0",
]
# `[pid:tid:time:INFO:CONSOLE:12] "message", source: file:///... (12)`; older Chromium writes
# `CONSOLE(12)`. A message may span lines (a stack).
CONSOLE = re.compile(r':CONSOLE(?::\d+|\(\d+\))\] "(.*?)", source: ', re.S)
SPEC = "run: report\nmodels: [org/a, org/b]  # <script>alert('spec')</script> & co\n"
FAILURE = {
    "shard": "abc123",
    "attempts": 3,
    "error": "CUDA out of memory <at layer 1> & more\nTraceback (most recent call last): ...",
    "time": "2026-12-01T10:00:00+00:00",
    "kind": "patching",
    "model": "org/a",
    "task": "binding",
    "seq_len": 8,
    "start": 0,
    "n": 2,
    "site": "resid_pre",
    "layers": [0, 1],
    "id": "abc123",
    "part": None,
    "counterfactual": "root_value",
}
# As the driver writes it at the end of a run, less `ray`, `cluster`, `plan` (tolerated).
RUN = {
    "spec": "specs/report.yaml",
    "spec_hash": "0123456789abcdef",
    "started": "2026-12-01T09:58:17+00:00",
    "versions": {"torch": "2.14.0", "duckdb": "2.0.1", "vllm": None},
    "git_commit": "7e50b5d9a3d3db528cdca730c7e4f1ea77ed0443",
    "status": "incomplete",
    "stopped": None,
    "finished": "2026-12-01T10:00:09+00:00",
    "wall_s": 111.4,
    "shards": {"total": 9, "done": 8, "done_before": 0, "finished": 8, "failed": 1},
    "rows_written": 312,
    "failures": [FAILURE],
}
SKIPS = [  # two programs of org/a whose counterfactual tokenizes to another length
    {"model": "org/a", "task": "binding", "seq_len": 4, "program": p, "reason": "cf length"}
    for p in (0, 1)
]
SECTIONS = ("The run", "Summary tables", "Charts", "Failures and skips")


@pytest.fixture
def run(tmp_path) -> Path:
    """Two models' behaviour and patching rows (`test_analysis`), a spec, a run.json with one
    failed shard, and two skipped programs."""
    root = write_run(tmp_path / "run")
    (root / "skipped").mkdir()
    skips = pa.Table.from_pylist(SKIPS, schema=view_schema("skipped"))
    pq.write_table(skips, root / "skipped" / "s1.parquet")
    (root / "spec.yaml").write_text(SPEC)
    (root / "run.json").write_text(json.dumps(RUN, indent=2))
    return root


def write(run: Path, *extra: str) -> Path:
    """The page, written through the CLI; returns its path."""
    assert main([str(run), "--report", *extra]) == 0
    return run / "report.html" if not extra else Path(extra[-1])


def test_page_is_self_contained_and_holds_every_part(run, capsys) -> None:
    page = write(run)
    assert capsys.readouterr().out == f"report: {page}\n"
    text = page.read_text()
    assert not list(run.glob(".report.html.*")), "the temporary file was renamed, not left"
    links = Links()
    links.feed(text)
    assert links.external == [], "the page loads nothing from the network"
    assert text.count("window.vegaEmbed=") == 1, "the bundle is inlined, once"
    # The parts, in order, and each in the table of contents.
    at = [text.index(f"<h2>{title}</h2>") for title in SECTIONS]
    assert at == sorted(at)
    for key in ("run", "tables", "charts", "failures"):
        assert f'<a href="#{key}">' in text and f'<section id="{key}">' in text
    con = connect(run)
    parts = sections(con, include_all=False)
    assert len(parts) >= 3
    for section in parts:
        assert html.escape(section.title or "prompt check") in text
        if section.text:
            assert f"<pre>{html.escape(section.text)}</pre>" in text
    drawn = figures(con, include_all=False)
    assert {"accuracy_vs_length", "patching_heatmap", "flip_rate"} <= set(drawn)
    for name in drawn:
        assert f'<h3>{name}</h3>\n<div class="chart" data-chart="{name}"' in text
        assert f'<a href="#chart-{name}">{name}</a>' in text
    assert text.count('<div class="chart" ') == len(drawn)
    # The run: its fields as run.json has them, the spec escaped, no field it lacks.
    assert "<dt>status</dt><dd>incomplete</dd>" in text
    assert f"<dd>{RUN['git_commit']}</dd>" in text
    assert "<dd>torch 2.14.0, duckdb 2.0.1, vllm -</dd>" in text
    assert "<dd>total 9, done 8, done_before 0, finished 8, failed 1</dd>" in text
    assert "<dt>ray</dt>" not in text
    assert f"<pre>{html.escape(SPEC)}</pre>" in text and "<script>alert(" not in text
    # Tables: numbers to 3 decimals, org/a's half-right length-8 programs; every row of this run
    # rests on 2-4 programs, so every row of a table with `programs` is grey, with the note.
    assert '<td class="num">0.500</td>' in text
    few = sum(few_programs(s.table) for s in parts if s.table is not None)
    assert few > 0 and text.count('<tr class="few">') == few
    assert f"rests on fewer than {MIN_PROGRAMS} programs" in text
    # Failures (the first line of the error, escaped) and skips; the footer.
    failures = text[text.index('<section id="failures">') :]
    assert "<td>abc123</td>" in failures and "<td>0, 1</td>" in failures
    assert "CUDA out of memory &lt;at layer 1&gt; &amp; more</td>" in failures
    assert "Traceback" not in failures
    assert '<td>cf length</td><td class="num">2</td>' in failures
    assert f"<footer>{html.escape(FOOTER)}</footer>" in text


def test_page_of_a_run_without_its_records_says_what_is_missing(run, tmp_path) -> None:
    """An old or copied folder: no run.json, no spec.yaml, no failures, no skips."""
    for name in ("run.json", "spec.yaml"):
        (run / name).unlink()
    for path in (run / "skipped").iterdir():
        path.unlink()
    page = write(run, "--report-path", str(tmp_path / "elsewhere" / "page.html"))
    text = page.read_text()
    assert not (run / "report.html").exists()
    assert "no run.json" in text and "no spec.yaml" in text
    failures = text[text.index('<section id="failures">') :]
    assert failures.count('<p class="note">none</p>') == 2


class Links(HTMLParser):
    """The `src` and `href` of every tag that point off the machine."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("src", "href") and value and re.match(r"\s*(https?:)?//", value):
                self.external.append(f"<{tag} {key}={value}>")


class ChartSvgs(HTMLParser):
    """Per chart div (`data-chart`): the `<svg>` elements drawn inside it, and its error text."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.chart: str | None = None
        self.depth = 0
        self.in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.chart is None:
            if tag == "div" and a.get("data-chart"):
                self.chart, self.depth = a["data-chart"], 1
                self.svgs[self.chart] = 0
            return
        self.depth += tag == "div"
        self.svgs[self.chart] += tag == "svg"
        self.in_error = tag == "p" and "chart-error" in (a.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        self.in_error = self.in_error and tag != "p"
        if self.chart is not None and tag == "div":
            self.depth -= 1
            if not self.depth:
                self.chart = None

    def handle_data(self, data: str) -> None:
        if self.in_error and self.chart is not None:
            self.errors[self.chart] = self.errors.get(self.chart, "") + data


def browse(page: Path, tmp_path: Path) -> tuple[ChartSvgs, list[str]]:
    """Open `page` in headless Chromium; returns what its chart divs hold after the scripts ran
    and the console's messages but Vega's warnings."""
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    out = subprocess.run(
        [str(CHROMIUM), *BROWSER_FLAGS, f"--user-data-dir={profile}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-3000:]
    dom = ChartSvgs()
    dom.feed(out.stdout)
    messages = CONSOLE.findall(out.stderr)
    return dom, [m for m in messages if not m.startswith("WARN ")]


def test_browser_draws_each_chart_as_one_svg_without_errors(run, tmp_path) -> None:
    drawn = figures(connect(run), include_all=False)
    dom, errors = browse(write(run), tmp_path)
    assert errors == [], "the page's console"
    assert dom.errors == {}
    assert dom.svgs == dict.fromkeys(drawn, 1), "one SVG in each chart's div, one div per chart"


def break_page(page: Path, text: str) -> Path:
    broken = page.with_name("broken.html")
    broken.write_text(text)
    return broken


def test_browser_check_fails_on_a_broken_page(run, tmp_path) -> None:
    """The check above can fail: a spec Vega cannot parse, and a page without the bundle, fail
    their charts visibly in their divs and on the console. (A field that is not in the data
    fails nothing: Vega draws an empty mark, silently.)"""
    page = write(run)
    text = page.read_text()
    names = list(figures(connect(run), include_all=False))
    start = text.index('<script type="application/json" id="spec-flip_rate">') + len(
        '<script type="application/json" id="spec-flip_rate">'
    )
    end = text.index("</script>", start)
    spec = json.loads(text[start:end])
    spec["transform"] = [{"filter": "datum.("}]  # an expression Vega cannot parse
    dom, errors = browse(break_page(page, text[:start] + json.dumps(spec) + text[end:]), tmp_path)
    assert errors == ["chart flip_rate failed to render: Unexpected token ("], errors
    assert dom.svgs == {n: int(n != "flip_rate") for n in names}
    assert dom.errors["flip_rate"].startswith("chart flip_rate failed to render")
    bundle = text.index("<script>") + len("<script>")
    no_bundle = text[:bundle] + text[text.index("</script>", bundle) :]
    dom, errors = browse(break_page(page, no_bundle), tmp_path)
    assert len(errors) == len(names) and "vegaEmbed is not defined" in errors[0], errors
    assert dom.svgs == dict.fromkeys(names, 0) and set(dom.errors) == set(names)
