"""`dsdpo plan` as a user meets it: bad input is one line, --json is JSON alone, --ram-gib compares the
ways to run a job and names the fastest that fits, LoRA is planned as LoRA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dsdpo.cli import main
from dsdpo.families import LLADA, lora_targets
from dsdpo.families.llada import LLaDAModelLM
from dsdpo.planner.shapes import lora_parameters
from tests.test_planner import tiny_llada

FIXTURES = Path(__file__).parent / "fixtures" / "planner"
REPO = Path(__file__).resolve().parents[1]
LLADA_8B = str(FIXTURES / "llada-8b.json")
RTX4080 = str(REPO / "ds_configs" / "rtx4080.json")


def plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


def _config_with(tmp_path, change) -> str:
    config = json.loads(Path(RTX4080).read_text())
    change(config)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def _zero(**fields):
    return lambda config: config["zero_optimization"].update(fields)


@pytest.mark.parametrize(
    ("ds_change", "options", "message"),
    [
        (lambda c: c.update(bf16=True), [], '"bf16" must be a JSON object'),
        (_zero(offload_param={"device": "disk"}), [], "zero_optimization.offload_param.device"),
        (_zero(stage=2), [], "zero_optimization.stage must be 3"),
        (lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": False}), [], "fp16 is not supported"),
        (
            lambda c: c.update(zero_optimisation=c["zero_optimization"]),
            [],
            "did you mean 'zero_optimization'",
        ),
        (lambda c: c.update(train_micro_batch_size_per_gpu=0), [], "train_micro_batch_size_per_gpu must be"),
        (None, ["--micro-batch", "0"], "--micro-batch"),
        (None, ["--micro-batch", "-1"], "--micro-batch"),
        (None, ["--max-length", "0"], "--max-length"),
        (None, ["--gpus", "0"], "--gpus"),
        (None, ["--budget", "0"], "--budget"),
        (None, ["--ram-gib", "0"], "--ram-gib"),
        (None, ["--max-length", "512", "--response-length", "600"], "longer than --max-length 512"),
    ],
)
def test_bad_input_is_one_line(tmp_path, ds_change, options, message):
    ds_config = _config_with(tmp_path, ds_change) if ds_change else RTX4080
    result = plan("--model", LLADA_8B, "--ds_config", ds_config, *options)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_a_model_config_that_is_not_an_object_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    result = plan("--model", str(tmp_path), "--ds_config", RTX4080)
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == f"Error: {tmp_path / 'config.json'}: expected a JSON object of model settings, got list"
    )


def test_json_is_all_that_goes_to_stdout():
    dsdpo = [sys.executable, "-c", "from dsdpo.cli import main; main()"]
    command = [*dsdpo, "plan", "--model", LLADA_8B, "--ds_config", RTX4080, "--json"]
    # Without DS_ACCELERATOR DeepSpeed looks for an accelerator and says which it took, on stdout.
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["model"]["parameters"] == 8_015_581_184


def test_long_responses_are_bounded():
    """The output layer runs at every masked response position: the default plans responses as long as
    the row (the bound), and a shorter --response-length plans fewer masked positions."""
    bound = json.loads(plan("--model", LLADA_8B, "--ds_config", RTX4080, "--json").output)
    half = json.loads(
        plan("--model", LLADA_8B, "--ds_config", RTX4080, "--json", "--response-length", "512").output
    )
    assert bound["chunk"]["masked"] == bound["chunk"]["rows"] * 1024
    assert half["chunk"]["masked"] == half["chunk"]["rows"] * 512


def test_lora_parameters_are_those_peft_trains():
    config = tiny_llada()
    model = LLaDAModelLM(config)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=lora_targets("auto", LLADA)))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_parameters(config, 4) == trained
    assert trained > 0


def test_lora_parameters_of_all_linear_leave_out_the_output_layer(tiny_gemma_dir):
    from peft import LoraConfig, get_peft_model

    from dsdpo.models.loading import load_model

    model = load_model(tiny_gemma_dir)
    with torch.device("cpu"):
        peft = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_parameters(tiny_gemma_dir, 2) == trained


def test_ram_gib_finds_full_fine_tuning_of_llada_8b_in_64_gib():
    result = plan("--model", LLADA_8B, "--ds_config", RTX4080, "--ram-gib", "64", "--json")
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    best = parsed["fastest_fitting"]["full"]
    assert best is not None and best["fits"]
    assert best["totals"]["cpu"] <= 64 * 2**30 and best["totals"]["gpu"] <= 16 * 2**30
    assert Path(best["config"]).name in ("rtx4080_hybrid.json", "rtx4080_nvme.json")
    assert "--nvme-path" in best["command"]
    # Every setting that fits is no faster than the one named, and rtx4080.json (all in RAM) loses on RAM.
    fitting = [entry for entry in parsed["comparison"] if entry["fits"] and entry["kind"] == "full"]
    assert min(entry["seconds_per_pair"] for entry in fitting) == best["seconds_per_pair"]
    in_ram = [entry for entry in parsed["comparison"] if Path(entry["config"]).name == "rtx4080.json"]
    assert in_ram and all("CPU RAM" in entry["why_not"] for entry in in_ram)


def test_ram_gib_prints_the_winner_and_its_command():
    result = plan("--model", LLADA_8B, "--ds_config", RTX4080, "--ram-gib", "64")
    assert result.exit_code == 0, result.output
    assert "fastest full fine-tuning that fits:" in result.output
    assert "deepspeed launch/train.py --ds_config" in result.output
    assert "s per pair" in result.output


def test_a_mixture_of_experts_is_planned_with_its_active_parameters():
    """The tiny LLaDA-MoE fixture (released layout, model_type "llada" with num_experts): 2 blocks, the
    second with 4 experts of 3 x 32 x 16 weights, 2 of them routed per token."""
    from dsdpo.planner.shapes import model_shape

    shape = model_shape(Path(__file__).parent / "fixtures" / "families" / "llada_moe")
    assert shape.model_type == "llada" and shape.layers == 2
    idle_experts = (4 - 2) * 3 * 32 * 16
    assert shape.parameters == 27712
    assert shape.active_parameters == shape.parameters - idle_experts
    assert shape.intermediate == 2 * 16 + 24  # two routed experts and the shared one, side by side


def test_lora_is_planned_as_lora():
    """--lora-rank: the frozen weights get no gradients or optimizer state, so rtx4080_lora.json's
    optimizer on the GPU holds the adapters' states only; the reference is the model, adapters off."""
    lora_config = str(REPO / "ds_configs" / "rtx4080_lora.json")
    full = json.loads(plan("--model", LLADA_8B, "--ds_config", lora_config, "--json").output)
    lora = json.loads(
        plan("--model", LLADA_8B, "--ds_config", lora_config, "--json", "--lora-rank", "16").output
    )
    adapters = lora_parameters(LLADA_8B, 16)
    assert lora["run"]["trainable_parameters"] == adapters and lora["run"]["reference"] == "adapter"
    states = {item["name"]: item["bytes"] for item in lora["gpu"]}
    assert states["fp32 master weights + Adam's two moments"] == 12 * adapters
    assert states["fp32 master weights + Adam's two moments"] < 1 * 2**30
    assert lora["totals"]["gpu"] < full["totals"]["gpu"] - 100 * 2**30  # no Adam state for 8 B weights
    assert lora["sweeps"]["reference"] == full["sweeps"]["reference"]  # adapters off: still a sweep
