"""The straightforward way to patch, for checking the engine: one full forward per patch, plain
PyTorch hooks, module paths written out per architecture (not taken from `actors.arch`)."""

import torch


def modules(model, layer: int):
    """(decoder layer, attention output projection, MLP) of `layer`, by explicit path."""
    kind = model.config.model_type
    if kind == "gpt2":
        block = model.transformer.h[layer]
        return block, block.attn.c_proj, block.mlp
    if kind == "gpt_neox":
        block = model.gpt_neox.layers[layer]
        return block, block.attention.dense, block.mlp
    block = model.model.layers[layer]
    return block, block.self_attn.o_proj, block.mlp


def n_heads(model) -> int:
    cfg = model.config
    return cfg.n_head if cfg.model_type == "gpt2" else cfg.num_attention_heads


def register_hook(module, kind: str, fn):
    """`pre_kwargs`: a forward pre-hook with kwargs; `pre`: on positional args; else a forward
    hook."""
    if kind == "pre_kwargs":
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    if kind == "pre":
        return module.register_forward_pre_hook(fn)
    return module.register_forward_hook(fn)


@torch.no_grad()
def patched_logits(model, clean_ids, cf_ids, site: str, layer: int, pos: int, head=None):
    """Last-position logits of the clean run with one activation taken from the cf run."""
    return patched_all_logits(model, clean_ids, cf_ids, site, layer, pos, head)[-1]


@torch.no_grad()
def patched_readout(model, clean_ids, cf_ids, site, layer, pos, head=None, n_read: int = 1):
    """Logits `[n_read, vocab]` at the last `n_read` positions of the patched clean run (a
    teacher-forced answer's readout positions)."""
    return patched_all_logits(model, clean_ids, cf_ids, site, layer, pos, head)[-n_read:]


@torch.no_grad()
def patched_all_logits(model, clean_ids, cf_ids, site: str, layer: int, pos: int, head=None):
    """Logits `[pos, vocab]` (float32) of the clean run with one activation from the cf run."""
    block, attn_out, mlp = modules(model, layer)
    heads = n_heads(model)
    saved = {}

    def hidden_of(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    if site == "resid_pre":
        module, kind = block, "pre_kwargs"
    elif site == "attn_head":
        module, kind = attn_out, "pre"
    else:
        module, kind = mlp, "post"

    def read(tensor):
        if site == "attn_head":
            return tensor[0, pos].view(heads, -1)[head].clone()
        return tensor[0, pos].clone()

    def write(tensor):
        tensor = tensor.clone()
        if site == "attn_head":
            tensor[0, pos].view(heads, -1)[head] = saved["value"]
        else:
            tensor[0, pos] = saved["value"]
        return tensor

    def capture(module, args, kwargs_or_out=None, out=None):
        if kind == "pre_kwargs":
            saved["value"] = read(hidden_of(args, kwargs_or_out))
        elif kind == "pre":
            saved["value"] = read(args[0])
        else:
            saved["value"] = read(kwargs_or_out)

    def replace(module, args, kwargs_or_out=None):
        if kind == "pre_kwargs":
            if args:
                return (write(args[0]), *args[1:]), kwargs_or_out
            return args, {**kwargs_or_out, "hidden_states": write(kwargs_or_out["hidden_states"])}
        if kind == "pre":
            return (write(args[0]), *args[1:])
        return write(kwargs_or_out)

    def register(fn):
        return register_hook(module, kind, fn)

    device = next(model.parameters()).device
    handle = register(capture)
    model(input_ids=torch.tensor([cf_ids], device=device))
    handle.remove()
    handle = register(replace)
    try:
        return model(input_ids=torch.tensor([clean_ids], device=device)).logits[0].float()
    finally:
        handle.remove()
