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
are where it errs, which is why cells that matter get checked exactly.

Gradients are taken at the requested sites and layers only: the weights are frozen for the
backward and the graph starts at the input embeddings. (bitsandbytes' int8 and nf4 layers pass
no gradient back on a CPU: there the estimate raises, naming the fix.) Programs of one length
share a forward; each program's metric depends on its own row only, so one backward of their
sum gives every row's gradients.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from actors.arch import SITES, ArchMap
from actors.engine import hidden_of, installed, output_of
from actors.loading import LoadedModel
from actors.targets import EncodedPair


@dataclasses.dataclass(frozen=True)
class Estimates:
    """Estimates of one batch of programs of one length.

    Attributes:
        programs: indices (into the caller's pairs) of the rows.
        clean_logit_diff: per row, the clean run's metric.
        cells: (site, layer) -> estimates `[row, pos]`, or `[row, pos, head]` for `attn_head`.
    """

    programs: list[int]
    clean_logit_diff: Tensor
    cells: dict[tuple[str, int], Tensor]


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


def _site_hook(arch: ArchMap, site: str, layer: int, store: dict, grad: bool) -> tuple:
    """(module, kind, hook) for `actors.engine.installed`, keeping the site's activation in
    `store` (retaining its gradient when `grad`)."""

    def keep(x: Tensor) -> None:
        if grad:
            x.retain_grad()
        store[(site, layer)] = x

    if site == "resid_pre":
        return arch.layers[layer], "pre", lambda m, a, kw: keep(hidden_of(a, kw))
    if site == "attn_head":
        return arch.attn_out[layer], "pre_args", lambda m, a: keep(a[0])
    return arch.mlp[layer], "post", lambda m, a, out: keep(output_of(out))


@contextlib.contextmanager
def _capture(arch: ArchMap, cells: Sequence[tuple[str, int]], grad: bool) -> Iterator[dict]:
    store: dict[tuple[str, int], Tensor] = {}
    with installed([_site_hook(arch, site, layer, store, grad) for site, layer in cells]):
        yield store


class Attributor:
    """Attribution estimates on one loaded model. Plain class, like `Patcher`.

    Args:
        lm: the loaded model.
        batch_size: programs per forward and backward.

    Example:
        >>> pairs = [encode_program(lm.tokenizer, p) for p in programs]
        >>> for est in Attributor(lm).estimate(pairs, ["resid_pre", "attn_head"]):
        ...     est.cells[("attn_head", 5)]  # [row, pos, head]
    """

    def __init__(self, lm: LoadedModel, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        self.lm = lm
        self.arch = lm.arch
        self.batch_size = batch_size

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
        """
        cells = self._cells(sites, layers)
        by_length: dict[int, list[int]] = {}
        for g, pair in enumerate(pairs):
            by_length.setdefault(len(pair.clean_ids), []).append(g)
        for members in by_length.values():
            for start in range(0, len(members), self.batch_size):
                part = members[start : start + self.batch_size]
                yield self._batch([pairs[g] for g in part], part, cells)

    def _batch(
        self, pairs: list[EncodedPair], programs: list[int], cells: list[tuple[str, int]]
    ) -> Estimates:
        model, device = self.lm.model, self.lm.device
        clean = torch.tensor([p.clean_ids for p in pairs], device=device)
        cf = torch.tensor([p.cf_ids for p in pairs], device=device)
        answers = torch.tensor([[p.clean_answer_id, p.cf_answer_id] for p in pairs], device=device)
        with torch.no_grad(), _capture(self.arch, cells, grad=False) as cf_acts:
            model(input_ids=cf, logits_to_keep=1)
        embed = model.get_input_embeddings()
        start = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        try:
            with torch.enable_grad(), _frozen(model), _capture(self.arch, cells, True) as acts:
                logits = model(input_ids=clean, logits_to_keep=1).logits[:, -1].float()
                picked = logits.gather(1, answers)
                metric = picked[:, 1] - picked[:, 0]
                metric.sum().backward()
        finally:
            start.remove()
        out = {}
        heads, d_head = self.arch.n_heads, self.arch.d_head
        for cell in cells:
            act, grad = acts[cell].detach(), acts[cell].grad
            if grad is None:
                raise RuntimeError(
                    f"{self.lm.name}: no gradient reached {cell[0]} at layer {cell[1]}: a module "
                    f"between it and the logits does not pass gradients back (quantization="
                    f"{self.lm.quantization!r}; bitsandbytes' CPU kernels have no backward); "
                    "fix: estimate with the model unquantized on a CPU"
                )
            delta = (cf_acts[cell] - act) * grad
            if cell[0] == "attn_head":
                delta = delta.reshape(*delta.shape[:2], heads, d_head)
            out[cell] = delta.sum(-1).float()
        return Estimates(programs, metric.detach(), out)
