"""Dream (Dream-v0 Base/Instruct 7B, DiffuCoder, Dream-Coder) as a native transformers model.

It reads the published checkpoints as they are (config.json with model_type "Dream", Qwen2-style
weight names `model.layers.N.self_attn.q_proj` ...) and runs no remote code. The computation is the
published modeling_dream.py's: a Qwen2 decoder without the causal mask (biases on q/k/v, none on
the output projection), RMS norms in fp32, RoPE tables cast to the activations' dtype. Dream was
trained to predict token i at position i-1; this model returns the logits as the network computes
them, and dsdpo reads them shifted (`dsdpo.families.Family.logit_shift`).
"""

from __future__ import annotations

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
    key_padding_mask,
    rotary_tables,
    self_attention,
)


class DreamConfig(PretrainedConfig):
    """The published Dream config.json, field for field (defaults as configuration_dream.py's)."""

    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        mask_token_id: int = 151666,
        pad_token_id: int = 151643,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps = initializer_range, rms_norm_eps
        self.rope_theta, self.rope_scaling, self.mask_token_id = rope_theta, rope_scaling, mask_token_id
        kwargs.pop("use_cache", None)  # there is no key/value cache in a denoiser
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise DsdpoError(f"config.json: hidden_act = {self.hidden_act!r} unsupported (Dream: 'silu')")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise DsdpoError(f"config.json: rope_scaling = {scaling!r} is not supported (Dream uses none)")


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Qwen2's decoder layer with bidirectional attention."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        d, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
        self.config = config
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d, bias=True)
        self.self_attn.k_proj = nn.Linear(d, config.num_key_value_heads * head_dim, bias=True)
        self.self_attn.v_proj = nn.Linear(d, config.num_key_value_heads * head_dim, bias=True)
        self.self_attn.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

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
        )
        mlp = self.mlp
        return x + gated_mlp(self.post_attention_layernorm(x), mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]  # noqa: RUF012
    _supports_sdpa = True


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, layers and the final norm: hidden states [B, S, D]."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        config.check_supported()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = rotary_tables(default_positions(input_ids, position_ids), head_dim, self.config.rope_theta)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class DreamModel(TrunkWithHead, DreamPreTrainedModel):
    """The denoiser: logits [B, S, V]; position i's logits predict token i+1 (see the module doc)."""

    trunk_class = DreamBaseModel
