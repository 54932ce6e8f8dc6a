"""Log-probabilities of target tokens at chosen positions, the one forward computation of every score.

The output layer of a diffusion LM is its largest activation (LLaDA: 126k vocabulary), and an ELBO
term only needs it where tokens are masked. Where the model's structure is known to be
"trunk -> linear head" the head runs on those positions alone; any other model gets full logits,
gathered afterwards (correct, only heavier). Either way log p(y_i) is computed a slice of positions
at a time (`target_logprobs`), so at most one slice of [positions, V] logits exists, in forward and
in backward (docs/design.md, "The output layer a slice at a time").
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dsdpo.errors import DsdpoError
from dsdpo.families import attribute, block_size_of_model, family_of, family_of_model, source_positions
from dsdpo.models.loading import is_remote_code
from dsdpo.models.padding import distinct_lengths, ignores_padding, logits_without_padding
from dsdpo.runtime.dist import all_reduce_max

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


# Bytes of one slice's fp32 logits. A backward holds about three of them at once (the recomputed
# log-softmax, its gradient, the logits' gradient), the sampler two fp64 copies: about 1 GiB at most
# whatever the number of masked positions. LLaDA's 126464-word vocabulary gives 530 positions a
# slice: still a large matrix product, and few slices (each one a gather of the head under ZeRO-3).
HEAD_SLICE_BYTES = 2**28


def positions_per_slice(vocab: int, slice_bytes: int = HEAD_SLICE_BYTES) -> int:
    """How many positions' logits fit one slice of `slice_bytes` bytes in fp32 (at least one)."""
    return max(1, slice_bytes // (4 * vocab))


def position_slices(positions: int, slice_positions: int) -> list[slice]:
    """Slices of `slice_positions` positions covering `positions`, as many on every rank: the most any
    rank needs, the last ones empty on the others. Under ZeRO-3 each call of the head module gathers
    its weight, a collective that every rank must run equally often."""
    (count,) = all_reduce_max([max(1, math.ceil(positions / slice_positions))])
    return [slice(k * slice_positions, (k + 1) * slice_positions) for k in range(int(count))]


def output_size(model: nn.Module, head: nn.Module, states: Tensor) -> int:
    """V of the logits head(states). The states are the logits themselves on the full-logits paths (an
    identity head); otherwise the config says it (a ZeRO-3 model's weights are partitioned): LLaDA's
    `embedding_size` (its output layer's rows) if it has one, else `vocab_size`."""
    if isinstance(head, nn.Identity):
        return states.shape[-1]
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    return getattr(model.config, "embedding_size", None) or model.config.vocab_size


def _slice_logprobs(head: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    # log p(y_i) in fp32 whatever the model's dtype: the ELBO sums hundreds of these.
    return -F.cross_entropy(head(states).float(), targets, reduction="none")


def target_logprobs(head: nn.Module, states: Tensor, targets: Tensor, slice_positions: int) -> Tensor:
    """[M] log softmax(head(states[i]))[targets[i]], the head applied to `slice_positions` rows at a time.

    With gradients each slice is checkpointed: forward keeps only its inputs, and backward recomputes
    its logits when it reaches them, one slice after the other (autograd runs the later slice's nodes
    first), so backward too holds one slice of logits. The head module is called on each slice, which
    is where ZeRO-3 gathers its weight.
    """
    if torch.is_grad_enabled():
        # Nothing random in a linear layer and a log-softmax: no RNG state to keep for the recompute.
        run = partial(checkpoint, _slice_logprobs, use_reentrant=False, preserve_rng_state=False)
    else:
        run = _slice_logprobs
    parts = position_slices(len(targets), slice_positions)
    return torch.cat([run(head, states[part], targets[part]) for part in parts])


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA layers live inside the base model
        model = model.get_base_model()
    config = getattr(model, "config", None)
    family = family_of(config)
    # A model without a config (any module returning logits) has no known split.
    model_type = getattr(config, "model_type", None)
    names = (family.trunk, family.head) if family else SPLIT_HEAD_MODEL_TYPES.get(model_type)
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
    run without padding (dsdpo.models.padding). A block model's rows come as [noised ; clean] with their
    positions and a ready 4-D mask (dsdpo.objective.blocks): the scored positions are in the noised copy.
    """

    def __init__(self, model: nn.Module, head_slice_bytes: int = HEAD_SLICE_BYTES):
        super().__init__()
        self.model = model
        self.head_slice_bytes = head_slice_bytes
        self._split = trunk_and_head(model)
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
                "rows: these draws were made for another kind of model (dsdpo.objective.draws, block_size)"
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
        if self.ignores_padding:  # on every rank, padded rows or not: the ranks' forwards must match
            (forwards,) = all_reduce_max([distinct_lengths(attention_mask)])
            head, states = (
                nn.Identity(),
                logits_without_padding(self._full_logits, input_ids, attention_mask, forwards=int(forwards)),
            )
        else:
            if self._bidirectional_decoder:
                attention_mask = bidirectional_attention_mask(attention_mask, self.model.dtype)
            if self._split is not None:
                trunk, head = self._split
                states = trunk(
                    input_ids=input_ids, attention_mask=attention_mask, **positions_given
                ).last_hidden_state
            else:
                head, states = nn.Identity(), self._full_logits(input_ids, attention_mask, **positions_given)
        # The full-logits paths have their logits already: slicing bounds the fp32 copies made from them.
        slice_positions = positions_per_slice(output_size(self.model, head, states), self.head_slice_bytes)
        states, targets = states[rows, sources], targets[rows, positions]
        token_logprobs = target_logprobs(head, states, targets, slice_positions)
        if (
            scored.is_floating_point()
        ):  # a block model's per-position weights L_b / l (dsdpo.objective.blocks)
            token_logprobs = token_logprobs * scored[rows, positions].float()
        per_row = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        return per_row.index_add(0, rows, token_logprobs)


def as_scorer(model: nn.Module) -> nn.Module:
    """The callable that scores rows: a MaskedTokenScorer, a DeepSpeed engine around one, or a model."""
    if isinstance(model, MaskedTokenScorer) or isinstance(getattr(model, "module", None), MaskedTokenScorer):
        return model
    return MaskedTokenScorer(model)
