"""The binding family's `stratify` option: (depth, heuristic) cells balanced by a fixed cycle over
the index, infeasible cells left out, programs deterministic, bad values named."""

import collections
import re

import pytest

from orchestrator.spec import SpecError, load_spec
from orchestrator.tasks import generate, iter_programs
from orchestrator.tasks.binding import strata_cycle

BOTH = {"style": "paper", "stratify": ["depth", "heuristic"]}


def cell_counts(seq_len: int, n: int, **options) -> collections.Counter:
    return collections.Counter(
        (p.depth, p.heuristic) for p in iter_programs("binding", 0, seq_len, n, **options)
    )


def feasible(seq_len: int) -> set[tuple[int, bool]]:
    """Written out by hand: every depth <= min(4, seq_len) with its root on line 1 or 2; rooted
    on line 3 or later only if the chain's d lines fit from line 3, i.e. seq_len >= d + 2."""
    depths = range(1, min(4, seq_len) + 1)
    return {(d, True) for d in depths} | {(d, False) for d in depths if d + 2 <= seq_len}


def test_feasible_cells_by_hand() -> None:
    assert feasible(4) == {(1, True), (2, True), (3, True), (4, True), (1, False), (2, False)}
    assert feasible(2) == {(1, True), (2, True)}
    for seq_len in (1, 2, 3, 4, 5, 6, 8, 16):
        cycle = strata_cycle(seq_len, stratify=["heuristic"])
        assert len(cycle) == len(set(cycle)), cycle
        assert set(cycle) == feasible(seq_len), seq_len


def test_same_programs_twice_and_alone() -> None:
    run_a = [p.to_dict() for p in iter_programs("binding", 7, 12, 40, **BOTH)]
    run_b = [p.to_dict() for p in iter_programs("binding", 7, 12, 40, **BOTH)]
    assert run_a == run_b
    for i in (0, 13, 39):
        assert generate("binding", 7, 12, i, **BOTH).to_dict() == run_a[i]
    assert list(iter_programs("binding", 7, 12, 3, start=37, **BOTH))[1].to_dict() == run_a[38]
    assert len({p["text"] for p in run_a}) == 40, "programs are not repeated"


@pytest.mark.parametrize("seq_len", [16, 8, 4])
def test_every_feasible_cell_equally_often(seq_len: int) -> None:
    cells = feasible(seq_len)
    counts = cell_counts(seq_len, 2 * len(cells), **BOTH)
    assert counts == {cell: 2 for cell in cells}, counts


def test_any_cycle_long_run_holds_every_cell_once() -> None:
    programs = list(iter_programs("binding", 1, 16, 8, start=5, **BOTH))
    assert {(p.depth, p.heuristic) for p in programs} == feasible(16)
    # Every cell fits at seq_len 16: depth still follows the index as without the option.
    assert [p.depth for p in programs] == [1 + p.index % 4 for p in programs]


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 5])
def test_infeasible_cells_never_requested(seq_len: int) -> None:
    # Short programs: a stratum that could not be drawn would loop until MAX_ATTEMPTS.
    counts = cell_counts(seq_len, 24, **BOTH)
    assert set(counts) == feasible(seq_len), counts
    for p in iter_programs("binding", 0, seq_len, 24, **BOTH):
        assert p.heuristic == (p.root_line <= 2)
        assert p.root_line + p.depth - 1 <= seq_len


def test_without_heuristic_the_programs_do_not_change() -> None:
    plain = [p.to_dict() for p in iter_programs("binding", 3, 8, 30, style="paper")]
    for stratify in ([], ["depth"], ()):
        again = iter_programs("binding", 3, 8, 30, style="paper", stratify=stratify)
        assert [p.to_dict() for p in again] == plain, stratify
    alone = iter_programs("binding", 3, 8, 30, style="paper", stratify=["heuristic"])
    both = iter_programs("binding", 3, 8, 30, style="paper", stratify=["heuristic", "depth"])
    assert [p.to_dict() for p in alone] == [p.to_dict() for p in both]
    # ...and the heuristic stratum does change them: unstratified, cells come by chance.
    assert cell_counts(8, 16, style="paper") != cell_counts(8, 16, **BOTH)


def test_max_depth_bounds_the_cycle() -> None:
    counts = cell_counts(16, 8, style="paper", stratify=["heuristic"], max_depth=2)
    assert counts == {(1, True): 2, (2, True): 2, (1, False): 2, (2, False): 2}


@pytest.mark.parametrize(
    ("stratify", "message"),
    [
        (["depth", "heurstic"], "stratify names unknown stratum 'heurstic'; fix: use names from"),
        ("heuristic", "stratify='heuristic' must be a list of stratum names"),
        ({"depth": 1}, "must be a list of stratum names from ['depth', 'heuristic']"),
        (["depth", 2], "stratify=['depth', 2] must hold stratum names (strings)"),
        (["heuristic", "heuristic"], "names 'heuristic' more than once; fix: name each stratum"),
    ],
)
def test_bad_stratify_is_named(stratify, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        generate("binding", 0, 8, 0, stratify=stratify)


def test_spec_names_a_bad_stratum(tmp_path) -> None:
    text = (
        "run: strata\nseed: 0\n"
        "tasks:\n  - family: binding\n    seq_lens: [4, 16]\n    n: 24\n"
        "    options: {{style: paper, stratify: {stratify}}}\n"
        "models:\n  - id: models/binding-tiny\n"
        "experiments:\n  behavior: {{backend: hf}}\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text(text.format(stratify="[depth, heuristic]"))
    assert load_spec(good).tasks[0].options["stratify"] == ["depth", "heuristic"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.format(stratify="[depth, heurstic]"))
    with pytest.raises(SpecError, match=r"bad\.yaml: the spec is not valid") as err:
        load_spec(bad)
    assert "tasks.0: binding: stratify names unknown stratum 'heurstic'" in str(err.value)


def test_the_preview_cli_takes_the_option(capsys) -> None:
    import json

    from orchestrator.tasks.__main__ import main

    assert main(["binding", "--seq-len", "8", "-n", "8", "--stratify", "depth,heuristic"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = list(iter_programs("binding", 0, 8, 8, stratify=["depth", "heuristic"]))
    assert shown == [p.to_dict() for p in want]
    assert collections.Counter((p["depth"], p["heuristic"]) for p in shown) == {
        (d, h): 1 for d in range(1, 5) for h in (True, False)
    }
    with pytest.raises(SystemExit):
        main(["binding", "--stratify", "depth,heuristc"])
    assert "unknown stratum 'heuristc'" in capsys.readouterr().err
