"""DeepSpeed engines for the policy and the frozen reference: the one module that imports deepspeed.

Both are ZeRO-3 engines around a MaskedTokenScorer (so ZeRO's hooks see one root forward). The
policy is loaded partitioned (transformers' from_pretrained under HfDeepSpeedConfig) and trains;
the reference has no optimizer state and runs under no_grad.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from dsdpo.config import ModelConfig
from dsdpo.errors import DsdpoError
from dsdpo.families import family_of_model, lora_targets
from dsdpo.models.freeze import FreezeReport, freeze
from dsdpo.models.loading import disable_dropout, load_model
from dsdpo.objective.logprobs import MaskedTokenScorer
from dsdpo.reference.interface import AdapterDisabledReference
from dsdpo.runtime.ds_config import precision, reference_ds_config
from dsdpo.runtime.leftovers import (
    allreduce_buffer,
    clear_stale_build_locks,
    clear_stale_shared_buffers,
    quiet_cached_op_loads,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the `deepspeed` launcher set up, or make a one-process group.

    Plain `python launch/train.py` has no launcher variables; DeepSpeed would then look for MPI.
    """
    if dist.is_initialized():
        return
    clear_stale_build_locks()  # DeepSpeed loads its communication op below
    clear_stale_shared_buffers()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    with quiet_cached_op_loads():  # DeepSpeed says "built successfully" also when it built nothing
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, auto_mpi_discovery=False)
    if on_cpu:
        _unlink_shared_allreduce_buffer()


def _unlink_shared_allreduce_buffer() -> None:
    """Remove the name of this rank's /dev/shm all-reduce buffer (dsdpo.runtime.leftovers), keeping the
    buffer: every rank opens every rank's file inside deepspeed.init_distributed, so after a barrier
    the names can go, and the mappings live until the process exits. A run that crashes or is killed
    later leaves nothing behind.
    """
    dist.barrier()
    allreduce_buffer(dist.get_rank()).unlink(missing_ok=True)


def finish_distributed() -> None:
    """Every rank at one point, then the process group closed, before a process exits normally.

    A rank that leaves first takes the group's store (rank 0 hosts it) with it while the others may
    still be tearing down their communication threads; one then aborts ("terminate called without an
    active exception", exit -6) after work that had succeeded.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class Engines:
    policy: Any  # deepspeed.DeepSpeedEngine around MaskedTokenScorer(policy model)
    reference: Any  # engine around MaskedTokenScorer(reference model), eval only; None without one
    # Held for the engines' lifetime: transformers' ZeRO-3 loading reads it globally.
    _hf_ds_config: Any = None
    freeze_report: FreezeReport | None = None  # what --freeze froze, when it was given


def _load_partitioned(path: str, ds_config: dict, model_config: ModelConfig):
    """Load a model straight into ZeRO-3 partitions (never whole on one rank)."""
    if not (Path(path) / "config.json").is_file():
        # plan_run checked the folders and exported a checkpoint given as one (dsdpo.models.start)
        raise DsdpoError(f"{path}: not a Hugging Face model folder (no config.json)")
    hf_config = HfDeepSpeedConfig(ds_config)  # must be alive during from_pretrained
    dtype = torch.bfloat16 if precision(ds_config) == "bf16" else torch.float32
    model = load_model(path, dtype=dtype, trust_remote_code=model_config.trust_remote_code)
    return model, hf_config


def _add_lora(model, model_config: ModelConfig, seed: int):
    """LoRA adapters on the model; their random initialisation depends on `seed` alone."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=model_config.lora_rank,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=0.0,  # the two-pass gradient needs a deterministic model
        target_modules=lora_targets(model_config.lora_target_modules, family_of_model(model)),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def build_engines(
    model_config: ModelConfig, ds_config: dict[str, Any], *, with_reference: bool = True, seed: int = 0
) -> Engines:
    """The training policy engine and the frozen reference engine (none when its scores are
    precomputed, or the loss is reference-free)."""
    policy_model, hf_config = _load_partitioned(model_config.path, ds_config, model_config)
    disable_dropout(policy_model)
    freeze_report = freeze(policy_model, model_config.freeze) if model_config.freeze else None
    if model_config.gradient_checkpointing:
        if not policy_model.supports_gradient_checkpointing:
            raise DsdpoError(
                f"{model_config.path}: {type(policy_model).__name__} does not support gradient "
                "checkpointing; train with --no-gradient-checkpointing (more activation memory)"
            )
        policy_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_config.lora_rank:
        policy_model = _add_lora(policy_model, model_config, seed)
    policy_scorer = MaskedTokenScorer(policy_model)
    policy, *_ = deepspeed.initialize(
        model=policy_scorer,
        model_parameters=[p for p in policy_scorer.parameters() if p.requires_grad],
        config=ds_config,
    )

    if not with_reference:
        return Engines(policy, None, hf_config, freeze_report)
    if model_config.lora_rank and not model_config.reference_path:
        return Engines(policy, AdapterDisabledReference(policy), hf_config, freeze_report)
    reference_config = reference_ds_config(ds_config)
    reference_model, _ = _load_partitioned(
        model_config.reference_path or model_config.path, reference_config, model_config
    )
    reference_model.requires_grad_(False)
    reference, *_ = deepspeed.initialize(model=MaskedTokenScorer(reference_model), config=reference_config)
    reference.eval()
    return Engines(policy, reference, hf_config, freeze_report)
