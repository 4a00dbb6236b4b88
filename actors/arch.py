"""Where the patching sites live in each decoder architecture.

Three sites, named as in TransformerLens:
- `resid_pre`: the residual stream entering layer L (the decoder layer's first input);
- `attn_head`: one head's output at one position, i.e. that head's `d_head` slice of the input
  to the attention output projection (`o_proj` / `c_proj` / `dense`). Its width is
  `n_heads * d_head` whatever the number of key/value heads, so grouped-query attention needs
  no special case here;
- `mlp_out`: the MLP's output, before it is added to the residual stream.

Families are recognised by structure, not by name, so relatives (Mistral, Qwen2/3, OLMo, ...)
map without a new entry.
"""

import dataclasses
from typing import Literal

from torch import nn

Site = Literal["resid_pre", "attn_head", "mlp_out"]
SITES: tuple[str, ...] = ("resid_pre", "attn_head", "mlp_out")


@dataclasses.dataclass(frozen=True)
class ArchMap:
    """The modules and sizes the patching engine needs, for one loaded model.

    Attributes:
        family: `llama` (Llama, Mistral, Qwen2, Qwen3 and kin), `gpt2` or `gpt_neox`.
        layers: the decoder layers, in order.
        attn_out: per layer, the module whose input holds the heads' outputs side by side.
        mlp: per layer, the MLP module.
    """

    family: str
    layers: list[nn.Module]
    attn_out: list[nn.Module]
    mlp: list[nn.Module]
    n_heads: int
    d_head: int
    d_model: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _llama(model: nn.Module, cfg) -> ArchMap | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(x, "self_attn", None), "o_proj") for x in layers):
        return None
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ArchMap(
        "llama",
        list(layers),
        [x.self_attn.o_proj for x in layers],
        [x.mlp for x in layers],
        n_heads,
        d_head,
        cfg.hidden_size,
    )


def _gpt2(model: nn.Module, cfg) -> ArchMap | None:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "c_proj") for b in blocks):
        return None
    return ArchMap(
        "gpt2",
        list(blocks),
        [b.attn.c_proj for b in blocks],
        [b.mlp for b in blocks],
        cfg.n_head,
        cfg.n_embd // cfg.n_head,
        cfg.n_embd,
    )


def _gpt_neox(model: nn.Module, cfg) -> ArchMap | None:
    layers = getattr(getattr(model, "gpt_neox", None), "layers", None)
    if layers is None or not all(hasattr(getattr(x, "attention", None), "dense") for x in layers):
        return None
    n_heads = cfg.num_attention_heads
    return ArchMap(
        "gpt_neox",
        list(layers),
        [x.attention.dense for x in layers],
        [x.mlp for x in layers],
        n_heads,
        cfg.hidden_size // n_heads,
        cfg.hidden_size,
    )


def arch_map(model: nn.Module) -> ArchMap:
    """Map a Hugging Face causal LM onto the patching sites.

    Raises:
        ValueError: the architecture is none of the supported families; the message names it.
    """
    cfg = model.config
    for probe in (_llama, _gpt2, _gpt_neox):
        found = probe(model, cfg)
        if found is not None:
            width = n_in(found.attn_out[0])
            if width != found.n_heads * found.d_head:
                raise ValueError(
                    f"{type(model).__name__}: attention output takes {width} features, not "
                    f"n_heads * d_head = {found.n_heads} * {found.d_head}; cannot split heads"
                )
            return found
    raise ValueError(
        f"cannot map architecture {type(model).__name__} (model_type={cfg.model_type!r}): the "
        "patching engine knows Llama-like models (model.layers[i].self_attn.o_proj: Llama, "
        "Mistral, Qwen2, Qwen3, ...), GPT-2 (transformer.h[i].attn.c_proj) and GPT-NeoX "
        "(gpt_neox.layers[i].attention.dense); add a probe in actors/arch.py for others"
    )


def n_in(module: nn.Module) -> int:
    """Input width of a linear layer (nn.Linear, bitsandbytes Linear, or GPT-2's Conv1D)."""
    if hasattr(module, "in_features"):
        return module.in_features
    if hasattr(module, "nx"):  # transformers' Conv1D stores (in, out) as nx, nf
        return module.nx
    return module.weight.shape[0]
