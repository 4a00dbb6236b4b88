"""The patching plan: which patches are asked for, which of them need a forward pass, and how
those passes run. Plain data, built without a model, so that what the engine will do can be
printed, compared and tested on its own (after pyvene's intervention-as-data).

A patch puts the counterfactual activation at one (site, layer, position[, head]) into the clean
run and asks for the logits at the program's *readout positions*, its last `n_read` (one for a
single-token answer; for a multi-token answer under teacher forcing, the program is the prompt
and the answer but its last token, and position j of the readout predicts answer token j). Every
patched position is a prompt position, at or before the first readout position. Three facts of
a causal decoder make most of the work unnecessary, and the plan applies each of them by name:

* **No forward where nothing differs** (`Patch.free`). Before the first position where the two
  prompts' tokens differ, both runs compute the same activations (causal attention), so the
  patch is the clean run (`before_diff`). At layer 0 the residual stream is the embedding of the
  token, equal in both runs wherever the tokens agree (`same_token`). A head or MLP output at the
  last layer, before the first readout position, is read by nothing that reaches the readout
  (`unread`).
* **Only the suffix runs.** A patch at position p cannot change positions before p, so a pass
  feeds tokens p.. only, and reads the clean run's keys and values for positions < p from its
  cache.
* **Rows join at their layer.** A patch at layer L cannot change layers below L, so its row
  enters the pass at layer L, with the clean residual stream as input: the batch grows as the
  forward climbs. A head or MLP patch at layer L < last changes only the residual of position p
  after layer L: where the main pass would be wider than one position, a one-position
  *pre-pass* computes that residual and the row joins the main pass at layer L + 1
  (`Entry.first == "carried"`), saving width - 1 token-layers per row. With n_read > 1 this
  includes the first readout position (its pass is n_read wide). At the last layer there is no
  layer to join: the write happens inside the main pass.

Rows of different programs share a pass when their programs have the same `stack_key` (length,
n_read) and the patch the same position; each row reads its own program's clean cache. The plan
also says what the clean and counterfactual runs must keep (`Plan.reads`), and what the passes
cost (`Plan.cost`, token-layers; `actors.flops` counts floating-point operations).
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

Site = Literal["resid_pre", "attn_head", "mlp_out"]
SITES: tuple[str, ...] = ("resid_pre", "attn_head", "mlp_out")
Free = Literal["before_diff", "same_token", "unread"]
StackKey = tuple[int, int]  # (n_tokens, n_read)
First = Literal["clean", "cf", "carried"]
Write = Literal["none", "head", "mlp"]


@dataclasses.dataclass(frozen=True)
class ProgramShape:
    """What the planner needs of one tokenized clean/counterfactual pair.

    Attributes:
        n_tokens: program length (both prompts have it).
        diff: positions where the two prompts' tokens differ, ascending, at least one.
        positions: the positions to patch.
        n_read: readout positions, `n_tokens - n_read ..`; diff and patch positions are at or
            before the first (after it both programs hold the same, teacher-forced, answer).
    """

    n_tokens: int
    diff: tuple[int, ...]
    positions: tuple[int, ...]
    n_read: int = 1

    def __post_init__(self) -> None:
        assert self.diff and list(self.diff) == sorted(set(self.diff)), f"diff={self.diff}"
        assert 1 <= self.n_read <= self.n_tokens, f"n_read={self.n_read}, n_tokens={self.n_tokens}"
        assert all(0 <= p <= self.first_read for p in (*self.diff, *self.positions)), (
            f"positions {self.positions} or diff {self.diff} outside 0..{self.first_read} "
            f"(n_tokens={self.n_tokens}, n_read={self.n_read})"
        )

    @property
    def first_read(self) -> int:
        return self.n_tokens - self.n_read

    @property
    def stack_key(self) -> StackKey:
        """(n_tokens, n_read): programs that share a stack of runs and passes."""
        return self.n_tokens, self.n_read


@dataclasses.dataclass(frozen=True)
class Patch:
    """One output row: the counterfactual activation at (site, layer, pos[, head]).

    `free` names why no forward is needed (the row's logits are the clean run's), or is None.
    """

    program: int
    site: str
    layer: int
    pos: int
    head: int | None = None
    free: Free | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
    """A row entering a pass.

    Attributes:
        patch: index into `Plan.patches`.
        layer: the layer whose input the row becomes (the batch grows here).
        first: what the row's input holds at the pass's first position: the clean residual
            stream (`clean`), the counterfactual one (`cf`, a `resid_pre` patch), or the output
            of this patch's pre-pass (`carried`). Later positions always hold the clean stream.
        write: a counterfactual value written inside `layer` at the first position: one head's
            slice of the attention output projection's input (`head`), or the MLP's output
            (`mlp`).
    """

    patch: int
    layer: int
    first: First = "clean"
    write: Write = "none"


@dataclasses.dataclass(frozen=True)
class Pass:
    """One forward over positions `start..stop-1` of programs of `n_tokens` tokens whose last
    `n_read` positions are read out.

    The forward runs layers 0..`last_layer`; entries are sorted by layer, and each joins the
    batch at its layer. What the batch holds at layer `l`:

    * a main pass (`read == "logits"`): every entry with `layer <= l`, in order, since each row
      needs the readout positions' logits (a main pass feeds them all: `stop == n_tokens`,
      `start <= n_tokens - n_read`);
    * a pre-pass (`read == "layer_out"`): only the entries with `layer == l`, since each row is
      read at its own layer (its output at position `start`, later `carried`) and then leaves.

    Where no entry is in the batch (below the first entry's layer; in a pre-pass, a layer no
    entry joins), the forward carries one row, the clean tokens of the first entry's program,
    which is dropped where entries join: a Hugging Face forward starts at the embeddings.
    """

    n_tokens: int
    start: int
    stop: int
    last_layer: int
    read: Literal["logits", "layer_out"]
    entries: tuple[Entry, ...]
    n_read: int = 1

    def __post_init__(self) -> None:
        layers = [e.layer for e in self.entries]
        assert self.entries and layers == sorted(layers), f"entries not sorted: {layers}"
        assert 0 <= self.start < self.stop <= self.n_tokens, (self.start, self.stop)
        assert layers[-1] <= self.last_layer, f"entry at {layers[-1]} > last {self.last_layer}"
        assert self.read == "logits" or self.width == 1, "a pre-pass feeds one position"
        assert self.read == "layer_out" or (
            self.stop == self.n_tokens and self.width >= self.n_read
        ), f"main pass {self.start}..{self.stop - 1} must feed the last {self.n_read} positions"

    @property
    def stack_key(self) -> StackKey:
        return self.n_tokens, self.n_read

    @property
    def width(self) -> int:
        """Positions fed per row."""
        return self.stop - self.start

    @property
    def first_layer(self) -> int:
        return self.entries[0].layer

    @functools.cached_property
    def _starts(self) -> list[int]:
        """`_starts[l]`: the number of entries with layer < l, for l in 0..last_layer + 1."""
        starts, i = [], 0
        for layer in range(self.last_layer + 2):
            while i < len(self.entries) and self.entries[i].layer < layer:
                i += 1
            starts.append(i)
        return starts

    def joining(self, layer: int) -> tuple[int, int]:
        """The slice `[a, b)` of `entries` that joins at `layer`."""
        return self._starts[layer], self._starts[layer + 1]

    def members(self, layer: int) -> tuple[int, int]:
        """The slice of `entries` in the batch at `layer`, in batch order; empty: the carrier."""
        a, b = self.joining(layer)
        return (a, b) if self.read == "layer_out" else (0, b)

    def batch(self, layer: int) -> int:
        """Rows the forward computes at `layer` (the carrier counts one)."""
        a, b = self.members(layer)
        return max(1, b - a)

    def token_layers(self) -> int:
        """Token x layer units this pass computes, the carrier included."""
        return self.width * sum(self.batch(x) for x in range(self.last_layer + 1))

    def split(self) -> tuple["Pass", "Pass"]:
        """Two passes of half the rows each (for a pass that ran out of memory)."""
        assert len(self.entries) > 1, "a pass of one row cannot be split"
        half = len(self.entries) // 2
        parts = self.entries[:half], self.entries[half:]
        last = [p[-1].layer if self.read == "layer_out" else self.last_layer for p in parts]
        return tuple(  # type: ignore[return-value]
            dataclasses.replace(self, entries=p, last_layer=x)
            for p, x in zip(parts, last, strict=True)
        )


@dataclasses.dataclass(frozen=True)
class Reads:
    """Layers whose activations the clean and counterfactual runs must keep."""

    clean_resid: tuple[int, ...]
    cf_resid: tuple[int, ...]
    cf_z: tuple[int, ...]
    cf_mlp: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a plan computes. `runs`: the clean and counterfactual forwards (token-layers);
    `readout_rows`: hidden states through the vocabulary readout (n_read per main-pass row,
    n_read per program and run)."""

    patches: int
    free: int
    passes: int
    pre_passes: int
    token_layers: int
    runs: int
    readout_rows: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every patch of a set of programs, and the passes that compute the ones not free.

    Passes come in execution order: for each (program length, n_read, position), its
    pre-passes, then the main passes that need their outputs.
    """

    n_layers: int
    n_heads: int
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    programs: tuple[ProgramShape, ...]
    patches: tuple[Patch, ...]
    passes: tuple[Pass, ...]

    @property
    def reads(self) -> Reads:
        clean, cf_resid, z, mlp = set(), set(), set(), set()
        for ps in self.passes:
            for e in ps.entries:
                clean.add(e.layer)
                if e.first == "cf":
                    cf_resid.add(e.layer)
                if e.write == "head":
                    z.add(e.layer)
                if e.write == "mlp":
                    mlp.add(e.layer)
        return Reads(*(tuple(sorted(s)) for s in (clean, cf_resid, z, mlp)))

    def cost(self) -> Cost:
        return Cost(
            patches=len(self.patches),
            free=sum(p.free is not None for p in self.patches),
            passes=len(self.passes),
            pre_passes=sum(p.read == "layer_out" for p in self.passes),
            token_layers=sum(p.token_layers() for p in self.passes),
            runs=2 * self.n_layers * sum(s.n_tokens for s in self.programs),
            readout_rows=sum(len(p.entries) * p.n_read for p in self.passes if p.read == "logits")
            + 2 * sum(s.n_read for s in self.programs),
        )

    def describe(self) -> str:
        """A few lines a researcher can read: counts, costs, and the largest passes."""
        c = self.cost()
        lines = [
            f"{c.patches} patches over {len(self.programs)} programs: {c.free} free "
            f"(no forward), {c.patches - c.free} in {c.passes} passes ({c.pre_passes} pre-passes)",
            f"token-layers: passes {c.token_layers:,}, clean/cf runs {c.runs:,}",
        ]
        for ps in sorted(self.passes, key=lambda p: -p.token_layers())[:3]:
            read = f" x {ps.n_read} positions" if ps.n_read > 1 else ""
            lines.append(
                f"  pass T={ps.n_tokens} positions {ps.start}..{ps.stop - 1} layers "
                f"{ps.first_layer}..{ps.last_layer} rows {len(ps.entries)} read {ps.read}{read}"
            )
        return "\n".join(lines)


RowLimit = Callable[[int, int], int]
"""Rows allowed in one pass, given (positions fed, positions attended): see `actors.budget`."""
Keep = Callable[[int, str, int, int, int | None], bool]
"""Whether to patch (program, site, layer, pos, head): an explicit set of cells instead of all."""


def _free(shape: ProgramShape, n_layers: int, site: str, layer: int, pos: int) -> Free | None:
    if pos < shape.diff[0]:
        return "before_diff"
    if site == "resid_pre" and layer == 0 and pos not in shape.diff:
        return "same_token"
    if site != "resid_pre" and layer == n_layers - 1 and pos < shape.first_read:
        return "unread"
    return None


def list_patches(
    programs: Sequence[ProgramShape],
    sites: Sequence[str],
    layers: Sequence[int],
    n_layers: int,
    n_heads: int,
    keep: Keep | None = None,
) -> list[Patch]:
    """Every patch (or every one `keep` accepts), in output order: program, site, layer,
    position, head."""
    patches = []
    for g, shape in enumerate(programs):
        for site in sites:
            for layer in layers:
                for pos in shape.positions:
                    free = _free(shape, n_layers, site, layer, pos)
                    heads: Iterable[int | None] = range(n_heads) if site == "attn_head" else [None]
                    patches.extend(
                        Patch(g, site, layer, pos, h, free)
                        for h in heads
                        if keep is None or keep(g, site, layer, pos, h)
                    )
    return patches


def _chunks(entries: list[Entry], limit: int) -> Iterable[tuple[Entry, ...]]:
    """Main passes: consecutive runs of at most `limit` entries, sorted by layer (every row
    stays to the last layer, so the top layer's batch is the whole pass)."""
    entries = sorted(entries, key=lambda e: e.layer)  # stable: patch order within a layer
    for i in range(0, len(entries), limit):
        yield tuple(entries[i : i + limit])


def _pre_chunks(entries: list[Entry], limit: int) -> Iterable[tuple[Entry, ...]]:
    """Pre-passes: a pre-pass's batch at a layer is only the rows joining there, so pass j takes
    the j-th run of at most `limit` entries of every layer."""
    by_layer: dict[int, list[Entry]] = {}
    for e in entries:
        by_layer.setdefault(e.layer, []).append(e)
    for j in itertools.count():
        chunk = [e for layer in sorted(by_layer) for e in by_layer[layer][j * limit :][:limit]]
        if not chunk:
            return
        yield tuple(chunk)


def build_plan(
    programs: Sequence[ProgramShape],
    sites: Sequence[str],
    layers: Sequence[int],
    n_layers: int,
    n_heads: int,
    row_limit: RowLimit,
    keep: Keep | None = None,
) -> Plan:
    """Plan every patch of `programs` at `sites` x `layers` x each program's positions (or
    only the cells `keep` accepts: the passes then hold those alone).

    Args:
        programs: the tokenized pairs' shapes.
        sites: any of `resid_pre`, `attn_head`, `mlp_out`.
        layers: layer indices, each in 0..n_layers-1.
        n_layers / n_heads: the model's.
        row_limit: rows allowed per pass given (positions fed, positions attended).
        keep: which (program, site, layer, pos, head) cells to patch (default: all).

    Returns:
        The plan; its `patches` are in output order.

    Raises:
        ValueError: an unknown site or a layer out of range.
    """
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; the sites are {list(SITES)}")
    out_of_range = [x for x in layers if not 0 <= x < n_layers]
    if out_of_range:
        raise ValueError(f"layers {out_of_range} out of range: the model has 0..{n_layers - 1}")
    patches = list_patches(programs, sites, layers, n_layers, n_heads, keep)
    pre: dict[tuple[int, int, int], list[Entry]] = {}
    main: dict[tuple[int, int, int], list[Entry]] = {}
    for i, patch in enumerate(patches):
        if patch.free is not None:
            continue
        shape = programs[patch.program]
        key = (*shape.stack_key, patch.pos)
        write: Write = {"attn_head": "head", "mlp_out": "mlp"}.get(patch.site, "none")
        if write == "none":
            main.setdefault(key, []).append(Entry(i, patch.layer, "cf"))
        elif patch.pos == shape.n_tokens - 1 or patch.layer == n_layers - 1:
            # At the last position the pre-pass would be the whole pass; at the last layer
            # (the first readout position, else it is free) there is no layer to carry it to.
            main.setdefault(key, []).append(Entry(i, patch.layer, "clean", write))
        else:
            pre.setdefault(key, []).append(Entry(i, patch.layer, "clean", write))
            main.setdefault(key, []).append(Entry(i, patch.layer + 1, "carried"))
    passes: list[Pass] = []
    for key in sorted(set(pre) | set(main)):
        n_tokens, n_read, pos = key
        if key in pre:
            limit = max(1, row_limit(1, pos + 1))
            for chunk in _pre_chunks(pre[key], limit):
                last = chunk[-1].layer
                passes.append(Pass(n_tokens, pos, pos + 1, last, "layer_out", chunk, n_read))
        limit = max(1, row_limit(n_tokens - pos, n_tokens))
        for chunk in _chunks(main[key], limit):
            passes.append(Pass(n_tokens, pos, n_tokens, n_layers - 1, "logits", chunk, n_read))
    return Plan(
        n_layers,
        n_heads,
        tuple(sites),
        tuple(layers),
        tuple(programs),
        tuple(patches),
        tuple(passes),
    )


def group_by_length(shapes: Sequence[ProgramShape]) -> dict[int, list[int]]:
    """Program indices by prompt length (one stack of activations per length)."""
    order = sorted(range(len(shapes)), key=lambda g: shapes[g].n_tokens)
    return {n: list(gs) for n, gs in itertools.groupby(order, key=lambda g: shapes[g].n_tokens)}
