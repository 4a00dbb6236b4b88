"""The model this project ships loads offline and still scores what its card says, so that a
change to the generator or the tokenizer that breaks it is caught."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.evaluate import accuracy_report, greedy_next_tokens
from orchestrator.tasks import iter_programs

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = MODELS / "binding-tiny"


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_shipped_model_scores_what_its_card_says() -> None:
    card = json.loads((SHIPPED / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(SHIPPED).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    # 200 programs from a seed used neither in training nor for the card.
    programs = list(iter_programs("binding", seed=31337, seq_len=16, n=200, style="paper"))
    report = accuracy_report(
        programs, greedy_next_tokens(model, tokenizer, [p.text for p in programs])
    )
    stated = card["accuracy"]["all"]
    assert abs(report["all"] - stated) <= 0.06, (report, stated)
    assert f"| all | {card['n']} | {stated:.3f} |" in (SHIPPED / "README.md").read_text()


@pytest.mark.parametrize(
    "folder", sorted(p.name for p in MODELS.glob("binding-tiny*") if p.is_dir())
)
def test_every_snapshot_loads_offline(folder: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODELS / folder)
    tokenizer = AutoTokenizer.from_pretrained(MODELS / folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers >= 4
    ids = tokenizer("a=5\n#a:")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 8, "char-level, <s> first"


def test_the_distractor_control_moves_nothing_the_root_value_moves() -> None:
    """On the shipped model, patching the root's digit from its root-value counterfactual moves
    the answer fully (resid_pre, layers 0-3); patching from the distractor control moves no cell
    of the same programs by more than a tenth of that (measured: at most 0.006 in the mean of a
    cell over 45 programs, `specs/counterfactuals.yaml`)."""
    from actors import Patcher, load_model

    lm = load_model(str(SHIPPED), dtype="float32", quantization="none")
    programs = [
        p
        for p in iter_programs("binding", seed=0, seq_len=16, n=40, style="paper")
        if not p.heuristic
    ][:12]
    patcher = Patcher(lm)
    mean = {}
    for kind in ("root_value", "distractor"):
        rows = patcher.patch(
            programs, sites=["resid_pre"], positions="targets", counterfactual=kind
        ).to_pandas()
        rows = rows[rows["top1_correct"] & rows["cf_top1_correct"]]
        assert rows["program"].nunique() >= 8, kind
        mean[kind] = rows.groupby(["layer", "label"])["norm_effect"].mean()
    assert (mean["root_value"].loc[[0, 1, 2, 3], "ref_depth_1_rhs"] > 0.9).all()
    assert mean["distractor"].abs().max() < 0.1, mean["distractor"].abs().sort_values().tail()
