"""How answers are asked (`actors.answers`), with a Qwen-style BPE vocabulary built here: the
prefix, the compared tokens, the candidates, `auto`, and the spans in both program styles."""

import pytest

from actors.answers import AUTO, Skip, ask, auto_prefix, choice, resolve_prefixes
from actors.loading import load_model
from actors.targets import OTHER, EncodedPair, encode_program
from orchestrator.tasks import get_family, iter_programs
from tests.tiny import build_qwen_style_tokenizer, save_space_model

DIGITS = get_family("binding").candidates


@pytest.fixture(scope="module")
def qwen_tok():
    return build_qwen_style_tokenizer()


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([t]) for t in tok(text)["input_ids"]]


def test_the_vocabulary_writes_programs_as_qwen_does(qwen_tok) -> None:
    assert pieces(qwen_tok, "a = 5") == ["a", " =", " ", "5"]
    assert pieces(qwen_tok, "#b: 5")[-3:] == [":", " ", "5"]
    assert pieces(qwen_tok, "x = 27")[-2:] == ["2", "7"]


@pytest.mark.parametrize("style", ["seed", "paper"])
def test_spans_land_on_their_tokens_and_the_prefix_is_appended(qwen_tok, style) -> None:
    n = 0
    for p in iter_programs("binding", seed=3, seq_len=8, n=30, style=style):
        pair = encode_program(qwen_tok, p, " ")
        assert isinstance(pair, EncodedPair), pair
        n += 1
        offsets = qwen_tok(p.text, return_offsets_mapping=True)["offset_mapping"]
        n_prompt = len(offsets)
        for label, (start, end) in p.spans.items():
            at = [i for i, x in enumerate(pair.labels) if x == label]
            assert at and all(i < n_prompt for i in at), label
            text = "".join(pair.tokens[i] for i in at)
            assert p.text[start:end] in text, (label, text)
        # The answer is written ` 5`: the space is appended to both prompts, the digits are
        # compared.
        assert pair.prefix == " " and pair.tokens[n_prompt:] == [" "]
        assert pair.labels[n_prompt:] == [OTHER]
        assert qwen_tok.decode([pair.clean_answer_id]) == p.answer
        assert qwen_tok.decode([pair.cf_answer_id]) == p.cf_answer
        assert sorted(qwen_tok.decode([t]) for t in pair.candidates) == sorted(DIGITS)
    assert n == 30


def test_shared_answer_tokens_are_appended_and_the_first_different_ones_compared(
    qwen_tok,
) -> None:
    q = ask(qwen_tok, "x = 27\n#x:", "x = 29\n#x:", "27", "29", [str(v) for v in range(100)], " ")
    assert q.prefix == " 2"
    assert [qwen_tok.decode([t]) for t in q.clean_answer + q.cf_answer] == ["7", "9"]
    # Candidates that agree with ` 2` continue with their second digit.
    assert sorted(qwen_tok.decode([t]) for t in q.candidates) == [str(d) for d in range(10)]
    q = ask(qwen_tok, "x = 27\n#x:", "x = 35\n#x:", "27", "35", ["27", "35"], " ")
    assert q.prefix == " " and len(q.clean_answer) == 2 and len(q.cf_answer) == 2
    skip = ask(qwen_tok, "x = 2\n#x:", "x = 3\n#x:", "2", "27", ["2", "27"], " ")
    assert isinstance(skip, Skip) and "one is the start of the other" in skip.reason


def test_auto_prefix_takes_whitespace_or_punctuation_no_candidate_starts_with() -> None:
    assert auto_prefix(" ", DIGITS) == " "
    assert auto_prefix(" 5", DIGITS) == " "  # GPT-2 writes ` 5` as one token
    assert auto_prefix("\n", DIGITS) == "\n"
    assert auto_prefix("5", DIGITS) == ""
    assert auto_prefix(" the", DIGITS) == ""  # the model talks: no prefix makes it answer
    assert auto_prefix("-", ["-3", "4"]) == ""  # part of an answer
    assert auto_prefix(" T", ["True", "False"]) == " "


def test_choice_is_strict() -> None:
    assert choice([3.0, 1.0, 2.0], [10, 11, 12], 10)
    assert not choice([3.0, 3.0], [10, 11], 10)
    assert not choice([1.0, 2.0], [10, 11], 10)


@pytest.mark.parametrize("tok", ["char", "qwen"])
def test_auto_picks_the_space_where_the_model_predicts_it(tmp_path, qwen_tok, tok) -> None:
    tokenizer = qwen_tok if tok == "qwen" else None
    lm = load_model(str(save_space_model(tmp_path / "m", tokenizer)))
    programs = list(iter_programs("binding", seed=0, seq_len=6, n=12, style="seed"))
    found = resolve_prefixes(lm.model, lm.tokenizer, [p.text for p in programs], DIGITS, AUTO)
    assert found == [" "] * len(programs)
    assert resolve_prefixes(lm.model, lm.tokenizer, ["x"], DIGITS, "") == [""]
