"""Model states on each device under ZeRO-3: what DeepSpeed allocates for the policy and the reference.

Model states (ZeRO-3, DeepSpeed 0.19; P parameters, b bytes a model element, W ranks; each item
cites the DeepSpeed function that allocates it): what DeepSpeed really allocates, per engine.
The accelerator holds the persistent small parameters, the gathered parameters in flight and their
gradients, and the reduce bucket, allocated whole at its configured size. The offloaded policy
keeps in CPU RAM its b-byte parameter partitions, fp32 master weights and Adam's two moments, a
flat gradient buffer in the accumulation dtype (data_types.grad_accum_dtype; the model's by default,
fp32 in the recipes), and an fp32 gradient buffer for each optimizer sub-group (b + 12 + a + 4 bytes a
parameter; 22 in bf16 with fp32 accumulation, 24 with a 16-bit reference engine).
NVMe swapping adds page-locked buffers in CPU RAM: buffer_count x buffer_size for each engine's
parameters, buffer_count x the largest sub-group (fp32) for the optimizer, and keeps the first
max_in_cpu elements of the policy's parameters in CPU RAM. On CUDA, buffers pinned through torch
(pin_memory) come from its caching host allocator, which rounds each to a power of two. A process
baseline (Python, torch, DeepSpeed, the communication group), measured, is added to CPU RAM.
DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs) is printed beside these.
Not modelled: transients of start-up (a pinned copy briefly beside its source), the CUDA host
allocator's cache of freed pinned blocks (the reference's partitions reuse the policy's).

P counts a mixture of experts' TOTAL parameters (every expert is partitioned, offloaded and trained);
compute and activations follow its ACTIVE ones (dsdpo.planner.activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsdpo.planner.shapes import ModelShape
from dsdpo.planner.zero_settings import (
    ZeroSettings,
    aligned,
    dtype_bytes,
    pinned,
    sub_group_members,
    sub_groups,
)
from dsdpo.runtime.estimate import zero3_model_states_estimate

ADAM_BYTES = 12  # fp32 master weight, exp_avg, exp_avg_sq


# The phases of a training step, in order; the transients of one are freed before the next.
PHASES = ("backward", "boundary", "step")


@dataclass
class Item:
    name: str
    bytes: float
    basis: str = "formula"  # formula | DeepSpeed estimator | measured
    # resident: held throughout; backward: during the forward and backward calls; boundary: the
    # gradients' finalisation after the backward freed its activations; step: the optimizer's update
    phase: str = "resident"


@dataclass
class MemoryPlan:
    gpu: list[Item] = field(default_factory=list)
    cpu: list[Item] = field(default_factory=list)
    nvme: list[Item] = field(default_factory=list)
    cross_check: dict[str, float] = field(default_factory=dict)  # DeepSpeed's estimator
    chunk: dict[str, float] = field(default_factory=dict)  # rows, tokens and masked positions per chunk

    @staticmethod
    def total(items: list[Item]) -> float:
        """The peak: what stays resident plus the largest of the transients of one phase."""
        resident = sum(item.bytes for item in items if item.phase == "resident")
        phases = [sum(item.bytes for item in items if item.phase == phase) for phase in PHASES]
        return resident + max(phases)


# The process before any model: Python, torch, DeepSpeed, dsdpo, the gloo group and DeepSpeed's
# compiled ops loaded. Measured: peak RSS of a training run of a 0.1M-parameter LLaDA on the CPU
# (benchmarks/planner_accuracy.py --baseline, 0.44 GiB). A CUDA process adds its driver context.
PROCESS_BASELINE = 0.44 * 2**30


def model_state_plan(
    shape: ModelShape,
    ds_config: dict,
    *,
    reference: str,
    world_size: int = 1,
    accelerator: str = "cuda",
    trainable_parameters: int | None = None,
) -> MemoryPlan:
    """Model states on each device (module docstring), without activations; `accelerator` is the
    device DeepSpeed computes on ("cuda", or "cpu" where the accelerator's items are RAM too).
    With `trainable_parameters` (LoRA's adapters) only those get gradients and optimizer state:
    DeepSpeed's ZeRO-3 optimizer takes the parameters that require a gradient
    (stage3._get_trainable_parameter_groups); the adapters, below the persistence threshold, stay
    whole on the accelerator."""
    z = ZeroSettings.of(ds_config, largest_parameter=shape.largest_parameter, world_size=world_size)
    b = dtype_bytes(ds_config)
    partitions = [math.ceil(size / world_size) for size in shape.parameter_sizes]
    trained = [math.ceil(trainable_parameters / world_size)] if trainable_parameters else partitions
    plan = MemoryPlan()
    plan.cpu.append(
        Item("process baseline (Python, torch, DeepSpeed; measured on the CPU)", PROCESS_BASELINE, "measured")
    )
    plan.gpu += _accelerator_items(shape, z, b, reference, accelerator)
    if trainable_parameters:
        plan.gpu.append(Item("LoRA adapters (persistent)", b * trainable_parameters))
    plan.gpu += _boundary_items(z, b, trained, accelerator)
    _policy_items(plan, z, b, partitions, trained, accelerator)
    if reference == "engine":
        _reference_items(plan, z, b, partitions, accelerator)
    plan.cross_check = zero3_model_states_estimate(
        shape.parameters,
        shape.largest_module,
        world_size=world_size,
        offload_optimizer=z.optimizer != "none",
        offload_params=z.params != "none",
    )
    return plan


def _accelerator_items(
    shape: ModelShape, z: ZeroSettings, b: int, reference: str, accelerator: str
) -> list[Item]:
    """What ZeRO-3 holds on the accelerator during the forward and backward calls."""
    p = shape.parameters
    # partitioned_param_coordinator: a module's parameters are gathered whole (plus the prefetch
    # bucket, capped by max_live), and a released module keeps those it uses again within
    # max_reuse_distance elements of the trace: the last max_reuse/2 of the forward wait for the
    # backward, and a model no larger than max_reuse stays gathered from one step to the next.
    working = max(shape.largest_module, min(z.max_live, shape.block_parameters + z.prefetch))
    kept = p if p <= z.max_reuse else z.max_reuse / 2
    in_flight = min(p, kept + working)
    persistent = b * shape.persistent(z.persistence_threshold) * (2 if reference == "engine" else 1)
    # stage3._setup_for_real_optimizer: torch.empty(reduce_bucket_size) per communication dtype with
    # contiguous_gradients (the default). CUDA allocates it whole; in RAM only the pages gradients
    # are copied into become resident (at most the model's gradients).
    bucket = z.reduce_bucket if z.contiguous_gradients else 0
    if accelerator != "cuda":
        bucket = min(bucket, p)
    return [
        Item("persistent small parameters (policy and reference)", persistent),
        Item(
            "gathered parameters (a module or a block + prefetch; kept for reuse)",
            b * in_flight,
            phase="backward",
        ),
        Item(
            "a module's gradients before they reach the reduce bucket",
            b * shape.largest_module,
            phase="backward",
        ),
        Item("reduce bucket (reduce_bucket_size, allocated whole)", b * bucket),
        # comm/coalesced_collectives.reduce_scatter_coalesced: torch.cat of the bucket's gradients.
        Item("reduce-scatter's flat copy of a bucket", b * min(z.reduce_bucket, p), phase="backward"),
        # stage3.__avg_scatter_contiguous_grads: a reduced bucket is cast to the accumulation dtype
        # when that is not the communication dtype (the model's): fp32 accumulation of bf16 gradients.
        Item(
            "the reduced bucket in the accumulation dtype",
            z.accumulation_bytes * min(z.reduce_bucket, p) if z.accumulation_bytes != b else 0,
            phase="backward",
        ),
    ]


def _boundary_items(z: ZeroSettings, b: int, partitions: list[int], accelerator: str) -> list[Item]:
    """The offloaded optimizer's gradient boundary, on the accelerator
    (stage3._finalize_offload_gradient_accumulation), parameter by parameter in order: the gradient
    partition (in the accumulation dtype) is copied there (CUDA), its norm taken in fp64 in chunks of
    2.5e8 (_constant_buffered_norm2), then it is cast to fp32 (no new tensor when it is fp32 already).
    A CPU optimizer copies each cast into its sub-group's buffer at once; for an NVMe optimizer
    DeepSpeed would keep every cast until one swap-out at the end, and dsdpo swaps each sub-group out
    as soon as its casts are made (dsdpo.runtime.zero.finalize_swapped_gradients), so one sub-group's are
    kept."""
    if z.optimizer == "none":
        return []
    peak = 0.0
    for group in sub_group_members(partitions, z.sub_group_size):
        kept = 0.0
        for numel in group:
            copy = z.accumulation_bytes * numel if accelerator == "cuda" else 0  # CPU: .to() is a no-op
            cast = 4 * numel if z.accumulation_bytes != 4 else 0
            peak = max(peak, kept + copy + max(8 * min(numel, 2.5e8), cast))
            if z.optimizer == "nvme":
                kept += cast or copy  # the fp32 tensor handed to the swapper
    name = "gradient boundary: fp64 norm chunk, fp32 casts" + (
        " (a sub-group's, NVMe)" if z.optimizer == "nvme" else ""
    )
    return [Item(name, peak, phase="boundary")]


def _policy_items(
    plan: MemoryPlan, z: ZeroSettings, b: int, partitions: list[int], trained: list[int], accelerator: str
) -> None:
    """The policy engine's partitions (stage3.DeepSpeedZeroOptimizer_Stage3): every parameter's, and
    the optimizer's states of those that train (`trained`)."""
    share = sum(partitions)
    where = {"none": plan.gpu, "cpu": plan.cpu, "nvme": plan.nvme}
    cpu_params = min(share, z.max_in_cpu) if z.params == "nvme" else share
    if z.params != "none":
        # _create_param_groups_fp16_flat_cpu_memory: one pinned flat buffer; with NVMe it holds the
        # first max_in_cpu elements and only the rest stays on the drive.
        plan.cpu.append(
            Item("policy parameters (16/32-bit flat partition, pinned)", pinned(b * cpu_params, accelerator))
        )
        if share > cpu_params:
            plan.nvme.append(Item("policy parameters beyond max_in_cpu", b * (share - cpu_params)))
    else:
        plan.gpu.append(Item("policy parameters (partitions)", b * share))
    groups = sub_groups(trained, z.sub_group_size)
    largest = max(groups)
    trained_share = sum(trained)
    where[z.optimizer].append(Item("fp32 master weights + Adam's two moments", ADAM_BYTES * trained_share))
    # _setup_for_real_optimizer: grad_partitions_flat_buffer, in the gradient accumulation dtype
    # (the model's by default), on the CPU when the optimizer is offloaded, pinned with pin_memory.
    grad_flat = z.accumulation_bytes * trained_share
    if z.optimizer != "none" and z.pin_optimizer:
        grad_flat = pinned(grad_flat, accelerator)
    (plan.cpu if z.optimizer != "none" else plan.gpu).append(
        Item(f"gradient partitions (flat, {8 * z.accumulation_bytes}-bit accumulation)", grad_flat)
    )
    # initialize_optimizer_states: with a CPU-offloaded optimizer every sub-group gets its own fp32
    # gradient buffer (pinned with pin_memory); otherwise (and for NVMe-swapped sub-groups) the
    # sub-groups share one of the largest sub-group's size.
    if z.optimizer == "cpu":
        fp32 = sum(pinned(4 * g, accelerator) if z.pin_optimizer else 4 * g for g in groups)
        plan.cpu.append(Item(f"fp32 gradients of the {len(groups)} optimizer sub-groups", fp32))
    else:
        (plan.cpu if z.optimizer == "nvme" else plan.gpu).append(
            Item("fp32 gradient buffer (largest optimizer sub-group)", 4 * largest)
        )
    if z.optimizer == "nvme":
        # optimizer_utils.OptimizerSwapper: SwapBufferManager, buffer_count page-locked fp32 buffers
        # of the largest sub-group (aio-aligned).
        buffers = z.optimizer_buffer_count * 4 * aligned(largest, 4, z.aio_alignment)
        plan.cpu.append(Item("optimizer swap buffers (buffer_count x largest sub-group, fp32)", buffers))
        # ops/adam/cpu_adam.DeepSpeedCPUAdam.step creates a swapped sub-group's moments with
        # zeros_like, outside the swap buffers, at its first step.
        plan.cpu.append(Item("Adam's moments of a sub-group at its first step", 8 * largest, phase="step"))
    if z.params == "nvme":
        plan.cpu.append(Item("parameter swap buffers (policy)", _param_swap_buffers(z, b)))
        if sum(partitions) > cpu_params:
            # _create_fp16_partitions_with_defragmentation: reserve_partitioned_swap_space, a
            # page-locked buffer of the largest sub-group for writing parameters back to NVMe.
            plan.cpu.append(Item("parameter write-back buffer", b * aligned(largest, b, z.aio_alignment)))


def _param_swap_buffers(z: ZeroSettings, b: int) -> float:
    """partitioned_param_swapper.AsyncPartitionedParameterSwapper._configure_aio: buffer_count
    page-locked buffers of buffer_size elements (aio-aligned)."""
    return z.param_buffer_count * b * aligned(z.param_buffer_size, b, z.aio_alignment)


def _reference_items(
    plan: MemoryPlan, z: ZeroSettings, b: int, partitions: list[int], accelerator: str
) -> None:
    """The reference engine: ZeRO-3 parameter offload only (parameter_offload.DeepSpeedZeRoOffload)."""
    if z.params == "nvme":
        plan.nvme.append(Item("reference parameters", b * sum(partitions)))
        plan.cpu.append(Item("parameter swap buffers (reference)", _param_swap_buffers(z, b)))
        return
    # partition_parameters.Init._partition_param: each partition its own tensor, pinned with pin_memory.
    size = sum(pinned(b * n, accelerator) if z.pin_params else b * n for n in partitions)
    (plan.cpu if z.params == "cpu" else plan.gpu).append(Item("reference parameters (partitions)", size))
