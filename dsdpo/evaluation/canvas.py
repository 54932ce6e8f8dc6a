"""The sampler's canvas and one forward over it: left-padded prompts, padding hidden, guidance.

Prompts of different lengths are left-padded so every answer starts at the same column. Padding is
hidden from every query (a key-padding mask, 4D for bidirectional decoders, see
dsdpo.objective.logprobs.bidirectional_attention_mask) and position ids restart at each row's first
real token, so a row decodes as it would alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsdpo.errors import DsdpoError
from dsdpo.families import family_of_model, source_positions
from dsdpo.models.loading import is_remote_code
from dsdpo.models.padding import ignores_padding, logits_without_padding
from dsdpo.objective.logprobs import bidirectional_attention_mask, output_size, trunk_and_head


@dataclass(frozen=True)
class Batch:
    """Left-padded prompts followed by a fully masked answer."""

    canvas: Tensor  # [B, P + G] token ids
    attention_mask: Tensor  # [B, P + G] long, 0 on left padding
    prompt: Tensor  # [B, P + G] bool, True on real prompt tokens
    answer_start: int
    mask_token_id: int


def left_padded_batch(
    prompt_ids: Sequence[Sequence[int]], *, gen_length: int, mask_token_id: int, device: torch.device
) -> Batch:
    if not prompt_ids:
        raise DsdpoError("no prompts to generate from")
    width = max(len(ids) for ids in prompt_ids)
    rows = len(prompt_ids)
    canvas = torch.full((rows, width + gen_length), mask_token_id, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(canvas)
    prompt = torch.zeros_like(canvas, dtype=torch.bool)
    for row, ids in enumerate(prompt_ids):
        start = width - len(ids)
        # Padding's value is never seen (attention hides it); 0 keeps it distinct from the mask token.
        canvas[row, :start] = 0
        attention_mask[row, :start] = 0
        canvas[row, start:width] = torch.tensor(list(ids), dtype=torch.long, device=device)
        prompt[row, start:width] = True
    return Batch(canvas, attention_mask, prompt, width, mask_token_id)


def _accepts_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def _model_dtype(model: nn.Module) -> torch.dtype:
    return getattr(model, "dtype", None) or next(model.parameters(), torch.empty(0)).dtype


@dataclass(frozen=True)
class Denoised:
    """One forward pass over the canvas, stopped before the output layer where the model lets it be
    split off (dsdpo.objective.logprobs.trunk_and_head): then `states` are the final hidden states and
    `head` is the output layer; any other model gives its logits as states and an identity head."""

    states: Tensor  # [B, S, d] hidden states, or [B, S, V] logits
    head: nn.Module
    shift: int  # the family's logit shift (dsdpo.families)
    vocab: int

    def logits(self, rows: Tensor, columns: Tensor) -> Tensor:
        """[n, V] logits of the tokens at (rows, columns): the output layer runs on these positions only."""
        return self.head(self.states[rows, source_positions(columns, self.shift)])


def denoise(model: nn.Module, canvas: Tensor, attention_mask: Tensor) -> Denoised:
    """The model's forward over `canvas`, left padding hidden and positions counted per row."""
    split = trunk_and_head(model)
    if not bool(attention_mask.all()) and _ignores_padding(model, canvas):
        unpadded = lambda ids, mask: _as_logits(model(input_ids=ids))  # noqa: E731
        head, states = nn.Identity(), logits_without_padding(unpadded, canvas, attention_mask)
    elif split is None:
        inputs = _padded_inputs(model, model, canvas, attention_mask)
        head, states = nn.Identity(), _as_logits(model(**inputs))
    else:
        trunk, head = split
        states = trunk(**_padded_inputs(model, trunk, canvas, attention_mask)).last_hidden_state
    family = family_of_model(model)
    return Denoised(states, head, family.logit_shift if family else 0, output_size(model, head, states))


def _padded_inputs(model: nn.Module, module: nn.Module, canvas: Tensor, attention_mask: Tensor) -> dict:
    """The inputs of `module` (the model or its trunk) that hide left padding from every query."""
    inputs = {"input_ids": canvas}
    if bool(attention_mask.all()):
        return inputs
    if getattr(getattr(model, "config", None), "use_bidirectional_attention", False):
        # A 2D mask with zeros would make this decoder causal (transformers 5.23): pass the 4D one.
        inputs["attention_mask"] = bidirectional_attention_mask(attention_mask, _model_dtype(model))
    else:
        inputs["attention_mask"] = attention_mask
    if _accepts_position_ids(module):
        # Each row's first real token is position 0, as if it had been run alone.
        inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return inputs


def _ignores_padding(model: nn.Module, canvas: Tensor) -> bool:
    """Probed once per model with its own code (dsdpo.models.padding); other models honour the mask."""
    if not is_remote_code(model):
        return False
    if not hasattr(model, "_dsdpo_ignores_padding"):
        padded = lambda ids, mask: _as_logits(model(input_ids=ids, attention_mask=mask))  # noqa: E731
        model._dsdpo_ignores_padding = ignores_padding(padded, canvas)
    return model._dsdpo_ignores_padding


def _as_logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def denoise_canvas(model: nn.Module, batch: Batch, canvas: Tensor, cfg_scale: float) -> Denoised:
    """The forward of one step; with classifier-free guidance (cfg_scale > 0) the rows of the
    unconditional pass follow those of the canvas: the same canvas with the prompt masked (LLaDA
    paper, section B.3; generate.py)."""
    if cfg_scale <= 0:
        return denoise(model, canvas, batch.attention_mask)
    unconditional = canvas.masked_fill(batch.prompt, batch.mask_token_id)
    return denoise(model, torch.cat([canvas, unconditional]), batch.attention_mask.repeat(2, 1))


def guided_logits(denoised: Denoised, rows: Tensor, columns: Tensor, cfg_scale: float) -> Tensor:
    """[n, V] logits at (rows, columns); with guidance uncond + (cfg_scale + 1) * (cond - uncond)."""
    if cfg_scale <= 0:
        return denoised.logits(rows, columns)
    unconditional_rows = rows + denoised.states.shape[0] // 2
    both = denoised.logits(torch.cat([rows, unconditional_rows]), columns.repeat(2))
    conditional, unconditional = both.chunk(2)
    return unconditional + (cfg_scale + 1) * (conditional - unconditional)
