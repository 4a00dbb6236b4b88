"""The `exception` family: integer arithmetic that may raise `ZeroDivisionError`.

    x = 8
    y = 0
    try:
        result = x // y
    except ZeroDivisionError:
        result = 5
    #result:

Half the programs divide by zero and take the handler's value. The counterfactual changes one
of the three constants so that the answer changes, often by switching the path taken.
"""

import random
from collections.abc import Sequence

from orchestrator.tasks.base import LETTERS, Program, Style, assign_op
from orchestrator.tasks.compose import Core, const, generate_family

NAME = "exception"
MIN_SEQ_LEN = 6
CANDIDATES = tuple(str(v) for v in range(10))
QUERY = "result"


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream: the try statement plus distractors.

    Raises:
        ValueError: seq_len below 6, or a bad style.
    """
    return generate_family(NAME, MIN_SEQ_LEN, _core, seed, seq_len, index, style)


def _core(rng: random.Random, seq_len: int, style: Style) -> Core:
    eq = assign_op(style)
    x, y = rng.sample(LETTERS, 2)
    op = rng.choice(["//", "%"])
    consts = [rng.randrange(10), 0 if rng.random() < 0.5 else rng.randrange(1, 10)]
    consts.append(rng.randrange(10))
    blocks = [
        [(x, eq, const(0, consts[0]))],
        [(y, eq, const(1, consts[1]))],
        [
            ("try:",),
            ("    ", QUERY, eq, x, f" {op} ", y),
            ("except ZeroDivisionError:",),
            ("    ", QUERY, eq, const(2, consts[2])),
        ],
    ]

    def evaluate(c: Sequence[int]) -> str:
        if c[1] == 0:
            return str(c[2])
        return str(c[0] // c[1] if op == "//" else c[0] % c[1])

    return Core(blocks, {x, y}, QUERY, consts, evaluate)
