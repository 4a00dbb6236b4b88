"""The patching engine against one-patch-per-forward plain-hook patching (`tests/reference.py`),
on every architecture the map supports, at 4 layers, and a test per shortcut of the engine."""

import math

import pyarrow as pa
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from actors import PATCHING_SCHEMA, Patcher, load_model
from actors.engine import Engine
from actors.targets import encode_program
from orchestrator.tasks import generate, iter_programs
from tests import reference
from tests.tiny import ARCHS, MORE_ARCHS, save_tiny_model

SITES = ["resid_pre", "attn_head", "mlp_out"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        arch: str(save_tiny_model(root / arch, arch, n_layers=N_LAYERS))
        for arch in ARCHS + MORE_ARCHS
    }


def mixed_programs() -> list:
    """Two programs of one length (they share passes, each with its own clean cache) and one of
    another length (its own stack)."""
    return [
        generate("binding", seed=1, seq_len=5, index=2, style="paper"),
        generate("binding", seed=1, seq_len=5, index=7, style="paper"),
        generate("binding", seed=1, seq_len=4, index=0, style="paper"),
    ]


def check_against_reference(lm, patcher, programs, sites=SITES, layers=None) -> int:
    """Every patch's two answer logits and top-1 against one full forward per patch."""
    checked = 0
    for wave in patcher.run(programs, sites, layers, "all"):
        for i, patch in enumerate(wave.plan.patches):
            pair = wave.pairs[patch.program][1]
            want = reference.patched_logits(
                lm.model,
                pair.clean_ids,
                pair.cf_ids,
                patch.site,
                patch.layer,
                patch.pos,
                patch.head,
            )
            answers = want[[pair.clean_answer_id, pair.cf_answer_id]]
            torch.testing.assert_close(
                wave.read.logits[i],
                answers,
                atol=1e-4,
                rtol=1e-4,
                msg=lambda m, p=patch: f"{p}: {m}",
            )
            assert int(wave.read.top[i]) == int(want.argmax()), patch
            checked += 1
    return checked


@pytest.mark.parametrize("arch", ARCHS + MORE_ARCHS)
def test_engine_equals_one_forward_per_patch(tiny_models, arch: str) -> None:
    lm = load_model(tiny_models[arch])
    assert lm.arch.n_layers == N_LAYERS and lm.arch.n_heads == 4
    # Small batches force several passes per position and several chunks of the vocabulary.
    patcher = Patcher(lm, batch_size=5, vocab_chunk=13)
    checked = check_against_reference(lm, patcher, mixed_programs())
    assert checked == patcher.last_plan.cost().patches
    assert checked > 1000


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_auto_batches_equal_one_forward_per_patch(tiny_models, arch: str) -> None:
    lm = load_model(tiny_models[arch])
    patcher = Patcher(lm, batch_size="auto")
    check_against_reference(lm, patcher, mixed_programs(), sites=["attn_head"], layers=[1, 2])
    # One pass per (position, kind) at this size: the rows of all programs share it.
    passes = patcher.last_plan.passes
    assert (
        max(len({patcher.last_plan.patches[e.patch].program for e in p.entries}) for p in passes)
        == 2
    )


def test_engine_computes_exactly_what_the_plan_says(tiny_models) -> None:
    """Measured at the decoder layers' inputs; with `tests/unit/test_plan.py` (the plan's cost
    against the closed form) this fails when a shortcut is removed: the whole prompt fed, rows
    joining at layer 0, no pre-passes, free patches run."""
    lm = load_model(tiny_models["qwen3"])
    patcher = Patcher(lm, batch_size=7)
    programs = mixed_programs()
    waves = list(patcher.run(programs, SITES, None, "all"))
    cost = waves[0].plan.cost()
    assert len(waves) == 1
    assert patcher.engine.stats.token_layers == cost.token_layers + cost.runs
    assert patcher.engine.stats.forwards == cost.passes + 2  # one run per program length
    # The runs read every candidate's token (for choice_correct); the passes only the two
    # answers' (each pass row gathers its tokens' unembedding rows).
    assert all(stack.tokens.shape[-1] == 2 for stack, _ in waves[0].stacks.values())
    # Only the last position reaches the readout: one row per main-pass entry, two per program.
    main_rows = sum(len(p.entries) for p in waves[0].plan.passes if p.read == "logits")
    assert patcher.engine.stats.readout_rows == main_rows + 2 * len(programs)


def test_last_layer_projection_and_mlp_run_at_the_last_position(tiny_models) -> None:
    """The last layer's attention output projection and MLP feed only the readout, which reads
    the last position: main passes run them on that position alone (the reference tests prove
    it exact). Counted at the MLP's output; fails when the shortcut is removed."""
    lm = load_model(tiny_models["llama"])
    patcher = Patcher(lm, batch_size=7)
    programs = mixed_programs()
    fed = []
    last = lm.arch.n_layers - 1
    hook = lm.arch.mlp[last].register_forward_hook(lambda m, a, out: fed.append(out.shape[:2]))
    try:
        waves = list(patcher.run(programs, SITES, None, "all"))
    finally:
        hook.remove()
    plan = waves[0].plan
    main = [p for p in plan.passes if p.read == "logits"]
    assert any(p.width > 1 for p in main)
    lengths = [len(encode_program(lm.tokenizer, p).clean_ids) for p in programs]
    # The clean and counterfactual runs, and the readout's one-time check (two forwards of the
    # first program), run every position.
    whole = 2 * sum(lengths) + 2 * lengths[0]
    assert sum(b * t for b, t in fed) == whole + sum(p.batch(last) for p in main)


def test_free_patches_are_the_clean_run(tiny_models) -> None:
    lm = load_model(tiny_models["gpt2"])
    programs = list(iter_programs("binding", seed=4, seq_len=6, n=3))
    rows = Patcher(lm).patch(programs, sites=SITES).to_pylist()
    for prog in programs:
        pair = encode_program(lm.tokenizer, prog)
        mine = [r for r in rows if r["program"] == prog.index]
        before = [r for r in mine if r["pos"] < pair.first_diff]
        assert before, "some positions precede the changed token"
        for r in before:
            assert r["patched_logit_diff"] == r["clean_logit_diff"]
            assert r["norm_effect"] in (0.0, None)
        # resid_pre into layer 0 at the changed token is the counterfactual input itself.
        (root,) = [
            r
            for r in mine
            if r["site"] == "resid_pre" and r["layer"] == 0 and r["pos"] == pair.first_diff
        ]
        assert root["patched_logit_diff"] == pytest.approx(root["cf_logit_diff"], abs=1e-4)
        assert root["flipped"] == root["cf_top1_correct"]


def test_oom_splits_the_pass_and_gives_the_same_rows(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])

    class SmallDevice(Engine):
        """Runs out of memory on any pass of more than 3 rows."""

        def run_pass(self, ps, *args, **kwargs):
            if len(ps.entries) > 3:
                raise torch.OutOfMemoryError(f"test: {len(ps.entries)} rows")
            return super().run_pass(ps, *args, **kwargs)

    programs = mixed_programs()[:2]
    want = Patcher(lm, batch_size=64).patch(programs, sites=["attn_head"])
    patcher = Patcher(lm, batch_size="auto", budget_bytes=1 << 30)
    patcher.engine = SmallDevice(lm.model, lm.arch, patcher.readout)
    got = patcher.patch(programs, sites=["attn_head"])
    assert patcher.engine.stats.oom_splits > 0
    assert patcher.budget_bytes == 1 << 29  # halved for the next waves
    assert got.column("patched_logit_diff").to_pylist() == pytest.approx(
        want.column("patched_logit_diff").to_pylist(), abs=1e-5
    )
    # With an integer batch size the error reaches the caller (the actor halves the batch).
    fixed = Patcher(lm, batch_size=64)
    fixed.engine = SmallDevice(lm.model, lm.arch, fixed.readout)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.patch(programs, sites=["attn_head"])


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_no_tensor_of_rows_by_vocabulary(tmp_path) -> None:
    """The readout walks the vocabulary in chunks: no op makes a tensor with a vocabulary-sized
    axis, except the clean/counterfactual check of the readout (one row) before the runs."""
    from tests.tiny import build_bpe_tokenizer

    vocab = 300
    lm = load_model(str(save_tiny_model(tmp_path / "m", "llama", build_bpe_tokenizer(vocab))))
    assert lm.model.config.vocab_size == vocab
    patcher = Patcher(lm, batch_size="auto", vocab_chunk=64)
    programs = list(iter_programs("binding", seed=0, seq_len=6, n=3))
    patcher.patch(programs[:1], sites=["resid_pre"], layers=[0])  # the one-row check
    log = ShapeLog()
    with log:
        table = patcher.patch(programs, sites=SITES)
    assert table.num_rows > 0
    embedding = tuple(lm.model.get_output_embeddings().weight.shape)
    assert [s for s in log.shapes if vocab in s and s != embedding] == []


def test_readout_check_refuses_an_unknown_logit_transform(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    # Llama's forward does not soft-cap; a readout that does is wrong, and must say so.
    lm.model.config.final_logit_softcapping = 0.5
    with pytest.raises(ValueError, match="transforms its logits"):
        Patcher(lm).patch([generate("binding", 0, 4, 1)], sites=["resid_pre"])


def test_table_schema_and_metrics(tiny_models) -> None:
    lm = load_model(tiny_models["qwen3"])
    programs = [generate(task, 2, 6, 0) for task in ("binding", "range", "boolean")]
    table = Patcher(lm).patch(programs, sites=["resid_pre", "attn_head"], layers=[1])
    assert table.schema == PATCHING_SCHEMA
    rows = table.to_pylist()
    assert {r["task"] for r in rows} == {"binding", "range", "boolean"}
    assert {r["layer"] for r in rows} == {1}
    assert {r["head"] for r in rows if r["site"] == "attn_head"} == {0, 1, 2, 3}
    assert {r["head"] for r in rows if r["site"] == "resid_pre"} == {None}
    for r in rows:
        assert r["model"] == tiny_models["qwen3"]
        gap = r["cf_logit_diff"] - r["clean_logit_diff"]
        if abs(gap) >= 1e-3:
            want = (r["patched_logit_diff"] - r["clean_logit_diff"]) / gap
            assert r["norm_effect"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        else:
            assert r["norm_effect"] is None
        assert all(math.isfinite(r[k]) for k in ("clean_logit_diff", "cf_logit_diff"))


def test_flipped_means_counterfactual_answer_on_top(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    program = generate("binding", 0, 4, 1)
    pair = encode_program(lm.tokenizer, program)
    patcher = Patcher(lm)
    (wave,) = patcher.run([program], ["resid_pre"])
    table = patcher.patch([program], sites=["resid_pre"])
    flipped = table.column("flipped").to_pylist()
    assert flipped == [int(t) == pair.cf_answer_id for t in wave.read.top]
    # A top-1 change to a third token is not a flip.
    third = [int(t) not in (pair.cf_answer_id, pair.clean_answer_id) for t in wave.read.top]
    assert not any(f and c for f, c in zip(flipped, third, strict=True))


def test_targets_only_labelled_positions(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    program = generate("binding", 0, 8, 3)
    table = Patcher(lm).patch([program], sites=["resid_pre"], layers=[0], positions="targets")
    labels = table.column("label").to_pylist()
    assert "other" not in labels
    assert set(labels) == set(program.spans)
    assert table.num_rows == len(program.spans)  # char-level: one token per one-char span


def test_plan_is_printable_before_anything_runs(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    patcher = Patcher(lm)
    plan = patcher.plan(mixed_programs(), sites=["attn_head"])
    assert patcher.engine.stats.forwards == 0
    assert (
        plan.cost().patches
        == sum(len(encode_program(lm.tokenizer, p).clean_ids) for p in mixed_programs())
        * N_LAYERS
        * 4
    )
    assert "passes" in plan.describe()


def test_bad_arguments(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    patcher = Patcher(lm)
    program = generate("binding", 0, 4, 0)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['resid_post'\]"):
        patcher.patch([program], sites=["resid_post"])
    with pytest.raises(ValueError, match=r"layers \[4\] out of range: the model has 0..3"):
        patcher.patch([program], layers=[4])
    with pytest.raises(ValueError, match="positions='some'"):
        patcher.patch([program], positions="some")
    for bad in (0, -3, "big", 2.5):
        # A wrong type meets the signature's type check first under pytest (TypeError).
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            Patcher(lm, batch_size=bad)
    assert isinstance(patcher.patch([], sites=["mlp_out"]), pa.Table)


def test_sweep_estimate_is_the_work_the_engine_does(tiny_models) -> None:
    """The plan the driver prints (`orchestrator.plan`) counts what the engine then computes,
    shard by shard (one layer block and site each): here the sample is every program."""
    from orchestrator.plan import SAMPLE, make_plan
    from orchestrator.shards import layer_blocks
    from orchestrator.spec import parse_spec

    model = tiny_models["qwen3"]
    spec = parse_spec(
        {
            "run": "estimate",
            "seed": 3,
            "tasks": [{"family": "binding", "seq_lens": [4, 6], "n": SAMPLE}],
            "models": [{"id": model}],
            "experiments": {
                "patching": {"sites": ["resid_pre", "attn_head"], "layers_per_shard": 3}
            },
        }
    )
    estimate = make_plan(spec, {model: N_LAYERS})
    lm = load_model(model)
    rows = token_layers = free = 0
    for seq_len in (4, 6):
        programs = list(iter_programs("binding", 3, seq_len, SAMPLE))
        for site in ("resid_pre", "attn_head"):
            for block in layer_blocks(N_LAYERS, None, 3):
                patcher = Patcher(lm, batch_size=10**6)
                table = patcher.patch(programs, [site], list(block), "targets")
                rows += table.num_rows
                free += patcher.last_plan.cost().free
                token_layers += patcher.engine.stats.token_layers
    assert (estimate.patch_rows, estimate.free_rows) == (rows, free)
    assert estimate.token_layers == token_layers
