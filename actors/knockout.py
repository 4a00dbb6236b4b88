"""Attention knockout: which attention edges carry the answer (Geva et al. 2023, "Dissecting
Recall of Factual Associations"; Wang et al. 2023, "Label Words are Anchors").

Activation patching (`actors.patching`) says which activations matter; it does not say which
position a head reads them from. A knockout cuts one edge of the attention graph: in one head of
one layer, the positions of the scope may no longer attend to one source position (its
pre-softmax score is -inf, so the head's other weights renormalize), and the metric's change is
the edge's effect. The metric is the engine's, `logit(cf answer) - logit(clean answer)` at the
last position (the compared tokens of `actors.answers`), on the clean inputs; the
counterfactual run only gives the scale of `norm_effect`.

* Sources: every labelled position of the program (`EncodedPair.labels`: the chain's
  `ref_depth_k_rhs`, `query_var`, a family's `cf_const`) but `final_colon` and `other`.
* Scopes: `answer` cuts the edge from the answer position (the last input) only; `later` cuts it
  from every position after the source, so nothing downstream reads the source through that
  head directly.

Mechanism: a forward pre-hook on the knocked layer's attention module replaces the
`attention_mask` it is called with by an additive mask per row and query head, `[batch, heads,
query, key]`: the model's own mask (causal, sliding window; a boolean or absent one turned
additive) plus -inf on the cut edges. Eager and SDPA attention both take such a mask, whatever
the family: Llama-likes with grouped-query attention (keys are shared, masks are per query
head), GPT-2, Gemma-2 (under eager its scores are soft-capped before the mask is added;
transformers' SDPA path drops the cap, for every forward alike). A wrapper in transformers'
attention registry (`ALL_ATTENTION_FUNCTIONS`) would do the same, but eager attention is not in
the registry (each modeling file passes its own function as the fallback), and the registry is
shared by every model of the process; the hook is the model's own, for one forward. Other
implementations (flash, flex) take no such mask: `Knocker` refuses them, naming the fix.

Rows of several (program, layer, head, source) knockouts of one program length share a forward:
the programs' clean inputs, one row per knockout, each layer's hook cutting its rows' edges.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from actors.budget import BatchSized, Footprint, auto_budget
from actors.engine import hidden_of, installed
from actors.execute import in_parts
from actors.loading import LoadedModel
from actors.patching import Patcher
from actors.rows import MIN_DENOMINATOR, program_columns
from actors.targets import OTHER, EncodedPair

__all__ = ["KNOCKOUT_SCHEMA", "SCOPES", "Knocker", "knock_mask", "sources"]

Scope = Literal["answer", "later"]
SCOPES: tuple[str, ...] = ("answer", "later")
NOT_SOURCES = ("final_colon", OTHER)
IMPLEMENTATIONS = ("eager", "sdpa")  # attention implementations that take a 4-D additive mask

KNOCKOUT_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("source", pa.string()),
        ("source_pos", pa.int32()),
        ("scope", pa.string()),
        ("token", pa.string()),
        ("clean_answer", pa.string()),
        ("cf_answer", pa.string()),
        ("answer_prefix", pa.string()),
        ("top1_correct", pa.bool_()),
        ("clean_logit_diff", pa.float32()),
        ("cf_logit_diff", pa.float32()),
        ("knocked_logit_diff", pa.float32()),
        ("effect", pa.float32()),
        ("norm_effect", pa.float32()),
        ("top1_changed", pa.bool_()),
        ("counterfactual", pa.string()),  # root_value: the scale of norm_effect
    ]
)


@dataclasses.dataclass(frozen=True)
class Knockout:
    """One cut edge: head `head` of layer `layer` stops attending to `source_pos` of pair
    `program` (an index into the caller's pairs)."""

    program: int
    layer: int
    head: int
    source_pos: int


def sources(pair: EncodedPair) -> list[int]:
    """The positions whose edges are cut: the labelled ones but `final_colon` and `other`."""
    return [pos for pos, label in enumerate(pair.labels) if label not in NOT_SOURCES]


def knock_mask(
    base: Float[Tensor, "#batch 1 query key"] | Bool[Tensor, "#batch 1 query key"] | None,
    shape: tuple[int, int, int],
    rows: Int[Tensor, " n"],
    heads: Int[Tensor, " n"],
    source_pos: Int[Tensor, " n"],
    scope: Scope,
    dtype: torch.dtype,
    causal: bool = True,
) -> Float[Tensor, "batch heads query query"]:
    """The additive attention mask of a layer whose rows `rows[i]` cut, in head `heads[i]`, the
    edges of `scope` to `source_pos[i]`.

    Args:
        base: the mask the model built (additive float, boolean `True` = attend, or None: SDPA's
            plain causal attention, or none at all where `causal` is False).
        shape: (batch, heads, positions) of the layer's attention.
        dtype: the queries' dtype (SDPA takes a float mask of its inputs' dtype).
    """
    batch, n_heads, n = shape
    device = rows.device
    assert base is None or base.device == device, f"mask on {base.device}, rows on {device}"
    if base is None:
        keep = torch.ones(n, n, dtype=torch.bool, device=device)
        base = (keep.tril() if causal else keep)[None, None]
    if base.dtype == torch.bool:
        base = torch.zeros(base.shape, dtype=dtype, device=device).masked_fill(
            ~base, torch.finfo(dtype).min
        )
    assert base.shape[-2:] == (n, n), f"mask {tuple(base.shape)} for {n} positions (a cache?)"
    query = torch.arange(n, device=device)[None, :]
    cut = query == n - 1 if scope == "answer" else query > source_pos[:, None]
    cut = cut.expand(len(rows), n)
    knock = torch.zeros(batch, n_heads, n, n, dtype=base.dtype, device=device)
    # Row i, head i, every query, key source_pos[i]: an [n_rows, query] block.
    knock[rows, heads, :, source_pos] = torch.zeros_like(cut, dtype=base.dtype).masked_fill(
        cut, float("-inf")
    )
    return base + knock


def _attention_of(layer: torch.nn.Module, attn_out: torch.nn.Module) -> torch.nn.Module:
    """The module of `layer` whose child is the attention output projection: the one called
    with `attention_mask`."""
    for module in layer.modules():
        if any(child is attn_out for child in module.children()):
            return module
    raise AssertionError(f"no module of {type(layer).__name__} holds its attention output")


class Knocker(BatchSized):
    """Attention knockouts on one loaded model. Plain class, like `Patcher`, which it uses to
    encode programs.

    Args:
        lm: the loaded model (eager or SDPA attention).
        batch_size: knockout rows per forward, or `auto`: as many as fit the memory budget
            (`actors.budget`), halved on out-of-memory.
        budget_bytes: the budget of `auto` (default: from the device's free memory).

    Raises:
        ValueError: the model's attention implementation takes no 4-D mask.

    Example:
        >>> table = Knocker(lm).knockout(programs, scope="answer")
    """

    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int | Literal["auto"] = "auto",
        budget_bytes: int | None = None,
    ) -> None:
        self.lm = lm
        self._check_implementation()
        self.arch = lm.arch
        self.batch_size = batch_size
        self.budget_bytes = budget_bytes
        dtype = next(lm.model.parameters()).dtype
        self.footprint = Footprint.of(lm.arch, lm.model.config, dtype.itemsize)
        self.attention = [
            _attention_of(layer, out)
            for layer, out in zip(lm.arch.layers, lm.arch.attn_out, strict=True)
        ]
        self.patcher = Patcher(lm, batch_size=1)
        self.skipped: list[tuple[Any, str]] = []

    def _check_implementation(self) -> None:
        implementation = self.lm.model.config._attn_implementation
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{self.lm.name}: attention implementation {implementation!r} takes no "
                f"per-head 4-D mask, which the knockout adds; use one of "
                f"{list(IMPLEMENTATIONS)}: lm.model.set_attn_implementation('sdpa') (or load "
                "the model with attn_implementation='eager')"
            )

    def _rows_per_forward(self, n_tokens: int) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        if self.budget_bytes is None:
            self.budget_bytes = auto_budget(self.lm.device)
        fp, n_heads = self.footprint, self.arch.n_heads
        # The layer's activations, the mask and its knock term, and the last position's logits.
        per_row = fp.row_bytes(n_tokens, n_tokens) + 2 * n_heads * n_tokens**2 * fp.dtype_bytes
        per_row += self.lm.model.get_output_embeddings().weight.shape[0] * fp.dtype_bytes
        return max(1, self.budget_bytes // per_row)

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        n = self.arch.n_layers
        chosen = list(range(n)) if layers is None else list(layers)
        bad = [x for x in chosen if not 0 <= x < n]
        if bad:
            raise ValueError(f"{self.lm.name}: layers {bad} out of range 0..{n - 1}")
        return chosen

    @contextlib.contextmanager
    def _cutting(self, cuts: list[Knockout | None], scope: Scope) -> Iterator[None]:
        """Hooks that cut, in the forward of the block, row i's edge `cuts[i]` (None: none)."""
        by_layer: dict[int, list[int]] = {}
        for row, cut in enumerate(cuts):
            if cut is not None:
                by_layer.setdefault(cut.layer, []).append(row)
        device = self.lm.device

        def hook(layer: int):
            mine = by_layer[layer]
            rows = torch.tensor(mine, device=device)
            heads = torch.tensor([cuts[r].head for r in mine], device=device)
            source_pos = torch.tensor([cuts[r].source_pos for r in mine], device=device)

            def fn(module, args, kwargs):
                hidden = hidden_of(args, kwargs)
                if "attention_mask" not in kwargs:
                    raise RuntimeError(
                        f"{self.lm.name}: layer {layer}'s {type(module).__name__} is called "
                        "without an attention_mask keyword, so the knockout cannot cut its "
                        "edges; fix: leave knockout out of the spec for this model, or give its "
                        "family a probe in actors/knockout.py"
                    )
                mask = knock_mask(
                    kwargs["attention_mask"],
                    (hidden.shape[0], self.arch.n_heads, hidden.shape[1]),
                    *(x.to(hidden.device) for x in (rows, heads, source_pos)),
                    scope,
                    hidden.dtype,
                    getattr(module, "is_causal", True),
                )
                return args, {**kwargs, "attention_mask": mask}

            return fn

        with installed([(self.attention[x], "pre", hook(x)) for x in by_layer]):
            yield

    @torch.no_grad()
    def _forward(
        self,
        ids: list[list[int]],
        answers: list[tuple[int, int]],
        cuts: list[Knockout | None],
        scope: Scope,
    ) -> tuple[list[float], list[int]]:
        """Per row, the metric (in double) and the top-1 token at the last position."""
        device = self.lm.device
        with self._cutting(cuts, scope):
            logits = self.lm.model(
                input_ids=torch.tensor(ids, device=device), use_cache=False, logits_to_keep=1
            ).logits[:, -1]
        picked = logits.double().gather(1, torch.tensor(answers, device=device))
        return (picked[:, 1] - picked[:, 0]).tolist(), logits.argmax(-1).tolist()

    def _run(
        self, pairs: list[EncodedPair], cuts: list[Knockout | None], scope: Scope, cf: bool = False
    ) -> tuple[list[float], list[int]]:
        """`_forward` over `cuts` (row i runs pair `cuts[i].program`, or pair i where `cuts`
        is all None), a length at a time, `_rows_per_forward` rows per forward."""
        which = [i if c is None else c.program for i, c in enumerate(cuts)]
        diffs, tops = [0.0] * len(cuts), [0] * len(cuts)
        by_length: dict[int, list[int]] = {}
        for i, g in enumerate(which):
            by_length.setdefault(len(pairs[g].clean_ids), []).append(i)

        def forward(part: list[int]) -> tuple[list[float], list[int]]:
            mine = [pairs[which[i]] for i in part]
            return self._forward(
                [p.cf_ids if cf else p.clean_ids for p in mine],
                [(p.clean_answer_id, p.cf_answer_id) for p in mine],
                [cuts[i] for i in part],
                scope,
            )

        def halve_budget() -> None:  # for the lengths that follow
            self.budget_bytes = max(1, self.budget_bytes // 2)

        for n_tokens, members in by_length.items():
            size = self._rows_per_forward(n_tokens)
            auto = self.batch_size == "auto"
            for part, (diff, top) in in_parts(members, size, forward, auto, halve_budget):
                for i, d, t in zip(part, diff, top, strict=True):
                    diffs[i], tops[i] = d, t
        return diffs, tops

    def knockout(
        self,
        programs: Sequence[Any],
        layers: Sequence[int] | None = None,
        scope: str = "answer",
        answer_prefix: str = "",
    ) -> pa.Table:
        """Cut every (layer, head, source) edge of every program, one at a time; one row each.

        Args:
            programs: `orchestrator.tasks.Program`s (or dicts with the same keys) that have a
                counterfactual.
            layers: layer indices (default: all).
            scope: `answer` (cut the edge from the answer position) or `later` (from every
                position after the source).
            answer_prefix: the text between prompt and answer (`actors.answers`), or `auto`.

        Returns:
            A table in `KNOCKOUT_SCHEMA`, rows in program, layer, head, source order. Programs
            that cannot be asked with this tokenizer are left out and listed, with the reason,
            in `self.skipped`.

        Raises:
            ValueError: an unknown scope or a layer out of range.
            torch.OutOfMemoryError: with `batch_size: auto`, not even one row per forward fits;
                with an integer batch size, the first time a forward does not fit.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}; use one of {list(SCOPES)}")
        layers = self._layers(layers)
        self._check_implementation()
        self.patcher.skipped = []
        encoded = self.patcher.encode(programs, answer_prefix)
        self.skipped = list(self.patcher.skipped)
        pairs = [pair for _, pair in encoded]
        clean, clean_top = self._run(pairs, [None] * len(pairs), scope)
        cf, _ = self._run(pairs, [None] * len(pairs), scope, cf=True)
        cuts = [
            Knockout(g, layer, head, pos)
            for g, pair in enumerate(pairs)
            for layer in layers
            for head in range(self.arch.n_heads)
            for pos in sources(pair)
        ]
        knocked, knocked_top = self._run(pairs, cuts, scope)
        columns: dict[str, list] = {f.name: [] for f in KNOCKOUT_SCHEMA}
        for cut, diff, top in zip(cuts, knocked, knocked_top, strict=True):
            prog, pair = encoded[cut.program]
            g = cut.program
            gap = cf[g] - clean[g]
            row = {
                **program_columns(self.lm.name, prog, pair),
                "layer": cut.layer,
                "head": cut.head,
                "source": pair.labels[cut.source_pos],
                "source_pos": cut.source_pos,
                "scope": scope,
                "token": pair.tokens[cut.source_pos],
                "top1_correct": clean_top[g] == pair.clean_answer_id,
                "clean_logit_diff": clean[g],
                "cf_logit_diff": cf[g],
                "knocked_logit_diff": diff,
                "effect": diff - clean[g],
                "norm_effect": (diff - clean[g]) / gap if abs(gap) >= MIN_DENOMINATOR else None,
                "top1_changed": top != pair.clean_answer_id,
            }
            for key, value in row.items():
                columns[key].append(value)
        return pa.table(columns, schema=KNOCKOUT_SCHEMA)
