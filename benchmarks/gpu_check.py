"""The GPU check (issue 22): what a lent CUDA machine measures, in one command and one JSON file.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out benchmarks/gpu_check.json]   # one H100, < 8 min
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run                              # the CPU, a tiny model

Runs offline on a machine with only this repository and its pip install:

1. tests/test_gpu.py (the tests marked `gpu`), with a time limit.
2. A ~1B LLaDA-format model (dsdpo's LLaDA, random weights, LLaDA's 126464-token vocabulary) and
   the character tokenizer of dsdpo.models.tiny, written to a temporary folder; synthetic pairs whose
   rows are exactly --prompt-tokens + --response-tokens wide (responses filled with EOS).
3. For each DeepSpeed config (default rtx4080.json and rtx4080_hybrid.json, with the batch triple
   replaced by 1 pair × --accumulation so that a step is short): the planner's GPU peak, time per
   pair and FLOPs per step (dsdpo.planner.report) for that run shape, then --steps real steps of
   `deepspeed launch/train.py` on the GPU. Measured from metrics.jsonl: gpu_peak_memory_mb
   (torch.cuda.max_memory_allocated of the whole run), seconds per step (the first step, with its
   warm-up, left out), hence seconds per pair and achieved TFLOPS (planner FLOPs / measured time:
   a lower bound of the matmul efficiency, since a step also waits on PCIe and the CPU's Adam).
4. The compute alone: forward and backward of one chunk of the trainer's size on the model held
   whole on the GPU (no ZeRO), timed; TFLOPS against the card's bf16 peak is the number that the
   planner's MATMUL_EFFICIENCY (0.4) assumes.
5. The sampler: dsdpo.evaluation.sampler on a few prompts, generated tokens per second.

Time on one H100, by design (nothing measured yet): the tests at most --tests-timeout (200 s: six
training subprocesses of tiny models; they also compile DeepSpeed's cpu_adam and async_io ops that
the runs reuse), the model ~15 s, each run at most --run-timeout (115 s: start-up, 3 steps, the
final checkpoint of ~16 GB, deleted after; the planner puts a step at 1.7 s under rtx4080.json,
~12 s with the optimizer on NVMe; a run cut short still reports the steps it logged), compute and
sampler ~20 s: at most ~7.8 minutes. A part that fails or runs out of time is recorded as such and
the rest go on. With --dry-run the same code runs on the CPU accelerator with a tiny LLaDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Compiled DeepSpeed ops (cpu_adam, async_io) are built once by the tests and reused by the runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dsdpo.models.tiny import build_tokenizer  # noqa: E402
from dsdpo.planner.cards import card  # noqa: E402
from dsdpo.planner.memory import RunShape  # noqa: E402
from dsdpo.planner.monitor import offloads_to_nvme  # noqa: E402
from dsdpo.planner.report import GIB, plan, step_flops  # noqa: E402
from dsdpo.planner.shapes import model_shape  # noqa: E402
from dsdpo.planner.sweeps import Sweeps, sweeps_per_step  # noqa: E402
from dsdpo.runtime.ds_config import read_ds_config  # noqa: E402
from dsdpo.training.demo import write_jsonl  # noqa: E402
from tests.run_helpers import free_port, nvme_available  # noqa: E402

CONFIGS = ("rtx4080.json", "rtx4080_hybrid.json")
# (hidden, layers, heads, MLP width, vocabulary): "1b" is 1.13 B parameters, 0.52 B of them the
# embedding and output layer of LLaDA's vocabulary (whose masked-position logits dominate memory).
SIZES = {"1b": (2048, 12, 16, 5632, 126464), "tiny": (64, 2, 4, 128, 512)}


@dataclass(frozen=True)
class Shape:
    """The run every part measures: rows of prompt + response tokens, 1 pair a micro-batch."""

    prompt_tokens: int
    response_tokens: int
    budget: int
    accumulation: int
    max_tokens_per_forward: int
    max_tokens_no_grad: int
    steps: int

    @property
    def width(self) -> int:
        return self.prompt_tokens + self.response_tokens

    def run_shape(self) -> RunShape:
        return RunShape(
            max_length=self.width, response_length=self.response_tokens, budget=self.budget,
            micro_batch=1, accumulation=self.accumulation, max_tokens_per_forward=self.max_tokens_per_forward,
            max_tokens_no_grad=self.max_tokens_no_grad, gradient_checkpointing=True, reference="engine",
        )  # fmt: skip


# --- inputs: model, data, configs ---


def build_model(folder: Path, dims: tuple[int, int, int, int, int], device: str) -> Path:
    """dsdpo's LLaDA (the published config with the widths `dims`: hidden, layers, heads, MLP width,
    vocabulary), random bf16 weights, and the character tokenizer of dsdpo.models.tiny, as a model folder."""
    tokenizer = build_tokenizer()
    hidden, layers, heads, mlp, vocab = dims
    published = json.loads((REPO / "tests/fixtures/planner/llada-8b.json").read_text())
    published.pop("model_type")
    published.update(
        d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=mlp,
        vocab_size=vocab, embedding_size=vocab, mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation of a 1B model is minutes on the CPU
        LLaDAModelLM(LLaDAConfig(**published)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if device == "cuda":
        torch.cuda.empty_cache()  # the training runs that follow are other processes
    return folder


def write_pairs(path: Path, count: int, shape: Shape) -> Path:
    """Pairs whose prompt is `prompt_tokens` characters (one token each) and whose responses are
    short texts filled with EOS to `response_tokens` by --pad-responses-to: every row is as wide."""
    rows = [
        {
            "id": f"p{i}",
            "prompt": f"{i:06d}".rjust(shape.prompt_tokens, "x"),
            "chosen": "yes",
            "rejected": "no",
        }
        for i in range(count)
    ]
    return write_jsonl(rows, path)


def check_config(name: str, accumulation: int) -> dict:
    """The shipped config with 1 pair a micro-batch × `accumulation`, everything else as shipped."""
    config = read_ds_config(REPO / "ds_configs" / name)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=accumulation)
    config.update(train_batch_size=accumulation)
    return config


# --- the planner ---


def planned(model_dir: Path, ds_config: dict, shape: Shape, card_name: str) -> dict:
    """The planner's numbers for this run: GPU peak, time per pair on the card, FLOPs per step."""
    run = shape.run_shape()
    result = plan(model_dir, ds_config, run, card(card_name))
    return {
        "gpu_peak_gib": result["totals"]["gpu"] / GIB,
        "fits_rtx4080": result["totals"]["gpu"] <= card("rtx4080").memory_bytes,
        "cpu_gib": result["totals"]["cpu"] / GIB,
        "nvme_gib": result["totals"]["nvme"] / GIB,
        "seconds_per_pair": [result["seconds"]["per_pair_overlapped"], result["seconds"]["per_pair_serial"]],
        "sweeps_per_step": result["sweeps"]["total"],
        "step_tflop": step_flops(shape := model_shape(model_dir), run, sweeps_per_step(shape, run)) / 1e12,
    }


# --- a training run ---


def run_command(command: list, *, env: dict, timeout: float, log: Path) -> dict:
    """Run `command` in its own process group (the launcher's children die with it on a timeout)."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = "timeout"
    return {"returncode": code, "seconds": time.perf_counter() - started, "log_tail": log.read_text()[-2000:]}


def swap_folder(output: Path) -> Path:
    """Where a run's NVMe offload swaps (used by configs that offload to "nvme")."""
    return output.with_name(f"{output.name}-swap")


def train(ds_config_file: Path, model_dir: Path, data: Path, output: Path, shape: Shape, args) -> dict:
    """`deepspeed launch/train.py` for shape.steps steps of this config, on one GPU (or the CPU)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [
        launcher, "--num_gpus", "1", "--master_port", str(free_port()), REPO / "launch" / "train.py",
        "--ds_config", ds_config_file, "--model", model_dir, "--data", data, "--output", output,
        "--max-length", shape.width, "--pad-responses-to", shape.response_tokens, "--budget", shape.budget,
        "--max-tokens-per-forward", shape.max_tokens_per_forward,
        "--max-tokens-no-grad", shape.max_tokens_no_grad, "--max-steps", shape.steps,
        "--nvme-path", swap_folder(output),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": accelerator(args)}
    output.mkdir(parents=True, exist_ok=True)
    swap_folder(output).mkdir(exist_ok=True)
    return run_command(list(map(str, command)), env=env, timeout=args.run_timeout, log=output / "train.log")


def measured(metrics_file: Path, pairs_per_step: int, step_tflop: float) -> dict:
    """Peak GPU memory, seconds per step and per pair, and achieved TFLOPS, from metrics.jsonl (the
    first step, which pays CUDA's and DeepSpeed's warm-up, left out when there are more)."""
    lines = metrics_file.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]  # a run killed mid-line
    timed = records[1:] or records
    seconds = sum(r["seconds"] for r in timed) / len(timed)
    peak = max((r.get("gpu_peak_memory_mb") for r in records), default=None, key=lambda v: v or 0)
    return {
        "steps": len(records),
        "gpu_peak_gib": peak / 1024 if peak else None,
        "seconds_per_step": seconds,
        "seconds_per_pair": seconds / pairs_per_step,
        "achieved_tflops": step_tflop / seconds,
        "sweeps_per_step": timed[-1]["sweeps"],
        # Tokens a row (attention mask), to show the planner's FLOPs were counted for rows this wide.
        "tokens_per_row": timed[-1]["tokens_per_s"] * timed[-1]["seconds"] / (2 * pairs_per_step),
        "loss": [r["loss"] for r in records],
    }


def check_run(name: str, model_dir: Path, data: Path, shape: Shape, args) -> dict:
    """Plan and measure one config; the run's folder (a checkpoint of several GB) is deleted after."""
    if not (REPO / "ds_configs" / name).is_file():
        return {"skipped": f"ds_configs/{name} does not exist on this branch"}
    ds_config = check_config(name, shape.accumulation)
    if offloads_to_nvme(ds_config) and not nvme_available():
        return {"skipped": "no libaio: NVMe offload cannot run"}
    result = {"planned": planned(model_dir, ds_config, shape, args.card)}
    config_file = Path(args.work_dir) / f"ds-{name}"
    config_file.write_text(json.dumps(ds_config))
    output = Path(args.work_dir) / f"run-{Path(name).stem}"
    result["run"] = train(config_file, model_dir, data, output, shape, args)
    metrics = output / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        result["measured"] = measured(metrics, shape.accumulation, result["planned"]["step_tflop"])
        peak = result["measured"]["gpu_peak_gib"]
        result["gpu_peak_measured_over_planned"] = peak / result["planned"]["gpu_peak_gib"] if peak else None
    for folder in (output, swap_folder(output)):  # a checkpoint and swap files: GBs each for the 1B model
        shutil.rmtree(folder, ignore_errors=True)
    return result


# --- compute and sampler, in this process ---


def accelerator(args) -> str:
    return "cpu" if args.dry_run else "cuda"


def timed(function, device: str, repeats: int) -> float:
    """Seconds of one call, the mean of `repeats` after one warm-up call."""
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def compute_rate(model, shape: Shape, card_name: str, device: str) -> dict:
    """One chunk of max_tokens_per_forward tokens, forward and backward with gradient checkpointing,
    on the whole model held on the device: the matmul rate the planner multiplies by 0.4."""
    from dsdpo.objective.logprobs import MaskedTokenScorer
    from dsdpo.planner.measure import scored_inputs

    rows = max(2, shape.max_tokens_per_forward // shape.width // 2 * 2)  # chosen and rejected rows
    masked = shape.response_tokens // 2  # what step_flops counts: half the response masked
    config = model.config
    inputs = scored_inputs(config.vocab_size, rows, shape.width, masked, mask_token_id=config.mask_token_id)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    scorer = MaskedTokenScorer(model)
    seconds = timed(lambda: scorer(**inputs).sum().backward(), device, repeats=3)
    chunk = RunShape(
        max_length=shape.width, response_length=shape.response_tokens, budget=rows // 2, micro_batch=1,
        accumulation=1, reference="none",
    )  # fmt: skip
    flops = step_flops(model_shape(config), chunk, Sweeps(0, 0, 1, one_pass=True))
    return {
        "rows": rows,
        "tokens": rows * shape.width,
        "seconds": seconds,
        "tflops": flops / seconds / 1e12,
        "fraction_of_bf16_peak": flops / seconds / card(card_name).bf16_flops,
    }


def sampler_rate(model, tokenizer, device: str, *, prompts: int, gen_length: int) -> dict:
    """Greedy LLaDA sampling of `prompts` prompts, one token revealed a step: answer tokens a second."""
    from dsdpo.evaluation.sampler import generate

    prompt_ids = [tokenizer(f"Question {i}: what is {i} + {i}?").input_ids for i in range(prompts)]

    def sample():
        with torch.no_grad():
            generate(
                model, prompt_ids, mask_token_id=model.config.mask_token_id, gen_length=gen_length,
                block_length=min(32, gen_length), steps=gen_length, device=torch.device(device),
            )  # fmt: skip

    seconds = timed(sample, device, repeats=1)
    return {
        "prompts": prompts,
        "gen_length": gen_length,
        "seconds": seconds,
        "tokens_per_s": prompts * gen_length / seconds,
    }


def in_process_rates(model_dir: Path, shape: Shape, args) -> dict:
    from dsdpo.models.loading import load_model, load_tokenizer

    device = accelerator(args)
    model = load_model(model_dir, dtype="bf16").to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rates = {"compute": compute_rate(model.train(), shape, args.card, device)}
    model.zero_grad(set_to_none=True)
    gen_length = 16 if args.dry_run else 128
    rates["sampler"] = sampler_rate(
        model.eval(), load_tokenizer(model_dir), device, prompts=args.prompts, gen_length=gen_length
    )
    return rates


# --- the whole check ---


def run_tests(args) -> dict:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_gpu.py",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = run_command(command, env=env, timeout=args.tests_timeout, log=Path(args.work_dir) / "pytest.log")
    lines = result["log_tail"].strip().splitlines()
    return {**result, "summary": lines[-1] if lines else ""}


def environment(args) -> dict:
    import deepspeed

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu"
    return {
        "device": device,
        "card_for_peak_rates": args.card,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "commit": commit.strip(),
    }


def table(report: dict) -> str:
    """The numbers a reader looks for, one line per config."""
    header = ("config", "plan GiB", "peak GiB", "peak/plan", "plan s/pair", "s/pair", "TFLOPS")
    lines = [
        f"{report['environment']['device']}: tests {report['tests'].get('summary', report['tests'])}",
        "".join(f"{h:>14}" for h in header),
    ]
    for name, run in report["runs"].items():
        if "measured" not in run:
            lines.append(f"{name:>14}  {run.get('skipped') or run['run']['returncode']}")
            continue
        p, m = run["planned"], run["measured"]
        fast, slow = p["seconds_per_pair"]
        cells = (
            p["gpu_peak_gib"], m["gpu_peak_gib"], run["gpu_peak_measured_over_planned"],
            f"{fast:.3g}..{slow:.3g}", m["seconds_per_pair"], m["achieved_tflops"],
        )  # fmt: skip
        lines.append(f"{Path(name).stem[:14]:>14}" + "".join(f"{_cell(c):>14}" for c in cells))
    for part in ("compute", "sampler"):
        lines.append(f"{part}: {json.dumps(report.get(part))}")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.3g}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the CPU accelerator and a tiny model")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="files in ds_configs/")
    parser.add_argument(
        "--card", default="h100-sxm", help="card table entry whose bf16 peak TFLOPS divide by"
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2, help="pairs a step (1 a micro-batch)")
    parser.add_argument("--max-tokens-per-forward", type=int, default=2048)
    parser.add_argument("--max-tokens-no-grad", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps a config (the first untimed)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts the sampler answers together")
    parser.add_argument("--tests-timeout", type=float, default=200)
    parser.add_argument("--run-timeout", type=float, default=115, help="seconds a config's training run")
    parser.add_argument("--work-dir", default=None, help="model, runs and NVMe swap (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.prompt_tokens, args.response_tokens = min(args.prompt_tokens, 16), min(args.response_tokens, 16)
        args.max_tokens_per_forward, args.max_tokens_no_grad = 64, 256
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    keep_work = args.work_dir is not None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dsdpo-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)
    shape = Shape(
        args.prompt_tokens, args.response_tokens, args.budget, args.accumulation,
        args.max_tokens_per_forward, args.max_tokens_no_grad, args.steps,
    )  # fmt: skip
    report = {"environment": environment(args), "shape": asdict(shape)}
    report["tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_tests(args)
    size = "tiny" if args.dry_run else "1b"
    model_dir = build_model(work / "model", SIZES[size], accelerator(args))
    report["model"] = {"size": size, "dims": SIZES[size], "parameters": model_shape(model_dir).parameters}
    data = write_pairs(work / "pairs.jsonl", shape.accumulation * shape.steps, shape)
    report["runs"] = {name: check_run(name, model_dir, data, shape, args) for name in args.configs}
    report.update(in_process_rates(model_dir, shape, args))
    report["elapsed_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
