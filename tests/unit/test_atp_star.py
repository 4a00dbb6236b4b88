"""The AtP* corrections of `actors.attribution`: GradDrop against a reference that detaches each
layer's outputs in a forward of its own, and the attention-saturation fix against exact
patching on a model where the patched layer's softmax is the only nonlinearity; each leaves
the estimates it does not concern as they were."""

import pytest
import torch

from actors import Patcher, load_model
from actors.attribution import Attributor
from actors.targets import encode_program
from orchestrator.tasks import get_family, iter_programs
from tests import reference
from tests.tiny import save_tiny_model

SITES = ["resid_pre", "attn_head", "mlp_out"]


def programs(n: int = 4):
    return list(iter_programs("binding", seed=3, seq_len=5, n=n))


def estimates(lm, pairs, sites, **options) -> dict:
    """(program, site, layer) -> (estimate, grad_drop or None), `[pos]` or `[pos, head]`."""
    out = {}
    for batch in Attributor(lm, batch_size=2, **options).estimate(pairs, sites):
        for row, g in enumerate(batch.programs):
            for cell, values in batch.cells.items():
                drop = batch.grad_drop[cell][row] if batch.grad_drop else None
                out[(g, *cell)] = (values[row], drop)
    return out


def detached_reference(model, pair, sites, n_layers) -> dict:
    """GradDrop written out: for each layer l, a forward whose layer-l attention and MLP outputs
    are cut from the graph (their values kept), a backward, and |(cf - clean) . grad| summed
    over l, divided by L - 1."""
    heads = reference.n_heads(model)
    cells = [(site, layer) for site in sites for layer in range(n_layers)]

    def acts(ids, grad, cut=None):
        store, handles = {}, []
        for site, layer in cells:
            block, attn_out, mlp = reference.modules(model, layer)

            def keep(t, key=(site, layer)):
                if grad and t.requires_grad:
                    t.retain_grad()
                store[key] = t

            if site == "resid_pre":
                handles.append(
                    block.register_forward_pre_hook(
                        lambda m, a, kw, k=keep: k(a[0] if a else kw["hidden_states"]),
                        with_kwargs=True,
                    )
                )
            elif site == "attn_head":
                handles.append(attn_out.register_forward_pre_hook(lambda m, a, k=keep: k(a[0])))
            else:
                handles.append(mlp.register_forward_hook(lambda m, a, o, k=keep: k(o)))
        if cut is not None:
            _, attn_out, mlp = reference.modules(model, cut)
            for module in (attn_out, mlp):
                handles.append(module.register_forward_hook(lambda m, a, o: o.detach()))
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, a, o: o.requires_grad_(grad)))
        try:
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return store, logits[pair.cf_answer_id] - logits[pair.clean_answer_id]

    for p in model.parameters():
        p.requires_grad_(False)
    cf, _ = acts(pair.cf_ids, grad=False)
    total = {cell: 0.0 for cell in cells}
    for cut in range(n_layers):
        clean, metric = acts(pair.clean_ids, grad=True, cut=cut)
        metric.backward()
        for cell in cells:
            grad = clean[cell].grad
            if grad is None:  # cut: the node's only path is its own, dropped write
                continue
            delta = ((cf[cell] - clean[cell].detach()) * grad)[0]
            if cell[0] == "attn_head":
                delta = delta.view(delta.shape[0], heads, -1)
            total[cell] = total[cell] + delta.sum(-1).abs()
    return {cell: value / (n_layers - 1) for cell, value in total.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_drop_equals_a_reference_that_detaches_each_layer(tmp_path, arch) -> None:
    n_layers = 3
    lm = load_model(str(save_tiny_model(tmp_path / arch, arch, n_layers=n_layers)))
    lm.model.double()
    progs = programs(3)
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    got = estimates(lm, pairs, SITES, grad_drop=True)
    differs = 0
    for g, pair in enumerate(pairs):
        want = detached_reference(lm.model, pair, SITES, n_layers)
        for (site, layer), value in want.items():
            plain, drop = got[(g, site, layer)]
            torch.testing.assert_close(drop.double(), value.double(), rtol=1e-5, atol=1e-7)
            if site != "resid_pre" and layer == n_layers - 1:
                # Nothing after the last layer to drop: the score is |estimate|.
                torch.testing.assert_close(drop, plain.abs(), rtol=1e-6, atol=1e-9)
            else:
                differs += bool((drop - plain.abs()).abs().max() > 1e-3)
    assert differs, "GradDrop changed no estimate of the earlier layers"


def test_grad_drop_leaves_the_signed_estimate_as_it_was(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=2)))
    pairs = [encode_program(lm.tokenizer, p) for p in programs(2)]
    plain, dropped = estimates(lm, pairs, SITES), estimates(lm, pairs, SITES, grad_drop=True)
    for key, (value, drop) in plain.items():
        assert drop is None
        assert torch.equal(dropped[key][0], value), key


def saturated_model(folder, arch: str):
    """One layer whose softmax is the only nonlinearity between a value token's residual and
    the metric: identity norms, no MLP, values blind to the dimensions in which the value
    tokens' embeddings differ, and keys that read those dimensions strongly, so that the last
    query's attention to the root value saturates one way or the other."""
    save_tiny_model(folder, arch, n_layers=1)
    lm = load_model(str(folder), dtype="float32")
    model = lm.model.double()
    identity = torch.nn.Identity()
    d = model.config.hidden_size
    blind = slice(0, 16)  # the dimensions in which the value tokens differ
    digits = sorted(
        {
            lm.tokenizer(c, add_special_tokens=False).input_ids[-1]
            for c in get_family("binding").candidates
        }
    )
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[digits, blind.stop :] = embed[digits[0], blind.stop :]
        embed.mul_(EMBED_SCALE)  # without norms, the scale the first norm would have given
        if arch == "gpt2":
            block = model.transformer.h[0]
            block.ln_1 = block.ln_2 = identity
            model.transformer.ln_f = identity
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
            weight = block.attn.c_attn.weight  # Conv1D: [in, out], out = q | k | v
            weight[blind, d : 2 * d].mul_(KEY_SCALE)
            weight[:, :d].mul_(QUERY_SCALE)
            weight[blind, 2 * d :] = 0.0
            weight[:, 2 * d :].mul_(VALUE_SCALE)
        else:
            layer = model.model.layers[0]
            layer.input_layernorm = layer.post_attention_layernorm = identity
            model.model.norm = identity
            layer.mlp.down_proj.weight.zero_()
            attn = layer.self_attn
            attn.k_proj.weight[:, blind] *= KEY_SCALE
            attn.q_proj.weight.mul_(QUERY_SCALE)
            if arch == "qwen3":  # queries and keys are normed per head: scale the norms
                attn.q_norm.weight.mul_(4.0)
                attn.k_norm.weight.mul_(4.0)
            attn.v_proj.weight[:, blind] = 0.0
            attn.v_proj.weight.mul_(VALUE_SCALE)
    return lm


EMBED_SCALE, QUERY_SCALE, KEY_SCALE, VALUE_SCALE = 10.0, 3.0, 10.0, 5.0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_attention_fix_is_exact_where_the_softmax_is_the_only_nonlinearity(tmp_path, arch):
    lm = saturated_model(tmp_path / arch, arch)
    progs = programs(6)
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    plain = estimates(lm, pairs, SITES)
    fixed = estimates(lm, pairs, SITES, attention_fix=True)
    rows = Patcher(lm).patch(progs, ["resid_pre"], [0], "all").to_pylist()
    index = {(p.task, p.seq_len, p.index): g for g, p in enumerate(progs)}
    off = 0
    for r in rows:
        g = index[(r["task"], r["seq_len"], r["program"])]
        exact = r["patched_logit_diff"] - r["clean_logit_diff"]
        got = float(fixed[(g, "resid_pre", 0)][0][r["pos"]])
        # The exact rows are float32 differences of logits near 10: 1e-6 is their rounding.
        assert got == pytest.approx(exact, rel=1e-5, abs=1e-6), r
        off += abs(float(plain[(g, "resid_pre", 0)][0][r["pos"]]) - exact) > 0.1 * abs(exact)
    assert off, "the plain estimate is already exact: the softmax is not saturated"
    # The fix concerns resid_pre alone: the heads and the MLP keep their estimates.
    for key, (value, _) in plain.items():
        if key[1] != "resid_pre":
            assert torch.equal(fixed[key][0], value), key


def test_attention_fix_keeps_positions_that_did_not_change(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "qwen3", n_layers=3)))
    pairs = [encode_program(lm.tokenizer, p) for p in programs(3)]
    plain = estimates(lm, pairs, ["resid_pre"])
    fixed = estimates(lm, pairs, ["resid_pre"], attention_fix=True)
    moved = 0
    for (g, site, layer), (value, _) in plain.items():
        first = pairs[g].first_diff
        assert torch.equal(fixed[(g, site, layer)][0][:first], value[:first])
        moved += bool((fixed[(g, site, layer)][0][first:] - value[first:]).abs().max() > 1e-6)
    assert moved, "the fix changed no estimate on a random model"


def test_attention_fix_names_a_family_it_does_not_map(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "gpt_neox", n_layers=2)))
    with pytest.raises(ValueError, match="attention_fix: false"):
        Attributor(lm, attention_fix=True)


def attention_paths(model, layer: int):
    """(input norm's owner and name, [(projection, slice of its output: queries, keys)], output
    projection) of `layer`'s attention, by explicit path."""
    if model.config.model_type == "gpt2":
        block = model.transformer.h[layer]
        d = model.config.n_embd
        return (block, "ln_1"), [(block.attn.c_attn, slice(0, 2 * d))], block.attn.c_proj
    block = model.model.layers[layer]
    attn = block.self_attn
    full = slice(None)
    return (block, "input_layernorm"), [(attn.q_proj, full), (attn.k_proj, full)], attn.o_proj


def fix_by_definition(model, pair, layer: int, plain: torch.Tensor) -> torch.Tensor:
    """The fixed `resid_pre` estimates of one layer, from the fix's definition written out with
    plain hooks and full forwards, for a layer whose input norm is the identity (so that the
    first-order change of the queries and keys is their exact change):
    plain - sum (q' - q) . dm/dq + (k' - k) . dm/dk at p + sum_t,h (z'_t - z_t) . dm/dz_t, with z'
    the layer's heads' outputs in a clean forward whose queries and keys at p are the cf's."""
    _, projections, out = attention_paths(model, layer)

    def run(ids, grad, replace=None):
        kept, handles = {"proj": [], "z": None}, []
        for module, part in projections:

            def keep(m, a, o, part=part):
                if replace is not None:
                    o = o.clone()
                    pos, source = replace
                    o[0, pos, part] = source[len(kept["proj"])][0, pos, part]
                if grad:
                    o.retain_grad()
                kept["proj"].append(o)
                return o

            handles.append(module.register_forward_hook(keep))

        def keep_z(m, a):
            if grad:
                a[0].retain_grad()
            kept["z"] = a[0]

        handles.append(out.register_forward_pre_hook(keep_z))
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, a, o: o.requires_grad_(grad)))
        try:
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        if grad:
            (logits[pair.cf_answer_id] - logits[pair.clean_answer_id]).backward()
        return kept

    for p in model.parameters():
        p.requires_grad_(False)
    clean = run(pair.clean_ids, grad=True)
    cf = run(pair.cf_ids, grad=False)
    want = plain.clone().double()
    for pos in range(pair.first_diff, len(pair.clean_ids)):
        linear = sum(
            ((c2[0, pos, part] - c1.detach()[0, pos, part]) * c1.grad[0, pos, part]).sum()
            for (_, part), c1, c2 in zip(projections, clean["proj"], cf["proj"], strict=True)
        )
        moved = run(pair.clean_ids, grad=False, replace=(pos, cf["proj"]))["z"]
        exact = ((moved - clean["z"].detach()) * clean["z"].grad).sum()
        want[pos] += float(exact) - float(linear)
    return want


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gemma2"])
def test_attention_fix_equals_its_definition(tmp_path, arch) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / arch, arch, n_layers=3)))
    model = lm.model.double()
    for layer in range(3):
        (owner, name), _, _ = attention_paths(model, layer)
        setattr(owner, name, torch.nn.Identity())
    pairs = [encode_program(lm.tokenizer, p) for p in programs(3)]
    plain = estimates(lm, pairs, ["resid_pre"])
    fixed = estimates(lm, pairs, ["resid_pre"], attention_fix=True)
    for g, pair in enumerate(pairs):
        for layer in (1, 2):
            want = fix_by_definition(model, pair, layer, plain[(g, "resid_pre", layer)][0])
            got = fixed[(g, "resid_pre", layer)][0].double()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_attention_fix_names_a_fused_projection(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "phi3", n_layers=2)))
    with pytest.raises(ValueError, match="no \\['q_proj', 'k_proj', 'v_proj'\\]"):
        Attributor(lm, attention_fix=True)
