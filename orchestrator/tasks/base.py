"""Shared pieces of the program families: the `Program` record, deterministic randomness, and a
line builder that records the character spans of labelled places as it writes.

A program is plain data (DESIGN: Programs). Generation is a pure function of
(seed, task, seq_len, index): each program gets its own `random.Random` seeded from a SHA-256 of
those four values, so index 500 comes out the same whether it is generated alone or as the 500th
of a run, on any machine and any Python version.
"""

import dataclasses
import hashlib
import random
import re
import string
from collections.abc import Iterator
from typing import Any, Literal

Style = Literal["seed", "paper"]
STYLES: tuple[str, ...] = ("seed", "paper")
LETTERS = string.ascii_lowercase

# The default template is the program itself: the answer is the token that follows the text.
RAW_TEMPLATE = "{text}"
# A template for instruction-tuned models that answer in words; `parse_answer` reads them.
CHAT_TEMPLATE = (
    "Here is a Python program:\n\n```python\n{program}\n```\n\n"
    "What is the value of `{query}` at the end of the program? "
    "Answer with the value only.\nAnswer:"
)


@dataclasses.dataclass(frozen=True)
class Program:
    """One generated program, with its counterfactual where the family has one.

    Attributes:
        task: family name (`binding`, `range`, ...).
        seq_len: number of statement lines before the query line.
        index: position in the (seed, task, seq_len) stream; the join key with results.
        seed: the sweep seed it was generated from.
        text: the program, ending with the query comment line (`#q:`), no trailing newline.
        answer: the value of `query` after running the program, as Python prints it.
        query: the variable whose final value is asked for.
        cf_text: the counterfactual program: one constant changed, same length as `text`.
        cf_answer: the answer of `cf_text`; differs from `answer` in its first character.
        depth: referential depth of the query's chain (binding only).
        root_line: 1-based line that holds the root value (binding only).
        heuristic: the root value sits on line 1 or 2 (binding only).
        spans: label -> [start, end) character span in `text` (and `cf_text`).
    """

    task: str
    seq_len: int
    index: int
    seed: int
    text: str
    answer: str
    query: str
    cf_text: str | None = None
    cf_answer: str | None = None
    depth: int | None = None
    root_line: int | None = None
    heuristic: bool | None = None
    spans: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, spans as `[start, end]` lists."""
        out = dataclasses.asdict(self)
        out["spans"] = {k: [s, e] for k, (s, e) in self.spans.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Program":
        """The program `to_dict` wrote (spans back to tuples)."""
        spans = {k: (int(s), int(e)) for k, (s, e) in data.get("spans", {}).items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in fields}, "spans": spans})

    @property
    def program(self) -> str:
        """The statements without the query line (for templates that restate the question)."""
        return self.text.rsplit("\n", 1)[0]


def program_rng(seed: int, task: str, seq_len: int, index: int) -> random.Random:
    """A `random.Random` that depends only on (seed, task, seq_len, index)."""
    key = f"{seed}\x1f{task}\x1f{seq_len}\x1f{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


class LineBuilder:
    """Writes a program line by line and remembers where labelled pieces landed.

    `add(...)` takes the pieces of one line; pieces given as `(label, text)` are recorded in
    `spans[label]`. Pieces with `None` labels are plain text.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self.spans: dict[str, tuple[int, int]] = {}
        self.line_starts: list[int] = []

    def add(self, *pieces: str | tuple[str | None, str]) -> None:
        if self._parts:
            self._write("\n")
        self.line_starts.append(self._length)
        for piece in pieces:
            label, text = piece if isinstance(piece, tuple) else (None, piece)
            if label is not None:
                assert label not in self.spans, f"span label {label!r} written twice"
                self.spans[label] = (self._length, self._length + len(text))
            self._write(text)

    def _write(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    @property
    def text(self) -> str:
        return "".join(self._parts)


def assign_op(style: Style, op: str = "=") -> str:
    """`' = '` in the seed's style, `'='` in the paper's (likewise `+=`, `-=`)."""
    return f" {op} " if style == "seed" else op


def query_line(query: str) -> tuple[str | tuple[str, str], ...]:
    """Pieces of the query comment `#q:` with its `query_var` and `final_colon` spans."""
    return ("#", ("query_var", query), ("final_colon", ":"))


def replace_at(text: str, start: int, new: str) -> str:
    """`text` with the characters at `start` replaced by `new` (same length)."""
    return text[:start] + new + text[start + len(new) :]


def check_style(style: str) -> Style:
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {list(STYLES)}; use style: seed or paper")
    return style  # type: ignore[return-value]


def check_seq_len(task: str, seq_len: int, minimum: int, maximum: int = 200) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
        raise TypeError(f"{task}: seq_len must be an int, got {seq_len!r}")
    if not minimum <= seq_len <= maximum:
        raise ValueError(
            f"{task}: seq_len={seq_len} is out of range; this family needs "
            f"{minimum} <= seq_len <= {maximum} statement lines"
        )


_ANSWER_RE = re.compile(r"True|False|-?\d+")


def parse_answer(generated: str) -> str | None:
    """The first value (`True`, `False` or an integer) in a model's generated text, else None.

    Shared by every family: all answers are Python ints or bools as `print` writes them.
    """
    match = _ANSWER_RE.search(generated)
    return match.group(0) if match else None


def render_prompt(program: Program, template: str = RAW_TEMPLATE) -> str:
    """Fill a template with `{text}`, `{program}` (statements only) and `{query}`."""
    try:
        return template.format(text=program.text, program=program.program, query=program.query)
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"prompt template {template!r} uses an unknown field {err}; "
            "the fields are {text}, {program} and {query} (write {{ and }} for braces)"
        ) from None


def distractor_names(rng: random.Random, exclude: set[str], k: int) -> list[str]:
    """k distinct single-letter names not in `exclude`."""
    pool = [c for c in LETTERS if c not in exclude]
    return rng.sample(pool, k)


def iter_indices(start: int, n: int) -> Iterator[int]:
    if start < 0 or n < 0:
        raise ValueError(f"start={start} and n={n} must be >= 0")
    return iter(range(start, start + n))
