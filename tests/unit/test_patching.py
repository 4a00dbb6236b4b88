"""The patching engine against one-patch-per-forward plain-hook patching, on six architectures."""

import math

import pyarrow as pa
import pytest
import torch

from actors import PATCHING_SCHEMA, Patcher, load_model
from actors.targets import encode_program
from orchestrator.tasks import generate, iter_programs
from tests import reference
from tests.tiny import ARCHS, save_tiny_model

SITES = ["resid_pre", "attn_head", "mlp_out"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(save_tiny_model(root / arch, arch)) for arch in ARCHS}


def encoded(lm, program):
    pair = encode_program(lm.tokenizer, program)
    assert not hasattr(pair, "reason"), pair
    return pair


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_forward_per_patch(tiny_models, arch: str) -> None:
    lm = load_model(tiny_models[arch])
    assert lm.arch.n_layers == 2 and lm.arch.n_heads == 4
    program = generate("binding", seed=1, seq_len=5, index=2)
    pair = encoded(lm, program)
    # A small batch size forces several chunks per position.
    patcher = Patcher(lm, batch_size=5)
    rows, logits, clean, _ = patcher.patch_pair(pair, SITES, [0, 1], "all")
    assert len(rows) == 2 * len(pair.clean_ids) * (1 + 4 + 1)
    for row, got in zip(rows, logits, strict=True):
        want = reference.patched_logits(
            lm.model, pair.clean_ids, pair.cf_ids, row.site, row.layer, row.pos, row.head
        )
        torch.testing.assert_close(
            got, want, atol=1e-4, rtol=1e-4, msg=lambda m, r=row: f"{r}: {m}"
        )
    # The clean and counterfactual logits are the model's own.
    full = lm.model(input_ids=torch.tensor([pair.clean_ids])).logits[0, -1]
    torch.testing.assert_close(clean.logits, full.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_equal_activations_have_no_effect_and_root_patch_is_the_counterfactual(
    tiny_models, arch: str
) -> None:
    lm = load_model(tiny_models[arch])
    patcher = Patcher(lm)
    programs = list(iter_programs("binding", seed=4, seq_len=6, n=4))
    table = patcher.patch(programs, sites=SITES)
    rows = table.to_pylist()
    for prog in programs:
        pair = encoded(lm, prog)
        mine = [r for r in rows if r["program"] == prog.index]
        before = [r for r in mine if r["pos"] < pair.first_diff]
        assert before, "some positions precede the changed token"
        for r in before:
            assert r["patched_logit_diff"] == pytest.approx(r["clean_logit_diff"], abs=0)
            assert r["norm_effect"] in (0.0, None)
        # resid_pre into layer 0 at the changed token is the counterfactual input itself.
        root = [
            r
            for r in mine
            if r["site"] == "resid_pre" and r["layer"] == 0 and r["pos"] == pair.first_diff
        ]
        assert len(root) == 1
        assert root[0]["patched_logit_diff"] == pytest.approx(root[0]["cf_logit_diff"], abs=1e-4)
        if root[0]["norm_effect"] is not None:
            assert root[0]["norm_effect"] == pytest.approx(1.0, abs=1e-3)
        assert root[0]["flipped"] == root[0]["cf_correct"]


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
    pair = encoded(lm, program)
    _, logits, _, _ = Patcher(lm).patch_pair(pair, ["resid_pre"], [0, 1], "all")
    table = Patcher(lm).patch([program], sites=["resid_pre"])
    flipped = table.column("flipped").to_pylist()
    assert flipped == [int(x.argmax()) == pair.cf_answer_id for x in logits]
    # A top-1 change to a third token is not a flip.
    changed_not_cf = [
        int(x.argmax()) not in (pair.cf_answer_id, pair.clean_answer_id) for x in logits
    ]
    assert not any(f and c for f, c in zip(flipped, changed_not_cf, strict=True))


def test_targets_only_labelled_positions(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    program = generate("binding", 0, 8, 3)
    table = Patcher(lm).patch([program], sites=["resid_pre"], layers=[0], positions="targets")
    labels = table.column("label").to_pylist()
    assert "other" not in labels
    assert set(labels) == set(program.spans)
    assert table.num_rows == len(program.spans)  # char-level: one token per one-char span


def test_bad_arguments(tiny_models) -> None:
    lm = load_model(tiny_models["llama"])
    patcher = Patcher(lm)
    program = generate("binding", 0, 4, 0)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['resid_post'\]"):
        patcher.patch([program], sites=["resid_post"])
    with pytest.raises(ValueError, match=r"layers \[2\] out of range: .* has layers 0..1"):
        patcher.patch([program], layers=[2])
    with pytest.raises(ValueError, match="positions='some'"):
        patcher.patch([program], positions="some")
    with pytest.raises(ValueError, match="batch_size=0"):
        Patcher(lm, batch_size=0)
    assert isinstance(patcher.patch([], sites=["mlp_out"]), pa.Table)
