"""Bytes on each device and parameter sweeps per optimizer step, by formula from the model's shape.

Activations (bytes saved for backward, T = rows × width tokens of one forward, b bytes per element,
d hidden, f MLP width, d_q and d_kv = heads and kv heads × head dim (d_q = d but where config.json's
head_dim says otherwise, as SDAR-4B's), h heads), counted tensor by tensor from
dsdpo/families/layers.py (the other Llama-shaped models save the same tensors):

    RMS norm            (4 + 2b)·T·d     its fp32 input, the normed value, the output the linears save
    rotary              0                q·cos saves only cos (no gradient): the [T, head dim] fp32 cos and
                                         sin tables, 8·T·d/h, are shared by every block
    attention           b·T·(2d_q + 2d_kv) + 4·T·h   q, k, v and the output (whose view the out projection
                                         saves) for SDPA's backward, and its fp32 log-sum-exp
    gated MLP           4b·T·f           gate, up, silu(gate), their product
    mixture of experts  f = k·f_expert + f_shared: a token's k experts and the shared expert (their
                        gated MLPs as above), and for each of the k copies of a token (an expert's
                        input rows, dsdpo/families/llada_moe.py) 3b·T·k·d: the gathered input the
                        expert's linears save, its output the routing weight's product saves, that
                        product index_add_ saves; the router's fp32 softmax 4·T·E and the int64
                        indices of top-k, of the gather and of index_add_, 24·T·k
    q/k norms           (4 + 2b)·T·(d_q + d_kv)  per-head RMS norms of queries and keys (SDAR, LLaDA-MoE)
    layer = 2 norms + attention (+ q/k norms) + MLP (+ the experts' copies and router)

    output layer        12·m·V           m = min(M, s): of the M masked positions (the head runs at
                                         those only) one slice of s positions exists at a time
                                         (dsdpo.objective.logprobs, s·4·V ≤ HEAD_SLICE_BYTES), in backward
                                         too:
                                         the recomputed fp32 log-softmax, its gradient and the
                                         gradient of the logits
    with checkpointing  N·b·T·d + max(norm + output layer, layer + b·T·(2d + 2f))
                        (each block keeps its input; one block is recomputed at a time)
    without             N·layer + norm + output layer

These were checked tensor by tensor with autograd's saved-tensor hooks on dsdpo's LLaDA block, and
against measured peaks (benchmarks/planner_accuracy.py).

Compute and activations follow a mixture of experts' ACTIVE parameters (f above, the FLOPs in
report.py), model states its TOTAL ones (every expert is partitioned, offloaded and trained).

A block-diffusion model (SDAR, LLaDA 2.x) scores one forward of [noised ; clean] (dsdpo.objective.blocks): a
row of S tokens is 2S tokens wide in every forward, in T above, in the attention's width and in
--max-tokens-per-forward's budget (dsdpo.objective.elbo.row_widths); its masked positions are the noised
half's, as many as a plain row's.

A forward without gradients keeps one block's transients, b·T·(3d + 3f) + 4·T·d, or one slice of
the output layer's logits, their fp32 copy in bf16 and the log-softmax, (b + 4 + 4·[b = 2])·m·V,
whichever is larger.

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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from dsdpo.objective.logprobs import HEAD_SLICE_BYTES, positions_per_slice
from dsdpo.planner.shapes import ModelShape
from dsdpo.runtime.ds_config import fill_swap_buffer_size

ACCUMULATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # data_types.grad_accum_dtype
ADAM_BYTES = 12  # fp32 master weight, exp_avg, exp_avg_sq


@dataclass(frozen=True)
class RunShape:
    """What the planner needs to know of a run besides the model and the DeepSpeed config."""

    max_length: int = 1024  # widest row: prompt + response tokens
    response_length: int | None = None  # tokens of a response (default: max_length, the bound)
    budget: int = 8  # draws per response
    micro_batch: int = 1  # pairs per micro-batch
    accumulation: int = 1
    max_tokens_per_forward: int = 4096
    max_tokens_no_grad: int | None = None  # default 4 × max_tokens_per_forward
    gradient_checkpointing: bool = True
    reference: str = (
        "engine"  # engine | precomputed | adapter (LoRA's adapters off) | none (reference-free, SFT)
    )
    trainable_parameters: int | None = None  # LoRA's adapters (None: every parameter trains)
    masked_fraction: float = 1.0  # of response tokens masked in the heaviest chunk (1: a bound)

    @property
    def response(self) -> int:
        return self.response_length or self.max_length

    @property
    def no_grad_tokens(self) -> int:
        return self.max_tokens_no_grad or 4 * self.max_tokens_per_forward


def dtype_bytes(ds_config: dict) -> int:
    return 2 if (ds_config.get("bf16") or {}).get("enabled") else 4


def chunk_rows(tokens: int, width: int) -> int:
    return max(1, tokens // width)


def row_width(shape: ModelShape, max_length: int) -> int:
    """Tokens of one row in a forward: max_length, twice over for a block model (module docstring)."""
    return max_length * (2 if shape.block_size else 1)


def _norm(shape: ModelShape, tokens: int, b: int) -> float:
    return (4 + 2 * b) * tokens * shape.hidden


def layer_bytes(shape: ModelShape, tokens: int, b: int) -> float:
    """Bytes one block saves for backward on a forward of `tokens` tokens (module docstring)."""
    dq, dkv, f = shape.q_width, shape.kv_width, shape.intermediate
    attention = b * tokens * (2 * dq + 2 * dkv) + 4 * tokens * shape.heads
    if shape.qk_norms:  # an RMS norm over each head's queries and keys, as the layer's own norms
        attention += (4 + 2 * b) * tokens * (dq + dkv)
    mlp = 4 * b * tokens * f
    k = shape.experts_per_token
    experts = tokens * (3 * b * k * shape.hidden + 4 * shape.experts + 24 * k)
    return 2 * _norm(shape, tokens, b) + attention + mlp + experts


def head_positions(shape: ModelShape, masked: float, slice_bytes: int = HEAD_SLICE_BYTES) -> float:
    """m: the masked positions whose logits exist at once, one slice of the output layer at most."""
    return min(masked, positions_per_slice(shape.vocab, slice_bytes))


def head_bytes(shape: ModelShape, masked: float, slice_bytes: int = HEAD_SLICE_BYTES) -> float:
    return 12 * head_positions(shape, masked, slice_bytes) * shape.vocab


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    masked: float,
    b: int,
    *,
    checkpointing: bool,
    slice_bytes: int = HEAD_SLICE_BYTES,
) -> float:
    """Peak bytes of one forward and backward with gradients (module docstring)."""
    head = _norm(shape, tokens, b) + head_bytes(shape, masked, slice_bytes) + 8 * tokens * shape.head_dim
    if not checkpointing:
        return shape.layers * layer_bytes(shape, tokens, b) + head
    recompute = layer_bytes(shape, tokens, b) + b * tokens * (2 * shape.hidden + 2 * shape.intermediate)
    return shape.layers * b * tokens * shape.hidden + max(head, recompute)


def no_grad_activation_bytes(
    shape: ModelShape, tokens: int, masked: float, b: int, slice_bytes: int = HEAD_SLICE_BYTES
) -> float:
    block = b * tokens * (3 * shape.hidden + 3 * shape.intermediate) + 4 * tokens * shape.hidden
    head = (b + 4 + (4 if b == 2 else 0)) * head_positions(shape, masked, slice_bytes) * shape.vocab
    return max(block, head)


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


def _offload(zero: dict, block: str) -> str:
    return (zero.get(block) or {}).get("device") or "none"


def _number(value, default: float) -> float:
    return default if value in (None, "auto") else float(value)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 settings that size allocations, with DeepSpeed 0.19's defaults
    (deepspeed/runtime/zero/config.py, offload_config.py)."""

    params: str  # where parameters are offloaded: none | cpu | nvme
    optimizer: str
    persistence_threshold: float
    prefetch: float
    max_live: float
    max_reuse: float
    reduce_bucket: float
    contiguous_gradients: bool
    sub_group_size: float
    pin_params: bool
    pin_optimizer: bool
    param_buffer_count: float
    param_buffer_size: float
    max_in_cpu: float
    optimizer_buffer_count: float
    aio_alignment: int  # bytes: AIO_ALIGNED_BYTES x intra_op_parallelism (swap_tensor/utils.py)
    accumulation_bytes: (
        int  # of the gradient accumulation buffer: data_types.grad_accum_dtype, else the model's
    )

    @classmethod
    def of(cls, ds_config: dict, *, largest_parameter: int, world_size: int) -> ZeroSettings:
        """From a DeepSpeed config, raw or resolved ("auto" swap buffers sized as training sizes them)."""
        zero = copy.deepcopy(ds_config.get("zero_optimization") or {})
        fill_swap_buffer_size(zero, largest_parameter, world_size)
        param, optimizer = zero.get("offload_param") or {}, zero.get("offload_optimizer") or {}
        return cls(
            params=_offload(zero, "offload_param"),
            optimizer=_offload(zero, "offload_optimizer"),
            persistence_threshold=_number(zero.get("stage3_param_persistence_threshold"), 1e5),
            prefetch=_number(zero.get("stage3_prefetch_bucket_size"), 5e7),
            max_live=_number(zero.get("stage3_max_live_parameters"), 1e9),
            max_reuse=_number(zero.get("stage3_max_reuse_distance"), 1e9),
            reduce_bucket=_number(zero.get("reduce_bucket_size"), 5e8),
            contiguous_gradients=zero.get("contiguous_gradients", True),
            sub_group_size=_number(zero.get("sub_group_size"), 1e9),
            pin_params=bool(param.get("pin_memory", False)),
            pin_optimizer=bool(optimizer.get("pin_memory", False)),
            param_buffer_count=_number(param.get("buffer_count"), 5),
            param_buffer_size=_number(param.get("buffer_size"), 1e8),
            max_in_cpu=_number(param.get("max_in_cpu"), 1e9),
            optimizer_buffer_count=_number(optimizer.get("buffer_count"), 4),
            aio_alignment=1024 * int((ds_config.get("aio") or {}).get("intra_op_parallelism", 1)),
            accumulation_bytes=ACCUMULATION_BYTES.get(
                (ds_config.get("data_types") or {}).get("grad_accum_dtype"), dtype_bytes(ds_config)
            ),
        )


def sub_group_members(partitions: list[int], sub_group_size: float) -> list[list[int]]:
    """The parameter partitions of each optimizer sub-group: parameters in order until a group
    reaches sub_group_size (stage3.DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups)."""
    if sub_group_size >= sum(partitions):
        return [list(partitions)]
    groups, current = [], []
    for numel in partitions:
        current.append(numel)
        if sum(current) >= sub_group_size:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


def sub_groups(partitions: list[int], sub_group_size: float) -> list[int]:
    """Elements of each optimizer sub-group."""
    return [sum(group) for group in sub_group_members(partitions, sub_group_size)]


def pinned(nbytes: float, accelerator: str) -> float:
    """Bytes a torch-pinned host buffer holds: on CUDA torch's CachingHostAllocator rounds each
    allocation up to a power of two (ATen/core/CachingHostAllocator.h, "Round up the allocation to
    the nearest power of two"), DeepSpeed's default pinning path (DS_PIN_MEMORY_BACKEND=torch,
    utils/pin_memory.py; its "native" backend does not round, not modelled). DeepSpeed's CPU
    accelerator pins nothing (cpu_accelerator.pin_memory)."""
    if accelerator != "cuda" or nbytes <= 0:
        return nbytes
    return float(2 ** math.ceil(math.log2(nbytes)))


def aligned(numel: float, element: int, alignment: int) -> float:
    """numel rounded up to whole aio blocks (swap_tensor's _io_aligned_numel)."""
    step = alignment // element
    return math.ceil(numel / step) * step


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
    plan.cross_check = deepspeed_estimate(shape, z.params, z.optimizer, world_size)
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
    as soon as its casts are made (dsdpo.runtime.engine.finalize_swapped_gradients), so one sub-group's are
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


def deepspeed_estimate(shape: ModelShape, params: str, optimizer: str, world_size: int) -> dict[str, float]:
    """DeepSpeed's estimator of ZeRO-3 model states (policy only, with its 1.5 buffer factor)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.parameters,
        shape.largest_module,
        num_gpus_per_node=world_size,
        cpu_offload=optimizer != "none",
        cpu_offload_params=params != "none",
        zero_init=True,
    )
    return {"gpu_bytes": float(gpu), "cpu_bytes": float(cpu)}


def chunk_shape(shape: ModelShape, run: RunShape, tokens: int) -> tuple[int, int, float]:
    """(rows, tokens, masked positions) of the heaviest chunk of at most `tokens` tokens."""
    width = row_width(shape, run.max_length)
    rows = chunk_rows(tokens, width)
    rows = min(rows, 2 * run.micro_batch * run.budget)
    return rows, rows * width, rows * run.response * run.masked_fraction


def memory_plan(
    shape: ModelShape, ds_config: dict, run: RunShape, world_size: int = 1, accelerator: str = "cuda"
) -> MemoryPlan:
    plan = model_state_plan(
        shape,
        ds_config,
        reference=run.reference,
        world_size=world_size,
        accelerator=accelerator,
        trainable_parameters=run.trainable_parameters,
    )
    b = dtype_bytes(ds_config)
    rows, tokens, masked = chunk_shape(shape, run, run.max_tokens_per_forward)
    no_grad_rows, no_grad_tokens, no_grad_masked = chunk_shape(shape, run, run.no_grad_tokens)
    grad = activation_bytes(shape, tokens, masked, b, checkpointing=run.gradient_checkpointing)
    other = activation_bytes(shape, tokens, masked, b, checkpointing=not run.gradient_checkpointing)
    no_grad = no_grad_activation_bytes(shape, no_grad_tokens, no_grad_masked, b)
    label = "with" if run.gradient_checkpointing else "without"
    plan.gpu.append(
        Item(
            f"activations of the largest chunk ({label} checkpointing; with or without gradients)",
            max(grad, no_grad),
            phase="backward",
        )
    )
    plan.chunk = {
        "rows": rows,
        "tokens": tokens,
        "masked": masked,
        "no_grad_rows": no_grad_rows,
        "no_grad_tokens": no_grad_tokens,
        "activations": grad,
        "activations_other_checkpointing": other,
        "activations_no_grad": no_grad,
        "output_layer": head_bytes(shape, masked),
    }
    return plan


@dataclass(frozen=True)
class Sweeps:
    """Parameter sweeps (forward or backward calls) of one optimizer step, as dsdpo.objective.gradient
    counts them."""

    reference: int
    policy_no_grad: int
    policy_grad: int  # forward calls with gradients (each is followed by a backward)
    one_pass: bool

    @property
    def total(self) -> int:
        return self.reference + self.policy_no_grad + 2 * self.policy_grad


def sweeps_per_step(shape: ModelShape, run: RunShape) -> Sweeps:
    rows = 2 * run.micro_batch * run.budget  # chosen and rejected, `budget` draws each
    width = row_width(shape, run.max_length)
    grad_calls = math.ceil(rows / chunk_rows(run.max_tokens_per_forward, width))
    no_grad_calls = math.ceil(rows / chunk_rows(run.no_grad_tokens, width))
    one_pass = grad_calls == 1
    reference = no_grad_calls if run.reference in ("engine", "adapter") else 0
    steps = run.accumulation
    return Sweeps(
        reference=steps * reference,
        policy_no_grad=0 if one_pass else steps * no_grad_calls,
        policy_grad=steps * grad_calls,
        one_pass=one_pass,
    )
