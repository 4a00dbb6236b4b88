"""The `range` family: a counter grown by a constant step in a `for ... in range(n)` loop.

    x = 2
    for i in range(3):
        x += 4
    #x:

The answer is `x0 + n * step` (0-90). The counterfactual changes one of the three constants.
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

NAME = "range"
MIN_SEQ_LEN = 3
CANDIDATES = tuple(str(v) for v in range(100))


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream: the loop plus `seq_len - 3` distractors.

    Raises:
        ValueError: seq_len below 3, or a bad style.
    """
    check_seq_len(NAME, seq_len, minimum=MIN_SEQ_LEN)
    style = check_style(style)
    rng = program_rng(seed, NAME, seq_len, index)
    eq, inc = assign_op(style), assign_op(style, "+=")

    def attempt() -> Program | None:
        x, i = rng.sample(LETTERS, 2)
        consts = [rng.randrange(10), rng.randrange(1, 10), rng.randrange(1, 10)]
        blocks = [
            [(x, eq, const(0, consts[0]))],
            [
                ("for ", i, " in range(", const(1, consts[1]), "):"),
                ("    ", x, inc, const(2, consts[2])),
            ],
        ]
        return assemble(
            task=NAME,
            seed=seed,
            seq_len=seq_len,
            index=index,
            rng=rng,
            style=style,
            blocks=blocks,
            reserved={x, i},
            query=x,
            consts=consts,
            evaluate=lambda c: str(c[0] + c[1] * c[2]),
        )

    return draw(NAME, attempt)
