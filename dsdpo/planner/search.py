"""`dsdpo plan --ram-gib N`: of the ways to run one training job on this machine, which fit and which
is fastest, with the command that runs it.

Compared, each planned by memory.py and report.py:
- placements: --ds_config and the recipes beside it (RECIPES: parameters and optimizer state in CPU RAM;
  parameters in RAM and optimizer state on NVMe; both on NVMe; LoRA);
- references: a second engine, or scores precomputed by `dsdpo precompute-reference` (no reference in
  memory while training; that command loads the reference whole on the GPU, so it must fit there, and
  its forwards are counted in the time per pair); LoRA's reference is its own model with the adapters
  off; reference-free training is another objective, compared only when asked for (--reference none);
- gradient checkpointing on and off;
- chunk sizes: for each of the above, the most rows per forward (with gradients, then without) whose GPU
  peak fits the card: the fewest parameter sweeps per step.
A setting fits when its GPU peak fits the card and its CPU RAM fits N GiB. Among those of one kind (full
fine-tuning, LoRA) the fewest seconds per pair (transfer and compute overlapped) wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dsdpo.planner.activations import no_grad_activation_bytes, row_width
from dsdpo.planner.cards import MATMUL_EFFICIENCY, Card
from dsdpo.planner.memory import RunShape
from dsdpo.planner.report import GIB, forward_flops, plan
from dsdpo.planner.shapes import ModelShape
from dsdpo.planner.zero_settings import dtype_bytes

RECIPES = {
    "rtx4080.json": "full",
    "rtx4080_hybrid.json": "full",
    "rtx4080_nvme.json": "full",
    "rtx4080_lora.json": "lora",
}
DEFAULT_LORA_RANK = 16  # the LoRA example of docs/training.md


@dataclass(frozen=True)
class Setting:
    config: Path
    kind: str  # "full" (every weight trains) or "lora"
    reference: str  # engine | precomputed | adapter (LoRA's adapters off) | none
    checkpointing: bool


@dataclass
class Outcome:
    setting: Setting
    plan: dict  # at the chosen chunk sizes (one row per forward when none fits)
    why_not: str  # why it does not fit; "" when it fits
    seconds_per_pair: float  # training, plus the reference scoring run for precomputed scores

    @property
    def fits(self) -> bool:
        return not self.why_not


def candidate_settings(ds_config: Path, *, lora_rank: int | None, reference: str) -> list[Setting]:
    """--ds_config (LoRA when --lora-rank is given) and the recipes found beside it, each with the
    references that train the objective asked for, with and without gradient checkpointing."""
    configs = {ds_config.resolve(): (ds_config, "lora" if lora_rank else "full")}
    for name, kind in RECIPES.items():
        configs.setdefault((ds_config.parent / name).resolve(), (ds_config.parent / name, kind))
    settings = []
    for path, kind in configs.values():
        if not path.is_file():
            continue
        if reference == "none":
            references = ["none"]
        else:
            references = ["adapter"] if kind == "lora" else ["engine", "precomputed"]
        for ref in references:
            settings += [Setting(path, kind, ref, checkpointing) for checkpointing in (True, False)]
    return settings


def _planned(shape, ds_config, run, card, world_size, grad_rows, no_grad_rows) -> dict:
    width = row_width(shape, run.max_length)
    chunked = dataclasses.replace(
        run, max_tokens_per_forward=grad_rows * width, max_tokens_no_grad=no_grad_rows * width
    )
    return plan(shape, ds_config, chunked, card, world_size=world_size)


def largest_fitting_chunks(shape: ModelShape, ds_config: dict, run: RunShape, card: Card, world_size: int):
    """The plan with the most rows per forward with gradients, then without, whose GPU peak fits the
    card (the GPU peak grows with the rows); with one row each when even that does not fit."""
    most = 2 * run.micro_batch * run.budget  # rows of a micro-batch

    def fits(grad_rows: int, no_grad_rows: int) -> bool:
        result = _planned(shape, ds_config, run, card, world_size, grad_rows, no_grad_rows)
        return result["totals"]["gpu"] <= card.memory_bytes

    grad = 1
    while grad < most and fits(grad + 1, grad + 1):
        grad += 1
    no_grad = grad
    while no_grad < most and fits(grad, no_grad + 1):
        no_grad += 1
    return _planned(shape, ds_config, run, card, world_size, grad, no_grad)


def precompute_seconds_per_pair(shape: ModelShape, run: RunShape, card: Card) -> float:
    """`dsdpo precompute-reference`: the reference's forwards of one pair (2 × budget rows), with the
    model whole on the GPU (no transfer)."""
    rows, width = 2 * run.budget, row_width(shape, run.max_length)
    flops = forward_flops(shape, rows * width, width, rows * run.response * 0.5)
    return flops / (card.bf16_flops * MATMUL_EFFICIENCY)


def precompute_gpu_bytes(shape: ModelShape, ds_config: dict, run: RunShape) -> float:
    """The reference whole on the GPU and one row's forward without gradients."""
    b = dtype_bytes(ds_config)
    width = row_width(shape, run.max_length)
    return b * shape.parameters + no_grad_activation_bytes(shape, width, run.response, b)


def evaluate(
    setting: Setting,
    shape: ModelShape,
    ds_config: dict,
    run: RunShape,
    card: Card,
    *,
    ram_bytes: float,
    world_size: int,
    lora_parameters: int,
) -> Outcome:
    run = dataclasses.replace(
        run,
        reference=setting.reference,
        gradient_checkpointing=setting.checkpointing,
        trainable_parameters=lora_parameters if setting.kind == "lora" else None,
    )
    result = largest_fitting_chunks(shape, ds_config, run, card, world_size)
    seconds = result["seconds"]["per_pair_overlapped"]
    gpu, cpu = result["totals"]["gpu"], result["totals"]["cpu"]
    why_not = []
    if gpu > card.memory_bytes:
        why_not.append(f"GPU {gpu / GIB:.1f} GiB > {card.memory_bytes / GIB:.0f} with one row per forward")
    if cpu > ram_bytes:
        why_not.append(f"CPU RAM {cpu / GIB:.1f} GiB > {ram_bytes / GIB:.0f}")
    if setting.reference == "precomputed":
        scoring = precompute_gpu_bytes(shape, ds_config, run)
        if scoring > card.memory_bytes:
            why_not.append(
                f"precompute-reference needs the reference whole on the GPU: {scoring / GIB:.1f} GiB"
            )
        seconds += precompute_seconds_per_pair(shape, run, card)
    return Outcome(setting, result, "; ".join(why_not), seconds)


def compare(
    shape: ModelShape,
    ds_configs: dict[Path, dict],
    settings: list[Setting],
    run: RunShape,
    card: Card,
    *,
    ram_bytes: float,
    world_size: int,
    lora_parameters: int,
) -> list[Outcome]:
    """Every setting's outcome, those that fit first, fastest first."""
    outcomes = [
        evaluate(
            setting,
            shape,
            ds_configs[setting.config],
            run,
            card,
            ram_bytes=ram_bytes,
            world_size=world_size,
            lora_parameters=lora_parameters,
        )
        for setting in settings
    ]
    # On a tie the reference engine comes first: one command, no scores file to keep in step.
    return sorted(
        outcomes,
        key=lambda outcome: (
            not outcome.fits,
            round(outcome.seconds_per_pair, 6),
            outcome.setting.reference == "precomputed",
        ),
    )


def fastest_fitting(outcomes: list[Outcome], kind: str) -> Outcome | None:
    """The first setting of `kind` that fits in `compare`'s order (the fastest), or None."""
    return next((outcome for outcome in outcomes if outcome.fits and outcome.setting.kind == kind), None)


def train_command(outcome: Outcome, *, model: str, lora_rank: int) -> str:
    """The commands that run `outcome`'s setting (data and output folders are placeholders)."""
    setting, run, placement = outcome.setting, outcome.plan["run"], outcome.plan["placement"]
    words = [
        "deepspeed launch/train.py --ds_config",
        str(setting.config),
        f"--model {model} --data pairs.jsonl --output runs/dpo",
        f"--budget {run['budget']} --max-length {run['max_length']}",
        f"--max-tokens-per-forward {run['max_tokens_per_forward']}",
        f"--max-tokens-no-grad {run['max_tokens_no_grad']}",
    ]
    if not setting.checkpointing:
        words.append("--no-gradient-checkpointing")
    if "nvme" in (placement["parameters"], placement["optimizer"]):
        words.append("--nvme-path /mnt/nvme/swap")
    if setting.kind == "lora":
        words.append(f"--lora-rank {lora_rank}")
    if setting.reference == "none":
        words.append("--reference-free")
    if setting.reference != "precomputed":
        return " ".join(words)
    scoring = (
        f"dsdpo precompute-reference --ref {model} --data pairs.jsonl --out ref.safetensors "
        f"--budget {run['budget']} --max-length {run['max_length']} --epochs 1 --dtype {placement['dtype']}"
    )
    return f"{scoring}\n    {' '.join(words)} --reference-scores ref.safetensors"


def _on_off(setting: Setting) -> str:
    return "on" if setting.checkpointing else "off"


def _describe(setting: Setting) -> str:
    return f"{setting.config.name}, reference {setting.reference}, checkpointing {_on_off(setting)}"


def _row(outcome: Outcome) -> str:
    setting, result = outcome.setting, outcome.plan
    chunk = result["chunk"]
    return (
        f"  {setting.config.name:<22} {setting.reference:<12} {_on_off(setting):<5}"
        f"{chunk['rows']:>4} {chunk['no_grad_rows']:>4}  {result['sweeps']['total']:>6}"
        f"{result['totals']['gpu'] / GIB:>8.1f}{result['totals']['cpu'] / GIB:>8.1f}"
        f"{result['totals']['nvme'] / GIB:>8.1f}{outcome.seconds_per_pair:>9.2f}  "
        + (outcome.why_not or "fits")
    )


def format_comparison(
    outcomes: list[Outcome], *, card: Card, ram_bytes: float, model: str, lora_rank: int
) -> str:
    lines = [
        f"settings compared on {card.name} ({card.memory_bytes / GIB:.0f} GiB) with "
        f"{ram_bytes / GIB:.0f} GiB of CPU RAM (formulas; those that fit first, fastest first):",
        f"  {'config':<22} {'reference':<12} {'ckpt':<5}{'rows':>4} {'(ng)':>4}  {'sweeps':>6}"
        f"{'GPU':>8}{'RAM':>8}{'NVMe':>8}{'s/pair':>9}  verdict",
        *(_row(outcome) for outcome in outcomes),
        "",
    ]
    for kind, label in (("full", "full fine-tuning"), ("lora", f"LoRA (rank {lora_rank})")):
        of_kind = [outcome for outcome in outcomes if outcome.setting.kind == kind]
        if not of_kind:
            continue
        best = fastest_fitting(outcomes, kind)
        if best is None:
            lines.append(f"no {label} setting fits; the closest: {of_kind[0].why_not}")
            continue
        lines += [
            f"fastest {label} that fits: {_describe(best.setting)}: {best.seconds_per_pair:.2f} s per pair",
            f"    {train_command(best, model=model, lora_rank=lora_rank)}",
        ]
        slower = [outcome for outcome in of_kind[1:] if outcome.fits]
        if slower:
            lines.append(
                f"    the {len(slower)} other fitting {label} settings are slower: the next, "
                f"{_describe(slower[0].setting)}, takes "
                f"{slower[0].seconds_per_pair / best.seconds_per_pair:.2f}x as long"
            )
    return "\n".join(lines)


def outcome_json(outcome: Outcome, *, model: str, lora_rank: int) -> dict:
    result, setting = outcome.plan, outcome.setting
    return {
        "config": str(setting.config),
        "kind": setting.kind,
        "reference": setting.reference,
        "gradient_checkpointing": setting.checkpointing,
        "fits": outcome.fits,
        "why_not": outcome.why_not,
        "seconds_per_pair": outcome.seconds_per_pair,
        "rows_per_forward": result["chunk"]["rows"],
        "rows_per_forward_no_grad": result["chunk"]["no_grad_rows"],
        "sweeps": result["sweeps"]["total"],
        "totals": result["totals"],
        "command": train_command(outcome, model=model, lora_rank=lora_rank),
    }
