"""AtP*'s attention-saturation fix for `resid_pre` estimates (Kramár et al. 2024, section 3.1.1).

Patching the residual stream entering layer L at position p changes that layer's query at p
and key at p, and the attention softmax they feed can be saturated, where its gradient says
nothing of what a large change does. The fix replaces that part of the first-order estimate by
a recomputation:

    fixed = estimate - (cf_x - x) . g_QK + sum_t,h (z'_{t,h} - z_{t,h}) . dm/dz_{t,h}

* `g_QK`: the gradient of the metric at x through layer L's queries and keys only (a
  vector-Jacobian product of the projections' gradients through the layer's own input norm);
* `z'`: the heads' outputs of layer L (the attention output projection's input) recomputed with
  the counterfactual query and key at p and the clean values: every query t >= p sees the new
  key, and query p is the new one. With the patch, layer L's q and k at p are exactly the
  counterfactual run's, so this part is exact; what follows z stays first-order.

The recomputation runs layer L's attention module alone, on a batch of one copy per position
(and the unchanged copy, so both sides of the difference come from the same kernel). Its query,
key and value projections are not recomputed: they are swapped, for the call, for modules that
return the clean run's outputs with the counterfactual rows written in, and the output
projection for one that keeps its input. A position whose residual is the same in both runs
keeps the plain estimate (the two terms cancel there).
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from actors.arch import ArchMap
from actors.engine import installed

ROWS_PER_CALL = 16384  # sequences x positions per recomputation of one layer's attention


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's attention keeps its projections: the attention module's attribute on
    the decoder layer, the projections' attributes with the slice of each output that holds
    queries and keys (None: none of it; values only), and the output projection's."""

    attention: str
    projections: tuple[tuple[str, slice | None], ...]
    out: str


def layout(arch: ArchMap) -> Layout:
    """The family's `Layout`.

    Raises:
        ValueError: the family's attention is not mapped here.
    """
    if arch.family == "llama":
        full = slice(None)
        return Layout("self_attn", (("q_proj", full), ("k_proj", full), ("v_proj", None)), "o_proj")
    if arch.family == "gpt2":
        return Layout("attn", (("c_attn", slice(0, 2 * arch.d_model)),), "c_proj")
    raise ValueError(
        f"attention_fix: the {arch.family} family's fused query/key/value layout is not mapped "
        "in actors/saturation.py; fix: set attention_fix: false for this model"
    )


class _Returns(nn.Module):
    """Stands in for a projection for one call: returns a prepared output."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        return self.out


class _Keeps(nn.Module):
    """Stands in for the output projection: keeps its input (the heads' outputs), returns
    zeros of the residual's width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.kept: Tensor | None = None

    def forward(self, z: Tensor) -> Tensor:
        self.kept = z
        return z.new_zeros((*z.shape[:-1], self.width))


@contextlib.contextmanager
def _swapped(module: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, new in replacements.items():
            setattr(module, name, new)
        yield
    finally:
        for name, old in saved.items():
            setattr(module, name, old)


def _repeat(value, batch: int, m: int):
    """Tensors with a batch dimension (in tuples too) repeated m times per row."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
        return value.repeat_interleave(m, 0)
    if isinstance(value, tuple | list):
        return type(value)(_repeat(v, batch, m) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, batch, m) for k, v in value.items()}
    return value


class QKFix:
    """The fix on one model (module docstring). Used by `actors.attribution.Attributor`:
    `capture` around the counterfactual forward (grad=False), `taken`, `capture` around the
    clean forward (grad=True), then `inputs` join the gradient call and `correct` uses them."""

    def __init__(self, arch: ArchMap) -> None:
        self.arch = arch
        self.layout = layout(arch)
        self._store: dict = {}
        attention = getattr(arch.layers[0], self.layout.attention, None)
        names = [name for name, _ in self.layout.projections] + [self.layout.out]
        missing = [n for n in names if not hasattr(attention, n)]
        if missing:
            raise ValueError(
                f"attention_fix: {type(attention).__name__} has no {missing} (its queries and "
                "keys are not where actors/saturation.py looks for them, e.g. a fused "
                "projection); fix: set attention_fix: false for this model"
            )

    def _attention(self, layer: int) -> nn.Module:
        return getattr(self.arch.layers[layer], self.layout.attention)

    def capture(self, layers: list[int], grad: bool):
        """Hooks keeping, at each layer, the projections' outputs; with `grad`, also the
        attention module's arguments and its heads' outputs (for the gradient)."""
        self._store = store = {"layers": list(layers), "proj": {}, "call": {}, "z": {}}
        hooks = []
        for layer in layers:
            attention = self._attention(layer)
            for name, _ in self.layout.projections:

                def keep(m, a, out, key=(layer, name)):
                    store["proj"][key] = out if grad else out.detach()

                hooks.append((getattr(attention, name), "post", keep))
            if grad:

                def call(m, args, kwargs, layer=layer):
                    store["call"][layer] = (args, kwargs)

                def z(m, args, layer=layer):
                    store["z"][layer] = args[0]

                hooks.append((attention, "pre", call))
                hooks.append((self.arch.attn_out[layer], "pre_args", z))
        return installed(hooks)

    def taken(self) -> dict:
        """What the last `capture` kept."""
        return self._store

    def _proj_keys(self) -> list[tuple[int, str]]:
        return [(x, name) for x in self._store["layers"] for name, _ in self.layout.projections]

    def inputs(self) -> list[Tensor]:
        """Tensors whose gradients `correct` needs: the projections' outputs, then the heads'
        outputs, per layer."""
        s = self._store
        return [s["proj"][k] for k in self._proj_keys()] + [s["z"][x] for x in s["layers"]]

    def correct(
        self, acts: dict, cf_acts: dict, cf: dict, grads: tuple[Tensor | None, ...]
    ) -> dict[int, Tensor]:
        """Per layer, `fixed - estimate` of the `resid_pre` cells, `[row, pos]`.

        Args:
            acts / cf_acts: ("resid_pre", layer) -> the clean (in the graph) / counterfactual
                residual stream entering the layer.
            cf: `taken()` after the counterfactual forward.
            grads: the gradients of `inputs()`, in order.
        """
        s, keys = self._store, self._proj_keys()
        g_proj = dict(zip(keys, grads[: len(keys)], strict=True))
        g_z = dict(zip(s["layers"], grads[len(keys) :], strict=True))
        out = {}
        for layer in s["layers"]:
            x, cf_x = acts[("resid_pre", layer)], cf_acts[("resid_pre", layer)]
            delta = cf_x - x.detach()
            changed = (delta != 0).any(-1)
            outputs, grad_outputs = [], []
            for name, part in self.layout.projections:
                g = g_proj[(layer, name)]
                if part is None or g is None:
                    continue
                outputs.append(s["proj"][(layer, name)][..., part])
                grad_outputs.append(g[..., part])
            (g_qk,) = torch.autograd.grad(
                outputs, [x], grad_outputs, retain_graph=True, allow_unused=True
            )
            linear = (delta * g_qk).sum(-1).float() if g_qk is not None else 0.0
            exact = self._recomputed(layer, cf, changed, g_z[layer])
            out[layer] = torch.where(changed, exact - linear, torch.zeros_like(exact))
        return out

    @torch.no_grad()
    def _recomputed(self, layer: int, cf: dict, changed: Tensor, g_z: Tensor | None) -> Tensor:
        """`sum_t,h (z' - z) . dm/dz` at every position where the residual changed."""
        batch, n_tokens = changed.shape
        result = torch.zeros(batch, n_tokens, device=changed.device)
        if g_z is None:
            return result
        positions = [p for p in range(n_tokens) if bool(changed[:, p].any())]
        per_call = max(1, ROWS_PER_CALL // (batch * n_tokens) - 1)
        for start in range(0, len(positions), per_call):
            chunk = positions[start : start + per_call]
            z = self._heads_out(layer, cf, chunk, batch)  # [batch, 1 + len(chunk), pos, width]
            moved = ((z[:, 1:] - z[:, :1]) * g_z.detach()[:, None]).sum((-1, -2)).float()
            result[:, chunk] = moved
        return result

    def _heads_out(self, layer: int, cf: dict, chunk: list[int], batch: int) -> Tensor:
        """Layer `layer`'s heads' outputs, per row: the clean copy, then one copy per position
        of `chunk` with the counterfactual query and key written there."""
        s, m = self._store, 1 + len(chunk)
        replacements: dict[str, nn.Module] = {}
        for name, part in self.layout.projections:
            out = s["proj"][(layer, name)].detach().repeat_interleave(m, 0)
            if part is not None:
                view = out.view(batch, m, *out.shape[1:])
                source = cf["proj"][(layer, name)]
                for i, p in enumerate(chunk):
                    view[:, 1 + i, p, part] = source[:, p, part]
            replacements[name] = _Returns(out)
        keeps = _Keeps(self.arch.d_model)
        replacements[self.layout.out] = keeps
        args, kwargs = s["call"][layer]
        attention = self._attention(layer)
        with _swapped(attention, replacements):
            attention(*_repeat(args, batch, m), **_repeat(kwargs, batch, m))
        z = keeps.kept
        assert z is not None, "the attention module did not call its output projection"
        return z.view(batch, m, *z.shape[1:])
