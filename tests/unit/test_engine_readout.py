"""The engine's teacher-forced readout (the last r positions of each program: logits of a token
set per position, top-1, log-sum-exp) against one full forward per patch with plain hooks
(`tests/reference.py`), driven through `actors.engine` directly with plans of mixed program
lengths and readout widths, and the readout's chunked log-sum-exp against `torch.logsumexp`."""

import random

import pytest
import torch

from actors import load_model
from actors.engine import Engine
from actors.execute import run_plan
from actors.plan import ProgramShape, build_plan
from actors.readout import Readout
from tests import reference
from tests.tiny import save_tiny_model

ARCHS = ("llama", "qwen3", "gpt2", "gemma2")  # gemma2: soft-capped final logits
SITES = ["resid_pre", "attn_head", "mlp_out"]
N_LAYERS = 4
K = 3  # tokens read per readout position
CHUNK = 13  # vocabulary rows per readout matmul: many chunks, the last one short
# (n_tokens, n_read, diff): two programs of one key share passes; (10, 1) and (10, 3) share a
# length but not a stack; the n_read = 1 program reads 2-D tokens (one position, no r axis).
PROGRAMS = [(10, 1, (3,)), (9, 2, (2, 5)), (9, 2, (4,)), (10, 3, (3, 6)), (8, 3, (2,))]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {a: str(save_tiny_model(root / a, a, n_layers=N_LAYERS)) for a in ARCHS}


def make_programs(vocab: int, seed: int = 0) -> list[dict]:
    """Random prompts plus r - 1 appended tokens (the answer but its last token, the same in
    both runs); the counterfactual differs at `diff`, all prompt positions."""
    rng = random.Random(seed)
    programs = []
    for n_tokens, n_read, diff in PROGRAMS:
        clean = [rng.randrange(4, vocab) for _ in range(n_tokens)]
        cf = list(clean)
        for p in diff:
            cf[p] = 4 + (clean[p] - 4 + rng.randrange(1, vocab - 4)) % (vocab - 4)
        tokens = [rng.sample(range(vocab), K) for _ in range(n_read)]
        shape = ProgramShape(n_tokens, diff, tuple(range(n_tokens - n_read + 1)), n_read)
        programs.append({"clean": clean, "cf": cf, "tokens": tokens, "shape": shape})
    return programs


def run_engine(lm, programs, chunk=CHUNK, limit=4):
    """Plan every patch of `programs`, run the stacks (one per `stack_key`) and the plan."""
    engine = Engine(lm.model, lm.arch, Readout.of(lm.model, chunk))
    shapes = [p["shape"] for p in programs]
    n_heads = lm.arch.n_heads
    plan = build_plan(shapes, SITES, range(N_LAYERS), N_LAYERS, n_heads, lambda w, c: limit)
    stacks = {}
    for key in sorted({s.stack_key for s in shapes}):
        members = [g for g, s in enumerate(shapes) if s.stack_key == key]
        tokens = torch.tensor([programs[g]["tokens"] for g in members])
        if key[1] == 1:
            tokens = tokens[:, 0]  # [prog, k]: today's one-position readout
        stack = engine.runs(
            torch.tensor([programs[g]["clean"] for g in members]),
            torch.tensor([programs[g]["cf"] for g in members]),
            tokens,
            plan.reads,
        )
        stacks[key] = (stack, {g: s for s, g in enumerate(members)})
    return engine, plan, stacks, run_plan(engine, plan, stacks)


def close(got, want, what) -> None:
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_readout_positions_equal_one_forward_per_patch(models, arch: str) -> None:
    lm = load_model(models[arch])
    programs = make_programs(lm.model.config.vocab_size)
    _, plan, stacks, out = run_engine(lm, programs)
    r_max = max(p["shape"].n_read for p in programs)
    assert out.logits.shape == (len(plan.patches), r_max, K)
    assert out.top.shape == out.lse.shape == (len(plan.patches), r_max)
    # Every kind of work happens: free rows, pre-passes, last-layer writes at the first readout
    # position of a pass n_read wide, and passes wider than n_read (the last-layer slicing).
    assert {p.free for p in plan.patches} == {None, "before_diff", "same_token", "unread"}
    assert any(ps.read == "layer_out" and ps.n_read > 1 for ps in plan.passes)
    writes = [
        ps
        for ps in plan.passes
        for e in ps.entries
        if e.layer == N_LAYERS - 1 and e.write != "none"
    ]
    assert writes and all(ps.width == ps.n_read for ps in writes)
    assert any(ps.n_read > 1 for ps in writes)
    assert any(ps.n_read > 1 and ps.width > ps.n_read for ps in plan.passes)
    checked = 0
    for i, patch in enumerate(plan.patches):
        prog = programs[patch.program]
        r = prog["shape"].n_read
        want = reference.patched_readout(
            lm.model, prog["clean"], prog["cf"], patch.site, patch.layer, patch.pos, patch.head, r
        )
        tokens = torch.tensor(prog["tokens"])  # [r, k]
        picked = want.gather(1, tokens)
        logprob = torch.log_softmax(want, dim=-1).gather(1, tokens)
        close(out.logits[i, :r], picked, f"{patch} logits")
        close(out.logits[i, :r] - out.lse[i, :r, None], logprob, f"{patch} log-probs")
        assert out.top[i, :r].tolist() == want.argmax(-1).tolist(), patch
        # Past the program's readout positions: nothing.
        assert out.logits[i, r:].isnan().all() and out.lse[i, r:].isnan().all(), patch
        assert (out.top[i, r:] == -1).all(), patch
        checked += 1
    assert checked == len(plan.patches) > 500
    # The runs' own readouts: the clean and counterfactual forwards at the readout positions.
    for (_, n_read), (stack, slot_of) in stacks.items():
        for g, s in slot_of.items():
            for run, ids in (("clean", programs[g]["clean"]), ("cf", programs[g]["cf"])):
                full = lm.model(input_ids=torch.tensor([ids])).logits[0, -n_read:].float()
                tokens = torch.tensor(programs[g]["tokens"])
                logits = getattr(stack, f"{run}_logits")[s].view(n_read, K)
                lse = getattr(stack, f"{run}_lse")[s].view(n_read)
                close(logits, full.gather(1, tokens), f"{run} run {g}")
                close(lse, torch.logsumexp(full, dim=-1), f"{run} run {g} lse")
                assert getattr(stack, f"{run}_top")[s].view(n_read).tolist() == (
                    full.argmax(-1).tolist()
                )


def test_one_position_readout_keeps_its_shapes(models) -> None:
    """With n_read = 1 and 2-D tokens everything is as before the readout positions existed:
    `[patch, k]`, `[patch]`, equal to the reference at the last position."""
    lm = load_model(models["qwen3"])
    programs = [p for p in make_programs(lm.model.config.vocab_size) if p["shape"].n_read == 1]
    _, plan, stacks, out = run_engine(lm, programs)
    assert list(stacks) == [(10, 1)] and stacks[(10, 1)][0].clean_logits.shape == (1, K)
    assert out.logits.shape == (len(plan.patches), K)
    assert out.top.shape == out.lse.shape == (len(plan.patches),)
    prog = programs[0]
    for i, patch in enumerate(plan.patches):
        want = reference.patched_logits(
            lm.model, prog["clean"], prog["cf"], patch.site, patch.layer, patch.pos, patch.head
        )
        close(out.logits[i], want[prog["tokens"][0]], f"{patch} logits")
        close(out.lse[i], torch.logsumexp(want, dim=0), f"{patch} lse")
        assert int(out.top[i]) == int(want.argmax()), patch
    # The caller's plain-length key still works for n_read = 1.
    engine = Engine(lm.model, lm.arch, Readout.of(lm.model, CHUNK))
    again = run_plan(engine, plan, {10: stacks[(10, 1)]})
    torch.testing.assert_close(again.logits, out.logits, atol=0, rtol=0)


def test_engine_computes_what_the_plan_counts(models) -> None:
    """Decoder-layer inputs, readout rows (n_read per main-pass row and per run), and the last
    layer's MLP fed the readout positions alone: fails if the last-layer slicing is removed
    or cut to one position, or a pass reads more or fewer positions than its programs'."""
    lm = load_model(models["llama"])
    programs = make_programs(lm.model.config.vocab_size)
    fed: list[tuple[int, int]] = []
    mlp = lm.arch.mlp[N_LAYERS - 1]
    hook = mlp.register_forward_hook(lambda m, a, out: fed.append(tuple(out.shape[:2])))
    try:
        engine, plan, _, _ = run_engine(lm, programs)
    finally:
        hook.remove()
    cost = plan.cost()
    assert engine.stats.token_layers == cost.token_layers + cost.runs
    assert engine.stats.readout_rows == cost.readout_rows
    main = [ps for ps in plan.passes if ps.read == "logits"]
    want = sum(len(ps.entries) * ps.n_read for ps in main)
    assert cost.readout_rows == want + 2 * sum(p["shape"].n_read for p in programs)
    runs = 2 * sum(p["shape"].n_tokens for p in programs)
    assert sum(b * t for b, t in fed) == runs + sum(
        ps.batch(N_LAYERS - 1) * ps.n_read for ps in main
    )


def test_lse_is_logsumexp_of_soft_capped_logits(models) -> None:
    """The chunked log-sum-exp of the finished (soft-capped) logits, for chunks that divide the
    vocabulary, leave a short last chunk, or exceed it; and stable where the logits are large
    enough that exp overflows in float32."""
    torch.manual_seed(0)
    model = load_model(models["gemma2"]).model
    assert model.config.final_logit_softcapping == 5.0
    ids = torch.tensor([make_programs(model.config.vocab_size)[3]["clean"]])
    want = model(input_ids=ids).logits[0].float()  # [pos, vocab], soft-capped by the model
    hidden = model.base_model(input_ids=ids).last_hidden_state[0]
    tokens = torch.randint(0, model.config.vocab_size, (hidden.shape[0], K))
    vocab = model.config.vocab_size
    for chunk in (1, 7, vocab // 4, vocab, vocab + 5):
        logits, top, lse = Readout.of(model, chunk)(hidden, tokens)
        close(lse, torch.logsumexp(want, dim=-1), f"chunk {chunk} lse")
        close(logits, want.gather(1, tokens), f"chunk {chunk} logits")
        assert top.tolist() == want.argmax(-1).tolist()
    # Turned off: the same logits and top-1, no log-sum-exp.
    logits, top, lse = Readout.of(model, 7, lse=False)(hidden, tokens)
    close(logits, want.gather(1, tokens), "lse=False logits")
    assert top.tolist() == want.argmax(-1).tolist() and lse.isnan().all()
    # Without a soft-cap, logits of a scaled-up hidden state reach ~1e4: exp overflows unless
    # the sum is rescaled by a running maximum.
    plain = Readout.of(load_model(models["llama"]).model, 7)
    big = 1e3 * torch.randn(4, plain.weight.shape[1])
    full = big @ plain.weight.T
    assert full.abs().max() > 100 and torch.exp(full).isinf().any()
    _, _, lse = plain(big, torch.zeros(4, 1, dtype=torch.long))
    torch.testing.assert_close(
        lse.double(), torch.logsumexp(full.double(), dim=-1), rtol=1e-6, atol=0
    )
