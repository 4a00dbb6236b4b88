"""The `range` family: a counter grown by a constant step in a `for ... in range(n)` loop.

    x = 2
    for i in range(3):
        x += 4
    #x:

The answer is `x0 + n * step` (0-90). The counterfactual changes one of the three constants.
"""

import random

from orchestrator.tasks.base import LETTERS, Program, Style, assign_op
from orchestrator.tasks.compose import Core, const, generate_family

NAME = "range"
MIN_SEQ_LEN = 3
CANDIDATES = tuple(str(v) for v in range(100))


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream: the loop plus `seq_len - 3` distractors.

    Raises:
        ValueError: seq_len below 3, or a bad style.
    """
    return generate_family(NAME, MIN_SEQ_LEN, _core, seed, seq_len, index, style)


def _core(rng: random.Random, seq_len: int, style: Style) -> Core:
    x, i = rng.sample(LETTERS, 2)
    consts = [rng.randrange(10), rng.randrange(1, 10), rng.randrange(1, 10)]
    blocks = [
        [(x, assign_op(style), const(0, consts[0]))],
        [
            ("for ", i, " in range(", const(1, consts[1]), "):"),
            ("    ", x, assign_op(style, "+="), const(2, consts[2])),
        ],
    ]
    return Core(blocks, {x, i}, x, consts, lambda c: str(c[0] + c[1] * c[2]))
