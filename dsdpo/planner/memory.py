"""Bytes on each device and parameter sweeps per optimizer step, by formula from the model's shape.

Activations (bytes saved for backward, T = rows × width tokens of one forward, b bytes per element,
d hidden, f MLP width, d_kv = kv heads × head dim, h heads), counted tensor by tensor from
dsdpo/families/layers.py (the other Llama-shaped models save the same tensors):

    RMS norm            (4 + 2b)·T·d     its fp32 input, the normed value, the output the linears save
    rotary              0                q·cos saves only cos (no gradient): the [T, head dim] fp32 cos and
                                         sin tables, 8·T·d/h, are shared by every block
    attention           b·T·(2d + 2d_kv) + 4·T·h   q, k, v and the output (whose view the out projection
                                         saves) for SDPA's backward, and its fp32 log-sum-exp
    gated MLP           4b·T·f           gate, up, silu(gate), their product
    layer = 2 norms + attention + MLP

    output layer        12·m·V           m = min(M, s): of the M masked positions (the head runs at
                                         those only) one slice of s positions exists at a time
                                         (dsdpo.logprobs, s·4·V ≤ HEAD_SLICE_BYTES), in backward too:
                                         the recomputed fp32 log-softmax, its gradient and the
                                         gradient of the logits
    with checkpointing  N·b·T·d + max(norm + output layer, layer + b·T·(2d + 2f))
                        (each block keeps its input; one block is recomputed at a time)
    without             N·layer + norm + output layer

These were checked tensor by tensor with autograd's saved-tensor hooks on dsdpo's LLaDA block, and
against measured peaks (benchmarks/planner_accuracy.py).

A forward without gradients keeps one block's transients, b·T·(3d + 3f) + 4·T·d, or one slice of
the output layer's logits, their fp32 copy in bf16 and the log-softmax, (b + 4 + 4·[b = 2])·m·V,
whichever is larger.

Model states (ZeRO-3; P parameters, bf16 b = 2): the GPU holds the persistent small parameters, the
gathered parameters in flight (at least the largest module, which ZeRO-3 gathers whole, or one block
plus the prefetch bucket, capped by stage3_max_live_parameters) and their gradient before reduction,
and the reduce buckets. An offloaded optimizer keeps fp32 master weights, Adam's two moments and
the gradient partitions in the model dtype (12 + b bytes a parameter; DeepSpeed 0.19 keeps the
gradient buffer in bf16 with bf16, measured) in CPU RAM or on NVMe; offloaded parameters (b bytes) too.
NVMe swapping adds pinned buffers in CPU RAM (buffer_count × buffer_size). DeepSpeed's own
estimator (estimate_zero3_model_states_mem_needs) is printed beside these for a cross-check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsdpo.logprobs import HEAD_SLICE_BYTES, positions_per_slice
from dsdpo.planner.shapes import ModelShape

ADAM_BYTES = 12  # fp32 master weight, exp_avg, exp_avg_sq (the gradient partition is in the model dtype)


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


def _norm(shape: ModelShape, tokens: int, b: int) -> float:
    return (4 + 2 * b) * tokens * shape.hidden


def layer_bytes(shape: ModelShape, tokens: int, b: int) -> float:
    """Bytes one block saves for backward on a forward of `tokens` tokens (module docstring)."""
    d, dkv, f = shape.hidden, shape.kv_width, shape.intermediate
    attention = b * tokens * (2 * d + 2 * dkv) + 4 * tokens * shape.heads
    mlp = 4 * b * tokens * f
    return 2 * _norm(shape, tokens, b) + attention + mlp


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


@dataclass
class Item:
    name: str
    bytes: float
    basis: str = "formula"  # formula | DeepSpeed estimator | measured


@dataclass
class MemoryPlan:
    gpu: list[Item] = field(default_factory=list)
    cpu: list[Item] = field(default_factory=list)
    nvme: list[Item] = field(default_factory=list)
    cross_check: dict[str, float] = field(default_factory=dict)  # DeepSpeed's estimator
    chunk: dict[str, float] = field(default_factory=dict)  # rows, tokens and masked positions per chunk

    @staticmethod
    def total(items: list[Item]) -> float:
        return sum(item.bytes for item in items)


def _offload(zero: dict, block: str) -> str:
    return (zero.get(block) or {}).get("device") or "none"


def _number(value, default: float) -> float:
    return default if value in (None, "auto") else float(value)


def model_state_plan(
    shape: ModelShape, ds_config: dict, *, reference: str, world_size: int = 1
) -> MemoryPlan:
    """Model states on each device (module docstring), without activations."""
    plan = MemoryPlan()
    zero = ds_config.get("zero_optimization") or {}
    b = dtype_bytes(ds_config)
    params, optimizer = _offload(zero, "offload_param"), _offload(zero, "offload_optimizer")
    p = shape.parameters
    threshold = _number(zero.get("stage3_param_persistence_threshold"), 1e5)
    prefetch = _number(zero.get("stage3_prefetch_bucket_size"), 5e7)
    live = _number(zero.get("stage3_max_live_parameters"), 1e9)
    reduce_bucket = _number(zero.get("reduce_bucket_size"), 5e8)
    # Nothing ZeRO-3 gathers or buckets is larger than the model itself (a small model's buckets).
    in_flight = min(p, max(shape.largest_module, min(live, shape.block_parameters + prefetch)))
    reduce_bucket = min(reduce_bucket, p)
    plan.gpu += [
        Item("persistent small parameters", b * shape.persistent(threshold)),
        Item("parameters in flight (largest module, or a block + prefetch)", b * in_flight),
        Item("their gradients before reduction", b * in_flight),
        Item("reduce buckets", b * reduce_bucket * (2 if zero.get("overlap_comm") else 1)),
    ]
    share = p / world_size
    where = {"none": plan.gpu, "cpu": plan.cpu, "nvme": plan.nvme}
    where[params].append(Item(f"policy parameters ({8 * b}-bit partitions)", b * share))
    where[optimizer].append(Item("fp32 master weights + Adam's two moments", ADAM_BYTES * share))
    where[optimizer].append(Item(f"gradient partitions ({8 * b}-bit, measured layout)", b * share))
    if params == "nvme":
        offload = zero["offload_param"]
        param_buffers = b * _number(offload.get("buffer_count"), 5) * _number(offload.get("buffer_size"), 1e8)
        plan.cpu.append(Item("pinned parameter swap buffers (policy)", param_buffers))
    if optimizer == "nvme":
        offload = zero["offload_optimizer"]
        count, group = _number(offload.get("buffer_count"), 4), _number(zero.get("sub_group_size"), 1e9)
        plan.cpu.append(Item("pinned optimizer swap buffers", 4 * count * group))
        plan.cpu.append(Item("optimizer sub-group being updated", (ADAM_BYTES + 4) * min(group, share)))
    if reference == "engine":
        where[params].append(Item("reference parameters", b * share))
        if params == "nvme":
            plan.cpu.append(Item("pinned parameter swap buffers (reference)", param_buffers))
    plan.cross_check = deepspeed_estimate(shape, params, optimizer, world_size)
    return plan


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


def chunk_shape(run: RunShape, tokens: int) -> tuple[int, int, float]:
    """(rows, tokens, masked positions) of the heaviest chunk of at most `tokens` tokens."""
    width = min(run.max_length, tokens) if tokens >= run.max_length else run.max_length
    rows = chunk_rows(tokens, width)
    rows = min(rows, 2 * run.micro_batch * run.budget)
    return rows, rows * width, rows * run.response * run.masked_fraction


def memory_plan(shape: ModelShape, ds_config: dict, run: RunShape, world_size: int = 1) -> MemoryPlan:
    plan = model_state_plan(shape, ds_config, reference=run.reference, world_size=world_size)
    b = dtype_bytes(ds_config)
    rows, tokens, masked = chunk_shape(run, run.max_tokens_per_forward)
    no_grad_rows, no_grad_tokens, no_grad_masked = chunk_shape(run, run.no_grad_tokens)
    grad = activation_bytes(shape, tokens, masked, b, checkpointing=run.gradient_checkpointing)
    other = activation_bytes(shape, tokens, masked, b, checkpointing=not run.gradient_checkpointing)
    no_grad = no_grad_activation_bytes(shape, no_grad_tokens, no_grad_masked, b)
    label = "with" if run.gradient_checkpointing else "without"
    plan.gpu.append(
        Item(
            f"activations of the largest chunk ({label} checkpointing; with or without gradients)",
            max(grad, no_grad),
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
    """Parameter sweeps (forward or backward calls) of one optimizer step, as dsdpo.gradient counts them."""

    reference: int
    policy_no_grad: int
    policy_grad: int  # forward calls with gradients (each is followed by a backward)
    one_pass: bool

    @property
    def total(self) -> int:
        return self.reference + self.policy_no_grad + 2 * self.policy_grad


def sweeps_per_step(run: RunShape) -> Sweeps:
    rows = 2 * run.micro_batch * run.budget  # chosen and rejected, `budget` draws each
    grad_calls = math.ceil(rows / chunk_rows(run.max_tokens_per_forward, run.max_length))
    no_grad_calls = math.ceil(rows / chunk_rows(run.no_grad_tokens, run.max_length))
    one_pass = grad_calls == 1
    reference = no_grad_calls if run.reference in ("engine", "adapter") else 0
    steps = run.accumulation
    return Sweeps(
        reference=steps * reference,
        policy_no_grad=0 if one_pass else steps * no_grad_calls,
        policy_grad=steps * grad_calls,
        one_pass=one_pass,
    )
