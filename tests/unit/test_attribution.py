"""Attribution estimates (`actors.attribution`) against autograd-free references: a central
finite difference along the patch direction, and, on a model built to be exactly linear in the
residual stream, exact patching itself."""

import pytest
import torch

from actors import Patcher, load_model
from actors.attribution import Attributor
from actors.targets import encode_program
from orchestrator.tasks import iter_programs
from tests import reference
from tests.tiny import save_tiny_model

SITES = ["resid_pre", "attn_head", "mlp_out"]


def programs():
    return list(iter_programs("binding", seed=7, seq_len=5, n=3)) + list(
        iter_programs("binding", seed=7, seq_len=6, n=2)
    )


@torch.no_grad()
def metric_along(model, pair, site, layer, pos, head, eps: float) -> float:
    """The metric of the clean run with the activation at the cell moved `eps` of the way
    toward its counterfactual value (plain hooks, module paths written out)."""
    block, attn_out, mlp = reference.modules(model, layer)
    saved = {}
    heads = reference.n_heads(model)

    def cell(t):
        t = t[0, pos]
        return t.view(heads, -1)[head] if site == "attn_head" else t

    def grab_pre(m, args, kwargs):
        saved["cf"] = cell(args[0] if args else kwargs["hidden_states"]).clone()

    def grab_in(m, args):
        saved["cf"] = cell(args[0]).clone()

    def grab_out(m, args, out):
        saved["cf"] = cell(out[0] if isinstance(out, tuple) else out).clone()

    def move(t):
        t = t.clone()
        c = cell(t)
        c += eps * (saved["cf"] - c)
        return t

    module, grab, kind = {
        "resid_pre": (block, grab_pre, "pre_kwargs"),
        "attn_head": (attn_out, grab_in, "pre"),
        "mlp_out": (mlp, grab_out, "post"),
    }[site]

    def register(fn):
        return reference.register_hook(module, kind, fn)

    h = register(grab)
    model(input_ids=torch.tensor([pair.cf_ids]))
    h.remove()
    if kind == "pre_kwargs":

        def put(m, args, kwargs):
            if args:
                return (move(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": move(kwargs["hidden_states"])}

    elif kind == "pre":

        def put(m, args):
            return (move(args[0]), *args[1:])

    else:

        def put(m, args, out):
            return move(out[0] if isinstance(out, tuple) else out)

    h = register(put)
    try:
        logits = model(input_ids=torch.tensor([pair.clean_ids])).logits[0, -1]
    finally:
        h.remove()
    return (logits[pair.cf_answer_id] - logits[pair.clean_answer_id]).item()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_estimates_are_the_directional_derivative(tmp_path, arch) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / arch, arch, n_layers=3)), dtype="float32")
    lm.model.double()
    pairs = [encode_program(lm.tokenizer, p) for p in programs()]
    batches = list(Attributor(lm, batch_size=2).estimate(pairs, SITES))
    assert sorted(g for b in batches for g in b.programs) == list(range(len(pairs)))
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for batch in batches:
        for (site, layer), est in batch.cells.items():
            for row, g in enumerate(batch.programs):
                pair = pairs[g]
                for _ in range(2):
                    pos = int(
                        torch.randint(pair.first_diff, len(pair.clean_ids), (1,), generator=gen)
                    )
                    head = (
                        int(torch.randint(0, 4, (1,), generator=gen))
                        if site == "attn_head"
                        else None
                    )
                    # Central, error O(eps^2); RMSNorm computes in float32 even in a float64
                    # model, so smaller steps meet its rounding.
                    eps = 1e-2
                    want = (
                        metric_along(lm.model, pair, site, layer, pos, head, eps)
                        - metric_along(lm.model, pair, site, layer, pos, head, -eps)
                    ) / (2 * eps)
                    got = est[row, pos] if head is None else est[row, pos, head]
                    assert float(got) == pytest.approx(want, rel=5e-3, abs=5e-5), (site, layer, pos)
                    checked += 1
            # Before the first changed token the two runs agree: nothing to estimate.
            assert torch.all(
                est[:, : min(p.first_diff for p in (pairs[g] for g in batch.programs))] == 0
            )
    assert checked >= 3 * 3 * 5 * 2


def linear_model(folder) -> str:
    """A Llama that is linear in its residual stream: identity norms, uniform causal attention
    (zero queries and keys), no MLP. Patching then changes the metric by exactly the first-order
    term."""
    save_tiny_model(folder, "llama", n_layers=3)
    lm = load_model(str(folder), dtype="float32")
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            # The changed token reaches the last position through attention alone, averaged
            # over the prefix: larger values and outputs make the patches move the metric.
            layer.self_attn.v_proj.weight.mul_(10.0)
            layer.self_attn.o_proj.weight.mul_(10.0)
    return lm


def test_on_a_linear_model_the_estimate_is_exact_patching(tmp_path) -> None:
    lm = linear_model(tmp_path / "linear")
    identity = torch.nn.Identity()
    for layer in lm.model.model.layers:
        layer.input_layernorm = identity
        layer.post_attention_layernorm = identity
    lm.model.model.norm = identity
    progs = programs()
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    est = {}
    for batch in Attributor(lm, batch_size=3).estimate(pairs, ["resid_pre", "attn_head"]):
        for row, g in enumerate(batch.programs):
            for (site, layer), values in batch.cells.items():
                est[(g, site, layer)] = values[row]
    rows = Patcher(lm).patch(progs, ["resid_pre", "attn_head"], None, "all").to_pylist()
    index = {(p.task, p.seq_len, p.index): g for g, p in enumerate(progs)}
    moved = 0
    for r in rows:
        g = index[(r["task"], r["seq_len"], r["program"])]
        values = est[(g, r["site"], r["layer"])]
        got = values[r["pos"]] if r["head"] is None else values[r["pos"], r["head"]]
        exact = r["patched_logit_diff"] - r["clean_logit_diff"]
        assert float(got) == pytest.approx(exact, rel=1e-3, abs=1e-3), r
        moved += abs(exact) > 0.1
    assert moved > 50, "the patches move the metric, so the equality says something"


def test_bad_arguments_are_named(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=2)))
    pairs = [encode_program(lm.tokenizer, programs()[0])]
    with pytest.raises(ValueError, match="unknown site"):
        list(Attributor(lm).estimate(pairs, ["resid_post"]))
    with pytest.raises(ValueError, match="out of range"):
        list(Attributor(lm).estimate(pairs, ["resid_pre"], [5]))
    with pytest.raises(ValueError, match="batch_size"):
        Attributor(lm, batch_size=0)


def test_a_model_that_passes_no_gradient_back_is_named(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=2)))
    pairs = [encode_program(lm.tokenizer, programs()[0])]
    # A layer whose output is cut from the graph, as a kernel without a backward does.
    attn = lm.model.model.layers[0].self_attn
    handle = attn.o_proj.register_forward_hook(lambda m, a, out: out.detach())
    try:
        with pytest.raises(RuntimeError, match="no gradient reached attn_head at layer 0"):
            list(Attributor(lm).estimate(pairs, ["attn_head"], [0]))
    finally:
        handle.remove()
    assert next(iter(Attributor(lm).estimate(pairs, ["attn_head"], [0]))).cells


def test_attribute_rows_and_their_exact_checks(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=3)))
    progs = programs()
    sites, k = ["resid_pre", "attn_head"], 3
    attributor = Attributor(lm, batch_size=2)
    rows = attributor.attribute(progs, sites, None, "targets", verify_top_k=k, seed=0).to_pylist()
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    assert len(rows) == sum(len(p.positions("targets")) * 3 * (1 + 4) for p in pairs)
    # The exact checks patched the chosen cells alone: 2k per program and site.
    assert attributor.patcher.last_plan is not None
    assert attributor.patcher.last_plan.cost().patches == 2 * k * len(sites) * len(progs)
    full = Patcher(lm).patch(progs, sites, None, "targets").to_pylist()
    exact = {
        (r["program"], r["seq_len"], r["site"], r["layer"], r["pos"], r["head"]): r for r in full
    }
    by_group: dict = {}
    for r in rows:
        by_group.setdefault((r["program"], r["seq_len"], r["site"]), []).append(r)
        e = exact[(r["program"], r["seq_len"], r["site"], r["layer"], r["pos"], r["head"])]
        assert r["top1_correct"] == e["top1_correct"]
        assert r["clean_logit_diff"] == pytest.approx(e["clean_logit_diff"], abs=1e-5)
        if r["verify"] is None:
            assert r["exact"] is None and r["norm_exact"] is None
            continue
        # Patching the chosen cells alone gives what patching every cell gives them.
        assert r["exact"] == pytest.approx(
            e["patched_logit_diff"] - e["clean_logit_diff"], abs=1e-5
        )
        assert r["norm_exact"] == pytest.approx(e["norm_effect"], abs=1e-5)
        assert r["exact_flipped"] == e["flipped"]
    for group in by_group.values():
        kinds = [r["verify"] for r in group]
        assert kinds.count("top") == k and kinds.count("random") == k
        largest = sorted(abs(r["estimate"]) for r in group)[-k:]
        assert sorted(abs(r["estimate"]) for r in group if r["verify"] == "top") == largest
    again = attributor.attribute(progs, sites, None, "targets", verify_top_k=k, seed=0)
    assert again.column("verify").to_pylist() == [r["verify"] for r in rows]
    other = attributor.attribute(progs, sites, None, "targets", verify_top_k=k, seed=1)
    assert other.column("verify").to_pylist() != [r["verify"] for r in rows]


def test_auto_batches_from_the_memory_budget(tmp_path) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "qwen3", n_layers=2)))
    pairs = [encode_program(lm.tokenizer, p) for p in programs()]
    tight = Attributor(lm, batch_size="auto", budget_bytes=1)
    assert tight._programs_per_batch(len(pairs[0].clean_ids)) == 1
    roomy = Attributor(lm, batch_size="auto", budget_bytes=1 << 30)
    assert roomy._programs_per_batch(len(pairs[0].clean_ids)) >= 3
    one = {g: b.cells for b in tight.estimate(pairs, SITES) for g in b.programs}
    for batch in roomy.estimate(pairs, SITES):
        for row, g in enumerate(batch.programs):
            for cell, values in batch.cells.items():
                torch.testing.assert_close(values[row], one[g][cell][0], rtol=1e-4, atol=1e-5)


def test_each_row_holds_its_cells_estimate(tmp_path) -> None:
    """The table is built column-wise (`actors.attribution_table`): every row's estimate and
    GradDrop score is the one `estimate` gives its (site, layer, pos, head)."""
    lm = load_model(str(save_tiny_model(tmp_path / "m", "qwen3", n_layers=2)))
    progs = programs()
    attributor = Attributor(lm, batch_size=2, grad_drop=True)
    rows = attributor.attribute(progs, SITES, None, "targets").to_pylist()
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    want = {}
    for batch in attributor.estimate(pairs, SITES):
        for row, g in enumerate(batch.programs):
            for cell, values in batch.cells.items():
                want[(g, *cell)] = (values[row], batch.grad_drop[cell][row])
    index = {(p.task, p.seq_len, p.index): g for g, p in enumerate(progs)}
    assert len(rows) == sum(len(p.positions("targets")) * 2 * (2 + 4) for p in pairs)
    for r in rows:
        g = index[(r["task"], r["seq_len"], r["program"])]
        at = (r["pos"],) if r["head"] is None else (r["pos"], r["head"])
        value, drop = want[(g, r["site"], r["layer"])]
        assert r["estimate"] == pytest.approx(float(value[at]), abs=1e-6)
        assert r["grad_drop"] == pytest.approx(float(drop[at]), abs=1e-6)
        assert r["label"] == pairs[g].labels[r["pos"]] and r["token"] == pairs[g].tokens[r["pos"]]
        assert r["verify"] is None and r["exact"] is None


def test_auto_halves_a_batch_that_runs_out_of_memory(tmp_path) -> None:
    """Under `auto` a batch that runs out of memory is retried at half the programs, down to
    one; with a whole-number batch size the error is the caller's (the worker halves it)."""
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=2)))
    pairs = [encode_program(lm.tokenizer, p) for p in programs()]

    class Tight(Attributor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tried: list[int] = []

        def _batch(self, pairs, programs, cells):
            self.tried.append(len(programs))
            if len(programs) > 1:
                raise torch.OutOfMemoryError("injected")
            return super()._batch(pairs, programs, cells)

    tight = Tight(lm, batch_size="auto", budget_bytes=1 << 40)
    got = {g: b.cells for b in tight.estimate(pairs, SITES) for g in b.programs}
    # Lengths 3 and 2 programs: 3 -> 1 (then 1, 1) and 2 -> 1 (then 1).
    assert tight.tried == [3, 1, 1, 1, 2, 1, 1]
    want = {
        g: b.cells for b in Attributor(lm, batch_size=1).estimate(pairs, SITES) for g in b.programs
    }
    assert sorted(got) == sorted(want) == list(range(len(pairs)))
    for g, cells in got.items():
        for cell, values in cells.items():
            torch.testing.assert_close(values, want[g][cell], rtol=1e-4, atol=1e-5)
    with pytest.raises(torch.OutOfMemoryError):
        list(Tight(lm, batch_size=4).estimate(pairs, SITES))
