"""LLaDA (LLaDA-8B Base/Instruct, LLaDA 1.5) as a native transformers model.

It reads the published checkpoints as they are (config.json with model_type "llada", weights named
`model.transformer.*`) and runs no remote code. The computation is that of the published
`LLaDALlamaBlock` (modeling_llada.py): a Llama block without the causal mask, RMS norms in fp32,
RoPE applied in fp32 (`rope_full_precision`), SwiGLU as `ff_out(silu(ff_proj(x)) * up_proj(x))`,
an untied output layer `ff_out`. Unlike the published code before its 2025-10 update, the padding
mask is always honoured, and gradient checkpointing works. Published options that the released
LLaDA models do not use (ALiBi, sequential blocks, QK norm ...) are refused by name.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from dsdpo.errors import DsdpoError
from dsdpo.families.layers import (
    RMSNorm,
    default_positions,
    gated_mlp,
    key_padding_mask,
    rotary_tables,
    self_attention,
)

# Published config fields whose other values select code paths that no released LLaDA uses.
REQUIRED_SETTINGS = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
    "layer_norm_with_affine": True,
}


class LLaDAConfig(PretrainedConfig):
    """The published LLaDA config.json, field for field (defaults as configuration_llada.py's)."""

    model_type = "llada"
    attribute_map = {  # noqa: RUF012 (transformers' convention: a class-level mapping)
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 768,
        n_heads: int = 12,
        n_kv_heads: int | None = None,
        n_layers: int = 12,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = None,
        activation_type: str = "swiglu",
        block_type: str = "sequential",
        block_group_size: int = 1,
        alibi: bool = False,
        rope: bool = False,
        rope_theta: float = 10000.0,
        rope_full_precision: bool = True,
        attention_layer_norm: bool = False,
        input_emb_norm: bool = False,
        layer_norm_type: str = "default",
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = None,
        rms_norm_eps: float = 1e-5,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        scale_logits: bool = False,
        max_sequence_length: int = 1024,
        vocab_size: int = 50257,
        embedding_size: int | None = 50304,
        weight_tying: bool = True,
        mask_token_id: int | None = None,  # dsdpo.families: the published 126336 when absent
        init_std: float = 0.02,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.attention_layer_norm = attention_layer_norm
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.bias_for_layer_norm = bias_for_layer_norm
        self.rms_norm_eps = rms_norm_eps
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.scale_logits = scale_logits
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        kwargs.setdefault("pad_token_id", 50256)
        kwargs.setdefault("eos_token_id", 50256)
        kwargs.pop("use_cache", None)  # there is no key/value cache in a denoiser
        super().__init__(**kwargs)
        self.tie_word_embeddings = weight_tying  # transformers ties ff_out to wte from this flag

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        return self.embedding_size or self.vocab_size

    def check_supported(self) -> None:
        for field, required in REQUIRED_SETTINGS.items():
            if getattr(self, field) != required:
                raise DsdpoError(
                    f"config.json: {field} = {getattr(self, field)!r} is not supported by dsdpo's LLaDA "
                    f"(the released LLaDA models use {required!r})"
                )
        norm_bias = self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm
        if norm_bias:
            raise DsdpoError(
                "config.json: biases in LLaDA's layer norms are not supported (bias_for_layer_norm)"
            )


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """x + attn_out(attention(attn_norm(x))), then + ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, head_dim = config.d_model, config.d_model // config.n_heads
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.ffn_size, bias=config.include_bias)
        self.up_proj = nn.Linear(d, config.ffn_size, bias=config.include_bias)
        self.ff_out = nn.Linear(config.ffn_size, d, bias=config.include_bias)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        x = x + self_attention(
            self.attn_norm(x),
            (self.q_proj, self.k_proj, self.v_proj, self.attn_out),
            num_heads=self.config.n_heads,
            num_kv_heads=self.config.kv_heads,
            rotary=rotary,
            rope_in_fp32=self.config.rope_full_precision,
            mask=mask,
        )
        return x + gated_mlp(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]  # noqa: RUF012
    _supports_sdpa = True


class LLaDABackbone(LLaDAPreTrainedModel):
    """Embeddings, blocks and the final norm: hidden states [B, S, D] (the output layer lives beside
    them in `transformer`, where the published weights put it)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        config.check_supported()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.output_size, config.d_model),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.output_size, bias=config.include_bias),
            }
        )
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> BaseModelOutput:
        x = self.transformer.wte(input_ids)
        head_dim = self.config.d_model // self.config.n_heads
        rotary = rotary_tables(default_positions(input_ids, position_ids), head_dim, self.config.rope_theta)
        mask = key_padding_mask(attention_mask)
        for block in self.transformer.blocks:
            x = block(x, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.transformer.ln_f(x))


class LLaDAModelLM(LLaDAPreTrainedModel):
    """The denoiser: logits [B, S, embedding_size] for every position (read at masked ones)."""

    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}  # noqa: RUF012

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.model.transformer.ff_out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **_
    ) -> MaskedLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return MaskedLMOutput(logits=self.model.transformer.ff_out(hidden))
