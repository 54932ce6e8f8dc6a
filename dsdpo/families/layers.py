"""The pieces the families share: RMS norm, rotary embeddings, attention, gated MLP.

LLaDA, Dream, LLaDA-MoE, SDAR and LLaDA 2.x are Llama-shaped transformers without the causal mask
(the last two block-causal). They differ in parameter names, biases, q/k norms, partial rotary
embeddings and one precision detail (where RoPE is applied in fp32), so each family module wires
these functions into its own module tree, under the parameter names of its published checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back, then scaled (the same in LLaDA and Dream)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def default_positions(input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
    """[B, S] positions: the given ones, else 0..S-1 (right padding leaves real tokens in place)."""
    if position_ids is not None:
        return position_ids
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, S, head_dim] in fp32 for RoPE with base `theta`, as both published models
    compute them: inverse frequencies theta^(-2i/d), the angle table concatenated with itself."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inverse_frequencies = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inverse_frequencies
    table = torch.cat((angles, angles), dim=-1)[:, None]
    return table.cos(), table.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, in_fp32: bool) -> Tensor:
    """x·cos + rotate_half(x)·sin. LLaDA rotates in fp32 (`rope_full_precision`); Dream and
    LLaDA-MoE cast the tables to the activations' dtype first. The two agree in fp32 and differ by
    rounding in bf16. Tables narrower than the head rotate its first dimensions only, the rest pass
    (partial rotary embeddings, LLaDA-MoE's modeling_lladamoe.py:257-272)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotated = apply_rotary(x[..., :rotary_dim], cos, sin, in_fp32=in_fp32)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    if in_fp32:
        rotated = x.float() * cos + _rotate_half(x.float()) * sin
        return rotated.to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, 1, 1, S] boolean mask (True = attend) from a [B, S] 0/1 mask; None when nothing is padded.

    Every query sees every real token and no padding: bidirectional attention, so a padded row
    scores exactly as it would alone.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def self_attention(
    x: Tensor,
    projections: tuple[nn.Module, nn.Module, nn.Module, nn.Module],
    *,
    num_heads: int,
    num_kv_heads: int,
    rotary: tuple[Tensor, Tensor],
    rope_in_fp32: bool,
    mask: Tensor | None,
    qk_norms: tuple[nn.Module, nn.Module] | None = None,
) -> Tensor:
    """Non-causal multi-head attention of a normed [B, S, D] input through (q, k, v, out) projections.

    Grouped-query attention: query head h reads key/value head h // (num_heads / num_kv_heads), as
    the published models' repetition of the key/value heads does. `qk_norms` normalise each head's
    query and key before RoPE, with one weight shared by the heads (LLaDA-MoE's `qk_layernorm`).
    """
    q_proj, k_proj, v_proj, out_proj = projections
    return attend(
        (q_proj(x), k_proj(x), v_proj(x)),
        out_proj,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        rotary=rotary,
        rope_in_fp32=rope_in_fp32,
        mask=mask,
        qk_norms=qk_norms,
    )


def attend(
    qkv: tuple[Tensor, Tensor, Tensor],
    out_proj: nn.Module,
    *,
    num_heads: int,
    num_kv_heads: int,
    rotary: tuple[Tensor, Tensor],
    rope_in_fp32: bool,
    mask: Tensor | None,
    qk_norms: tuple[nn.Module, nn.Module] | None = None,
) -> Tensor:
    """self_attention from projected queries, keys and values [B, S, heads · head_dim] (a model with
    one fused q/k/v projection, LLaDA 2.x's `query_key_value`, splits it and comes in here)."""
    cos, sin = rotary
    q, k = _split_heads(qkv[0], num_heads), _split_heads(qkv[1], num_kv_heads)
    if qk_norms is not None:
        q, k = qk_norms[0](q), qk_norms[1](k)
    q = apply_rotary(q, cos, sin, in_fp32=rope_in_fp32)
    k = apply_rotary(k, cos, sin, in_fp32=rope_in_fp32)
    v = _split_heads(qkv[2], num_kv_heads)
    heads = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=False, enable_gqa=num_kv_heads != num_heads
    )
    batch, _, length, _ = heads.shape
    return out_proj(heads.transpose(1, 2).reshape(batch, length, -1))


def gated_mlp(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    """down(silu(gate(x)) · up(x)): LLaDA's ff_proj/up_proj/ff_out, Dream's gate/up/down_proj."""
    return down(F.silu(gate(x)) * up(x))


class GatedMLP(nn.Module):
    """gate_proj/up_proj/down_proj without biases, as one module: LLaDA-MoE's and LLaDA 2.x's dense MLP,
    each of their experts and their shared experts (modeling_lladamoe.py:278-298,
    modeling_llada2_moe.py:201-214)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj)


class TrunkWithHead:
    """The denoiser of the families published as a trunk `model.*` and an output layer `lm_head`
    (Dream, LLaDA-MoE, SDAR, LLaDA 2.x): logits [B, S, V] = lm_head(trunk hidden states) at every
    position. Mixed in before the family's PreTrainedModel class, which sets `trunk_class` (and
    `_tied_weights_keys` where the trunk's embeddings are not `embed_tokens`: the trunk class names
    them in `_input_embed_layer`, transformers' convention)."""

    trunk_class: type[nn.Module]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config):
        super().__init__(config)
        self.model = self.trunk_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self.model, self.model._input_embed_layer)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> MaskedLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return MaskedLMOutput(logits=self.lm_head(hidden))
