"""LLaDA-MoE (LLaDA-MoE-7B-A1B Base/Instruct) as a native transformers model.

It reads the published checkpoints as they are (config.json with model_type "llada" like dense
LLaDA, told apart by its MoE fields: dsdpo.families; OLMoE-style weight names `model.layers.N.mlp.
experts.E.gate_proj` ...) and runs no remote code. The computation is the published
modeling_lladamoe.py's (line numbers below are dllm's copy, reference-models/llada_moe/): an OLMoE
decoder without the causal mask (339, 615), q/k RMS norms over each head before RoPE (351-355,
373-375), RoPE tables cast to the activations' dtype (226), optionally on part of each head
(`partial_rotary_factor`, 257-272), a dense MLP where `moe_layer_freq[i] == 0` and a sparse MoE block
elsewhere, plus a shared expert on MoE layers (719-727, 795-796), untied `lm_head`, logits of token
i at position i (1141). The padding mask hides padded keys and nothing else, as dllm's copy does
(403-410, 616-623; the model page's original ignores it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from dsdpo.errors import DsdpoError
from dsdpo.families.layers import (
    GatedMLP,
    RMSNorm,
    TrunkWithHead,
    default_positions,
    key_padding_mask,
    rotary_tables,
    self_attention,
)
from dsdpo.families.routing import RoutedExperts


class LLaDAMoEConfig(PretrainedConfig):
    """The published LLaDA-MoE config.json, field for field (defaults as configuration_lladamoe.py's).

    model_type is the released one, "llada", so that a checkpoint's config.json and `dsdpo export`
    keep the published layout; dsdpo.families tells it from dense LLaDA by `num_experts`.
    """

    model_type = "llada"

    def __init__(
        self,
        vocab_size: int = -1,
        hidden_size: int = -1,
        dense_intermediate_size: int = -1,
        expert_intermediate_size: int = -1,
        shared_expert_intermediate_size: int | None = -1,
        num_hidden_layers: int = -1,
        num_attention_heads: int = -1,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        pad_token_id: int = 1,
        eos_token_id: int = 50279,
        tie_word_embeddings: bool = False,
        rope_theta: float = -1,
        partial_rotary_factor: float = -1,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        clip_qkv: float | None = None,
        num_experts_per_tok: int = -1,
        num_experts: int = -1,
        qk_layernorm: bool | None = None,
        moe_layer_freq: list[int] | None = None,
        moe_router_enable_expert_bias: bool | None = None,
        mask_token_id: int | None = None,  # dsdpo.families: the published 156895 when absent
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.dense_intermediate_size = dense_intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps = initializer_range, rms_norm_eps
        self.rope_theta, self.partial_rotary_factor = rope_theta, partial_rotary_factor
        self.rope_scaling, self.attention_bias = rope_scaling, attention_bias
        self.attention_dropout, self.clip_qkv = attention_dropout, clip_qkv
        self.num_experts_per_tok, self.num_experts = num_experts_per_tok, num_experts
        self.qk_layernorm = qk_layernorm
        self.moe_layer_freq = list(moe_layer_freq or [])
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.mask_token_id = mask_token_id
        # Router fields the published code stores and never reads (docs/published_code.md, "llada_moe"):
        # norm_topk_prob (663 hard-codes False), moe_router_score_function (666: always softmax),
        # routed_scaling_factor, router_num_group, router_topk_group. They stay in **kwargs, and so
        # in the config.json a checkpoint writes.
        kwargs.pop("use_cache", None)  # there is no key/value cache in a denoiser (942)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """transformers 4.57's default RoPE: int(head_dim · partial_rotary_factor) dimensions rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_layer_freq[index] != 0

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise DsdpoError(f"config.json: hidden_act = {self.hidden_act!r} unsupported (LLaDA-MoE: 'silu')")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise DsdpoError(
                f"config.json: rope_scaling = {scaling!r} is not supported (LLaDA-MoE uses none)"
            )
        if self.clip_qkv is not None:
            raise DsdpoError("config.json: clip_qkv is not supported (the released LLaDA-MoE uses none)")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise DsdpoError(
                f"config.json: partial_rotary_factor = {self.partial_rotary_factor!r} rotates "
                f"{self.rotary_dim} dimensions of a {self.head_dim}-wide head (an even number from 2 up; "
                "the published code cannot build the model without the field either)"
            )
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            raise DsdpoError(
                f"config.json: moe_layer_freq has {len(self.moe_layer_freq)} entries for "
                f"{self.num_hidden_layers} layers"
            )


def route(router_logits: Tensor, expert_bias: Tensor | None, top_k: int) -> tuple[Tensor, Tensor]:
    """(weights, experts) [N, top_k] of each token: the published router (658-687).

    Softmax over the router logits in fp32; the expert bias is added to those probabilities and so
    moves both which experts are chosen and the weights their outputs get; plain top-k, no
    renormalisation (`norm_topk_prob = False` hard-coded, 663).
    """
    probabilities = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    if expert_bias is not None:
        probabilities = probabilities + expert_bias
    return torch.topk(probabilities, top_k, dim=-1)


class LLaDAMoESparseMoeBlock(RoutedExperts):
    """The router `gate` and the experts, each its own module (dsdpo.families.routing)."""

    def __init__(self, config: LLaDAMoEConfig):
        experts = [
            GatedMLP(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts)
        ]
        super().__init__(experts, config.num_experts_per_tok)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        if config.moe_router_enable_expert_bias:  # a buffer, set by the load balancer, never trained
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        # The weights are cast to the activations' dtype (the published cast, 687): sum_dtype None.
        return route(self.gate(tokens), self.expert_bias, self.top_k)


class LLaDAMoEDecoderLayer(GradientCheckpointingLayer):
    """x + o_proj(attention(input_layernorm(x))), then + mlp(h) (+ shared_expert(h)),
    h = post_attention_layernorm(x) (766-797)."""

    def __init__(self, config: LLaDAMoEConfig, index: int):
        super().__init__()
        d, head_dim = config.hidden_size, config.head_dim
        kv_width = config.num_key_value_heads * head_dim
        self.config = config
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.self_attn.k_proj = nn.Linear(d, kv_width, bias=config.attention_bias)
        self.self_attn.v_proj = nn.Linear(d, kv_width, bias=config.attention_bias)
        self.self_attn.o_proj = nn.Linear(d, d, bias=config.attention_bias)
        if config.qk_layernorm:
            self.self_attn.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.self_attn.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        moe = config.is_moe_layer(index)
        self.mlp = (
            LLaDAMoESparseMoeBlock(config)
            if moe
            else GatedMLP(config.hidden_size, config.dense_intermediate_size)
        )
        if moe and config.shared_expert_intermediate_size is not None:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        attn = self.self_attn
        x = x + self_attention(
            self.input_layernorm(x),
            (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj),
            num_heads=self.config.num_attention_heads,
            num_kv_heads=self.config.num_key_value_heads,
            rotary=rotary,
            rope_in_fp32=False,
            mask=mask,
            qk_norms=(attn.q_norm, attn.k_norm) if self.config.qk_layernorm else None,
        )
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDAMoEDecoderLayer"]  # noqa: RUF012
    _supports_sdpa = True


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    """Embeddings, layers and the final norm: hidden states [B, S, D]."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        config.check_supported()
        # padding_idx as published (910): that row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids)
        positions = default_positions(input_ids, position_ids)
        rotary = rotary_tables(positions, self.config.rotary_dim, self.config.rope_theta)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class LLaDAMoEModelLM(TrunkWithHead, LLaDAMoEPreTrainedModel):
    """The denoiser: logits [B, S, V] for every position (read at masked ones)."""

    trunk_class = LLaDAMoEModel
