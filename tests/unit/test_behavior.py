"""Behaviour scoring: logits over candidates, greedy generation with the parser, vLLM adapters."""

import types

import pytest
import torch

from actors import load_model
from actors.behavior import (
    BEHAVIOR_SCHEMA,
    HFScorer,
    first_token_ids,
    vllm_predictions,
    vllm_requests,
)
from orchestrator.tasks import CHAT_TEMPLATE, get_family, iter_programs, parse_answer
from tests.tiny import save_tiny_model


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


def test_generation_when_first_tokens_collide(lm) -> None:
    programs = list(iter_programs("range", 0, 4, 3))
    assert first_token_ids(lm.tokenizer, programs[0].text, get_family("range").candidates) is None
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
    assert HFScorer(lm, template="chat").template == CHAT_TEMPLATE


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
