"""Behaviour scoring: logits over candidates, greedy generation with the parser, vLLM adapters."""

import types

import pytest
import torch

from actors import load_model
from actors.answers import continuations
from actors.behavior import (
    BEHAVIOR_SCHEMA,
    HFScorer,
    behavior_rows,
    family_choice,
    render,
    vllm_next,
    vllm_predictions,
    vllm_requests,
    vllm_score_params,
)
from actors.patching import Patcher
from orchestrator.tasks import (
    CHAT_TEMPLATE,
    get_family,
    iter_programs,
    parse_answer,
    render_prompt,
)
from orchestrator.tasks.base import Program
from orchestrator.tasks.errors import error_kind
from tests.tiny import build_qwen_style_tokenizer, save_space_model, save_tiny_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3")))


def test_logits_method_picks_the_best_candidate(lm) -> None:
    programs = list(iter_programs("binding", 0, 6, 9, style="paper"))
    table = HFScorer(lm, batch_size=4).score(programs)
    assert table.schema == BEHAVIOR_SCHEMA
    rows = table.to_pylist()
    assert {r["method"] for r in rows} == {"logits"} and {r["backend"] for r in rows} == {"hf"}
    digits = get_family("binding").candidates
    ids = [lm.tokenizer.convert_tokens_to_ids(d) for d in digits]
    for p, row in zip(programs, rows, strict=True):
        # One unpadded forward per program, as a check on the batched, left-padded one.
        logits = lm.model(input_ids=torch.tensor([lm.tokenizer(p.text)["input_ids"]])).logits[0, -1]
        assert row["predicted"] == digits[int(logits[ids].argmax())]
        assert row["correct"] == (row["predicted"] == p.answer)
        assert (row["depth"], row["heuristic"], row["expected"]) == (p.depth, p.heuristic, p.answer)
        assert row["error_kind"] == error_kind(p, row["predicted"])
        assert (row["error_kind"] is None) == row["correct"]


def test_rows_carry_the_kind_of_each_wrong_binding_answer() -> None:
    """Lines 1 q=4 | 2 b=9 | 3 q=b | 4 b=7 | 5 q=1: q held 4 and 9 before it became 1; b ends
    at 7. Other families' rows read null whatever the answer."""
    text = "q=4\nb=9\nq=b\nb=7\nq=1\n#q:"
    program = Program("binding", 5, 0, 0, text, "1", "q", depth=1, root_line=5, heuristic=False)
    preds = ["1", "4", "9", "7", "5", None]
    rows = behavior_rows("m", [program] * len(preds), preds, "hf", "logits").to_pylist()
    assert [r["error_kind"] for r in rows] == [
        None,
        "stale_binding",
        "stale_binding",  # also on line 2: stale comes first
        "distractor_value",
        "other",
        "not_a_candidate",
    ]
    assert [r["correct"] for r in rows] == [True] + [False] * 5
    other = list(iter_programs("boolean", 0, 4, 2))
    rows = behavior_rows("m", other, [None, "nonsense"], "hf", "generate").to_pylist()
    assert [r["error_kind"] for r in rows] == [None, None]


def test_generation_when_first_tokens_collide(lm) -> None:
    programs = list(iter_programs("range", 0, 4, 3))
    text, tok = programs[0].text, lm.tokenizer
    ids = tok(text)["input_ids"]
    conts = continuations(tok, ids, text, get_family("range").candidates)
    assert family_choice(ids, conts) is None
    rows = HFScorer(lm, max_new_tokens=3).score(programs).to_pylist()
    assert {r["method"] for r in rows} == {"generate"}
    for p, row in zip(programs, rows, strict=True):
        ids = torch.tensor([lm.tokenizer(p.text)["input_ids"]])
        out = lm.model.generate(
            input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
        )
        text = lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["predicted"] == parse_answer(text)


def test_chat_template_generates(lm) -> None:
    programs = list(iter_programs("boolean", 0, 4, 2))
    rows = HFScorer(lm, template="chat", max_new_tokens=2).score(programs).to_pylist()
    assert {r["method"] for r in rows} == {"generate"}
    # The char-level tokenizer has no chat template: the built-in question is the prompt.
    assert render(lm.tokenizer, programs[0], "chat") == render_prompt(programs[0], CHAT_TEMPLATE)


def test_vllm_requests_and_outputs_with_plain_data() -> None:
    programs = list(iter_programs("binding", 0, 4, 2))
    prompts, params = vllm_requests(programs, "raw", 4)
    assert prompts == [p.text for p in programs]
    assert params == {"max_tokens": 4, "temperature": 0.0}
    prompts, _ = vllm_requests(programs, "Q: {query}?", 4)
    assert prompts == [f"Q: {p.query}?" for p in programs]
    outputs = [
        types.SimpleNamespace(outputs=[types.SimpleNamespace(text="7\n#a:")]),
        types.SimpleNamespace(outputs=[types.SimpleNamespace(text=" True")]),
        types.SimpleNamespace(outputs=[types.SimpleNamespace(text="no idea")]),
        types.SimpleNamespace(outputs=[]),
    ]
    assert vllm_predictions(outputs) == ["7", "True", None, None]


def test_vllm_candidate_scoring_with_plain_data() -> None:
    direct = vllm_score_params([7, 3, 7], direct=True)
    assert direct == {
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": 1,
        "logprob_token_ids": [3, 7],
    }
    assert vllm_score_params([7, 3], direct=False)["logprobs"] == 20
    out = types.SimpleNamespace(
        outputs=[
            types.SimpleNamespace(
                token_ids=[3], logprobs=[{3: types.SimpleNamespace(logprob=-0.1), 7: -2.5}]
            )
        ]
    )
    assert vllm_next(out, [7, 3, 9]) == (3, [-2.5, -0.1, float("-inf")])


@pytest.fixture(scope="module")
def qwen_tok():
    return build_qwen_style_tokenizer(chat=True)


def test_the_asked_columns_equal_a_plain_forward(lm) -> None:
    programs = list(iter_programs("binding", 0, 6, 9, style="paper"))
    rows = HFScorer(lm).score(programs).to_pylist()
    digits = [lm.tokenizer.convert_tokens_to_ids(d) for d in get_family("binding").candidates]
    for p, row in zip(programs, rows, strict=True):
        logits = lm.model(input_ids=torch.tensor([lm.tokenizer(p.text)["input_ids"]])).logits[0, -1]
        top = int(logits.argmax())
        answer = lm.tokenizer.convert_tokens_to_ids(p.answer)
        assert row["answer_prefix"] == "" and row["top1"] == lm.tokenizer.decode([top])
        assert row["top1_candidate"] == (top in digits)
        assert row["top1_correct"] == (top == answer)
        others = [d for d in digits if d != answer]
        assert row["choice_correct"] == bool(logits[answer] > logits[others].max())
        # With single-token answers the logits method's answer is the choice.
        assert row["choice_correct"] == row["correct"]


def test_auto_prefix_asks_after_the_space_and_agrees_with_patching(tmp_path, qwen_tok) -> None:
    """A model that writes a space after `#b:`: without a prefix every program's top-1 is the
    space (not a candidate); with `auto` the digits are compared after it, and behaviour and
    patching call the same programs right."""
    space = load_model(str(save_space_model(tmp_path / "space", qwen_tok)))
    programs = list(iter_programs("binding", 0, 6, 8, style="seed"))
    plain = HFScorer(space).score(programs, "").to_pylist()
    assert {(r["top1"], r["top1_candidate"], r["top1_correct"]) for r in plain} == {
        (" ", False, False)
    }
    rows = HFScorer(space).score(programs, "auto").to_pylist()
    assert {r["answer_prefix"] for r in rows} == {" "}
    assert all(r["top1_candidate"] for r in rows)
    table = Patcher(space).patch(programs, ["resid_pre"], [0], "targets", "auto").to_pylist()
    for p, row in zip(programs, rows, strict=True):
        mine = [r for r in table if r["program"] == p.index]
        assert mine and {r["answer_prefix"] for r in mine} == {" "}
        assert {(r["top1_correct"], r["choice_correct"], r["top1"]) for r in mine} == {
            (row["top1_correct"], row["choice_correct"], row["top1"])
        }


def test_chat_uses_the_tokenizers_own_template(tmp_path, qwen_tok) -> None:
    chat = load_model(str(save_tiny_model(tmp_path / "chat", "qwen3", qwen_tok)))
    programs = list(iter_programs("binding", 0, 4, 3))
    prompt = render(chat.tokenizer, programs[0], "chat")
    assert prompt.startswith("<|im_start|>user\nHere is a Python program:")
    assert prompt.endswith("Answer with the value only.<|im_end|>\n<|im_start|>assistant\n")
    rows = HFScorer(chat, template="chat", max_new_tokens=3).score(programs).to_pylist()
    assert {r["method"] for r in rows} == {"generate"}
    for p, row in zip(programs, rows, strict=True):
        ids = torch.tensor([chat.tokenizer(render(chat.tokenizer, p, "chat"))["input_ids"]])
        out = chat.model.generate(
            input_ids=ids,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=chat.tokenizer.pad_token_id,
        )
        text = chat.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["predicted"] == parse_answer(text)
