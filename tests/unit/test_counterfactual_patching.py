"""Patching from each counterfactual kind (`Patcher.patch(counterfactual=...)`) against one
full forward per patch with plain hooks (`tests/reference.py`), the programs and their variants
built here by `orchestrator.tasks.counterfactuals.variant` and tokenized by hand: the rows'
logit differences, the controls' contrast answer and scale, `flipped`, and the programs left
out."""

import pytest
import torch

from actors import Patcher, load_model
from actors.rows import MIN_DENOMINATOR
from orchestrator.tasks import generate, get_family, iter_programs
from orchestrator.tasks.counterfactuals import KINDS, SAME_ANSWER, variant
from tests import reference
from tests.tiny import save_tiny_model
from tests.unit.test_counterfactuals import hand_made


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(save_tiny_model(root / arch, arch, n_layers=3)) for arch in ("llama", "gpt2")}


def programs(n: int = 3) -> list:
    """Binding programs that have every kind (a stale binding is rare: look for one)."""
    out = []
    for program in iter_programs("binding", 5, 8, 200, style="paper"):
        if all(variant(program, kind) is not None for kind in KINDS):
            out.append(program)
        if len(out) == n:
            return out
    raise AssertionError("fewer than n programs with every counterfactual kind")


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def token(tokenizer, answer: str) -> int:
    (tid,) = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return tid


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_one_forward_per_patch(models, arch: str, kind: str) -> None:
    lm = load_model(models[arch], dtype="float32", quantization="none")
    tok, model = lm.tokenizer, lm.model
    progs = programs()
    table = Patcher(lm, batch_size=7).patch(
        progs,
        sites=["resid_pre", "attn_head"],
        layers=[0, 2],
        positions="targets",
        counterfactual=kind,
    )
    rows = table.to_pylist()
    assert rows and {r["counterfactual"] for r in rows} == {kind}
    by_program = {p.index: p for p in progs}
    checked = 0
    for r in rows:
        root = by_program[r["program"]]
        made = variant(root, kind)
        clean_ids, cf_ids = tok(made.text)["input_ids"], tok(made.cf_text)["input_ids"]
        clean_id = token(tok, root.answer)
        # The contrast: the counterfactual's own answer, or for a control the root's.
        contrast = root.cf_answer if kind in SAME_ANSWER else made.cf_answer
        assert (r["clean_answer"], r["cf_answer"], r["contrast_answer"]) == (
            root.answer,
            made.cf_answer,
            contrast,
        )
        other = token(tok, contrast)
        clean, cf = logits_of(model, clean_ids), logits_of(model, cf_ids)
        root_cf = logits_of(model, tok(root.cf_text)["input_ids"])
        clean_diff = (clean[other] - clean[clean_id]).item()
        contrast_diff = (root_cf if kind in SAME_ANSWER else cf)[[other, clean_id]]
        contrast_diff = (contrast_diff[0] - contrast_diff[1]).item()
        assert r["clean_logit_diff"] == pytest.approx(clean_diff, abs=1e-4)
        assert r["cf_logit_diff"] == pytest.approx((cf[other] - cf[clean_id]).item(), abs=1e-4)
        assert r["contrast_logit_diff"] == pytest.approx(contrast_diff, abs=1e-4)
        own = clean_id if kind in SAME_ANSWER else token(tok, made.cf_answer)
        assert r["cf_top1_correct"] == (int(cf.argmax()) == own)
        others = [token(tok, c) for c in get_family("binding").candidates]
        assert r["cf_choice_correct"] == all(cf[own] > cf[t] for t in others if t != own)

        want = reference.patched_logits(
            model, clean_ids, cf_ids, r["site"], r["layer"], r["pos"], r["head"]
        )
        patched = (want[other] - want[clean_id]).item()
        assert r["patched_logit_diff"] == pytest.approx(patched, abs=1e-4), r
        gap = contrast_diff - clean_diff
        if abs(gap) < MIN_DENOMINATOR:
            assert r["norm_effect"] is None
        else:
            norm = (patched - clean_diff) / gap
            assert r["norm_effect"] == pytest.approx(norm, abs=1e-3, rel=1e-3), r
        top = int(want.argmax())
        assert r["flipped"] == (top != clean_id if kind in SAME_ANSWER else top == other), r
        checked += 1
    assert checked == len(rows)


@pytest.mark.parametrize("metric", ["first_token", "answer_logprob"])
def test_a_control_is_scaled_by_its_root_counterfactual(models, metric: str) -> None:
    """A distractor's contrast is the root-value counterfactual's run: its `contrast_logit_diff`
    is the root rows' `cf_logit_diff`, under either metric; its patches before the changed digit
    are the clean run (effect 0, flipped where the clean top-1 is not the answer)."""
    lm = load_model(models["llama"], dtype="float32", quantization="none")
    progs = programs()
    patcher = Patcher(lm, metric=metric)
    root = patcher.patch(progs, sites=["resid_pre"], layers=[1]).to_pandas()
    control = patcher.patch(
        progs, sites=["resid_pre"], layers=[1], counterfactual="distractor"
    ).to_pandas()
    assert set(root["counterfactual"]) == {"root_value"}
    assert (root["contrast_logit_diff"] == root["cf_logit_diff"]).all()
    for index, rows in control.groupby("program"):
        mine = root[root["program"] == index].iloc[0]
        first = rows.iloc[0]
        assert first["contrast_answer"] == mine["cf_answer"] != first["cf_answer"]
        assert first["clean_logit_diff"] == pytest.approx(mine["clean_logit_diff"], abs=1e-4)
        assert first["contrast_logit_diff"] == pytest.approx(mine["cf_logit_diff"], abs=1e-4)
        changed = variant(next(p for p in progs if p.index == index), "distractor")
        start = changed.spans["distractor_rhs"][0]
        offsets = lm.tokenizer(changed.text, return_offsets_mapping=True)["offset_mapping"]
        before = [pos for pos, (s, e) in enumerate(offsets) if e <= start and e > s]
        early = rows[rows["pos"].isin(before)]
        assert len(early) == len(before) > 0
        assert (early["norm_effect"].abs() < 1e-5).all()
        # The clean run: flipped where its top-1 is not the clean answer (a random model).
        assert (early["flipped"] == ~early["top1_correct"]).all()
        assert (rows["label"] == "distractor_rhs").sum() == 1


def test_programs_without_the_kind_are_skipped_with_the_reason(models) -> None:
    # c is read from a's first binding; nothing overwrites a chain variable before the binding
    # it reads, so there is no `reassign` counterfactual.
    hand = hand_made()
    assert variant(hand, "reassign") is None and variant(hand, "distractor") is not None
    patcher = Patcher(load_model(models["llama"], dtype="float32", quantization="none"))
    table = patcher.patch([hand, *programs(1)], layers=[0], counterfactual="reassign")
    assert set(table.column("program").to_pylist()) == {programs(1)[0].index}
    (skipped,) = patcher.skipped
    assert skipped[0]["index"] == 0 and "no reassign counterfactual" in skipped[1]
    with pytest.raises(ValueError, match="counterfactual='bogus'"):
        patcher.patch(programs(1), counterfactual="bogus")
    ranged = generate("range", 0, 4, 0)
    with pytest.raises(ValueError, match="defined for binding programs"):
        patcher.patch([ranged], counterfactual="distractor")
