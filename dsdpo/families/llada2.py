"""LLaDA 2.x (LLaDA2.0/2.1 mini and flash) as a native transformers model.

It reads the published checkpoints as they are (config.json with model_type "llada2_moe", Ling
weight names `model.word_embeddings`, `model.layers.N.attention.query_key_value`,
`model.layers.N.mlp.gate.expert_bias` ...) and runs no remote code. The computation is the
published modeling_llada2_moe.py's (line numbers below are dllm's first import of it, reference-
models/llada2_moe/): a decoder with one fused q/k/v projection split by heads (496-503; grouped-query
attention), q/k RMS norms over each head before RoPE (`use_qk_norm`, 505-507), RoPE tables cast to
the activations' dtype (153) on the first partial_rotary_factor · head_dim dimensions of each head
(441-446, 186-197), a dense MLP in the first `first_k_dense_replace` layers and a sparse MoE block
with shared experts in the others (559-567, 289-340), untied `lm_head`, logits of token i at
position i (1096-1102).

Attention is BLOCK-CAUSAL at inference: position i sees position j iff j // block_size <=
i // block_size, blocks counted from position 0 of prompt + response, as the published generate()
builds its mask (1335-1347). The published model takes that mask from its caller (an additive 0/-inf
4-D mask; given none it attends bidirectionally, and a 2-D padding mask becomes a CAUSAL one:
docs/published_code.md, "llada2_moe"); given none or a 2-D one, this one builds the block-causal mask
itself and hides padded keys, and a ready 4-D mask (boolean, or additive 0/-inf) is used as it is.
The block length is not in the released config.json: dsdpo reads `block_size` there, 32 when absent
(generate()'s default block_length and dFactory's block-diffusion SFT recipe).

Its score is the block-diffusion ELBO (dsdpo.objective.blocks): [noised ; clean] rows under the
block-diffusion
mask, as dFactory's block-diffusion training feeds it (train_llada2_bd.py:122-166, 424-434).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from dsdpo.errors import DsdpoError
from dsdpo.families.layers import GatedMLP, RMSNorm, TrunkWithHead, attend, default_positions, rotary_tables
from dsdpo.families.routing import RoutedExperts
from dsdpo.objective.blocks import block_causal_mask


class LLaDA2MoeConfig(PretrainedConfig):
    """The published LLaDA 2.x config.json, field for field (defaults as configuration_llada2_moe.py's),
    plus dsdpo's `block_size` and `mask_token_id`.

    Stored and never read by the published model (kept in the config.json a checkpoint writes):
    norm_head, embedding_dropout, output_dropout, use_sliding_window/sliding_window/max_window_layers
    (the sliding window reaches SDPA as an unused keyword), output_router_logits, and config.json's
    score_function, norm_topk_prob, router_dtype, moe_router_enable_expert_bias (the router is always
    sigmoid in fp32 with an expert bias, renormalised when top_k > 1: 217-286). attention_dropout is
    applied by the published model in training mode only; dsdpo trains without dropout (the released
    configs say 0.0), so that the policy scores a row as the reference does.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 0,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = True,
        rms_norm_eps: float = 1e-05,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 16384,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        pad_token_id: int = 126081,
        num_experts: int | None = 16,
        num_shared_experts: int | None = 0,
        num_experts_per_tok: int = 2,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        head_dim: int | None = None,
        partial_rotary_factor: float = 0.5,
        block_size: int = 32,  # dsdpo's: generate()'s block_length default, dFactory's recipe
        mask_token_id: int | None = None,  # dsdpo.families: the published 156895 when absent
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.hidden_act = num_key_value_heads, hidden_act
        self.use_qkv_bias, self.use_qk_norm, self.use_bias = use_qkv_bias, use_qk_norm, use_bias
        self.rms_norm_eps, self.initializer_range = rms_norm_eps, initializer_range
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.rope_scaling = rope_scaling
        self.num_experts, self.num_shared_experts = num_experts, num_shared_experts
        self.num_experts_per_tok, self.n_group, self.topk_group = num_experts_per_tok, n_group, topk_group
        self.routed_scaling_factor, self.moe_intermediate_size = routed_scaling_factor, moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.partial_rotary_factor = partial_rotary_factor
        self.block_size, self.mask_token_id = block_size, mask_token_id
        kwargs.pop("use_cache", None)  # there is no key/value cache in a denoiser
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def rope_dim(self) -> int:
        """transformers 4.57's default RoPE: int(head_dim · partial_rotary_factor) dimensions rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts is not None and index >= self.first_k_dense_replace  # 562-567

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise DsdpoError(f"config.json: hidden_act = {self.hidden_act!r} unsupported (LLaDA 2.x: 'silu')")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise DsdpoError(
                f"config.json: rope_scaling = {scaling!r} is not supported (LLaDA 2.x uses none)"
            )
        if not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise DsdpoError(
                f"config.json: partial_rotary_factor = {self.partial_rotary_factor!r} rotates "
                f"{self.rope_dim} dimensions of a {self.head_dim}-wide head (an even number from 2 up)"
            )
        if not self.num_key_value_heads or self.num_attention_heads % self.num_key_value_heads:
            raise DsdpoError(
                f"config.json: num_key_value_heads = {self.num_key_value_heads!r} does not divide "
                f"num_attention_heads = {self.num_attention_heads} (the published default 0 cannot run)"
            )
        if self.num_experts is not None and (
            self.num_experts % self.n_group
            or self.num_experts // self.n_group < 2
            or not self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group)
        ):
            raise DsdpoError(
                f"config.json: num_experts = {self.num_experts} in n_group = {self.n_group} groups of at "
                f"least 2, topk_group = {self.topk_group} of them holding num_experts_per_tok = "
                f"{self.num_experts_per_tok}: the published group-limited router needs all three"
            )


class LLaDA2Gate(nn.Module):
    """The router `mlp.gate`: a weight [experts, D] and the `expert_bias` buffer (217-286).

    Sigmoid scores of fp32 logits; the expert bias is added for the CHOICE of experts only:
    group-limited top-k (each of n_group groups scored by the sum of its two best biased scores,
    the topk_group best groups kept, top_k experts among them); the weights are the unbiased
    scores of the chosen experts, renormalised to sum to 1 when top_k > 1, times
    routed_scaling_factor. (LLaDA-MoE's router adds its bias to the weights too.)
    """

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Always registered, whatever moe_router_enable_expert_bias says (232); set by the load
        # balancer in pretraining, never trained here.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(weights fp32, experts) [N, top_k] of the tokens [N, D]."""
        scores = torch.sigmoid(F.linear(tokens.float(), self.weight.float()))
        biased = scores + self.expert_bias
        grouped = biased.view(len(tokens), self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        in_kept_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        allowed = in_kept_group[:, :, None].expand_as(grouped).reshape(len(tokens), -1)
        experts = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts


class LLaDA2SparseMoeBlock(RoutedExperts):
    """The routed experts (dsdpo.families.routing), the router `gate` and the shared experts, added
    unweighted (337-338). The routed outputs are weighted and summed in fp32 and rounded once, as
    the published moe_infer does (368-374)."""

    sum_dtype = torch.float32

    def __init__(self, config: LLaDA2MoeConfig):
        experts = [
            GatedMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        ]
        super().__init__(experts, config.num_experts_per_tok)
        self.gate = LLaDA2Gate(config)
        if config.num_shared_experts is not None:
            self.shared_experts = GatedMLP(
                config.hidden_size, config.moe_intermediate_size * config.num_shared_experts
            )

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.gate(tokens)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + self.shared_experts(x) if hasattr(self, "shared_experts") else out


class LLaDA2DecoderLayer(GradientCheckpointingLayer):
    """x + dense(attention(input_layernorm(x))), then + mlp(post_attention_layernorm(x)) (575-645)."""

    def __init__(self, config: LLaDA2MoeConfig, index: int):
        super().__init__()
        d, heads, kv_heads, head_dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.config = config
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(
            d, (heads + 2 * kv_heads) * head_dim, bias=config.use_qkv_bias
        )
        if config.use_qk_norm:
            self.attention.query_layernorm = RMSNorm(head_dim, config.rms_norm_eps)
            self.attention.key_layernorm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attention.dense = nn.Linear(heads * head_dim, d, bias=config.use_bias)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = (
            LLaDA2SparseMoeBlock(config)
            if config.is_moe_layer(index)
            else GatedMLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        attn, config = self.attention, self.config
        batch, length, _ = x.shape
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        qkv = attn.query_key_value(self.input_layernorm(x)).view(batch, length, heads + 2 * kv_heads, -1)
        q, k, v = (part.flatten(2) for part in qkv.split([heads, kv_heads, kv_heads], dim=2))
        x = x + attend(
            (q, k, v),
            attn.dense,
            num_heads=heads,
            num_kv_heads=kv_heads,
            rotary=rotary,
            rope_in_fp32=False,
            mask=mask,
            qk_norms=(attn.query_layernorm, attn.key_layernorm) if config.use_qk_norm else None,
        )
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2PreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2DecoderLayer"]  # noqa: RUF012
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LLaDA2Gate):  # a bare parameter transformers' init does not know
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


def attention_mask_of(attention_mask: Tensor | None, positions: Tensor, block_size: int) -> Tensor:
    """[B, 1, S, S] boolean (True = attend): a ready 4-D mask as it is (an additive one attends where
    it adds 0, generate()'s 0/-inf), else the block-causal mask hiding the padded keys of a 2-D one."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return block_causal_mask(positions, attention_mask, block_size)


class LLaDA2MoeModel(LLaDA2PreTrainedModel):
    """Embeddings, layers and the final norm: hidden states [B, S, D]."""

    _input_embed_layer = "word_embeddings"

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        config.check_supported()
        # padding_idx as published (783-785): that row gets no gradient.
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> BaseModelOutput:
        x = self.word_embeddings(input_ids)
        positions = default_positions(input_ids, position_ids)
        rotary = rotary_tables(positions, self.config.rope_dim, self.config.rope_theta)
        mask = attention_mask_of(attention_mask, positions, self.config.block_size)
        for layer in self.layers:
            x = layer(x, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class LLaDA2MoeModelLM(TrunkWithHead, LLaDA2PreTrainedModel):
    """The denoiser: logits [B, S, V] for every position."""

    trunk_class = LLaDA2MoeModel
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # noqa: RUF012
