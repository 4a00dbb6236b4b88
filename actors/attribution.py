"""Attribution patching: a first-order estimate of every patch's effect, from one clean forward,
one counterfactual forward and one backward pass per batch of programs (Nanda 2023, "Attribution
Patching"; Kramár et al. 2024, "AtP*").

Exact patching (`actors.patching`) costs a partial forward per (site, layer, position[, head]);
for a 70B model's 80 x 64 heads at every position that is out of reach. The estimate of a patch
is the metric's change to first order in the patched activation:

    estimate = (cf_act - clean_act) . d metric / d act     (at the clean run)

with the engine's metric, `logit(cf answer) - logit(clean answer)` at the last position (the
compared tokens of `actors.answers`), so an estimate stands for `patched_logit_diff -
clean_logit_diff` of the same cell. It is exact where the metric is linear in the activation
(tests build such a model) and a linearisation elsewhere: saturated attention and layer norms
are where it errs, which is why cells that matter get checked exactly (`verify_top_k`).

Two corrections of AtP*, each switchable:
* `attention_fix` (`actors.saturation`): a `resid_pre` activation feeds its layer's queries and
  keys, through a softmax whose gradient vanishes where it saturates. That part of its effect is
  recomputed: the layer's attention with the counterfactual query and key at the position, the
  change in the heads' outputs dotted with their gradient.
* `grad_drop`: an effect can cancel between paths (a head's direct effect against a later
  layer's compensation). For each layer l, the backward runs again with the gradient through
  layer l's attention and MLP outputs zeroed (the residual path kept), and the score is
  `sum_l |estimate_l| / (L - 1)`: a magnitude, in the `grad_drop` column; the signed `estimate`
  stays plain AtP. A node of layer l gets 0 from its own layer's drop, hence L - 1.

Gradients are taken at the requested sites and layers only: the weights are frozen for the
backward and the graph starts at the input embeddings. Quantized models work: bitsandbytes'
int8 and 4-bit layers pass the gradient to their input (its packed 4-bit CPU kernel through
`actors.quantized`); a module that passes none makes the estimate raise, naming it and the fix.
Programs of one length
share a forward; each program's metric depends on its own row only, so one backward of their
sum gives every row's gradients. Under `batch_size: auto` the programs per backward are sized
from the memory budget (`Footprint.backward_bytes`), halved on out-of-memory.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import torch
from torch import Tensor

from actors.arch import SITES, ArchMap
from actors.attribution_table import ATTRIBUTION_SCHEMA, block, chosen_cells, fill_exact, table
from actors.budget import BatchSized, Footprint, auto_budget
from actors.engine import hidden_of, installed, output_of
from actors.execute import in_parts
from actors.loading import LoadedModel
from actors.patching import PATCHING_SCHEMA, Patcher
from actors.quantized import gradients_through_4bit
from actors.rows import append_rows
from actors.saturation import QKFix
from actors.targets import EncodedPair

__all__ = ["ATTRIBUTION_SCHEMA", "Attributor", "Estimates"]


@dataclasses.dataclass(frozen=True)
class Estimates:
    """Estimates of one batch of programs of one length.

    Attributes:
        programs: indices (into the caller's pairs) of the rows.
        clean_logit_diff / cf_logit_diff: per row, each run's metric.
        clean_top / cf_top: per row, each run's top-1 token at the last position.
        cells: (site, layer) -> estimates `[row, pos]`, or `[row, pos, head]` for `attn_head`.
        grad_drop: the same shape, the GradDrop scores (None when off).
    """

    programs: list[int]
    clean_logit_diff: Tensor
    cf_logit_diff: Tensor
    clean_top: Tensor
    cf_top: Tensor
    cells: dict[tuple[str, int], Tensor]
    grad_drop: dict[tuple[str, int], Tensor] | None = None


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Weights take no gradient for the block (activations still do)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _site_hook(arch: ArchMap, site: str, layer: int, store: dict) -> tuple:
    """(module, kind, hook) for `actors.engine.installed`, keeping the site's activation."""

    def keep(x: Tensor) -> None:
        store[(site, layer)] = x

    if site == "resid_pre":
        return arch.layers[layer], "pre", lambda m, a, kw: keep(hidden_of(a, kw))
    if site == "attn_head":
        return arch.attn_out[layer], "pre_args", lambda m, a: keep(a[0])
    return arch.mlp[layer], "post", lambda m, a, out: keep(output_of(out))


def _capture(arch: ArchMap, cells: Sequence[tuple[str, int]], store: dict):
    return installed([_site_hook(arch, site, layer, store) for site, layer in cells])


def _drop_hooks(arch: ArchMap, dropping: list[int | None]) -> list[tuple]:
    """Hooks that zero the gradient through layer `dropping[0]`'s attention and MLP outputs
    (GradDrop); the residual path around them keeps its gradient. `dropping[0] = None`: none."""

    def at(layer: int):
        def fn(module, args, out):
            def grad(g: Tensor) -> Tensor:
                return torch.zeros_like(g) if dropping[0] == layer else g

            if output_of(out).requires_grad:  # else the estimate raises, naming the module
                output_of(out).register_hook(grad)

        return fn

    modules = [(arch.attn_out[x], x) for x in range(arch.n_layers)]
    modules += [(arch.mlp[x], x) for x in range(arch.n_layers)]
    return [(module, "post", at(x)) for module, x in modules]


class Attributor(BatchSized):
    """Attribution estimates (and their exact checks) on one loaded model. Plain class, like
    `Patcher`, which it uses to encode programs and to patch the cells it verifies.

    Args:
        lm: the loaded model.
        batch_size: programs per forward and backward, or `auto`: from the memory budget.
        attention_fix / grad_drop: the AtP* corrections (module docstring).
        budget_bytes: the budget of `auto` (default: from the device's free memory).

    Example:
        >>> table = Attributor(lm).attribute(programs, ["attn_head"], verify_top_k=5)
    """

    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int | Literal["auto"] = "auto",
        attention_fix: bool = False,
        grad_drop: bool = False,
        budget_bytes: int | None = None,
    ) -> None:
        self.lm = lm
        self.arch = lm.arch
        self.batch_size = batch_size
        self.attention_fix = attention_fix
        self.grad_drop = grad_drop
        self.budget_bytes = budget_bytes
        self.qk = QKFix(lm.arch) if attention_fix else None
        dtype = next(lm.model.parameters()).dtype
        self.footprint = Footprint.of(lm.arch, lm.model.config, dtype.itemsize)
        self.patcher = Patcher(lm, batch_size=batch_size, budget_bytes=budget_bytes)
        self.skipped: list[tuple[Any, str]] = []

    def _batch_size_set(self, value: int | Literal["auto"]) -> None:
        if hasattr(self, "patcher"):  # the exact checks patch in batches of the same size
            self.patcher.batch_size = value

    def _programs_per_batch(self, n_tokens: int) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        if self.budget_bytes is None:
            self.budget_bytes = auto_budget(self.lm.device)
        per_program = self.footprint.backward_bytes(self.arch.n_layers, n_tokens)
        if self.grad_drop:  # each backward's gradients of the sites are kept at once
            per_program += per_program // self.arch.n_layers
        return max(1, self.budget_bytes // per_program)

    def _cells(self, sites: Sequence[str], layers: Sequence[int] | None) -> list[tuple[str, int]]:
        bad = [s for s in sites if s not in SITES]
        if bad:
            raise ValueError(f"unknown site(s) {bad}; the sites are {list(SITES)}")
        n = self.arch.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        out_of_range = [x for x in layers if not 0 <= x < n]
        if out_of_range:
            raise ValueError(f"{self.lm.name}: layers {out_of_range} out of range 0..{n - 1}")
        return [(site, layer) for site in sites for layer in layers]

    def estimate(
        self,
        pairs: Sequence[EncodedPair],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
    ) -> Iterator[Estimates]:
        """Estimates of every (site, layer, position[, head]) of the pairs, a batch of programs
        of one length at a time.

        Raises:
            ValueError: an unknown site or a layer out of range.
            torch.OutOfMemoryError: not even one program fits (under `auto`), or a batch does
                not fit (with an integer batch size).
        """
        cells = self._cells(sites, layers)
        by_length: dict[int, list[int]] = {}
        for g, pair in enumerate(pairs):
            by_length.setdefault(len(pair.clean_ids), []).append(g)
        for n_tokens, members in by_length.items():
            batches = in_parts(
                members,
                self._programs_per_batch(n_tokens),
                lambda part: self._batch([pairs[g] for g in part], part, cells),
                shrink=self.batch_size == "auto",
            )
            for _, est in batches:
                yield est

    def _qk_capture(self, cells: list[tuple[str, int]], grad: bool):
        if self.qk is None:
            return contextlib.nullcontext()
        return self.qk.capture(sorted({x for s, x in cells if s == "resid_pre"}), grad)

    def _batch(
        self, pairs: list[EncodedPair], programs: list[int], cells: list[tuple[str, int]]
    ) -> Estimates:
        model, device = self.lm.model, self.lm.device
        clean = torch.tensor([p.clean_ids for p in pairs], device=device)
        cf = torch.tensor([p.cf_ids for p in pairs], device=device)
        answers = torch.tensor([[p.clean_answer_id, p.cf_answer_id] for p in pairs], device=device)
        cf_acts: dict = {}
        with torch.no_grad(), _capture(self.arch, cells, cf_acts), self._qk_capture(cells, False):
            cf_logits = model(input_ids=cf, logits_to_keep=1, use_cache=False).logits[:, -1]
        cf_qk = self.qk.taken() if self.qk else None
        dropping: list[int | None] = [None]
        drops = _drop_hooks(self.arch, dropping) if self.grad_drop else []
        embed = model.get_input_embeddings()
        start = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        acts: dict = {}
        try:
            with torch.enable_grad(), _frozen(model), gradients_through_4bit(model):
                with (
                    _capture(self.arch, cells, acts),
                    self._qk_capture(cells, True),
                    installed(drops),
                ):
                    logits = model(input_ids=clean, logits_to_keep=1, use_cache=False).logits
                picked = logits[:, -1].float().gather(1, answers)
                metric = picked[:, 1] - picked[:, 0]
                inputs = [acts[c] for c in cells] + (self.qk.inputs() if self.qk else [])
                grads = torch.autograd.grad(
                    metric.sum(), inputs, retain_graph=True, allow_unused=True
                )
                out = {
                    c: self._delta(c, cf_acts[c], acts[c], g)
                    for c, g in zip(cells, grads[: len(cells)], strict=True)
                }
                if self.qk:
                    resid = [c for c in cells if c[0] == "resid_pre"]
                    fixed = self.qk.correct(
                        {c: acts[c] for c in resid},
                        {c: cf_acts[c] for c in resid},
                        cf_qk,
                        grads[len(cells) :],
                    )
                    for layer, correction in fixed.items():
                        out[("resid_pre", layer)] = out[("resid_pre", layer)] + correction
                drop = self._grad_drop(metric, cells, acts, cf_acts, dropping)
        finally:
            start.remove()
        cf_picked = cf_logits.float().gather(1, answers)
        return Estimates(
            programs,
            metric.detach(),
            cf_picked[:, 1] - cf_picked[:, 0],
            logits[:, -1].detach().argmax(-1),
            cf_logits.argmax(-1),
            out,
            drop,
        )

    def _delta(self, cell: tuple[str, int], cf: Tensor, act: Tensor, grad: Tensor | None) -> Tensor:
        """`(cf - clean) . grad` per row and position (and head)."""
        if grad is None:
            raise RuntimeError(
                f"{self.lm.name}: no gradient reached {cell[0]} at layer {cell[1]}: a module "
                f"between it and the logits does not pass gradients back (quantization="
                f"{self.lm.quantization!r}); fix: load the model with quantization: none, or "
                "give that module's kernel a backward (as actors/quantized.py does for "
                "bitsandbytes' packed 4-bit layers)"
            )
        delta = (cf - act.detach()) * grad
        if cell[0] == "attn_head":
            delta = delta.reshape(*delta.shape[:2], self.arch.n_heads, self.arch.d_head)
        return delta.sum(-1).float()

    def _grad_drop(self, metric, cells, acts, cf_acts, dropping) -> dict | None:
        """`sum_l |estimate with layer l's gradient dropped| / (L - 1)` per cell."""
        if not self.grad_drop:
            return None
        n = self.arch.n_layers
        total = {c: 0.0 for c in cells}
        for layer in range(n):
            dropping[0] = layer
            grads = torch.autograd.grad(
                metric.sum(), [acts[c] for c in cells], retain_graph=True, allow_unused=True
            )
            for c, g in zip(cells, grads, strict=True):
                if c[0] != "resid_pre" and c[1] == layer:
                    continue  # the node's own write is dropped: it gets 0 from this layer
                total[c] = total[c] + self._delta(c, cf_acts[c], acts[c], g).abs()
        dropping[0] = None
        return {c: v / max(1, n - 1) for c, v in total.items()}

    # -- the experiment ---------------------------------------------------------------------
    def attribute(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
        answer_prefix: str = "",
        verify_top_k: int = 0,
        seed: int = 0,
    ) -> pa.Table:
        """Estimate every cell of the programs; patch `verify_top_k` of each program's largest
        (by |estimate|, or by the GradDrop score when on) and as many random others exactly.

        Args:
            programs: `orchestrator.tasks.Program`s (or dicts) with a counterfactual.
            sites / layers / positions / answer_prefix: as for `Patcher.patch`.
            verify_top_k: K per program and site (0: no exact patching).
            seed: with each program's (task, seq_len, index) and the site, seeds its random
                sample, so a rerun picks the same cells.

        Returns:
            A table in `ATTRIBUTION_SCHEMA`, one row per cell. Programs that cannot be patched
            with this tokenizer are in `self.skipped`.
        """
        if verify_top_k < 0:
            raise ValueError(f"verify_top_k={verify_top_k!r} must be >= 0")
        if positions not in ("all", "targets"):
            raise ValueError(f"positions={positions!r}; use all or targets")
        self.patcher.skipped = []
        encoded = self.patcher.encode(programs, answer_prefix)
        self.skipped = list(self.patcher.skipped)
        blocks = []
        for est in self.estimate([pair for _, pair in encoded], sites, layers):
            cells = {c: v.cpu().numpy() for c, v in est.cells.items()}
            drops = (
                {c: v.cpu().numpy() for c, v in est.grad_drop.items()} if est.grad_drop else None
            )
            for row, g in enumerate(est.programs):
                prog, pair = encoded[g]
                blocks.append(
                    block(
                        self.lm.name,
                        prog,
                        pair,
                        (float(est.clean_logit_diff[row]), float(est.cf_logit_diff[row])),
                        (int(est.clean_top[row]), int(est.cf_top[row])),
                        {c: v[row] for c, v in cells.items()},
                        None if drops is None else {c: v[row] for c, v in drops.items()},
                        pair.positions(positions),
                    )
                )
        if verify_top_k:
            chosen = chosen_cells(blocks, verify_top_k, seed, by_grad_drop=self.grad_drop)
            columns: dict[str, list] = {f.name: [] for f in PATCHING_SCHEMA}
            for wave in self.patcher.run_pairs(encoded, sites, layers, positions, chosen):
                append_rows(columns, self.lm.name, "first_token", wave, self.lm.tokenizer)
            fill_exact(blocks, pa.table(columns, schema=PATCHING_SCHEMA))
        return table(blocks, self.attention_fix)
