"""The `increments` family: a variable set once, then moved up and down step by step.

    x = 3
    x += 2
    y = 4
    x -= 1
    #x:

Between half and all of the lines after the first step `x`; the rest are distractors. Steps are
chosen so that x stays within 0-99 along the way; a counterfactual that would leave that range
is not used.
"""

import random
from collections.abc import Sequence

from orchestrator.tasks.base import LETTERS, Program, Style, assign_op
from orchestrator.tasks.compose import Block, Core, const, generate_family

NAME = "increments"
MIN_SEQ_LEN = 2
CANDIDATES = tuple(str(v) for v in range(100))


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream.

    Raises:
        ValueError: seq_len below 2, or a bad style.
    """
    return generate_family(NAME, MIN_SEQ_LEN, _core, seed, seq_len, index, style)


def _run(consts: Sequence[int], signs: list[int]) -> str | None:
    value = consts[0]
    for sign, step in zip(signs, consts[1:], strict=True):
        value += sign * step
        if not 0 <= value <= 99:
            return None
    return str(value)


def _core(rng: random.Random, seq_len: int, style: Style) -> Core:
    x = rng.choice(LETTERS)
    n_steps = rng.randint(max(1, seq_len // 2), seq_len - 1)
    consts, signs = [rng.randrange(10)], []
    value = consts[0]
    for _ in range(n_steps):
        step = rng.randrange(1, 10)
        sign = -1 if step <= value and (value + step > 99 or rng.random() < 0.4) else 1
        value += sign * step
        consts.append(step)
        signs.append(sign)
    blocks: list[Block] = [[(x, assign_op(style), const(0, consts[0]))]]
    for k, sign in enumerate(signs, 1):
        op = assign_op(style, "+=" if sign > 0 else "-=")
        blocks.append([(x, op, const(k, consts[k]))])
    return Core(blocks, {x}, x, consts, lambda c: _run(c, signs))
