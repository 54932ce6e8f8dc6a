"""Loading masked-diffusion language models and their tokenizers from local folders.

Four kinds load here: the published LLaDA and Dream checkpoints, into dsdpo's own implementation of
their architecture (dsdpo.families; their code files are never run), masked-LM models
(`AutoModelForMaskedLM`: BERT, ModernBERT ...), decoders with bidirectional attention (a
Gemma/Llama-family config with `use_bidirectional_attention`), and any other model with its own
code under `trust_remote_code`. Nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dsdpo.errors import DsdpoError
from dsdpo.families import family_of, family_of_folder
from dsdpo.runtime.checkpoint import (
    cast_weight,
    is_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
    weight_sources,
)

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model_folder(path: str | Path) -> Path:
    """The folder holding config.json (and the tokenizer): the model folder, or a checkpoint's hf/."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file() and is_checkpoint(folder):
        folder = resolve_checkpoint(folder) / "hf"
    if not folder.is_dir():
        raise DsdpoError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise DsdpoError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def load_config(path: str | Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    folder = check_model_folder(path)
    family = family_of_folder(folder)
    try:
        if family is not None:  # the folder's own code files (auto_map) are never run
            return family.config_class.from_pretrained(folder)
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        hint = (
            "" if trust_remote_code else " (a model with its own code, like LLaDA, needs --trust-remote-code)"
        )
        raise DsdpoError(f"{folder}/config.json: {err}{hint}") from err


def model_class_for(config: PretrainedConfig, *, trust_remote_code: bool = False):
    """The class that builds the denoiser: dsdpo's own for a known family, else the Auto class
    with the masked-LM head where there is one."""
    family = family_of(config)
    if family is not None:
        return family.model_class
    architectures = config.architectures or []
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        # LLaDA and Dream register their denoiser under AutoModel (and sometimes AutoModelForCausalLM).
        for name, cls in (("AutoModelForMaskedLM", AutoModelForMaskedLM), ("AutoModel", AutoModel)):
            if name in auto_map:
                return cls
        return AutoModelForCausalLM
    if any(arch.endswith("ForMaskedLM") for arch in architectures):
        return AutoModelForMaskedLM
    if not getattr(config, "use_bidirectional_attention", False):
        log.warning(
            "%s has causal attention: it is not a masked diffusion model, and its scores will be poor. "
            "Set use_bidirectional_attention in its config if it was trained as a denoiser.",
            config.model_type,
        )
    return AutoModelForCausalLM


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    trust_checkpoint: bool = False,
) -> PreTrainedModel:
    """Load the denoiser in `path` for scoring or training: a Hugging Face folder, or a dsdpo
    checkpoint (a step_NNNNNN folder, or a run folder whose `latest` names one), whose shards must
    hold only weights unless `trust_checkpoint` (dsdpo.runtime.safe_load)."""
    config = load_config(path, trust_remote_code=trust_remote_code)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DsdpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not (Path(path) / "config.json").is_file():  # a checkpoint: weights from the ZeRO shards
        return load_checkpoint_model(
            path, dtype=dtype, trust_remote_code=trust_remote_code, trust_checkpoint=trust_checkpoint
        )
    cls = model_class_for(config, trust_remote_code=trust_remote_code)
    if family_of(config) is not None:
        return cls.from_pretrained(path, config=config, dtype=dtype)
    return cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code)


def check_finite_weights(folder: str | Path) -> None:
    """Every floating-point tensor of a model folder's safetensors files is finite, read one tensor at
    a time: a NaN in the starting weights is this error, not a run of skipped steps."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise DsdpoError(
                        f"{path}: {name} holds NaN or infinite values; the model's weights are broken"
                    )


def build_from_config(config: PretrainedConfig, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """A randomly initialised model of `config`'s architecture (weights come afterwards)."""
    cls = model_class_for(config, trust_remote_code=trust_remote_code)
    if family_of(config) is not None:
        return cls(config)
    return cls.from_config(config, trust_remote_code=trust_remote_code)


def copy_code_files(model_folder: str | Path, out: Path) -> None:
    """The model's own Python files (auto_map's modules), so that a checkpoint or an export of it
    loads again wherever the original did: with LLaDA's or Dream's own scripts too."""
    for source in Path(model_folder).glob("*.py"):
        (out / source.name).write_bytes(source.read_bytes())


def is_remote_code(model: torch.nn.Module) -> bool:
    """Whether the model's class came from its folder's own code files (trust_remote_code)."""
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    return type(model).__module__.startswith("transformers_modules")


def disable_dropout(model: torch.nn.Module) -> None:
    """Make the model deterministic in train mode (train mode keeps activation checkpointing on).

    The chunked exact gradient recomputes every score in a second pass: both passes must compute
    the same function. (TRL's DPO disables dropout too.)
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    folder = check_model_folder(path)
    # A family's config is handed over, so that AutoTokenizer does not load it through its code files.
    family_config = {"config": load_config(folder)} if family_of_folder(folder) else {}
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **family_config)
    except (OSError, ValueError) as err:
        raise DsdpoError(f"{folder}: no usable tokenizer ({err})") from err


def resolve_mask_token_id(
    explicit: int | None, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> int:
    """The mask token: an explicit option, else the config's `mask_token_id`, else the published one
    of the model's family (LLaDA 126336, Dream 151666), else the tokenizer's. One given by the option,
    the config or the tokenizer is refused, naming where it came from, when it is no id of the
    vocabulary (the first forward would fail on it); a family's published id is its released models'."""
    mask, source = _mask_token_id_and_source(explicit, config, tokenizer)
    vocabulary = max(getattr(config, "vocab_size", 0) or 0, getattr(config, "embedding_size", 0) or 0)
    if source is not None and vocabulary and not 0 <= mask < vocabulary:
        raise DsdpoError(f"{source} {mask} is outside the model's vocabulary (ids 0 to {vocabulary - 1})")
    return mask


def _mask_token_id_and_source(
    explicit: int | None, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[int, str | None]:
    if explicit is not None:
        return int(explicit), "--mask-token-id"
    from_config = getattr(config, "mask_token_id", None)
    if from_config is not None:
        return int(from_config), f"{Path(config.name_or_path or '.') / 'config.json'}: mask_token_id"
    family = family_of(config)
    if family is not None:
        return family.mask_token_id, None
    if tokenizer is not None and tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id), "the tokenizer's mask token"
    raise DsdpoError(
        "no mask token id: the model config has no mask_token_id and the tokenizer no mask token; "
        "give it with --mask-token-id (LLaDA uses 126336)"
    )


def load_checkpoint_model(
    checkpoint: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    trust_checkpoint: bool = False,
) -> PreTrainedModel:
    """The trained policy of a checkpoint as a plain transformers model (for eval and scoring)."""
    folder = resolve_checkpoint(checkpoint)
    verify_checkpoint(folder, trust_checkpoint=trust_checkpoint)
    config = load_config(folder / "hf", trust_remote_code=trust_remote_code)
    model = build_from_config(config, trust_remote_code=trust_remote_code)
    sources = weight_sources(folder)
    check_weights_fit(model, sources, folder)
    weights = {name: cast_weight(make(), dtype or torch.float32) for name, (_, make) in sources.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    tied = {name for name in missing if _is_tied(model, name)}
    if unexpected or set(missing) - tied:
        raise DsdpoError(
            f"{folder}: the weights do not fit the model config (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(dtype) if dtype is not None else model


def check_weights_fit(model: torch.nn.Module, sources: dict, folder: Path) -> None:
    """Every weight of the checkpoint has the shape its hf/config.json gives it: a config edited or
    copied from another size is this one line, not a traceback from load_state_dict."""
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, (shape, _) in sources.items():
        if name in shapes and shapes[name] != tuple(shape):
            raise DsdpoError(
                f"{folder / 'hf' / 'config.json'} does not describe the checkpoint's weights: {name} is "
                f"{tuple(shape)} in the shards, {shapes[name]} by the config"
            )


def check_config_fits_weights(folder: Path, sources: dict) -> None:
    """check_weights_fit against a model of hf/config.json built on the meta device (no memory); a
    model that needs its own code is not built (exporting runs no code from the checkpoint)."""
    try:
        config = load_config(folder / "hf")
    except DsdpoError:
        return
    with torch.device("meta"):
        model = build_from_config(config)
    check_weights_fit(model, sources, folder)


def _is_tied(model: PreTrainedModel, name: str) -> bool:
    """Whether parameter `name` shares storage with another parameter (a tied weight)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(
        p.data_ptr() == target.data_ptr() for other, p in params.items() if other != name
    )
