"""The planner's memory plan against the peak resident memory of real training runs (issues 14, 22).

Each case is a real `python launch/train.py` run in a subprocess: dsdpo's LLaDA with random weights
(the published config with other widths), or LLaDA-MoE (MOE_SIZES: the released layout, every layer
a mixture of experts, with fewer and narrower experts), the shipped DeepSpeed config with only
device-independent fields changed (bf16 on or off, one micro-batch of one pair per step), a
reference engine, two optimizer steps of short rows. Measured: the training process's peak
resident set size, as `/usr/bin/time -v` reports it ("Maximum resident set size"): the kernel's
count, independent of what the planner sums.

Predicted: `dsdpo plan`'s numbers for the same run on the CPU accelerator (memory_plan with
accelerator "cpu"). There the "GPU" is the CPU, so the plan's GPU items (activations, gathered
parameters, reduce bucket) live in the same RAM: predicted = the peak of the CPU RAM and GPU items
together (what stays resident, which holds the process baseline, plus the largest transients of one
phase of the step). On a CUDA machine the same items are split between the two.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/planner_accuracy.py [--cases small:cpu:fp32 ...]
    ... --baseline      the process baseline: a run of a ~0.1M-parameter model
    ... --activations   the activation formulas alone against the live tensor bytes of one chunk
                        (dsdpo/planner/measure.py: a dispatch mode following every storage torch
                        creates), with and without gradient checkpointing and without gradients

NVMe cases need libaio and swap under --swap (a folder on this machine's disk).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
SIZES = {  # name: (hidden, layers, heads, MLP width, vocabulary); realistic shapes (MLP 3 x hidden)
    "tiny": (64, 2, 4, 192, 128),  # ~0.1M parameters: the process baseline
    "small": (384, 6, 6, 1152, 32768),  # ~36M
    "medium": (768, 12, 12, 2304, 32768),  # ~142M
    "large": (1024, 16, 16, 3072, 32768),  # ~285M
    "widest": (2048, 2, 16, 6144, 126464),  # LLaDA-8B's widest layer (126464 x 2048), tied: RAM
}
MOE_FIELDS = "experts, top-k, expert width, vocabulary"
MOE_SIZES = {  # name: (hidden, layers, heads, experts, experts a token, expert width, vocabulary)
    "moe": (256, 4, 4, 32, 4, 256, 32768),  # ~42M parameters, ~13M active
}
TIED = {"widest"}  # one 126464 x 2048 matrix for embedding and output layer, to fit this machine's RAM
ACTIVATION_SIZES = {
    "small": (128, 2, 4, 384, 2048),
    "medium": (256, 4, 4, 768, 8192),
    "large": (512, 4, 8, 1536, 16384),
}
CONFIGS = {"cpu": "rtx4080.json", "nvme": "rtx4080_nvme.json"}
DEFAULT_CASES = [
    f"{size}:{offload}:{dtype}"
    for size in ("small", "medium", "large")
    for offload in ("cpu", "nvme")
    for dtype in ("fp32", "bf16")
]
# The run: rows of 64 tokens, 2 draws per response, 2 optimizer steps (memory peaks need no long runs).
MAX_LENGTH, BUDGET, STEPS = 64, 2, 2


def llada_config(hidden, layers, heads, mlp, vocab) -> dict:
    """The published LLaDA-8B config with other widths; special tokens are the tiny tokenizer's."""
    from dsdpo.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = json.loads((REPO / "tests/fixtures/planner/llada-8b.json").read_text())
    config.update(
        d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=mlp,
        vocab_size=vocab, embedding_size=vocab, mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return config


def llada_moe_model(hidden, layers, heads, experts, top_k, expert_width, vocab):
    """LLaDA-MoE's released layout (tests/fixtures/planner/llada-moe-7b-a1b.json) with other widths."""
    from dsdpo.families.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
    from dsdpo.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = json.loads((REPO / "tests/fixtures/planner/llada-moe-7b-a1b.json").read_text())
    config.pop("model_type")
    config.update(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        num_experts=experts, num_experts_per_tok=top_k, expert_intermediate_size=expert_width,
        moe_layer_freq=[1] * layers, vocab_size=vocab, mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LLaDAMoEModelLM(LLaDAMoEConfig(**config))


def model_folder(size: str, work: Path) -> Path:
    """A LLaDA or LLaDA-MoE folder (random weights, fp32) and the tiny character tokenizer, made once
    per size."""
    import torch

    from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
    from dsdpo.models.tiny import build_tokenizer

    folder = work / f"llada-{size}"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    torch.manual_seed(0)
    if size in MOE_SIZES:
        model = llada_moe_model(*MOE_SIZES[size])
    else:
        config = llada_config(*SIZES[size])
        config.pop("model_type")
        config["weight_tying"] = size in TIED
        model = LLaDAModelLM(LLaDAConfig(**config))
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def case_ds_config(offload: str, dtype: str, work: Path) -> Path:
    """The shipped config with bf16 set and one pair per optimizer step (device-independent fields)."""
    config = json.loads((REPO / "ds_configs" / CONFIGS[offload]).read_text())
    config["bf16"] = {"enabled": dtype == "bf16"}
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    path = work / f"ds_{offload}_{dtype}.json"
    path.write_text(json.dumps(config))
    return path


def peak_rss_bytes(time_output: str) -> int:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    if not match:
        raise RuntimeError(f"no peak resident set size in:\n{time_output[-3000:]}")
    return int(match.group(1)) * 1024


def measured_peak(model: Path, ds_config: Path, data: Path, work: Path, swap: Path, extra=()) -> int:
    """Peak RSS of one training run, from /usr/bin/time -v (its output folder, checkpoints with the
    swapped optimizer state included, is deleted afterwards: several GiB a run)."""
    for role in ("policy", "reference"):
        (swap / role).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="run-") as output:
        command = [
            "/usr/bin/time", "-v", sys.executable, str(REPO / "launch/train.py"),
            "--ds_config", str(ds_config), "--model", str(model), "--data", str(data), "--output", output,
            "--max-steps", str(STEPS), "--budget", str(BUDGET), "--max-length", str(MAX_LENGTH),
            "--nvme-path", str(swap), "--overwrite", *extra,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return peak_rss_bytes(result.stderr)


def planned(ds_config: Path, model: Path, swap: Path, reference: str) -> tuple[float, dict]:
    """(predicted peak RSS on the CPU accelerator, the plan's totals): CPU RAM + GPU (module docstring)."""
    from dsdpo.planner.memory import RunShape, memory_plan
    from dsdpo.planner.shapes import model_shape
    from dsdpo.runtime.ds_config import read_ds_config, resolve_ds_config

    shape = model_shape(model)
    resolved = resolve_ds_config(
        read_ds_config(ds_config), world_size=1, total_steps=STEPS, nvme_path=str(swap),
        largest_parameter=shape.largest_parameter,
    )  # fmt: skip
    run = RunShape(max_length=MAX_LENGTH, budget=BUDGET, micro_batch=1, reference=reference)
    plan = memory_plan(shape, resolved, run, accelerator="cpu")
    cpu, gpu = plan.total(plan.cpu), plan.total(plan.gpu)
    # One RAM: the peak of both lists' items together (each phase's transients counted once).
    totals = {"cpu": cpu, "gpu": gpu, "parameters": shape.parameters, "active": shape.active_parameters}
    return plan.total(plan.cpu + plan.gpu), totals


def activation_table(dtype_name: str, rows=4, width=256, masked=128) -> None:
    """Predicted and measured activation bytes of one chunk of `rows` rows, `masked` positions each."""
    import torch

    from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
    from dsdpo.planner.activations import activation_bytes, no_grad_activation_bytes
    from dsdpo.planner.measure import measured_activation_bytes, scored_inputs
    from dsdpo.planner.shapes import model_shape

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    print(f"activations, {dtype_name}, chunk of {rows} rows x {width} tokens, {masked} masked a row")
    print(f"{'size':<8} {'what':<28} {'predicted MiB':>14} {'measured MiB':>14} {'ratio':>7}")
    for name, size in ACTIVATION_SIZES.items():
        config = llada_config(*size)
        config.pop("model_type")
        config = LLaDAConfig(**config)
        torch.manual_seed(0)
        model = LLaDAModelLM(config).to(dtype).train()
        shape, b = model_shape(config), torch.finfo(dtype).bits // 8
        inputs = scored_inputs(config.vocab_size, rows, width, masked, mask_token_id=config.mask_token_id)
        tokens, positions = rows * width, rows * masked
        cases = []
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            predicted = activation_bytes(shape, tokens, positions, b, checkpointing=checkpointing)
            what = f"grad, checkpointing {'on' if checkpointing else 'off'}"
            cases.append((what, predicted, measured_activation_bytes(model, inputs)))
        predicted = no_grad_activation_bytes(shape, tokens, positions, b)
        cases.append(("no grad", predicted, measured_activation_bytes(model, inputs, grad=False)))
        for what, predicted, measured in cases:
            mib = f"{predicted / 2**20:14.2f} {measured / 2**20:14.2f}"
            print(f"{name:<8} {what:<28} {mib} {predicted / measured:7.3f}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", nargs="+", default=DEFAULT_CASES, help="SIZE:cpu|nvme:fp32|bf16 (SIZES, MOE_SIZES)"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "planner_accuracy")
    parser.add_argument("--swap", type=Path, default=None, help="NVMe swap folder (default: under --work)")
    parser.add_argument("--baseline", action="store_true", help="measure the process baseline only")
    parser.add_argument("--reference-free", action="store_true", help="train without a reference engine")
    parser.add_argument("--activations", choices=["fp32", "bf16"], help="the activation formulas only")
    parser.add_argument(
        "--shipped", action="store_true", help="the shipped config as is (no bf16/batch change)"
    )
    args = parser.parse_args()
    if args.activations:
        activation_table(args.activations)
        return
    from dsdpo.training.demo import addition_pairs, write_jsonl

    args.work.mkdir(parents=True, exist_ok=True)
    swap = args.swap or args.work / "swap"
    data = write_jsonl(addition_pairs(32, seed=1), args.work / "pairs.jsonl")
    if args.baseline:
        peak = measured_peak(
            model_folder("tiny", args.work), REPO / "ds_configs/cpu.json", data, args.work, swap
        )
        print(f"process baseline (tiny LLaDA, ds_configs/cpu.json): peak RSS {peak / GIB:.3f} GiB")
        return
    print(
        f"rows of {MAX_LENGTH} tokens, budget {BUDGET}, {STEPS} steps of "
        + ("the shipped batch" if args.shipped else "1 pair")
        + (", reference-free; " if args.reference_free else ", reference engine; ")
        + "sizes (hidden, layers, heads, MLP, vocabulary): "
        + ", ".join(
            f"{n} {SIZES[n]}" if n in SIZES else f"{n} (hidden, layers, heads, {MOE_FIELDS}) {MOE_SIZES[n]}"
            for n in sorted({c.split(":")[0] for c in args.cases})
        )
    )
    columns = ("params", "active", "plan CPU", "plan GPU", "planned", "measured")
    header = f"{'case':<20} {columns[0]:>7} {columns[1]:>7} " + " ".join(f"{c:>9}" for c in columns[2:])
    print(header + f" {'ratio':>6}   (GiB; parameters in millions)", flush=True)
    ratios = []
    for case in args.cases:
        size, offload, dtype = case.split(":")
        model = model_folder(size, args.work)
        ds_config = (
            REPO / "ds_configs" / CONFIGS[offload]
            if args.shipped
            else case_ds_config(offload, dtype, args.work)
        )
        reference = "none" if args.reference_free else "engine"
        prediction, totals = planned(ds_config, model, swap, reference)
        extra = ["--reference-free"] if args.reference_free else []
        peak = measured_peak(model, ds_config, data, args.work, swap, extra)
        ratios.append(prediction / peak)
        print(
            f"{case:<20} {totals['parameters'] / 1e6:7.1f} {totals['active'] / 1e6:7.1f} "
            + " ".join(f"{v / GIB:9.2f}" for v in (totals["cpu"], totals["gpu"], prediction, peak))
            + f" {prediction / peak:6.3f}",
            flush=True,
        )
    print(f"planned / measured: {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} runs")


if __name__ == "__main__":
    main()
