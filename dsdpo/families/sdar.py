"""SDAR (SDAR-1.7B/4B/8B/30B Chat, TraDo) as a native transformers model.

It reads the published checkpoints as they are (config.json with model_type "sdar", Qwen3 weight
names `model.layers.N.self_attn.q_norm` ...) and runs no remote code. The computation is the
published modeling_sdar.py's at inference (reference-models/sdar/, JetAstra/SDAR @c2041a8): a Qwen3
decoder (q/k RMS norms over each head before RoPE, 534-537; grouped-query attention; RoPE tables
cast to the activations' dtype, 730) whose attention is BLOCK-CAUSAL: position i sees position j iff
j // block_size <= i // block_size, blocks counted from position 0 of prompt + response, as the
published sampler's mask (generate.py:79-87); logits of token i at position i (1210). Its RMS
norm is flash-attn's fused kernel (51, 366-367): the weight is applied in fp32 and the result rounded
once, where LLaDA's and Dream's round before the weight.

Its score is the block-diffusion ELBO (each block denoised given the clean blocks before it), which
the scorer computes from [noised ; clean] rows under the block-diffusion mask (dsdpo.objective.blocks), as
SDAR's own training does (prepare_for_bd_training, 1069-1110): given a ready 4-D mask, the model
uses it as it is. The published model takes every mask from its caller and ignores a 2-D padding
mask; given none or a 2-D one, this one builds the block-causal mask itself and hides padded keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from dsdpo.errors import DsdpoError
from dsdpo.families.layers import (
    RMSNorm,
    TrunkWithHead,
    default_positions,
    gated_mlp,
    rotary_tables,
    self_attention,
)
from dsdpo.objective.blocks import block_causal_mask


class SDARConfig(PretrainedConfig):
    """The published SDAR config.json, field for field (defaults as configuration_sdar.py's)."""

    model_type = "sdar"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        use_sliding_window: bool = False,
        block_size: int = 4,  # the released chat models' (config.json); the sampler's block_length
        mask_token_id: int = 151669,
        pad_token_id: int | None = None,  # the released config.json has none (the embedding's padding_idx)
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim, self.hidden_act = head_dim, hidden_act
        self.max_position_embeddings, self.initializer_range = max_position_embeddings, initializer_range
        self.rms_norm_eps, self.rope_theta, self.rope_scaling = rms_norm_eps, rope_theta, rope_scaling
        self.attention_bias, self.use_sliding_window = attention_bias, use_sliding_window
        self.block_size, self.mask_token_id = block_size, mask_token_id
        kwargs.pop("use_cache", None)  # there is no key/value cache in a denoiser
        # The released config.json names "flex_attention" (SDAR-8B-Chat's), which transformers refuses
        # for a model class that does not declare it; this one's attention is layers.self_attention.
        kwargs.pop("attn_implementation", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise DsdpoError(f"config.json: hidden_act = {self.hidden_act!r} unsupported (SDAR: 'silu')")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise DsdpoError(f"config.json: rope_scaling = {scaling!r} is not supported (SDAR uses none)")
        if self.use_sliding_window:
            raise DsdpoError("config.json: use_sliding_window is not supported (the released SDAR uses none)")


class FusedRMSNorm(RMSNorm):
    """flash-attn's rms_norm_fn: x / rms(x) · weight all in fp32, rounded once to x's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SDARDecoderLayer(GradientCheckpointingLayer):
    """Qwen3's decoder layer with block-causal attention."""

    def __init__(self, config: SDARConfig):
        super().__init__()
        d, heads, kv_heads, head_dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.config = config
        self.input_layernorm = FusedRMSNorm(d, config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, heads * head_dim, bias=config.attention_bias)
        self.self_attn.k_proj = nn.Linear(d, kv_heads * head_dim, bias=config.attention_bias)
        self.self_attn.v_proj = nn.Linear(d, kv_heads * head_dim, bias=config.attention_bias)
        self.self_attn.o_proj = nn.Linear(heads * head_dim, d, bias=config.attention_bias)
        self.self_attn.q_norm = FusedRMSNorm(head_dim, config.rms_norm_eps)
        self.self_attn.k_norm = FusedRMSNorm(head_dim, config.rms_norm_eps)
        self.post_attention_layernorm = FusedRMSNorm(d, config.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        attn = self.self_attn
        x = x + self_attention(
            self.input_layernorm(x),
            (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj),
            num_heads=self.config.num_attention_heads,
            num_kv_heads=self.config.num_key_value_heads,
            rotary=rotary,
            rope_in_fp32=False,
            mask=mask,
            qk_norms=(attn.q_norm, attn.k_norm),
        )
        mlp = self.mlp
        return x + gated_mlp(self.post_attention_layernorm(x), mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class SDARPreTrainedModel(PreTrainedModel):
    config_class = SDARConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SDARDecoderLayer"]  # noqa: RUF012
    _supports_sdpa = True


class SDARModel(SDARPreTrainedModel):
    """Embeddings, layers and the final norm: hidden states [B, S, D]."""

    def __init__(self, config: SDARConfig):
        super().__init__(config)
        config.check_supported()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SDARDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = FusedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids)
        positions = default_positions(input_ids, position_ids)
        rotary = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        if attention_mask is not None and attention_mask.dim() == 4:  # ready: [B, 1, S, S], True = attend
            mask = attention_mask.bool()
        else:
            mask = block_causal_mask(positions, attention_mask, self.config.block_size)
        for layer in self.layers:
            x = layer(x, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class SDARForCausalLM(TrunkWithHead, SDARPreTrainedModel):
    """The denoiser: logits [B, S, V] for every position."""

    trunk_class = SDARModel
