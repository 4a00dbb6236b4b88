"""The `boolean` family: boolean logic over comparisons of digits.

    a = 3 < 5
    b = 7 > 2
    c = a and b
    d = not c
    #d:

Leaves compare two digits; later lines combine earlier ones with `and`, `or`, `not`. The query is
the last of these lines; lines it does not read are distractors of the same kind, and the rest
of `seq_len` are numeric distractors. Constants are written as comparisons so that the
counterfactual (one digit changed, the answer flipped) keeps the text's length, which
`True` -> `False` would not.
"""

import operator
import random
from collections.abc import Sequence

from orchestrator.tasks.base import LETTERS, Program, Style, assign_op
from orchestrator.tasks.compose import Block, Core, const, generate_family

NAME = "boolean"
MIN_SEQ_LEN = 2
CANDIDATES = ("True", "False")
_COMPARE = {"<": operator.lt, ">": operator.gt}


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream.

    Raises:
        ValueError: seq_len below 2, or a bad style.
    """
    return generate_family(NAME, MIN_SEQ_LEN, _core, seed, seq_len, index, style)


def _core(rng: random.Random, seq_len: int, style: Style) -> Core:
    eq = assign_op(style)
    n_core = rng.randint(max(2, (seq_len + 1) // 2), seq_len)
    names = rng.sample(LETTERS, n_core)
    blocks: list[Block] = []
    # Each core line's meaning: ("leaf", op, k) compares constants k and k+1; ("not", i) and
    # ("and"/"or", i, j) read earlier core lines.
    nodes: list[tuple] = []
    consts: list[int] = []
    for line_no, name in enumerate(names):
        last = line_no == n_core - 1
        if line_no == 0 or (not last and rng.random() < 0.35):
            op = rng.choice(sorted(_COMPARE))
            k = len(consts)
            consts += [rng.randrange(10), rng.randrange(10)]
            nodes.append(("leaf", op, k))
            blocks.append([(name, eq, const(k, consts[k]), f" {op} ", const(k + 1, consts[k + 1]))])
        elif line_no == 1 or rng.random() < 0.25:
            i = rng.randrange(line_no)
            nodes.append(("not", i))
            blocks.append([(name, eq, "not ", names[i])])
        else:
            i, j = rng.sample(range(line_no), 2)
            word = rng.choice(["and", "or"])
            nodes.append((word, i, j))
            blocks.append([(name, eq, names[i], f" {word} ", names[j])])

    def evaluate(c: Sequence[int]) -> str:
        values: list[bool] = []
        for node in nodes:
            if node[0] == "leaf":
                values.append(_COMPARE[node[1]](c[node[2]], c[node[2] + 1]))
            elif node[0] == "not":
                values.append(not values[node[1]])
            elif node[0] == "and":
                values.append(values[node[1]] and values[node[2]])
            else:
                values.append(values[node[1]] or values[node[2]])
        return str(values[-1])

    return Core(blocks, set(names), names[-1], consts, evaluate)
