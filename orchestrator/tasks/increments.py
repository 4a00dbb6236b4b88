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

from orchestrator.tasks.base import (
    LETTERS,
    Program,
    Style,
    assign_op,
    check_seq_len,
    check_style,
    program_rng,
)
from orchestrator.tasks.compose import assemble, const, draw

NAME = "increments"
MIN_SEQ_LEN = 2
CANDIDATES = tuple(str(v) for v in range(100))


def _run(consts: list[int] | tuple[int, ...], signs: list[int]) -> str | None:
    value = consts[0]
    for sign, step in zip(signs, consts[1:], strict=True):
        value += sign * step
        if not 0 <= value <= 99:
            return None
    return str(value)


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream.

    Raises:
        ValueError: seq_len below 2, or a bad style.
    """
    check_seq_len(NAME, seq_len, minimum=MIN_SEQ_LEN)
    style = check_style(style)
    rng = program_rng(seed, NAME, seq_len, index)
    eq = assign_op(style)

    def attempt() -> Program | None:
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
        blocks = [[(x, eq, const(0, consts[0]))]]
        for k, sign in enumerate(signs, 1):
            blocks.append([(x, assign_op(style, "+=" if sign > 0 else "-="), const(k, consts[k]))])
        return assemble(
            task=NAME,
            seed=seed,
            seq_len=seq_len,
            index=index,
            rng=rng,
            style=style,
            blocks=blocks,
            reserved={x},
            query=x,
            consts=consts,
            evaluate=lambda c: _run(c, signs),
        )

    return draw(NAME, attempt)
