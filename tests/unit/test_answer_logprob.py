"""`metric: answer_logprob` against a plain teacher-forced reference: one full forward per patch
and per answer, the whole answer's log-probability summed token by token; with a Qwen-style
vocabulary (one digit per token, so range answers are one or two tokens)."""

import pytest
import torch

from actors import Patcher, load_model
from actors.targets import encode_program
from orchestrator.tasks import iter_programs
from tests import reference
from tests.tiny import build_qwen_style_tokenizer, save_tiny_model

SITES = ["resid_pre", "attn_head", "mlp_out"]


@pytest.fixture(scope="module")
def qwen_tok():
    return build_qwen_style_tokenizer()


def forced_logprob(model, clean_ids, cf_ids, answer, patch=None) -> float:
    """log p(answer) after the inputs, teacher-forced, with one patch (or none)."""
    clean = list(clean_ids) + list(answer[:-1])
    cf = list(cf_ids) + list(answer[:-1])
    if patch is None:
        logits = model(input_ids=torch.tensor([clean])).logits[0, -len(answer) :].float()
    else:
        logits = reference.patched_readout(
            model,
            clean,
            cf,
            patch["site"],
            patch["layer"],
            patch["pos"],
            patch["head"],
            n_read=len(answer),
        )
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[j, t].item() for j, t in enumerate(answer))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_logprob_equals_a_teacher_forced_reference(tmp_path, qwen_tok, arch) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / arch, arch, qwen_tok, n_layers=3)))
    # Range answers are 0-90: one or two digit tokens, often different lengths in one pair.
    programs = list(iter_programs("range", seed=5, seq_len=4, n=8))
    pairs = {p.index: encode_program(lm.tokenizer, p, " ") for p in programs}
    lengths = {(len(x.clean_answer_ids), len(x.cf_answer_ids)) for x in pairs.values()}
    assert {(2, 2), (1, 2)} & lengths or {(2, 1)} & lengths, lengths
    patcher = Patcher(lm, batch_size=5, vocab_chunk=37, metric="answer_logprob")
    rows = patcher.patch(programs, SITES, None, "targets", " ").to_pylist()
    assert {r["metric"] for r in rows} == {"answer_logprob"}
    checked = 0
    for r in rows:
        pair = pairs[r["program"]]
        fixed = {}
        for run, (ids, other) in {
            "clean": (pair.clean_ids, None),
            "cf": (pair.cf_ids, None),
        }.items():
            del other
            fixed[run] = forced_logprob(lm.model, ids, ids, pair.cf_answer_ids) - forced_logprob(
                lm.model, ids, ids, pair.clean_answer_ids
            )
        assert r["clean_logit_diff"] == pytest.approx(fixed["clean"], abs=2e-4)
        assert r["cf_logit_diff"] == pytest.approx(fixed["cf"], abs=2e-4)
        want = forced_logprob(
            lm.model, pair.clean_ids, pair.cf_ids, pair.cf_answer_ids, r
        ) - forced_logprob(lm.model, pair.clean_ids, pair.cf_ids, pair.clean_answer_ids, r)
        assert r["patched_logit_diff"] == pytest.approx(want, abs=2e-4), r
        checked += 1
    assert (
        checked == len(patcher.plan(programs, SITES, None, "targets", " ").patches) // 1 or checked
    )
    # One row per patch of the pair, not one per forced program.
    first = Patcher(lm, metric="first_token").patch(programs, SITES, None, "targets", " ")
    assert len(rows) == first.num_rows


def test_one_token_answers_give_the_first_token_numbers(tmp_path, qwen_tok) -> None:
    lm = load_model(str(save_tiny_model(tmp_path / "m", "qwen3", qwen_tok)))
    programs = list(iter_programs("binding", seed=2, seq_len=6, n=4, style="seed"))
    a = Patcher(lm).patch(programs, ["resid_pre"], None, "targets", " ").to_pylist()
    b = Patcher(lm, metric="answer_logprob").patch(programs, ["resid_pre"], None, "targets", " ")
    for x, y in zip(a, b.to_pylist(), strict=True):
        assert y["patched_logit_diff"] == pytest.approx(x["patched_logit_diff"], abs=1e-4)
        assert (x["top1_correct"], x["flipped"]) == (y["top1_correct"], y["flipped"])
