"""Log-probabilities of target tokens at chosen positions, the one forward computation of every score.

The output layer of a diffusion LM is its largest activation (LLaDA: 126k vocabulary), and an ELBO
term only needs it where tokens are masked. Where the model's structure is known to be
"trunk -> linear head" the head runs on those positions alone; any other model gets full logits,
gathered afterwards (correct, only heavier).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsdpo.errors import DsdpoError
from dsdpo.families import attribute, block_size_of_model, family_of, family_of_model, source_positions
from dsdpo.models import is_remote_code
from dsdpo.padding import ignores_padding, logits_without_padding

log = logging.getLogger(__name__)

# Model types whose logits are exactly `head(trunk(...).last_hidden_state)`, with no scaling or
# soft-capping between them (dsdpo's LLaDA and Dream name theirs in dsdpo.families). A type not
# listed here falls back to full logits.
SPLIT_HEAD_MODEL_TYPES = {
    "gemma": ("model", "lm_head"),
    "llama": ("model", "lm_head"),
    "mistral": ("model", "lm_head"),
    "qwen2": ("model", "lm_head"),
    "qwen3": ("model", "lm_head"),
    "bert": ("bert", "cls"),
}


def _trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA layers live inside the base model
        model = model.get_base_model()
    config = getattr(model, "config", None)
    family = family_of(config)
    names = (family.trunk, family.head) if family else SPLIT_HEAD_MODEL_TYPES.get(config.model_type)
    if names is None or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    if family is not None and config.tie_word_embeddings:
        return None  # the tied output layer's weight is read outside its module: full logits
    try:
        return tuple(attribute(model, name) for name in names)
    except AttributeError:
        return None


def bidirectional_attention_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """A 4D additive key-padding mask, or None where nothing is padded.

    transformers' decoders with `use_bidirectional_attention` (Gemma, 5.23) still build a *causal*
    mask from a 2D padding mask: every query would stop seeing later tokens. A ready 4D mask is used
    as it is, so padding is hidden from every query and nothing else is.
    """
    if bool(attention_mask.all()):
        return None  # SDPA then runs unmasked, non-causal
    hidden = torch.finfo(dtype).min * (attention_mask == 0).to(dtype)
    return hidden[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)


def _logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


class MaskedTokenScorer(nn.Module):
    """Wraps a denoiser; forward returns, per row, Σ log p(targets[i] | input) over scored positions i
    (Σ w_i log p(...) when `scored` holds float weights w_i: a block model's per-block weights).

    This is the module a DeepSpeed engine wraps, so that ZeRO-3's hooks see one root forward call.
    A family's logit shift is applied here (Dream reads token i's logits at position i-1). A model
    with its own code is probed once for whether it ignores the padding mask; if it does, its rows
    run without padding (dsdpo.padding). A block model's rows come as [noised ; clean] with their
    positions and a ready 4-D mask (dsdpo.blocks): the scored positions are in the noised copy.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._split = _trunk_and_head(model)
        family = family_of_model(model)
        self._shift = family.logit_shift if family else 0
        self.block_size = block_size_of_model(model)  # the draws of a block model are made per block
        self._bidirectional_decoder = bool(
            getattr(getattr(model, "config", None), "use_bidirectional_attention", False)
        )
        # None: not probed yet (only remote code is); the probe runs in the first forward, on every
        # rank alike, where ZeRO-3 has the parameters at hand.
        self.ignores_padding: bool | None = None if is_remote_code(model) else False

    def _full_logits(self, input_ids: Tensor, attention_mask: Tensor, **positions) -> Tensor:
        return _logits(self.model(input_ids=input_ids, attention_mask=attention_mask, **positions))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, scored: Tensor, targets: Tensor, position_ids=None
    ) -> Tensor:
        if (self.block_size is None) != (position_ids is None):  # every scoring path comes through here
            raise DsdpoError(
                "a block-diffusion model scores [noised ; clean] rows of block draws, any other model plain "
                "rows: these draws were made for another kind of model (dsdpo.draws, block_size)"
            )
        rows, positions = scored.nonzero(as_tuple=True)
        # Only block rows carry positions (both copies share them); remote code may not take the argument.
        positions_given = {} if position_ids is None else {"position_ids": position_ids}
        sources = source_positions(positions, self._shift)
        if self.ignores_padding is None:
            self.ignores_padding = ignores_padding(self._full_logits, input_ids)
            if self.ignores_padding:
                log.warning(
                    "%s ignores the padding mask: each forward runs rows of equal length only (slower, "
                    "exact). A current copy of the model's code may fix it.",
                    type(self.model).__name__,
                )
        if self.ignores_padding and not bool(attention_mask.all()):
            logits = logits_without_padding(self._full_logits, input_ids, attention_mask)[rows, sources]
        else:
            if self._bidirectional_decoder:
                attention_mask = bidirectional_attention_mask(attention_mask, self.model.dtype)
            if self._split is not None:
                trunk, head = self._split
                hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, **positions_given)
                logits = head(hidden.last_hidden_state[rows, sources])
            else:
                logits = self._full_logits(input_ids, attention_mask, **positions_given)[rows, sources]
        # log p(y_i) in fp32 whatever the model's dtype: the ELBO sums hundreds of these.
        token_logprobs = -F.cross_entropy(logits.float(), targets[rows, positions], reduction="none")
        if scored.is_floating_point():
            token_logprobs = token_logprobs * scored[rows, positions].float()
        per_row = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        return per_row.index_add(0, rows, token_logprobs)


def as_scorer(model: nn.Module) -> nn.Module:
    """The callable that scores rows: a MaskedTokenScorer, a DeepSpeed engine around one, or a model."""
    if isinstance(model, MaskedTokenScorer) or isinstance(getattr(model, "module", None), MaskedTokenScorer):
        return model
    return MaskedTokenScorer(model)
