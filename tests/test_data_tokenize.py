"""Tokenising and truncating pairs, and the exact tensors the collator builds."""

import pytest
import torch

from dsdpo.data import PreferenceExample, TokenizedPair, collate_pairs, tokenize_pairs
from dsdpo.errors import DsdpoError


def example(prompt, chosen, rejected, prob=None, id="x"):
    return PreferenceExample(id, prompt, chosen, rejected, prob, "d.jsonl:7")


def char_ids(tokenizer, text):
    """The character tokenizer maps each character to one id: the expected ids, one by one."""
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def test_plain_and_conversational_rows_tokenise_with_eos(tokenizer):
    eos = tokenizer.eos_token_id
    pairs, counts = tokenize_pairs([example("Q:", "ab", "c")], tokenizer, max_length=64)
    assert pairs[0].prompt_ids == char_ids(tokenizer, "Q:")
    assert pairs[0].chosen_ids == [*char_ids(tokenizer, "ab"), eos]
    assert pairs[0].rejected_ids == [*char_ids(tokenizer, "c"), eos]
    assert counts == {
        "prompt_truncated": 0,
        "prompt_cut_to_fit": 0,
        "response_truncated": 0,
        "identical_after_truncation": 0,
        "prompt_too_long": 0,
    }

    chat = example([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}], "no")
    pairs, _ = tokenize_pairs([chat], tokenizer, max_length=64)
    # The tiny template renders "<user>hi\n" then the generation prompt "<assistant>".
    assert pairs[0].prompt_ids == char_ids(tokenizer, "<user>hi\n<assistant>")
    assert pairs[0].chosen_ids == [*char_ids(tokenizer, "yo"), eos]


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [example("abcdef", "ghijk", "lm")]
    pairs, counts = tokenize_pairs(rows, tokenizer, max_length=8, max_prompt_length=4)
    assert pairs[0].prompt_ids == char_ids(tokenizer, "cdef")
    assert pairs[0].chosen_ids == char_ids(tokenizer, "ghij")
    assert pairs[0].rejected_ids == [*char_ids(tokenizer, "lm"), eos]
    assert counts["prompt_truncated"] == 1 and counts["response_truncated"] == 1

    # Cut to "abc" both, the pair says nothing: it is dropped and counted.
    rows = [example("p", "abcX", "abcY", id="same"), example("p", "abX", "abcY", id="kept")]
    pairs, counts = tokenize_pairs(rows, tokenizer, max_length=4)
    assert [pair.example_id for pair in pairs] == ["kept"]
    assert counts["identical_after_truncation"] == 1


def test_a_prompt_that_fills_the_budget_loses_its_start_so_the_response_fits(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [example("abcdef", "g", "h"), example("abcdefghij", "klmnopq", "r")]
    pairs, counts = tokenize_pairs(rows, tokenizer, max_length=6)
    # Responses of 2 tokens (text + EOS) fit whole: the prompt keeps its last 6 - 2 tokens.
    assert pairs[0].prompt_ids == char_ids(tokenizer, "cdef")
    assert pairs[0].chosen_ids == [*char_ids(tokenizer, "g"), eos]
    # A response of 8 tokens gets half of max_length, 3; the prompt its last 3.
    assert pairs[1].prompt_ids == char_ids(tokenizer, "hij")
    assert pairs[1].chosen_ids == char_ids(tokenizer, "klm")
    assert counts["prompt_cut_to_fit"] == 2 and counts["prompt_too_long"] == 0


def test_refuse_long_prompts_reports_the_row_or_skips_it(tokenizer):
    rows = [example("abcdef", "g", "h")]
    with pytest.raises(
        DsdpoError, match=r"^d\.jsonl:7: the prompt is 6 tokens, leaving no room for a response"
    ):
        tokenize_pairs(rows, tokenizer, max_length=6, refuse_long_prompts=True)
    pairs, counts = tokenize_pairs(rows, tokenizer, max_length=6, skip_invalid=True, refuse_long_prompts=True)
    assert pairs == [] and counts["prompt_too_long"] == 1
    with pytest.raises(DsdpoError, match=r"max_prompt_length must be in \[1, max_length\)"):
        tokenize_pairs(rows, tokenizer, max_length=6, max_prompt_length=6)


def test_collator_builds_exact_ids_and_masks():
    pairs = [
        TokenizedPair("p0", [5, 6], [7], [8, 9, 10], 0.25),
        TokenizedPair("p1", [11], [12, 13], [14], None),
    ]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 0, 0],  # p0 chosen
        [11, 12, 13, 0, 0],  # p1 chosen
        [5, 6, 8, 9, 10],  # p0 rejected
        [11, 14, 0, 0, 0],  # p1 rejected
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch.response_mask.tolist() == [
        [False, False, True, False, False],
        [False, True, True, False, False],
        [False, False, True, True, True],
        [False, True, False, False, False],
    ]
    assert batch.input_ids.dtype == torch.long and batch.response_mask.dtype == torch.bool
    assert batch.example_ids == ["p0", "p1"]
    # A pair without a soft label is a hard preference for chosen.
    assert batch.preference_prob.tolist() == [0.25, 1.0]
    assert collate_pairs(pairs[1:], pad_token_id=0).preference_prob is None


def test_pad_responses_to_fills_both_sides_with_eos_to_the_canvas(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [example("Q:", "42", "7"), example("Q:", "12345", "1", id="long")]
    pairs, _ = tokenize_pairs(rows, tokenizer, max_length=64, pad_responses_to=4)
    assert pairs[0].chosen_ids == [*char_ids(tokenizer, "42"), eos, eos]
    assert pairs[0].rejected_ids == [*char_ids(tokenizer, "7"), eos, eos, eos]
    # Longer than the canvas: as it is (the answer and its EOS).
    assert pairs[1].chosen_ids == [*char_ids(tokenizer, "12345"), eos]
    # The cut comes after the padding, and "7" + EOS fill stays apart from "42" + EOS fill.
    pairs, counts = tokenize_pairs(rows[:1], tokenizer, max_length=5, pad_responses_to=4)
    assert pairs[0].chosen_ids == [*char_ids(tokenizer, "42"), eos]
    assert counts["response_truncated"] == 2
    # SFT rows (no rejected side) stay without one.
    sft = PreferenceExample("s", "Q:", "9", None, None, "d.jsonl:1")
    (pair,), _ = tokenize_pairs([sft], tokenizer, max_length=64, pad_responses_to=3)
    assert pair.chosen_ids == [*char_ids(tokenizer, "9"), eos, eos] and pair.rejected_ids == []
    with pytest.raises(DsdpoError, match="pad_responses_to must be at least 1"):
        tokenize_pairs(rows, tokenizer, max_length=64, pad_responses_to=0)
