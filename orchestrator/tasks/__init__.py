"""Program families: generators of small Python programs with known answers and counterfactuals.

    from orchestrator.tasks import generate, iter_programs
    program = generate("binding", seed=0, seq_len=16, index=500, style="paper")

Every family is deterministic in (seed, seq_len, index), returns plain `Program` records, and
shares one prompt template (`RAW_TEMPLATE`: the program itself, the answer is the next token),
one template for models that talk (`CHAT_TEMPLATE`) and one answer parser (`parse_answer`).
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator.tasks import binding, boolean, exception, increments, range_loop
from orchestrator.tasks.base import (
    CHAT_TEMPLATE,
    RAW_TEMPLATE,
    STYLES,
    Program,
    iter_indices,
    parse_answer,
    render_prompt,
)

__all__ = [
    "CHAT_TEMPLATE",
    "FAMILIES",
    "RAW_TEMPLATE",
    "STYLES",
    "Family",
    "Program",
    "generate",
    "get_family",
    "iter_programs",
    "parse_answer",
    "render_prompt",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """A program family as the rest of the system sees it.

    Attributes:
        name: the task name used in specs and result tables.
        generate: `(seed, seq_len, index, **options) -> Program`.
        min_seq_len: fewest statement lines the family can write.
        candidates: every answer the family can give, for next-token scoring.
        options: keyword options beyond `style` that `generate` accepts.
    """

    name: str
    generate: Callable[..., Program]
    min_seq_len: int
    candidates: tuple[str, ...]
    options: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "binding",
            binding.generate,
            1,
            tuple(binding.DIGITS),
            ("max_depth", "p_var", "n_names", "stratify"),
        ),
        Family("range", range_loop.generate, range_loop.MIN_SEQ_LEN, range_loop.CANDIDATES),
        Family("increments", increments.generate, increments.MIN_SEQ_LEN, increments.CANDIDATES),
        Family("boolean", boolean.generate, boolean.MIN_SEQ_LEN, boolean.CANDIDATES),
        Family("exception", exception.generate, exception.MIN_SEQ_LEN, exception.CANDIDATES),
    )
}


def get_family(name: str) -> Family:
    """The family called `name`.

    Raises:
        ValueError: unknown name; the message lists the families.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown task family {name!r}; choose one of {sorted(FAMILIES)}"
        ) from None


def generate(task: str, seed: int, seq_len: int, index: int, **options: Any) -> Program:
    """Program `index` of family `task` for (seed, seq_len); options as the family takes them.

    Raises:
        ValueError: unknown family, an option the family does not take, or a bad value.
    """
    family = get_family(task)
    unknown = sorted(set(options) - {"style", *family.options})
    if unknown:
        allowed = ["style", *family.options]
        raise ValueError(f"task {task!r} does not take option(s) {unknown}; it takes {allowed}")
    return family.generate(seed, seq_len, index, **options)


def iter_programs(
    task: str, seed: int, seq_len: int, n: int, start: int = 0, **options: Any
) -> Iterator[Program]:
    """Programs `start .. start+n-1` of the stream, generated lazily one at a time."""
    for index in iter_indices(start, n):
        yield generate(task, seed, seq_len, index, **options)
