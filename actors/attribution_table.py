"""From attribution estimates to rows of `ATTRIBUTION_SCHEMA`, column-wise: a program's cells are
numpy arrays, not one Python object per row, because at a 70B model's 80 layers x 64 heads a
program has ~360,000 of them at 70 positions. Also the choice of the cells checked exactly
(`choose`) and the filling-in of their exact effects."""

import dataclasses
import random

import numpy as np
import pyarrow as pa

from actors.patching import PATCHING_SCHEMA
from actors.rows import MIN_DENOMINATOR, program_columns
from actors.targets import EncodedPair

Cell = tuple[str, int, int, int | None]  # site, layer, pos, head

# A cell's and its program's columns as in patching rows (model .. answer_prefix), then its own.
ATTRIBUTION_SCHEMA = pa.schema(
    [
        *(PATCHING_SCHEMA.field(name) for name in PATCHING_SCHEMA.names[:13]),
        ("top1_correct", pa.bool_()),
        ("cf_top1_correct", pa.bool_()),
        ("clean_logit_diff", pa.float32()),
        ("cf_logit_diff", pa.float32()),
        ("estimate", pa.float32()),
        ("norm_estimate", pa.float32()),
        ("grad_drop", pa.float32()),
        ("attention_fix", pa.bool_()),
        ("verify", pa.string()),
        ("exact", pa.float32()),
        ("norm_exact", pa.float32()),
        ("exact_flipped", pa.bool_()),
        ("counterfactual", pa.string()),  # root_value: the estimates' counterfactual
    ]
)
assert ATTRIBUTION_SCHEMA.names[12] == "answer_prefix", "the shared columns end there"


@dataclasses.dataclass
class Block:
    """One program's cells: `fixed` holds the columns every cell shares, the arrays one entry
    per cell (sites and layers in the estimates' order, then positions, then heads)."""

    key: tuple[str, int, int]  # (task, seq_len, index), as `Patcher.patch(cells=...)` takes
    fixed: dict
    site: np.ndarray
    layer: np.ndarray
    head: np.ndarray  # -1: no head
    pos: np.ndarray
    token: np.ndarray
    label: np.ndarray
    estimate: np.ndarray
    grad_drop: np.ndarray | None
    verify: np.ndarray = None  # type: ignore[assignment]
    exact: np.ndarray = None  # type: ignore[assignment]
    norm_exact: np.ndarray = None  # type: ignore[assignment]
    exact_flipped: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.estimate)
        self.verify = np.full(n, None, dtype=object)
        self.exact = np.full(n, np.nan, dtype=np.float32)
        self.norm_exact = np.full(n, np.nan, dtype=np.float32)
        self.exact_flipped = np.full(n, None, dtype=object)

    def cell(self, i: int) -> Cell:
        head = int(self.head[i])
        return str(self.site[i]), int(self.layer[i]), int(self.pos[i]), None if head < 0 else head


def block(
    model: str,
    prog: dict,
    pair: EncodedPair,
    logit_diffs: tuple[float, float],
    tops: tuple[int, int],
    cells: dict[tuple[str, int], np.ndarray],
    grad_drop: dict[tuple[str, int], np.ndarray] | None,
    wanted: list[int],
) -> Block:
    """The block of one program from its estimates (`cells`: (site, layer) -> `[pos]` or
    `[pos, head]`, every position) at the `wanted` positions."""
    clean, cf = logit_diffs
    fixed = {
        **program_columns(model, prog, pair),
        "top1_correct": tops[0] == pair.clean_answer_id,
        "cf_top1_correct": tops[1] == pair.cf_answer_id,
        "clean_logit_diff": clean,
        "cf_logit_diff": cf,
    }
    at = np.asarray(wanted, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("site", "layer", "head", "pos", "e", "d")}
    for (site, layer), values in cells.items():
        values = values[at]
        heads = values.shape[1] if values.ndim == 2 else 1
        n = values.size
        parts["site"].append(np.full(n, site, dtype=object))
        parts["layer"].append(np.full(n, layer, dtype=np.int32))
        parts["head"].append(np.tile(np.arange(heads) if values.ndim == 2 else [-1], len(at)))
        parts["pos"].append(np.repeat(at, heads))
        parts["e"].append(values.reshape(-1))
        if grad_drop is not None:
            parts["d"].append(grad_drop[(site, layer)][at].reshape(-1))
    tokens = np.asarray(pair.tokens, dtype=object)
    labels = np.asarray(pair.labels, dtype=object)
    pos = np.concatenate(parts["pos"])
    return Block(
        key=(prog["task"], prog["seq_len"], prog["index"]),
        fixed=fixed,
        site=np.concatenate(parts["site"]),
        layer=np.concatenate(parts["layer"]),
        head=np.concatenate(parts["head"]).astype(np.int32),
        pos=pos.astype(np.int32),
        token=tokens[pos],
        label=labels[pos],
        estimate=np.concatenate(parts["e"]).astype(np.float32),
        grad_drop=np.concatenate(parts["d"]).astype(np.float32) if grad_drop is not None else None,
    )


def choose(scores: np.ndarray, k: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """The k indices of largest |score| (ties: the earlier first) and k others drawn at random
    from the rest, in that order."""
    order = np.argsort(-np.abs(scores), kind="stable").tolist()
    rest = sorted(order[k:])
    return order[:k], rng.sample(rest, min(k, len(rest)))


def chosen_cells(blocks: list[Block], k: int, seed: int, by_grad_drop: bool) -> dict:
    """Mark each program's cells to check exactly (`verify`: `top` / `random`, per site, the
    sample seeded by (seed, program, site)); returns them as `Patcher.patch(cells=...)` takes."""
    cells: dict[tuple, set[Cell]] = {}
    for b in blocks:
        scores = b.grad_drop if by_grad_drop and b.grad_drop is not None else b.estimate
        for site in dict.fromkeys(b.site.tolist()):
            index = np.flatnonzero(b.site == site)
            rng = random.Random(f"{seed}/{b.key[0]}/{b.key[1]}/{b.key[2]}/{site}")
            top, drawn = choose(scores[index], k, rng)
            for kind, picks in (("top", top), ("random", drawn)):
                for i in index[picks]:
                    b.verify[i] = kind
                    cells.setdefault(b.key, set()).add(b.cell(int(i)))
    return cells


def fill_exact(blocks: list[Block], patched: pa.Table) -> None:
    """Copy the exact effects of the patched cells (`PATCHING_SCHEMA` rows) into the blocks."""
    found = {}
    for r in patched.to_pylist():
        key = (r["task"], r["seq_len"], r["program"], r["site"], r["layer"], r["pos"], r["head"])
        found[key] = r
    for b in blocks:
        for i in np.flatnonzero(b.verify != None):  # noqa: E711 (element-wise)
            r = found[(*b.key, *b.cell(int(i)))]
            b.exact[i] = r["patched_logit_diff"] - r["clean_logit_diff"]
            b.norm_exact[i] = np.nan if r["norm_effect"] is None else r["norm_effect"]
            b.exact_flipped[i] = r["flipped"]


def _floats(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def table(blocks: list[Block], attention_fix: bool) -> pa.Table:
    """The rows of the blocks, in order."""
    parts = []
    for b in blocks:
        n = len(b.estimate)
        denom = b.fixed["cf_logit_diff"] - b.fixed["clean_logit_diff"]
        norm = b.estimate / denom if abs(denom) >= MIN_DENOMINATOR else np.full(n, np.nan)
        columns = {name: pa.array([value] * n) for name, value in b.fixed.items()}
        columns |= {
            "site": pa.array(b.site, pa.string()),
            "layer": pa.array(b.layer, pa.int32()),
            "head": pa.array(b.head, pa.int32(), mask=b.head < 0),
            "pos": pa.array(b.pos, pa.int32()),
            "token": pa.array(b.token, pa.string()),
            "label": pa.array(b.label, pa.string()),
            "estimate": pa.array(b.estimate, pa.float32()),
            "norm_estimate": _floats(norm.astype(np.float32)),
            "grad_drop": pa.nulls(n, pa.float32()) if b.grad_drop is None else _floats(b.grad_drop),
            "attention_fix": pa.array([attention_fix] * n, pa.bool_()),
            "verify": pa.array(b.verify, pa.string()),
            "exact": _floats(b.exact),
            "norm_exact": _floats(b.norm_exact),
            "exact_flipped": pa.array(b.exact_flipped, pa.bool_()),
        }
        parts.append(
            pa.table(
                [columns[f.name].cast(f.type) for f in ATTRIBUTION_SCHEMA],
                schema=ATTRIBUTION_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else ATTRIBUTION_SCHEMA.empty_table()
