"""Gradients through bitsandbytes' 4-bit linears where their kernel has none, for attribution.

On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s weight at its first forward
without gradients and from then on runs the packed kernel (`gemv_4bit`), which has no backward:
the output leaves the graph, and no gradient reaches the layers below. (On CUDA, and on CPUs
without the packing, `matmul_4bit` has a backward and nothing here engages.) Attribution needs
only the gradient with respect to the layer's input, `grad_out @ W`, with `W` the weight the
kernel uses. `gradients_through_4bit` reattaches such an output to its input through that
product, dequantizing `W` from the packed layout on the way back (one layer at a time, freed
after use), and leaves the forward's values, the kernel's own, as they were. (PyTorch gives the
kernel's output a fallback node that passes nothing back, so what is tested is the packing.)
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

PACK_BLOCK = 32  # rows per block of bitsandbytes' CPU packing (`_convert_weight_packed_for_cpu`)


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(
        module.weight, "quant_state"
    )


def dequantized_weight(module: nn.Module) -> Tensor:
    """A bitsandbytes 4-bit linear's weight, `[out, in]` float32, packed for the CPU or not."""
    state = module.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(module.weight.data, state).float()
    n, k = state.shape
    # The packing stores, per block of 32 rows and pair of columns, 32 low and 32 high nibbles.
    packed = module.weight.data.reshape(-1, PACK_BLOCK)
    nibbles = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    index = nibbles.reshape(n // PACK_BLOCK, k // 2, PACK_BLOCK, 2).transpose(1, 2).reshape(n, k)
    # absmax: [k / blocksize, n] after the packing.
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)
    return state.code.float().to(index.device)[index.long()] * scale


class _Reattach(torch.autograd.Function):
    """`out` (computed without a graph) as a function of `x`: its gradient is `g @ W`."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, module: nn.Module) -> Tensor:
        ctx.module = module
        ctx.x_dtype = x.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = dequantized_weight(ctx.module)
        return (grad.float() @ weight).to(ctx.x_dtype), None, None


@contextlib.contextmanager
def gradients_through_4bit(model: nn.Module) -> Iterator[int]:
    """For the block, every packed 4-bit linear whose input is in the graph passes the gradient
    back as `grad_out @ W`. Yields the number of 4-bit layers watched."""

    def hook(module, args, out):
        x = args[0] if args else None
        packed = getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        if x is None or not x.requires_grad or not packed:
            return None
        # The packed kernel's output has a node that passes no gradient: replace it.
        return _Reattach.apply(x, out.detach(), module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_4bit(m)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
