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

NAME = "exception"
MIN_SEQ_LEN = 6
CANDIDATES = tuple(str(v) for v in range(10))
QUERY = "result"


def generate(seed: int, seq_len: int, index: int, *, style: Style = "seed") -> Program:
    """Program `index` of the (seed, seq_len) stream: the try statement plus distractors.

    Raises:
        ValueError: seq_len below 6, or a bad style.
    """
    check_seq_len(NAME, seq_len, minimum=MIN_SEQ_LEN)
    style = check_style(style)
    rng = program_rng(seed, NAME, seq_len, index)
    eq = assign_op(style)

    def attempt() -> Program | None:
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

        def evaluate(c: list[int]) -> str:
            if c[1] == 0:
                return str(c[2])
            return str(c[0] // c[1] if op == "//" else c[0] % c[1])

        return assemble(
            task=NAME,
            seed=seed,
            seq_len=seq_len,
            index=index,
            rng=rng,
            style=style,
            blocks=blocks,
            reserved={x, y},
            query=QUERY,
            consts=consts,
            evaluate=evaluate,
        )

    return draw(NAME, attempt)
