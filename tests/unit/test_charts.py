"""The charts say how far to trust each number: grey cells and hollow points where programs are
few, interval bands under the lines, one fixed effect scale, and subtitles that add up. Frames are
built by hand with the columns every aggregate carries (`programs`, each mean's `_lo`, `_hi`)."""

import functools
import itertools
import re

import altair as alt
import pandas as pd
import pytest
import vl_convert

from analysis import charts, trajectory
from analysis.intervals import MIN_PROGRAMS

FEW, ENOUGH = 5, 30
assert FEW < MIN_PROGRAMS <= ENOUGH, f"{FEW=} {ENOUGH=} must straddle {MIN_PROGRAMS=}"
LABELS = ("ref_depth_1_rhs", "ref_depth_2_rhs", "query_var", "final_colon")


def grid(
    value: str, few: dict | None = None, extent: float = 0.3, centre: float = 0.0, **axes
) -> pd.DataFrame:
    """One row per combination of `axes`' values: the mean `value` spread over `centre` +-
    `extent`, its interval 0.05 either side, `programs` ENOUGH, except FEW in the row(s)
    matching `few`."""
    keys = list(axes)
    df = pd.DataFrame(list(itertools.product(*axes.values())), columns=keys)
    means = [centre + extent * (2 * i / max(len(df) - 1, 1) - 1) for i in range(len(df))]
    df[value] = means
    df[value + "_lo"] = df[value] - 0.05
    df[value + "_hi"] = df[value] + 0.05
    low = pd.Series(False, index=df.index)
    if few:
        low = pd.concat([df[k] == v for k, v in few.items()], axis=1).all(axis=1)
    df["programs"] = [FEW if x else ENOUGH for x in low]
    df["n"] = df["programs"] * 3
    return df


def _models(df: pd.DataFrame) -> pd.DataFrame:
    """A trajectory frame's checkpoint `model` id, from its `run` and `step`."""
    return df.assign(model=df["run"] + "-step" + df["step"].astype(str))


# Each heatmap with a frame of the contract columns, one cell at FEW programs.
HEATMAPS = {
    "patching_heatmap": lambda few: charts.patching_heatmap(
        grid("mean_effect", few, model=["org/a"], site=["resid_pre"], layer=[0, 1], label=LABELS)
    ),
    "attribution_heatmap": lambda few: charts.attribution_heatmap(
        grid(
            "mean_effect",
            few,
            model=["org/a"],
            site=["resid_pre"],
            kind=["estimate", "exact"],
            layer=[0, 1],
            label=LABELS,
        )
    ),
    "counterfactual_heatmap": lambda few: charts.counterfactual_heatmap(
        grid(
            "mean_effect",
            few,
            model=["org/a"],
            counterfactual=["root_value", "distractor"],
            site=["resid_pre"],
            layer=[0, 1],
            label=LABELS,
        )
    ),
    "heads": lambda few: charts.heads(
        grid(
            "mean_effect",
            few,
            model=["org/a"],
            layer=[0, 1],
            head=[0, 1, 2],
            label=["query_var", "final_colon"],
        )
    ),
    "routing_map": lambda few: charts.routing_map(
        grid(
            "mean_effect",
            few,
            model=["org/a"],
            scope=["answer"],
            source=["ref_depth_1_rhs", "query_var"],
            layer=[0, 1],
            head=[0, 1],
        )
    ),
    "root_effect_by_step": lambda few: trajectory.root_effect_by_step(
        _models(
            grid(
                "mean_effect",
                few,
                run=["models/traj"],
                step=[250, 1000],
                site=["resid_pre"],
                layer=[0, 1],
                label=LABELS,
            )
        )
    ),
}
FEW_CELL = {"layer": 1, "label": "query_var"}  # in every heatmap's frame but heads' and routing's
FEW_HEAD = {"layer": 1, "head": 0}


def _few_cell(name: str) -> dict:
    return FEW_HEAD if name in ("heads", "routing_map") else FEW_CELL


def svg_of(chart: alt.TopLevelMixin) -> str:
    return vl_convert.vegalite_to_svg(chart.to_json())


def marks(svg: str, role: str) -> list[str]:
    """The SVG elements of every mark of `role` (`rect mark`, `point`, `bar`)."""
    return re.findall(rf'<path [^>]*aria-roledescription="{role}"[^>]*/>', svg)


@pytest.mark.parametrize("name", HEATMAPS)
def test_cells_of_few_programs_are_grey_and_outlined(name: str) -> None:
    few = _few_cell(name)
    chart = HEATMAPS[name](few)
    rows = next(iter(chart.to_dict()["datasets"].values()))
    low = [r for r in rows if r["programs"] < MIN_PROGRAMS]
    assert len(low) >= 1 and len(low) < len(rows), "some cells low, others not"
    cells = marks(svg_of(chart), "rect mark")
    assert len(cells) == len(rows), "one rect per cell"
    grey = [c for c in cells if f'fill="{charts.FEW_FILL}"' in c]
    assert len(grey) == len(low), f"{len(grey)} grey cells for {len(low)} of few programs"
    assert all(f'stroke="{charts.FEW_STROKE}"' in c for c in grey), "outlined"
    assert not any("stroke=" in c for c in cells if c not in grey), "only they"
    # the grey cells are the cells of few programs: the aria label names the cell's keys
    for cell in grey:
        assert all(f"{k}: {v}" in cell for k, v in few.items()), cell
        assert f"programs: {FEW}" in cell, "the tooltip carries programs"


@pytest.mark.parametrize("name", HEATMAPS)
def test_every_effect_is_on_one_fixed_clamped_scale(name: str) -> None:
    spec = HEATMAPS[name](_few_cell(name)).to_dict()
    rows = next(iter(spec["datasets"].values()))
    assert max(abs(r["mean_effect"]) for r in rows) == pytest.approx(0.3), "the data's extent"
    color = spec["spec"]["encoding"]["color"]
    assert color["field"] == "mean_effect"
    assert color["scale"] == {
        "scheme": charts.DIVERGING,
        "domain": [-1, 1],
        "domainMid": 0,
        "clamp": True,
    }
    assert color["condition"] == {"test": charts.FEW, "value": charts.FEW_FILL}
    title = " ".join(color["title"])
    assert "clamped to ±1" in title and f"grey: fewer than {MIN_PROGRAMS} programs" in title
    tooltip = {t["field"]: t.get("format") for t in spec["spec"]["encoding"]["tooltip"]}
    assert {k: tooltip[k] for k in ("mean_effect", "mean_effect_lo", "mean_effect_hi")} == {
        "mean_effect": ".3f",
        "mean_effect_lo": ".3f",
        "mean_effect_hi": ".3f",
    }
    assert "programs" in tooltip


def test_an_effect_beyond_the_scale_takes_its_end_colour() -> None:
    """Clamped: 3 is drawn in the colour of 1, not off the scale (and 1 is not 0.3's colour)."""
    df = grid("mean_effect", model=["org/a"], site=["resid_pre"], layer=[0], label=LABELS[:3])
    df["mean_effect"] = [0.3, 1.0, 3.0]
    fills = [
        re.search(r'fill="([^"]+)"', c)[1]
        for c in marks(svg_of(charts.patching_heatmap(df)), "rect mark")
    ]
    assert fills[1] == fills[2] and fills[0] != fills[1], fills


# Each line chart with a frame of the contract columns (its mean, `programs` FEW at `few`).
LINES = {
    "accuracy_vs_length": (
        "accuracy",
        lambda few: charts.accuracy_vs_length(
            grid("accuracy", few, 0.2, 0.5, model=["org/a"], task=["binding"], seq_len=[8, 16, 32])
        ),
        {"seq_len": 16},
    ),
    "accuracy_by_depth": (
        "accuracy",
        lambda few: charts.accuracy_by_depth(
            grid(
                "accuracy", few, 0.2, 0.5, model=["org/a"], depth=[1, 2, 3], heuristic=[True, False]
            )
        ),
        {"depth": 2, "heuristic": False},
    ),
    "flip_rate": (
        "flip_rate",
        lambda few: charts.flip_rate(
            grid(
                "flip_rate",
                few,
                0.2,
                0.5,
                model=["org/a"],
                site=["resid_pre"],
                layer=[0, 1, 2],
                label=LABELS[:2],
            )
        ),
        {"layer": 1, "label": "ref_depth_2_rhs"},
    ),
    "accuracy_by_step": (
        "accuracy",
        lambda few: trajectory.accuracy_by_step(
            _models(
                grid(
                    "accuracy",
                    few,
                    0.2,
                    0.5,
                    run=["models/traj"],
                    step=[250, 1000, 4000],
                    depth=[1, 2],
                    heuristic=[True, False],
                )
            )
        ),
        {"step": 1000, "depth": 2, "heuristic": True},
    ),
    "probes_by_step": (
        "accuracy",
        lambda few: trajectory.probes_by_step(probes(few)),
        {"layer": 1},
    ),
}


def probes(few: dict | None) -> pd.DataFrame:
    """A probes frame: `programs` is `n_test`, the interval Wilson's (here made up)."""
    df = _models(
        grid(
            "accuracy",
            few,
            0.2,
            0.5,
            run=["models/traj"],
            step=[250, 1000],
            layer=[0, 1, 2],
            label=["final_colon"],
            target=["answer"],
        )
    )
    return df.assign(
        control_accuracy=0.3, chance=0.25, selectivity=df["accuracy"] - 0.3, n_test=df["programs"]
    ).drop(columns="n")


@pytest.mark.parametrize("name", LINES)
def test_lines_have_interval_bands_and_hollow_points_of_few_programs(name: str) -> None:
    value, draw, few = LINES[name]
    chart = draw(few)
    spec = chart.to_dict()
    layers = spec["spec"]["layer"]
    areas = [layer for layer in layers if layer["mark"]["type"] == "area"]
    assert len(areas) == 1, [layer["mark"] for layer in layers]
    (area,) = areas
    enc = area["encoding"]
    assert (enc["y"]["field"], enc["y2"]["field"]) == (f"{value}_lo", f"{value}_hi")
    assert 0.1 <= area["mark"]["opacity"] <= 0.2
    # the mean's line (not the probes' control line, which has no colour field)
    line = next(x for x in layers if x["mark"]["type"] == "line" and "color" in x["encoding"])
    assert enc["color"] == line["encoding"]["color"], "in the line's colour"
    assert layers.index(area) < layers.index(line), "under the line"
    tooltip = {t["field"] for t in line["encoding"]["tooltip"]}
    assert {value, f"{value}_lo", f"{value}_hi"} <= tooltip
    assert "programs" in tooltip or "n_test" in tooltip

    rows = next(iter(spec["datasets"].values()))
    low = sum(r["programs"] < MIN_PROGRAMS for r in rows)
    assert 1 <= low < len(rows)
    svg = svg_of(chart)
    points = marks(svg, "point")
    assert len(points) == len(rows), "one point per row"
    hollow = [p for p in points if 'fill="white"' in p]
    assert len(hollow) == low, f"{len(hollow)} hollow points for {low} rows of few programs"
    assert all(f"programs: {FEW}" in p or f"n_test: {FEW}" in p for p in hollow), hollow
    assert len(re.findall(r'aria-roledescription="area mark"', svg)) >= 1, "the band is drawn"


def test_a_band_spans_its_interval() -> None:
    """The band's top and bottom sit at `accuracy_hi` and `accuracy_lo` on the 0-1 axis."""
    df = grid("accuracy", model=["org/a"], task=["binding"], seq_len=[8, 16])
    df[["accuracy", "accuracy_lo", "accuracy_hi"]] = [[0.5, 0.25, 0.75], [0.5, 0.25, 0.75]]
    svg = svg_of(charts.accuracy_vs_length(df))
    (area,) = re.findall(r'<path [^>]*aria-roledescription="area mark"[^>]*/>', svg)
    ys = {float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", area)}
    assert ys == {charts.PANEL * (1 - 0.75), charts.PANEL * (1 - 0.25)}, ys


def error_frame() -> pd.DataFrame:
    """org/a: depth 1 with FEW wrong answers, depth 2 with ENOUGH; two kinds each."""
    rows = []
    for depth, wrong in ((1, FEW), (2, ENOUGH)):
        for kind, share in (("line_1_2_constant", 0.6), ("other", 0.4)):
            rows.append(
                {
                    "model": "org/a",
                    "depth": depth,
                    "error_kind": kind,
                    "n": round(wrong * share),
                    "wrong": wrong,
                    "share": share,
                    "share_lo": share - 0.1,
                    "share_hi": share + 0.1,
                    "programs": wrong,
                }
            )
    return pd.DataFrame(rows)


def test_error_kinds_fade_the_bars_of_few_wrong_answers() -> None:
    chart = charts.error_kinds(error_frame())
    spec = chart.to_dict()
    bars = spec["spec"]["layer"][0]
    assert {t["field"] for t in bars["encoding"]["tooltip"]} >= {"share_lo", "share_hi", "wrong"}
    assert spec["title"]["subtitle"] == [f"faded: fewer than {MIN_PROGRAMS} wrong answers"]
    drawn = marks(svg_of(chart), "bar")
    assert len(drawn) == 4
    faded = [b for b in drawn if f'opacity="{charts.FEW_OPACITY}"' in b]
    assert len(faded) == 2 and all("depth: 1" in b for b in faded), faded


def test_subtitle_appends_lines_and_keeps_the_title() -> None:
    chart = alt.Chart(pd.DataFrame({"x": [1]})).mark_point().encode(x="x:Q")
    titled = charts.subtitle(chart.properties(title="A title"), ["first line"])
    again = charts.subtitle(titled, ["second line", "third line"])
    assert again.title.to_dict() == {
        "text": "A title",
        "subtitle": ["first line", "second line", "third line"],
        "subtitleColor": charts.MUTED,
        "subtitleFontSize": 10,
    }
    assert titled.title.subtitle == ["first line"], "a copy: the first chart keeps its lines"
    svg = svg_of(again)
    assert ">A title</text>" in svg
    (group,) = re.findall(r'role-title-subtitle".*?</text>', svg)
    assert f'fill="{charts.MUTED}"' in group
    lines = re.findall(r"<tspan[^>]*>([^<]*)</tspan>", group)
    assert lines == ["first line", "second line", "third line"], group
    with pytest.raises(TypeError, match="not the string"):
        charts.subtitle(chart, "one line")


def test_a_chart_keeps_its_own_key_line_first() -> None:
    """The caller's lines (what was filtered) come after the chart's own (what the band means)."""
    df = grid("accuracy", model=["org/a"], task=["binding"], seq_len=[8, 16])
    chart = charts.subtitle(charts.accuracy_vs_length(df), ["programs right in both runs: 3 of 4"])
    assert chart.to_dict()["title"] == {
        "text": "Accuracy by program length",
        "subtitle": [charts.LINE_KEY, "programs right in both runs: 3 of 4"],
        "subtitleColor": charts.MUTED,
        "subtitleFontSize": 10,
    }


def test_a_frame_without_the_interval_columns_is_refused() -> None:
    df = grid("mean_effect", model=["org/a"], site=["resid_pre"], layer=[0], label=LABELS)
    with pytest.raises(ValueError, match=r"^patching_heatmap: the frame lacks \['programs'\]"):
        charts.patching_heatmap(df.drop(columns="programs"))
    with pytest.raises(ValueError, match=r"flip_rate.*'flip_rate_lo'"):
        charts.flip_rate(
            grid("flip_rate", model=["a"], site=["s"], layer=[0], label=LABELS).drop(
                columns="flip_rate_lo"
            )
        )


def scatter_frame() -> pd.DataFrame:
    df = grid("estimate", model=["org/a"], site=["resid_pre"], layer=[0, 1], head=[0], label=LABELS)
    return df.assign(
        verify=["top", "random"] * (len(df) // 2), exact=df["estimate"] * 2, spearman=0.8
    )


# Every chart function, with a frame of the contract columns.
EVERY = {
    **{name: functools.partial(draw, _few_cell(name)) for name, draw in HEATMAPS.items()},
    **{name: functools.partial(draw, few) for name, (_, draw, few) in LINES.items()},
    "error_kinds": lambda: charts.error_kinds(error_frame()),
    "attribution_scatter": lambda: charts.attribution_scatter(scatter_frame()),
}


def test_every_chart_function_is_exercised() -> None:
    """A new chart function joins EVERY, so that it is rendered too."""
    functions = {
        name
        for module in (charts, trajectory)
        for name, f in vars(module).items()
        if callable(f)
        and not name.startswith("_")
        and getattr(f, "__module__", "") == module.__name__
        and f.__annotations__.get("return") is alt.FacetChart
    }
    assert functions == set(EVERY), sorted(functions ^ set(EVERY))


@pytest.mark.parametrize("name", EVERY)
def test_every_chart_saves(name: str, tmp_path) -> None:
    chart = EVERY[name]()
    assert chart.to_dict()["config"]["axis"]["grid"] is False, "the theme is on"
    png, svg, html = charts.save(chart, tmp_path, name)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert svg.read_text().lstrip().startswith("<svg") and "vega" in html.read_text()
