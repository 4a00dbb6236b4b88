"""Attention knockout (`actors.knockout`) against a reference that never touches a mask: with
one edge (query q -> source s) of one head cut, the head's other weights renormalize, so its
output at q becomes `(z - p_qs v_s) / (1 - p_qs)`; the reference reads the eager attention
weights and values of the clean run and writes that output into the attention output
projection's input, one forward per knockout. Also: a hand-built model that copies the root
value, and the table's rows and arguments."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors import load_model
from actors.knockout import KNOCKOUT_SCHEMA, Knocker, sources
from actors.rows import MIN_DENOMINATOR
from actors.targets import encode_program
from models.tokenizer import build_char_tokenizer
from orchestrator.tasks import generate, iter_programs
from tests import reference
from tests.tiny import save_tiny_model, tiny_config

N_LAYERS = 4
SOURCES = {"ref_depth_1_rhs", "ref_depth_2_rhs", "ref_depth_3_rhs", "query_var"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("knockout")
    return {
        arch: str(save_tiny_model(root / arch, arch, n_layers=N_LAYERS))
        for arch in ("llama", "qwen3", "gpt2", "gemma2")
    }


def programs() -> list:
    """Depths 2 and 3, two program lengths (so rows of several programs and lengths batch)."""
    return [
        *iter_programs("binding", seed=7, seq_len=5, n=2, start=1),
        generate("binding", seed=7, seq_len=4, index=1),
    ]


def _qkv_paths(model, layer: int):
    """(attention module, value reader) of `layer`, by explicit path: the reader turns the
    module's value projection's output into `[pos, n_heads, d_head]` per query head."""
    cfg = model.config
    if cfg.model_type == "gpt2":
        attn = model.transformer.h[layer].attn
        d, n = cfg.n_embd, cfg.n_head
        return attn, attn.c_attn, lambda out: out[0, :, 2 * d :].view(-1, n, d // n)
    attn = model.model.layers[layer].self_attn
    n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n

    def per_query_head(out):
        return out[0].view(-1, kv, d_head).repeat_interleave(n // kv, dim=1)

    return attn, attn.v_proj, per_query_head


class Renormalized:
    """The reference: the clean run's eager attention weights and values of every layer (one
    forward), then one forward per knockout with the head's output at each cut query replaced
    by the renormalized one (module docstring)."""

    @torch.no_grad()
    def __init__(self, model, pair) -> None:
        assert model.config._attn_implementation == "eager", "weights come from eager only"
        self.model, self.pair = model, pair
        self.weights, self.values = {}, {}
        handles = []
        for layer in range(model.config.num_hidden_layers):
            attn, v_module, values = _qkv_paths(model, layer)

            def keep_w(m, a, out, layer=layer):
                self.weights[layer] = out[1][0]

            def keep_v(m, a, out, layer=layer, values=values):
                self.values[layer] = values(out)

            handles += [attn.register_forward_hook(keep_w), v_module.register_forward_hook(keep_v)]
        try:
            model(input_ids=torch.tensor([pair.clean_ids]))
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def metric(self, layer: int, head: int, source: int, scope: str) -> float:
        """The metric with the edges of `scope` to `source` cut in (layer, head)."""
        model, pair = self.model, self.pair
        n, n_heads = len(pair.clean_ids), reference.n_heads(model)
        w, v = self.weights[layer][head], self.values[layer][source, head]
        queries = [n - 1] if scope == "answer" else range(source + 1, n)

        def renormalize(module, args):
            z = args[0].clone()
            heads = z[0].view(n, n_heads, -1)
            for q in queries:
                heads[q, head] = (heads[q, head] - w[q, source] * v) / (1 - w[q, source])
            return (z, *args[1:])

        _, attn_out, _ = reference.modules(model, layer)
        handle = attn_out.register_forward_pre_hook(renormalize)
        try:
            logits = model(input_ids=torch.tensor([pair.clean_ids])).logits[0, -1]
        finally:
            handle.remove()
        return (logits[pair.cf_answer_id] - logits[pair.clean_answer_id]).item()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gemma2"])
@pytest.mark.parametrize("scope", ["answer", "later"])
def test_equals_renormalized_reference(folders, arch, scope) -> None:
    lm = load_model(folders[arch], dtype="float32")
    lm.model.double()
    progs = programs()
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    tables = {}
    for implementation in ("sdpa", "eager"):
        lm.model.set_attn_implementation(implementation)
        knocker = Knocker(lm, batch_size=7)
        tables[implementation] = knocker.knockout(progs, scope=scope).to_pylist()
        assert lm.model.config._attn_implementation == implementation  # left as it was
    rows = tables["eager"]
    assert len(rows) == sum(N_LAYERS * 4 * len(sources(p)) for p in pairs)
    refs = {
        (p.seq_len, p.index): Renormalized(lm.model, pair)
        for p, pair in zip(progs, pairs, strict=True)
    }
    # Under SDPA the model's mask comes as None (plain causal) or, in Gemma-2's sliding layers,
    # boolean; under eager, additive. Float32 columns round at ~3e-7. Transformers' SDPA path
    # drops Gemma-2's attention soft-capping (~4e-6 here), which the eager reference keeps.
    tolerance = {"eager": 1e-6, "sdpa": 2e-5 if arch == "gemma2" else 1e-6}
    for row, row_sdpa in zip(rows, tables["sdpa"], strict=True):
        ref = refs[(row["seq_len"], row["program"])]
        want = ref.metric(row["layer"], row["head"], row["source_pos"], scope)
        for implementation, got in (("eager", row), ("sdpa", row_sdpa)):
            tol = tolerance[implementation]
            assert got["knocked_logit_diff"] == pytest.approx(want, abs=tol), (implementation, row)
            assert got["effect"] == pytest.approx(want - got["clean_logit_diff"], abs=2 * tol)
    # The edges matter: some cut moves the metric well beyond the tolerance.
    assert max(abs(r["effect"]) for r in rows) > 1e-2


COPY_LAYER, COPY_HEAD = 1, 3  # query head 3 reads key/value head 1 (grouped-query attention)


def save_copy_model(folder, seed: int = 0):
    """A 2-layer Llama whose head COPY_HEAD of layer COPY_LAYER, at `:`, attends to the digit
    tokens and copies the digit to the logits; everything else is zero (layer 0 does nothing).

    Embeddings: dim 0 flags a digit, dims 1-10 say which, dim 11 flags `:`, dim 12 is 1 for
    every token (no zero vector meets the norms). The head's query and key use dim 7 of its
    16, whose rotary frequency is ~3e-4 rad per position, so scores do not depend on where
    the digit is: ~650 for a digit key, 0 for any other. Its value is the digit's one-hot,
    which the output projection writes to dims 20-29 and the unembedding reads, 10 per unit.
    """
    tokenizer = build_char_tokenizer()
    cfg = tiny_config("llama", len(tokenizer), n_layers=2)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    vocab = tokenizer.get_vocab()
    digits = [vocab[str(k)] for k in range(10)]
    d_head = cfg.hidden_size // cfg.num_attention_heads
    kv = COPY_HEAD // (cfg.num_attention_heads // cfg.num_key_value_heads)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, 12] = 1.0
        embed[vocab[":"], 11] = 1.0
        attn = model.model.layers[COPY_LAYER].self_attn
        attn.q_proj.weight[COPY_HEAD * d_head + 7, 11] = 10.0
        attn.k_proj.weight[kv * d_head + 7, 0] = 10.0
        for k, token in enumerate(digits):
            embed[token, 0] = 1.0
            embed[token, 1 + k] = 1.0
            attn.v_proj.weight[kv * d_head + k, 1 + k] = 1.0
            attn.o_proj.weight[20 + k, COPY_HEAD * d_head + k] = 1.0
            model.lm_head.weight[token, 20 + k] = 10.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def one_digit_programs(n: int) -> list:
    """Binding programs whose only digit is the root value (the other lines copy variables)."""
    found = [
        p
        for p in iter_programs("binding", seed=3, seq_len=3, n=200, p_var=0.9)
        if sum(c.isdigit() for c in p.text) == 1
    ]
    assert len(found) >= n, f"only {len(found)} one-digit programs"
    return found[:n]


@pytest.mark.parametrize("scope", ["answer", "later"])
def test_cutting_the_root_edge_of_a_copy_head_moves_the_answer(tmp_path, scope) -> None:
    lm = load_model(str(save_copy_model(tmp_path / "copy")), dtype="float32")
    progs = one_digit_programs(4)
    rows = Knocker(lm, batch_size="auto").knockout(progs, scope=scope).to_pylist()
    assert {p.depth for p in progs} != {1}, "want chains with hops, not only roots"
    assert all(r["top1_correct"] for r in rows), "the model copies the root value"
    assert all(r["clean_logit_diff"] < -50 and r["cf_logit_diff"] > 50 for r in rows)
    root = [r for r in rows if r["source"] == "ref_depth_1_rhs"]
    copy = [r for r in root if (r["layer"], r["head"]) == (COPY_LAYER, COPY_HEAD)]
    assert len(copy) == len(progs)
    for r in copy:  # the copy is gone: every logit 0, the metric 0
        assert r["top1_changed"], r
        assert r["effect"] == pytest.approx(-r["clean_logit_diff"], abs=1e-3)
        assert r["norm_effect"] == pytest.approx(0.5, abs=1e-4)
    others = [r for r in rows if r not in copy]
    assert {r["source"] for r in others} >= {"ref_depth_1_rhs", "ref_depth_2_rhs", "query_var"}
    for r in others:  # other heads, other layers, other sources: nothing moves
        assert not r["top1_changed"], r
        assert abs(r["effect"]) < 1e-3, r


def test_rows_labels_and_batch_size_independence(folders) -> None:
    lm = load_model(folders["qwen3"], dtype="float32")
    progs = programs()
    pairs = [encode_program(lm.tokenizer, p) for p in progs]
    knocker = Knocker(lm, batch_size=1)
    one = knocker.knockout(progs, layers=[1, 3], scope="later")
    assert one.schema.equals(KNOCKOUT_SCHEMA)
    want = [
        (p.seq_len, p.index, layer, head, pos)
        for p, pair in zip(progs, pairs, strict=True)
        for layer in (1, 3)
        for head in range(4)
        for pos in sources(pair)
    ]
    keys = ("seq_len", "program", "layer", "head", "source_pos")
    assert [tuple(r[k] for k in keys) for r in one.to_pylist()] == want
    by_program = {(p.seq_len, p.index): pair for p, pair in zip(progs, pairs, strict=True)}
    for r in one.to_pylist():
        pair = by_program[(r["seq_len"], r["program"])]
        assert r["source"] == pair.labels[r["source_pos"]] and r["source"] in SOURCES
        assert r["token"] == pair.tokens[r["source_pos"]]
        assert r["scope"] == "later"
        gap = r["cf_logit_diff"] - r["clean_logit_diff"]
        if abs(gap) >= MIN_DENOMINATOR:
            assert r["norm_effect"] == pytest.approx(r["effect"] / gap, rel=1e-4, abs=1e-6)
        else:
            assert r["norm_effect"] is None
    assert {r["source"] for r in one.to_pylist()} == SOURCES
    # The clean and counterfactual metrics, and the clean top-1, are the model's own.
    first = {(r["seq_len"], r["program"]): r for r in reversed(one.to_pylist())}
    for p, pair in zip(progs, pairs, strict=True):
        r = first[(p.seq_len, p.index)]
        with torch.no_grad():
            clean, cf = lm.model(input_ids=torch.tensor([pair.clean_ids, pair.cf_ids])).logits[
                :, -1
            ]
        for logits, column in ((clean, "clean_logit_diff"), (cf, "cf_logit_diff")):
            metric = (logits[pair.cf_answer_id] - logits[pair.clean_answer_id]).item()
            assert r[column] == pytest.approx(metric, abs=1e-5)
        assert r["top1_correct"] == (int(clean.argmax()) == pair.clean_answer_id)
    knocker.batch_size = "auto"
    auto = knocker.knockout(progs, layers=[1, 3], scope="later")
    for column in ("knocked_logit_diff", "effect", "clean_logit_diff", "top1_changed"):
        a, b = one.column(column).to_pylist(), auto.column(column).to_pylist()
        assert a == pytest.approx(b, abs=1e-5), column


def test_auto_halves_a_forward_that_runs_out_of_memory(folders, monkeypatch) -> None:
    lm = load_model(folders["llama"], dtype="float32")
    progs = programs()[:2]
    want = Knocker(lm, batch_size=1).knockout(progs, layers=[2])
    knocker = Knocker(lm, batch_size="auto")
    forward, sizes = knocker._forward, []

    def small_only(ids, *args):
        sizes.append(len(ids))
        if len(ids) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(ids, *args)

    monkeypatch.setattr(knocker, "_forward", small_only)
    got = knocker.knockout(progs, layers=[2])
    assert max(sizes) > 3 and sizes[-1] <= 3, sizes
    assert got.column("knocked_logit_diff").to_pylist() == pytest.approx(
        want.column("knocked_logit_diff").to_pylist(), abs=1e-5
    )
    with pytest.raises(torch.OutOfMemoryError):  # a fixed batch size is the caller's to fix
        knocker.batch_size = 4
        knocker.knockout(progs, layers=[2])


def test_bad_arguments_are_named(folders) -> None:
    lm = load_model(folders["llama"], dtype="float32")
    knocker = Knocker(lm, batch_size=2)
    progs = programs()[:1]
    with pytest.raises(ValueError, match=r"scope='all'.*answer.*later"):
        knocker.knockout(progs, scope="all")
    with pytest.raises(ValueError, match=r"layers \[4, -1\] out of range 0\.\.3"):
        knocker.knockout(progs, layers=[0, 4, -1])
    for bad in (0, "big", 1.5):
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            knocker.batch_size = bad
    was = lm.model.config._attn_implementation
    lm.model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match=r"'flash_attention_2'.*set_attn_implementation"):
            Knocker(lm)
    finally:
        lm.model.config._attn_implementation = was


def test_skipped_is_reset_and_hooks_are_removed(folders) -> None:
    lm = load_model(folders["gpt2"], dtype="float32")
    knocker = Knocker(lm, batch_size=3)
    good = programs()[:1]
    same = good[0].to_dict() | {"cf_text": good[0].text, "cf_answer": good[0].answer}
    table = knocker.knockout([*good, same], layers=[0])
    assert len(knocker.skipped) == 1 and knocker.skipped[0][0]["index"] == good[0].index
    assert table.num_rows == 4 * len(sources(encode_program(lm.tokenizer, good[0])))
    knocker.knockout(good, layers=[0])
    assert knocker.skipped == []
    assert all(not m._forward_pre_hooks for m in lm.model.modules())
