"""The plan `dsdpo plan` prints: memory per device, sweeps per step and the time per pair on a card.

Time (formulas; the rates are the card table's and the options'): each sweep streams the policy's
parameters to the GPU (b·P bytes over PCIe, from NVMe first when they are swapped there); the
compute is 2·(active block parameters)·T + 4·N·T·S·d_q (attention) + 2·d·V·M (the output layer at masked
positions) floating-point operations for a forward of T tokens, a backward twice that, and one more
forward of the blocks with gradient checkpointing, at MATMUL_EFFICIENCY of the bf16 rate. Transfer
and compute overlap (prefetch) or not: the plan gives both ends. The optimizer step runs on the CPU
(offloaded) at `cpu_adam_params_per_s`, with fp32 states read and written on NVMe when swapped there.
Not modelled: ZeRO-3's gathers between GPUs (several ranks without offload: the transfer shows 0),
the data loader, and the start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dsdpo.planner.activations import row_width
from dsdpo.planner.cards import MATMUL_EFFICIENCY, Card
from dsdpo.planner.memory import RunShape, memory_plan
from dsdpo.planner.model_states import ADAM_BYTES, MemoryPlan
from dsdpo.planner.shapes import ModelShape, model_shape
from dsdpo.planner.sweeps import Sweeps, sweeps_per_step
from dsdpo.planner.zero_settings import _offload, dtype_bytes
from dsdpo.runtime.ds_config import precision

GIB = 2**30


@dataclass(frozen=True)
class HostRates:
    nvme_read: float = 3.5e9  # bytes/s of the swap drive (a PCIe 4 NVMe drive; assumed)
    nvme_write: float = 3.0e9
    cpu_adam_params_per_s: float = 1.0e9  # DeepSpeedCPUAdam on a desktop CPU (assumed)


def forward_flops(shape: ModelShape, tokens: float, width: float, masked: float) -> float:
    return (
        2 * shape.active_block_parameters * tokens
        + 4 * shape.layers * tokens * width * shape.q_width
        + 2 * shape.hidden * shape.vocab * masked
    )


def step_flops(shape: ModelShape, run: RunShape, sweeps: Sweeps) -> float:
    """Floating-point operations of one optimizer step's forwards and backwards (module docstring)."""
    rows = 2 * run.micro_batch * run.budget
    width = row_width(shape, run.max_length)  # a block model's rows are [noised ; clean]
    tokens = rows * width
    masked = rows * run.response * 0.5  # l_over_L masks half the response on average
    forward = forward_flops(shape, tokens, width, masked)
    blocks_forward = 2 * shape.active_block_parameters * tokens
    no_grad_passes = (1 if run.reference in ("engine", "adapter") else 0) + (0 if sweeps.one_pass else 1)
    # A backward computes the inputs' gradients (one forward's work) and the weights' (another), but
    # LoRA's frozen weights need none: their adapters' are negligible.
    backward = forward if run.trainable_parameters else 2 * forward
    grad = forward + backward + (blocks_forward if run.gradient_checkpointing else 0)
    return run.accumulation * (no_grad_passes * forward + grad)


def step_seconds(
    shape: ModelShape, ds_config: dict, run: RunShape, sweeps: Sweeps, card: Card, rates: HostRates
):
    """(overlapped, serial) seconds of one optimizer step."""
    b = dtype_bytes(ds_config)
    zero = ds_config.get("zero_optimization") or {}
    params, optimizer = _offload(zero, "offload_param"), _offload(zero, "offload_optimizer")
    compute = step_flops(shape, run, sweeps) / (card.bf16_flops * MATMUL_EFFICIENCY)
    per_sweep = b * shape.parameters / card.host_bandwidth if params != "none" else 0.0
    if params == "nvme":
        per_sweep = max(per_sweep, b * shape.parameters / rates.nvme_read)
    transfer = sweeps.total * per_sweep
    trained = run.trainable_parameters or shape.parameters
    update = trained / rates.cpu_adam_params_per_s if optimizer != "none" else 0.0
    if optimizer == "nvme":
        states = (ADAM_BYTES + b) * trained
        update += states / rates.nvme_read + states / rates.nvme_write
    return max(compute, transfer) + update, compute + transfer + update, compute, transfer, update


def plan(
    model: str | Path | dict | ModelShape,
    ds_config: dict,
    run: RunShape,
    card: Card,
    *,
    rates: HostRates | None = None,
    world_size: int = 1,
) -> dict:
    """Everything `dsdpo plan` prints, as plain data (bytes and seconds)."""
    rates = rates or HostRates()
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    memory: MemoryPlan = memory_plan(shape, ds_config, run, world_size)
    sweeps = sweeps_per_step(shape, run)
    fast, slow, compute, transfer, update = step_seconds(shape, ds_config, run, sweeps, card, rates)
    pairs = run.micro_batch * run.accumulation * world_size
    zero = ds_config.get("zero_optimization") or {}
    gpu_total = MemoryPlan.total(memory.gpu)
    return {
        "model": {
            "type": shape.model_type,
            "parameters": shape.parameters,
            "active_parameters": shape.active_parameters,
            "experts": shape.experts,
            "experts_per_token": shape.experts_per_token,
            "block_size": shape.block_size,
            "largest_module": shape.largest_module,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
        },
        "run": asdict(run),
        "placement": {
            "parameters": _offload(zero, "offload_param"),
            "optimizer": _offload(zero, "offload_optimizer"),
            "dtype": precision(ds_config),
        },
        "card": asdict(card),
        "rates": asdict(rates),
        "gpu": [asdict(item) for item in memory.gpu],
        "cpu": [asdict(item) for item in memory.cpu],
        "nvme": [asdict(item) for item in memory.nvme],
        "totals": {
            "gpu": gpu_total,
            "cpu": MemoryPlan.total(memory.cpu),
            "nvme": MemoryPlan.total(memory.nvme),
        },
        "fits_gpu": gpu_total <= card.memory_bytes,
        "deepspeed_estimate": memory.cross_check,
        "chunk": memory.chunk,
        "sweeps": {**asdict(sweeps), "total": sweeps.total},
        "seconds": {
            "step_overlapped": fast,
            "step_serial": slow,
            "compute": compute,
            "parameter_transfer": transfer,
            "optimizer": update,
            "per_pair_overlapped": fast / pairs,
            "per_pair_serial": slow / pairs,
        },
    }


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_plan(result: dict, *, ram_bytes: float | None = None) -> str:
    model, run, card = result["model"], result["run"], result["card"]
    chunk, sweeps, seconds = result["chunk"], result["sweeps"], result["seconds"]
    response = run["response_length"] or run["max_length"]
    other = _gib(chunk["activations_other_checkpointing"])
    step, serial = seconds["step_overlapped"], seconds["step_serial"]
    pair, pair_serial = seconds["per_pair_overlapped"], seconds["per_pair_serial"]
    routed = (
        f", {model['experts_per_token']} of {model['experts']} experts: parameters, gradients and optimizer "
        "states follow the total, activations and compute the active"
        if model["experts"]
        else ""
    )
    block, width = model["block_size"], 2 * run["max_length"]
    rows = f"; a forward's row is [noised ; clean], {width} tokens: block {block}" if block else ""
    lines = [
        f"model: {model['type']}, {model['parameters'] / 1e9:.3f} B parameters (counted on the meta device; "
        f"{model['active_parameters'] / 1e9:.3f} B active per token{routed}), "
        f"{model['layers']} layers, hidden {model['hidden']}, vocabulary {model['vocab']}",
        f"run: micro-batch {run['micro_batch']} pairs x accumulation {run['accumulation']}, budget "
        f"{run['budget']}, rows of {run['max_length']} tokens (responses {response}{rows}), "
        f"max {run['max_tokens_per_forward']} tokens per forward with gradients, "
        f"{run['max_tokens_no_grad'] or 4 * run['max_tokens_per_forward']} without",
        "all numbers are formulas (dsdpo/planner/memory.py); [DS] marks DeepSpeed's estimator; a total is "
        "what stays resident plus the largest [phase] of transients",
        "",
        f"GPU ({card['name']}, {card['memory_bytes'] / GIB:.0f} GiB)",
    ]
    for device in ("gpu", "cpu", "nvme"):
        if device != "gpu":
            lines.append({"cpu": "CPU RAM", "nvme": "NVMe"}[device])
        for item in result[device]:
            phase = (
                "" if item["phase"] == "resident" else f" [{item['phase']}]"
            )  # total: resident + largest phase
            lines.append(f"  {item['name'] + phase:<78} {_gib(item['bytes'])}")
        total = result["totals"][device]
        note = ""
        if device == "gpu":
            note = "  fits" if result["fits_gpu"] else "  DOES NOT FIT"
        if device == "cpu" and ram_bytes:
            note = "  fits" if total <= ram_bytes else f"  DOES NOT FIT in {ram_bytes / GIB:.0f} GiB"
        lines.append(f"  {'total':<78} {_gib(total)}{note}")
    estimate = result["deepspeed_estimate"]
    lines += [
        f"  [DS] model states: GPU {_gib(estimate['gpu_bytes'])}, CPU {_gib(estimate['cpu_bytes'])} "
        "(policy only; its CPU figure includes a 1.5 buffer factor"
        + ("; it has no NVMe case: its CPU figure is the states swapped here)" if result["nvme"] else ")"),
        "",
        f"chunk with gradients: {chunk['rows']} rows, {chunk['tokens']} tokens, {chunk['masked']:.0f} masked "
        f"positions: activations {_gib(chunk['activations'])} ({other} "
        f"{'without' if run['gradient_checkpointing'] else 'with'} checkpointing), output layer (a slice of "
        f"the masked positions) {_gib(chunk['output_layer'])}; chunk without gradients: "
        f"{chunk['no_grad_rows']} rows, {_gib(chunk['activations_no_grad'])}",
        f"sweeps per optimizer step: {sweeps['total']} (reference {sweeps['reference']}, policy without "
        f"gradients {sweeps['policy_no_grad']}, policy with gradients {sweeps['policy_grad']} forward + "
        f"{sweeps['policy_grad']} backward; {'one pass' if sweeps['one_pass'] else 'two passes'})",
        f"time per optimizer step on {card['name']}: {step:.1f} s (transfer and compute overlapped) to "
        f"{serial:.1f} s (serial); compute {seconds['compute']:.1f} s, parameter transfer "
        f"{seconds['parameter_transfer']:.1f} s, optimizer {seconds['optimizer']:.1f} s",
        f"time per pair: {pair:.2f} to {pair_serial:.2f} s (formula, not measured)",
    ]
    return "\n".join(lines)


def run_shape_from(ds_config: dict, **options) -> RunShape:
    """A RunShape whose micro-batch and accumulation come from the DeepSpeed config unless given."""
    micro = options.pop("micro_batch", None) or ds_config.get("train_micro_batch_size_per_gpu", 1)
    accumulation = options.pop("accumulation", None) or ds_config.get("gradient_accumulation_steps", 1)
    micro = micro if isinstance(micro, int) else 1
    accumulation = accumulation if isinstance(accumulation, int) else 1
    return RunShape(micro_batch=micro, accumulation=accumulation, **options)
