"""Tiny masked-diffusion models with a character tokenizer, for tests, the demo and examples.

`init_tiny(DIR)` writes a folder that `dsdpo.models.loading.load_model` and transformers load like any
other: config.json, model.safetensors and a fast tokenizer with a real mask token. Two kinds:

- "gemma": a Gemma decoder with bidirectional attention, the shape of LLaDA and Dream.
- "bert": BertForMaskedLM, the classic masked-LM kind.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GemmaConfig,
    GemmaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from dsdpo.errors import DsdpoError

ARCHITECTURES = ("gemma", "bert")
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]", "eos": "[EOS]", "mask": "[MASK]"}
# One token per printable ASCII character: any English prompt tokenizes without an unknown token.
CHARACTERS = [c for c in string.printable if c not in "\x0b\x0c\r"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: special tokens first, then printable ASCII.

    vocab_size: fill the vocabulary with never-produced tokens up to this size, for a model with a
    real model's output layer (LLaDA-8B's 126464 words) and a tiny trunk.
    """
    tokens = [*SPECIAL_TOKENS.values(), *CHARACTERS]
    tokens += [f"[UNUSED{index}]" for index in range(len(tokens), vocab_size or len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{name}_token": token for name, token in SPECIAL_TOKENS.items()},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "gemma",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised model whose config names the tokenizer's mask token."""
    if arch not in ARCHITECTURES:
        raise DsdpoError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if hidden_size % num_heads:
        raise DsdpoError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    torch.manual_seed(seed)
    if arch == "gemma":
        config = GemmaConfig(
            **common,
            num_key_value_heads=num_heads,
            head_dim=hidden_size // num_heads,
            use_bidirectional_attention=True,  # a denoiser sees the whole sequence, like LLaDA
        )
        return GemmaForCausalLM(config)
    return BertForMaskedLM(BertConfig(**common))


def init_tiny(out_dir: str | Path, **model_options) -> Path:
    """Write a tiny model and its tokenizer to `out_dir`; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, **model_options)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
