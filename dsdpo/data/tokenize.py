"""Token ids of preference examples, truncated to a length budget.

Plain prompts are tokenised as they are; conversational prompts are rendered with the tokenizer's
chat template and `add_generation_prompt=True`, so the response starts where the assistant speaks.
A response is its text (the assistant message's content) followed by EOS when the tokenizer has one,
so the model also learns where an answer stops. With pad_responses_to N, a shorter response is
filled with EOS to N tokens: a masked diffusion sampler denoises a fixed canvas of gen_length
positions and fills the rest of an answer with EOS (LLaDA's SFT pads with EOS for this, Nie et al.
2025, appendix B), so a preference loss scored on the bare answer would train the model on a canvas
whose length gives the answer's length away, one the sampler never shows it.

Truncation keeps the END of the prompt (the question sits next to the answer) and the START of each
response (the part the model produces first), so that prompt + response <= max_length. A prompt that
alone fills max_length loses its start until the longer response fits (up to half of max_length),
as TRL keeps a prompt's end; with refuse_long_prompts such a pair is an error (or skipped) instead.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from dsdpo.data.rows import PreferenceExample, response_text
from dsdpo.errors import DsdpoError


@dataclass
class TokenizedPair:
    example_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]  # empty for an SFT example
    preference_prob: float | None

    @property
    def length(self) -> int:
        """The longer of the two sequences: what this pair costs in a padded batch."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def digest(self) -> str:
        """A hash of the pair's token ids: it changes when the row's text or its tokenisation does."""
        return _sha256([self.prompt_ids, self.chosen_ids, self.rejected_ids])[:16]


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns rows into token ids here: the vocabulary, the special tokens and the
    chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return _sha256([vocab, special, getattr(tokenizer, "chat_template", None)])[:16]


def prompt_token_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise DsdpoError("conversational rows need a tokenizer with a chat template, and this one has none")
    # Rendered to text first: the template writes its own special tokens (BOS, role markers).
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_token_ids(response, tokenizer) -> list[int]:
    ids = tokenizer(response_text(response), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def eos_filled(ids: list[int], length: int, eos_token_id: int) -> list[int]:
    """`ids` followed by EOS up to `length` tokens (a longer one as it is)."""
    return [*ids, *[eos_token_id] * (length - len(ids))]


def pad_responses(pair: TokenizedPair, length: int, eos_token_id: int) -> TokenizedPair:
    """Both responses filled with EOS to `length` tokens; an SFT row's empty rejected side stays empty."""
    rejected = eos_filled(pair.rejected_ids, length, eos_token_id) if pair.rejected_ids else []
    return replace(pair, chosen_ids=eos_filled(pair.chosen_ids, length, eos_token_id), rejected_ids=rejected)


def encode_example(example: PreferenceExample, tokenizer) -> TokenizedPair:
    """The untruncated token ids of one example."""
    return TokenizedPair(
        example_id=example.id,
        prompt_ids=prompt_token_ids(example.prompt, tokenizer),
        chosen_ids=response_token_ids(example.chosen, tokenizer),
        rejected_ids=[] if example.rejected is None else response_token_ids(example.rejected, tokenizer),
        preference_prob=example.preference_prob,
    )


def truncation_counter() -> Counter:
    """The cut counts, every kind present (a report shows the zeros too)."""
    kinds = ("prompt_truncated", "prompt_cut_to_fit", "response_truncated", "identical_after_truncation")
    return Counter(dict.fromkeys((*kinds, "prompt_too_long"), 0))


class PromptTooLong(ValueError):
    """The prompt alone leaves no room for a response: cutting it would train on nothing."""


def truncate_pair(
    pair: TokenizedPair,
    *,
    max_length: int,
    max_prompt_length: int | None,
    counts: Counter,
    refuse_long_prompts: bool = False,
) -> TokenizedPair:
    """The pair cut to the budget; `counts` gains what was cut. Raises PromptTooLong only when
    refuse_long_prompts and the prompt alone leaves no room for a response."""
    prompt = pair.prompt_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
        counts["prompt_truncated"] += 1
    if len(prompt) >= max_length:
        if refuse_long_prompts:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens, leaving no room for a response in "
                f"max_length {max_length}"
            )
        response_room = min(max(len(pair.chosen_ids), len(pair.rejected_ids)), max_length // 2)
        prompt = prompt[len(prompt) - (max_length - response_room) :]
        counts["prompt_cut_to_fit"] += 1
    room = max_length - len(prompt)
    responses = []
    for ids in (pair.chosen_ids, pair.rejected_ids):
        if len(ids) > room:
            counts["response_truncated"] += 1
        responses.append(ids[:room])
    if responses[0] == responses[1] and pair.rejected_ids:
        # Both responses agree up to the cut: the pair carries no preference signal any more.
        counts["identical_after_truncation"] += 1
    return TokenizedPair(pair.example_id, prompt, responses[0], responses[1], pair.preference_prob)


def tokenize_pairs(
    examples: Iterable[PreferenceExample],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
    refuse_long_prompts: bool = False,
    pad_responses_to: int | None = None,
) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Token ids of each example, cut so prompt + response <= max_length, and the counts of cuts.

    Counts: prompt_truncated (pairs, by max_prompt_length), prompt_cut_to_fit (pairs whose prompt
    alone filled max_length), response_truncated (responses), identical_after_truncation (pairs dropped:
    their two responses became equal) and prompt_too_long (pairs skipped: refuse_long_prompts with
    skip_invalid). With refuse_long_prompts and not skip_invalid, such a prompt raises DsdpoError
    naming the example's source. pad_responses_to: responses filled with EOS to that many tokens
    before the cut (see the module's docstring).
    """
    if max_length < 2:
        raise DsdpoError(
            f"max_length must be at least 2 (a prompt token and a response token), got {max_length}"
        )
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise DsdpoError(
            f"max_prompt_length must be in [1, max_length), got {max_prompt_length} "
            f"with max_length {max_length}"
        )
    if pad_responses_to is not None:
        if pad_responses_to < 1:
            raise DsdpoError(f"pad_responses_to must be at least 1, got {pad_responses_to}")
        if tokenizer.eos_token_id is None:
            raise DsdpoError("pad_responses_to pads with EOS, and this tokenizer has no EOS token")
    counts = truncation_counter()
    pairs = []
    for example in examples:
        try:
            pair = encode_example(example, tokenizer)
            if pad_responses_to is not None:
                pair = pad_responses(pair, pad_responses_to, tokenizer.eos_token_id)
            cut = truncate_pair(
                pair,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                counts=counts,
                refuse_long_prompts=refuse_long_prompts,
            )
            if cut.rejected_ids and cut.chosen_ids == cut.rejected_ids:
                continue  # no preference left to learn, only noise (counted by truncate_pair)
            pairs.append(cut)
        except PromptTooLong as err:
            if not skip_invalid:
                raise DsdpoError(
                    f"{example.source}: {err}; raise max_length, or drop --refuse-long-prompts to keep "
                    "the prompt's end"
                ) from None
            counts["prompt_too_long"] += 1
        except DsdpoError as err:
            raise DsdpoError(f"{example.source}: {err}") from None
    return pairs, dict(counts)
