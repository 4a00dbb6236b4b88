"""Spans to token positions and labels, with a char-level and a BPE tokenizer."""

import pytest

from actors.answers import continuations
from actors.targets import (
    OTHER,
    EncodedPair,
    Skip,
    encode_pair,
    encode_program,
    label_positions,
)
from models.tokenizer import build_char_tokenizer
from orchestrator.tasks import FAMILIES, iter_programs
from tests.tiny import build_bpe_tokenizer


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return build_bpe_tokenizer()


def programs():
    for task in sorted(FAMILIES):
        yield from iter_programs(task, seed=21, seq_len=8, n=25)


def test_char_level_labels_land_on_the_span_characters(char_tok) -> None:
    for p in programs():
        pair = encode_program(char_tok, p)
        assert isinstance(pair, EncodedPair), pair
        assert pair.labels[0] == OTHER, "<s> carries no label"
        for label, (start, end) in p.spans.items():
            positions = [i for i, x in enumerate(pair.labels) if x == label]
            # One token per character, after <s>.
            assert positions == list(range(start + 1, end + 1))
            assert "".join(pair.tokens[i] for i in positions) == p.text[start:end]
        assert pair.labels[-1] == "final_colon" and pair.tokens[-1] == ":"
        assert pair.tokens[pair.first_diff] != char_tok.decode([pair.cf_ids[pair.first_diff]])
        changed = "ref_depth_1_rhs" if p.task == "binding" else "cf_const"
        assert pair.labels[pair.first_diff] == changed
        assert char_tok.decode([pair.clean_answer_id]) == p.answer[0]
        assert char_tok.decode([pair.cf_answer_id]) == p.cf_answer[0]
        assert pair.positions("targets") == [i for i, x in enumerate(pair.labels) if x != OTHER]
        assert pair.positions("all") == list(range(len(pair.clean_ids)))


def test_bpe_labels_cover_their_spans(bpe_tok) -> None:
    merged = 0
    n_pairs = 0
    for p in programs():
        pair = encode_program(bpe_tok, p)
        if isinstance(pair, Skip):
            continue
        n_pairs += 1
        offsets = bpe_tok(p.text, return_offsets_mapping=True)["offset_mapping"]
        merged += len(offsets) < len(p.text)
        for label, (start, end) in p.spans.items():
            positions = [i for i, x in enumerate(pair.labels) if x == label]
            assert positions, f"{label} lost in {p.text!r}"
            covered = set()
            for i in positions:
                s, e = offsets[i]
                assert s < end and start < e, "a labelled token overlaps its span"
                covered |= set(range(s, e))
            assert set(range(start, end)) <= covered, "the labelled tokens cover the span"
    assert n_pairs > 60
    assert merged == n_pairs, "BPE merged characters in every program"


def test_label_positions_prefers_the_later_span() -> None:
    # One token covering "#x:" overlaps query_var and final_colon: the later-starting one wins.
    spans = {"query_var": (1, 2), "final_colon": (2, 3)}
    assert label_positions([(0, 0), (0, 3)], spans) == [OTHER, "final_colon"]
    assert label_positions([(0, 1), (1, 2), (2, 3)], spans) == [OTHER, "query_var", "final_colon"]


def test_answer_tokens_follow_the_prompt(bpe_tok, char_tok) -> None:
    def first(tok, prompt, answer):
        return continuations(tok, tok(prompt)["input_ids"], prompt, [answer])[0][0]

    assert char_tok.decode([first(char_tok, "a=5\n#a:", "5")]) == "5"
    tok = first(bpe_tok, "x = 1\n#x:", "12")
    assert "12".startswith(bpe_tok.decode([tok]))


def test_pairs_that_cannot_be_patched_are_skipped_with_a_reason(char_tok, bpe_tok) -> None:
    spans = {"query_var": (5, 6)}
    same = encode_pair(char_tok, "a=5\n#a:", "a=5\n#a:", "5", "7", spans)
    assert isinstance(same, Skip) and "identically" in same.reason
    # `1` is the start of `12` in tokens: no token tells them apart.
    prefix_of = encode_pair(char_tok, "a=5\n#a:", "a=7\n#a:", "1", "12", spans)
    assert isinstance(prefix_of, Skip) and "one is the start of the other" in prefix_of.reason
    # BPE: a frequent merge in one text but not in the other changes the length.
    found = None
    for clean, cf in [("x = 1\n#x:", "x = q\n#x:"), ("x += 1\n#x:", "x +@ 1\n#x:")]:
        n_clean, n_cf = len(bpe_tok(clean)["input_ids"]), len(bpe_tok(cf)["input_ids"])
        if n_clean != n_cf:
            found = encode_pair(bpe_tok, clean, cf, "1", "2", spans)
            break
    assert isinstance(found, Skip) and "tokenize to" in found.reason


def test_a_program_without_counterfactual_is_refused_with_the_fix(char_tok) -> None:
    prog = next(iter(programs())).to_dict() | {"cf_text": None}
    with pytest.raises(ValueError, match="cf_text=None: patching needs a counterfactual"):
        encode_program(char_tok, prog)
