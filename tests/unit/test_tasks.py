"""Program families: answers checked by running the programs, counterfactuals, spans, balance,
determinism, and property tests over seeds and lengths."""

import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.tasks import (
    CHAT_TEMPLATE,
    FAMILIES,
    Program,
    generate,
    get_family,
    iter_programs,
    parse_answer,
    render_prompt,
)


def run(text: str) -> dict:
    env: dict = {}
    exec(compile(text, "<program>", "exec"), env)
    return env


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos)


def check_program(p: Program) -> None:
    """Every property a program of any family must have."""
    family = get_family(p.task)
    assert p.text.endswith(f"#{p.query}:")
    assert p.text.count("\n") == p.seq_len, "seq_len statements plus the query line"
    assert str(run(p.text)[p.query]) == p.answer
    assert p.answer in family.candidates
    # Counterfactual: same length, one character changed, on one line, answer flipped.
    assert p.cf_text is not None and p.cf_answer is not None
    assert len(p.cf_text) == len(p.text)
    diff = [i for i, (a, b) in enumerate(zip(p.text, p.cf_text, strict=True)) if a != b]
    assert len(diff) == 1, f"cf differs at {diff}"
    changed = "ref_depth_1_rhs" if p.task == "binding" else "cf_const"
    assert p.spans[changed] == (diff[0], diff[0] + 1)
    assert str(run(p.cf_text)[p.query]) == p.cf_answer
    assert p.cf_answer[0] != p.answer[0], "the first answer token must change"
    assert p.cf_answer in family.candidates
    # Query spans.
    s, e = p.spans["query_var"]
    assert p.text[s:e] == p.query and p.text[s - 1] == "#"
    s, e = p.spans["final_colon"]
    assert p.text[s:e] == ":" and e == len(p.text)


def check_binding_chain(p: Program) -> None:
    """The ref_depth spans follow the chain from the root value to the queried variable."""
    lines = p.text.split("\n")
    assert p.depth is not None and 1 <= p.depth <= 4
    assert set(p.spans) == {f"ref_depth_{k}_rhs" for k in range(1, p.depth + 1)} | {
        "query_var",
        "final_colon",
    }
    s, e = p.spans["ref_depth_1_rhs"]
    assert p.text[s:e] == p.answer
    assert line_of(p.text, s) + 1 == p.root_line
    assert p.heuristic == (p.root_line <= 2)
    prev_line = -1
    for k in range(1, p.depth + 1):
        s, e = p.spans[f"ref_depth_{k}_rhs"]
        line_no = line_of(p.text, s)
        assert line_no > prev_line, "the chain runs forward through the program"
        lhs = lines[line_no].split("=")[0].strip()
        rhs = lines[line_no].split("=")[1].strip()
        assert p.text[s:e] == rhs
        if k < p.depth:
            nxt = p.spans[f"ref_depth_{k + 1}_rhs"]
            assert p.text[nxt[0] : nxt[1]] == lhs, "the next hop reads this line's variable"
            # ...and reads it before anything reassigns it.
            between = lines[line_no + 1 : line_of(p.text, nxt[0])]
            assert all(ln.split("=")[0].strip() != lhs for ln in between)
        else:
            assert lhs == p.query
            assert all(ln.split("=")[0].strip() != lhs for ln in lines[line_no + 1 : -1])
        prev_line = line_no


@pytest.mark.parametrize("task", sorted(FAMILIES))
@pytest.mark.parametrize("style", ["seed", "paper"])
def test_every_program_runs_to_its_answer(task: str, style: str) -> None:
    family = get_family(task)
    for seq_len in sorted({family.min_seq_len, 8, 16}):
        for p in iter_programs(task, seed=3, seq_len=seq_len, n=60, style=style):
            check_program(p)
            if task == "binding":
                check_binding_chain(p)


def test_binding_styles() -> None:
    seed_style = generate("binding", 0, 16, 11, style="seed")
    paper = generate("binding", 0, 16, 11, style="paper")
    assert " = " in seed_style.text and " " not in paper.text
    assert seed_style.text.replace(" = ", "=") == paper.text
    assert all(len(line) == 3 for line in paper.text.split("\n")), "the paper's `a=5` lines"


def test_binding_depths_are_balanced_and_heuristic_rate_reported() -> None:
    programs = list(iter_programs("binding", seed=0, seq_len=16, n=1000))
    counts = collections.Counter(p.depth for p in programs)
    assert counts == {1: 250, 2: 250, 3: 250, 4: 250}
    heuristic = sum(p.heuristic for p in programs) / len(programs)
    assert 0.3 < heuristic < 0.7, heuristic
    # Balance comes from rejection sampling, not from stopping at shallow chains: deep chains
    # are longer than the programs' own typical chain, and the query differs across programs.
    assert len({p.query for p in programs}) == 26


def test_binding_reassigns_variables() -> None:
    programs = list(iter_programs("binding", seed=0, seq_len=16, n=200))
    reassigned = 0
    for p in programs:
        lhs = [line.split("=")[0].strip() for line in p.text.split("\n")[:-1]]
        reassigned += len(lhs) != len(set(lhs))
    assert reassigned > 100


def test_max_depth_option() -> None:
    depths = {p.depth for p in iter_programs("binding", 0, 16, 40, max_depth=2)}
    assert depths == {1, 2}
    # Short programs cannot hold deep chains; depths cycle within what fits.
    assert {p.depth for p in iter_programs("binding", 0, 2, 40)} == {1, 2}


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_determinism_and_random_access(task: str) -> None:
    run_a = [p.to_dict() for p in iter_programs(task, seed=5, seq_len=12, n=501)]
    run_b = [p.to_dict() for p in iter_programs(task, seed=5, seq_len=12, n=501)]
    assert run_a == run_b
    assert generate(task, 5, 12, 500).to_dict() == run_a[500]
    assert list(iter_programs(task, 5, 12, 3, start=498))[2].to_dict() == run_a[500]
    other_seed = [p.text for p in iter_programs(task, seed=6, seq_len=12, n=50)]
    assert other_seed != [p["text"] for p in run_a[:50]]
    assert len({p["text"] for p in run_a}) > 450, "programs are not repeated"


def test_same_programs_in_another_process() -> None:
    """No dependence on Python's per-process string hashing."""
    code = (
        "import hashlib, json\n"
        "from orchestrator.tasks import FAMILIES, iter_programs\n"
        "h = hashlib.sha256()\n"
        "for t in sorted(FAMILIES):\n"
        "    for p in iter_programs(t, 1, 10, 40):\n"
        "        h.update(json.dumps(p.to_dict(), sort_keys=True).encode())\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    here = hashlib.sha256()
    for t in sorted(FAMILIES):
        for p in iter_programs(t, 1, 10, 40):
            here.update(json.dumps(p.to_dict(), sort_keys=True).encode())
    assert digests == {here.hexdigest()}


@settings(max_examples=150, deadline=None)
@given(
    task=st.sampled_from(sorted(FAMILIES)),
    seed=st.integers(0, 2**31),
    seq_len=st.integers(1, 24),
    index=st.integers(0, 10**6),
    style=st.sampled_from(["seed", "paper"]),
)
def test_property_any_seed_and_length(
    task: str, seed: int, seq_len: int, index: int, style: str
) -> None:
    seq_len = max(seq_len, get_family(task).min_seq_len)
    p = generate(task, seed, seq_len, index, style=style)
    assert (p.task, p.seed, p.seq_len, p.index) == (task, seed, seq_len, index)
    check_program(p)
    if task == "binding":
        check_binding_chain(p)
        assert p.depth == 1 + index % min(4, seq_len)
    assert generate(task, seed, seq_len, index, style=style) == p


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: generate("loops", 0, 8, 0), "unknown task family 'loops'"),
        (lambda: generate("binding", 0, 0, 0), "seq_len=0 is out of range"),
        (lambda: generate("exception", 0, 5, 0), "needs 6 <= seq_len"),
        (lambda: generate("binding", 0, 8, 0, style="tight"), "use style: seed or paper"),
        (lambda: generate("range", 0, 8, 0, max_depth=2), "does not take option(s) ['max_depth']"),
        (lambda: generate("binding", 0, 8, 0, max_depth=5), "max_depth=5 must be between 1"),
    ],
)
def test_bad_arguments_are_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_parse_answer_and_templates() -> None:
    assert parse_answer(" 7\n") == "7"
    assert parse_answer("The value is -12.") == "-12"
    assert parse_answer("It is True, since") == "True"
    assert parse_answer("no idea") is None
    p = generate("boolean", 0, 6, 1)
    assert render_prompt(p) == p.text
    chat = render_prompt(p, CHAT_TEMPLATE)
    assert p.program in chat and f"`{p.query}`" in chat and "#" not in chat
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        render_prompt(p, "{text} {answer}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.tasks", *args], capture_output=True, text=True
    )


def test_cli_prints_json_lines() -> None:
    out = run_cli("binding", "--seq-len", "16", "-n", "4", "--seed", "2", "--style", "paper")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4
    assert rows[3] == generate("binding", 2, 16, 3, style="paper").to_dict()
    needed = {"task", "seq_len", "index", "text", "answer", "query", "cf_text", "cf_answer"}
    assert needed | {"depth", "heuristic", "spans"} <= set(rows[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "invalid choice: 'nope'"),
        (["binding", "-n", "0"], "0 must be at least 1"),
        (["exception", "--seq-len", "4"], "too short for exception"),
        (["range", "--max-depth", "2"], "binding family only"),
        (["binding", "--style", "wide"], "invalid choice: 'wide'"),
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str], message: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
