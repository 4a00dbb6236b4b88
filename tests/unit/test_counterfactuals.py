"""Counterfactual kinds of binding programs (`orchestrator.tasks.counterfactuals`): valid Python
with the claimed answer (changed, or not for the controls), the same length, one place changed
and labelled, deterministic."""

import pytest

from orchestrator.tasks import Program, generate, iter_programs
from orchestrator.tasks.counterfactuals import KINDS, LABELS, SAME_ANSWER, run_binding, variant

STYLES = ("paper", "seed")


def changed(a: str, b: str) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_runs_with_its_claimed_answer(kind, style) -> None:
    found = 0
    for seq_len in (4, 8, 16):
        for program in iter_programs("binding", 3, seq_len, 40, style=style):
            got = variant(program, kind)
            if got is None:
                continue
            found += 1
            assert len(got.cf_text) == len(got.text) == len(program.text)
            assert got.text == program.text and got.answer == program.answer
            diff = changed(got.text, got.cf_text)
            assert len(diff) == 1, (kind, got.text, got.cf_text)
            query = got.cf_text.rsplit("#", 1)[1].rstrip(":")
            assert run_binding(got.cf_text, query) == got.cf_answer
            assert run_binding(got.text, got.query) == got.answer
            if kind in SAME_ANSWER:
                assert got.cf_answer == got.answer, "a control leaves the answer as it was"
                start, end = got.spans[LABELS[kind]]
                assert diff == [start] and end == start + 1
            else:
                assert got.cf_answer != got.answer
            if kind == "query_swap":
                assert diff == [got.spans["query_var"][0]] and query != got.query
            assert variant(program, kind) == got, "deterministic"
    # Of these 120 programs (26 names), 17 have a stale binding in the chain: reassign is rare.
    assert found >= (10 if kind == "reassign" else 100), (kind, found)


def hand_made() -> Program:
    """a=1 / b=a / a=7 / c=b / #c:  -> c is 1, read through b from the first binding of a."""
    text = "a=1\nb=a\na=7\nc=b\n#c:"
    return Program(
        task="binding",
        seq_len=4,
        index=0,
        seed=0,
        text=text,
        answer="1",
        query="c",
        cf_text=text[:2] + "2" + text[3:],
        cf_answer="2",
        depth=3,
        root_line=1,
        heuristic=True,
        spans={"ref_depth_1_rhs": (2, 3), "query_var": (17, 18), "final_colon": (18, 19)},
    )


def test_a_hand_made_program_of_each_kind() -> None:
    program = hand_made()
    assert run_binding(program.text, "c") == "1"
    swap = variant(program, "query_swap")
    assert swap.cf_text.endswith("#a:") and swap.cf_answer == "7"
    distractor = variant(program, "distractor")
    # The only digit off c's chain (lines 4, 2, 1) is line 3's: a=7.
    assert distractor.spans["distractor_rhs"] == (10, 11) and distractor.cf_answer == "1"
    # a's binding the chain reads is line 1; nothing of the chain is bound before what it reads.
    assert variant(program, "reassign") is None


def test_reassign_changes_a_binding_the_chain_does_not_read() -> None:
    text = "x=4\nx=5\ny=x\n#y:"
    base = generate("binding", 0, 3, 0, style="paper")
    program = base.__class__(
        task="binding",
        seq_len=3,
        index=0,
        seed=0,
        text=text,
        answer="5",
        query="y",
        cf_text=text,
        cf_answer="6",
        spans={"query_var": (13, 14), "final_colon": (14, 15)},
    )
    got = variant(program, "reassign")
    assert got.spans["stale_rhs"] == (2, 3), "x=4 is overwritten before y reads x"
    assert got.cf_answer == "5" and run_binding(got.cf_text, "y") == "5"


def test_bad_kinds_and_families_are_named() -> None:
    program = generate("binding", 0, 8, 1)
    with pytest.raises(ValueError, match="use one of"):
        variant(program, "swap")
    other = generate("increments", 0, 8, 1)
    assert variant(other, "root_value") is other
    with pytest.raises(ValueError, match="use root_value for this task"):
        variant(other, "distractor")
