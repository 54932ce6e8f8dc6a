"""DeepSpeed's own estimator of ZeRO-3 model states, which `dsdpo plan` prints beside its formulas."""

from __future__ import annotations


def zero3_model_states_estimate(
    parameters: int, largest_module: int, *, world_size: int, offload_optimizer: bool, offload_params: bool
) -> dict[str, float]:
    """DeepSpeed's estimate of the policy's model states per device (with its 1.5 buffer factor):
    estimate_zero3_model_states_mem_needs, deepspeed/runtime/zero/stage3.py."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        parameters,
        largest_module,
        num_gpus_per_node=world_size,
        cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params,
        zero_init=True,
    )
    return {"gpu_bytes": float(gpu), "cpu_bytes": float(cpu)}
