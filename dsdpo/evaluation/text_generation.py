"""Text in and out of LLaDA's sampler: prompts encoded, answers decoded up to their first stop token.

    texts = generate_text(model, tokenizer, ["What is 2+3?"], mask_token_id=m, ...)

The sampler itself (dsdpo.evaluation.sampler.generate) takes and gives token ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.sampler import generate
from dsdpo.families import FAMILIES


def cut_at_stop(token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (EOS): what follows is filler, not answer."""
    stops = set(stop_token_ids)
    for index, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[:index])
    return list(token_ids)


def stop_ids_of(tokenizer) -> list[int]:
    """EOS, plus the families' end-of-turn tokens that the tokenizer has (LLaDA's instruct model ends
    with <|eot_id|>, Dream's with <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in dict.fromkeys(token for family in FAMILIES.values() for token in family.stop_tokens):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def encode_prompt(tokenizer, text: str, *, chat: bool) -> list[int]:
    """Token ids of a prompt; as a user turn with the tokenizer's chat template when `chat` and it has one."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        # The template already holds any BOS; adding special tokens again would double it.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def generate_text(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, mask_token_id: int, chat: bool = True, **sampler
) -> list[str]:
    """Generate answers to text prompts; each is decoded up to its first stop token (EOS)."""
    prompt_ids = [encode_prompt(tokenizer, text, chat=chat) for text in prompts]
    return answer_texts(model, tokenizer, prompt_ids, mask_token_id=mask_token_id, **sampler)


def answer_texts(
    model: nn.Module, tokenizer, prompt_ids: Sequence[Sequence[int]], *, mask_token_id: int, **sampler
) -> list[str]:
    """Generate answers to tokenised prompts; each is decoded up to its first stop token (EOS)."""
    stop_ids = stop_ids_of(tokenizer)
    answers = generate(model, prompt_ids, mask_token_id=mask_token_id, stop_token_ids=stop_ids, **sampler)
    return [
        tokenizer.decode(cut_at_stop(row.tolist(), stop_ids), skip_special_tokens=True).strip()
        for row in answers
    ]


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """Prompts from a JSONL file whose rows hold a 'prompt' (or a 'question') string."""
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such data file")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DsdpoError(f"{file}:{number}: not JSON ({err})") from None
        text = row.get("prompt", row.get("question")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DsdpoError(f"{file}:{number}: a row needs a 'prompt' or 'question' string")
        prompts.append(text)
    if not prompts:
        raise DsdpoError(f"{file}: no prompts in the file")
    return prompts
