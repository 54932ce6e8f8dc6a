"""The training options that fill the DeepSpeed JSON's "auto" values (learning rate, schedule, warmup,
weight decay, batch), as Hugging Face's Trainer does; and the schedule the engine then applies."""

import inspect
import json
import math

import pytest
from deepspeed.runtime import lr_schedules

from dsdpo.config import TrainConfig
from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config import BATCH_FIELDS, read_ds_config, resolve_ds_config
from tests.run_helpers import REPO

# Each shipped config resolved by the code before its values became "auto" (world size 8 for
# multi_gpu.json, 100 steps, NVMe planned), recorded when they did.
BEFORE = json.loads((REPO / "tests" / "fixtures" / "ds_configs_resolved_before_auto.json").read_text())


def _resolve(raw, options=None, total_steps=100, world_size=1, source="ds.json", lora=False):
    return resolve_ds_config(
        raw,
        world_size=world_size,
        total_steps=total_steps,
        options=options,
        largest_parameter=126464 * 4096,
        source=source,
        planning=True,
        lora=lora,
    )


def _auto_config(**scheduler_params) -> dict:
    """ds_configs/cpu.json with every option-filled value "auto"."""
    raw = read_ds_config(REPO / "ds_configs" / "cpu.json")
    raw.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    raw["optimizer"]["params"].update(lr="auto", weight_decay="auto")
    raw["scheduler"] = {"type": "auto", "params": scheduler_params}
    return raw


def _with_default_warmup_type(resolved: dict) -> dict:
    """The old files left warmup_type to DeepSpeed's default; the new ones name it."""
    scheduler = getattr(lr_schedules, resolved["scheduler"]["type"])
    default = inspect.signature(scheduler).parameters["warmup_type"].default
    resolved["scheduler"]["params"].setdefault("warmup_type", default)
    return resolved


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_shipped_configs_without_options_resolve_as_before_they_said_auto(name):
    world_size = 8 if name == "multi_gpu.json" else 1
    raw = read_ds_config(REPO / "ds_configs" / name)
    lora = name == "rtx4080_lora.json"  # used with --lora-rank: the adapters' defaults
    resolved = _resolve(raw, TrainConfig(), world_size=world_size, source=name, lora=lora)
    assert _with_default_warmup_type(resolved) == _with_default_warmup_type(BEFORE[name])


def test_every_recipe_for_one_card_takes_the_rate_and_decay_options():
    """The rtx4080 recipes say "auto" where an option fills (HF's convention): --learning-rate and
    --weight-decay are taken, not refused as given both ways; the LoRA recipe's defaults differ only."""
    options = TrainConfig(learning_rate=2e-5, weight_decay=0.01)
    for path in sorted((REPO / "ds_configs").glob("rtx4080*.json")):
        lora = path.name == "rtx4080_lora.json"
        params = _resolve(read_ds_config(path), options, source=path.name, lora=lora)["optimizer"]["params"]
        assert (params["lr"], params["weight_decay"]) == (2e-5, 0.01), path.name
    lora_defaults = _resolve(read_ds_config(REPO / "ds_configs/rtx4080.json"), TrainConfig(), lora=True)
    assert (
        lora_defaults["optimizer"]["params"]["lr"],
        lora_defaults["optimizer"]["params"]["weight_decay"],
    ) == (
        5e-5,
        0.0,
    )


def test_options_fill_the_auto_values():
    options = TrainConfig(
        learning_rate=3e-6, weight_decay=0.05, per_device_batch_size=4, gradient_accumulation_steps=8
    )
    resolved = _resolve(
        _auto_config(warmup_min_ratio=0.1, warmup_type="log"), options, world_size=2, total_steps=50
    )
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["gradient_accumulation_steps"] == 8
    assert resolved["train_batch_size"] == 4 * 8 * 2
    assert resolved["optimizer"]["params"]["lr"] == 3e-6
    assert resolved["optimizer"]["params"]["weight_decay"] == 0.05
    assert resolved["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.1 * 3e-6,
            "warmup_max_lr": 3e-6,
            "warmup_num_steps": 20,
            "warmup_type": "log",
            "total_num_steps": 50,
        },
    }


def test_a_fixed_train_batch_size_still_derives_its_auto_parts_and_a_missing_key_takes_the_option():
    raw = _auto_config()
    raw["train_batch_size"] = 8  # micro-batch and accumulation "auto": 1 × 8, as before the options
    del raw["optimizer"]["params"]["weight_decay"]
    resolved = _resolve(raw, TrainConfig(weight_decay=0.05))
    assert [resolved[key] for key in BATCH_FIELDS] == [8, 1, 8]
    assert resolved["optimizer"]["params"]["weight_decay"] == 0.05
    assert "weight_decay" not in _resolve(raw, TrainConfig())["optimizer"]["params"]  # AdamW's own default


@pytest.mark.parametrize(
    ("options", "scheduler"),
    [
        (
            dict(lr_scheduler="cosine", warmup_ratio=0.1),  # ceil(0.1 × 95) = 10
            {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": 95,
                    "warmup_min_ratio": 0.0,
                    "cos_min_ratio": 0.0,
                    "warmup_num_steps": 10,
                    "warmup_type": "linear",
                },
            },
        ),
        (
            dict(lr_scheduler="linear", warmup_ratio=0.011),  # ceil(1.045) = 2, where int() gives 1
            {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": 5e-7,
                    "warmup_num_steps": 2,
                    "warmup_type": "linear",
                    "total_num_steps": 95,
                },
            },
        ),
        (
            dict(lr_scheduler="constant", warmup_steps=3),
            {
                "type": "WarmupLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": 5e-7,
                    "warmup_num_steps": 3,
                    "warmup_type": "linear",
                },
            },
        ),
        (
            dict(lr_scheduler="linear", warmup_steps=0),  # DeepSpeed refuses 0 steps: 1, as transformers
            {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": 5e-7,
                    "warmup_num_steps": 1,
                    "warmup_type": "linear",
                    "total_num_steps": 95,
                },
            },
        ),
        (dict(lr_scheduler="constant", warmup_steps=0), None),  # the optimizer's rate, untouched
    ],
)
def test_lr_scheduler_and_warmup_lay_out_deepspeeds_scheduler(options, scheduler):
    resolved = _resolve(_auto_config(), TrainConfig(**options), total_steps=95)
    assert resolved.get("scheduler") == scheduler


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(learning_rate=1e-4),
            r"cpu.json: optimizer.params.lr is 0.002 and --learning-rate \(train.learning_rate\) 0.0001 is",
        ),
        (dict(weight_decay=0.1), r"cpu.json: optimizer.params.weight_decay is 0.0 and --weight-decay"),
        (dict(per_device_batch_size=4), r"train_micro_batch_size_per_gpu is 2 and --per-device-batch-size"),
        (dict(gradient_accumulation_steps=4), r"accumulation_steps is 2 and --gradient-accumulation-steps"),
        (dict(lr_scheduler="cosine"), r"cpu.json: scheduler.type is 'WarmupDecayLR' and --lr-scheduler"),
        (dict(warmup_steps=5), r"cpu.json: scheduler.params.warmup_num_steps is 2 and --warmup-steps"),
        (dict(warmup_ratio=0.5), r"cpu.json: scheduler.params.warmup_num_steps is 2 and --warmup-ratio"),
    ],
)
def test_a_value_in_the_json_and_as_an_option_is_an_error_naming_both(options, message):
    with pytest.raises(DsdpoError, match=message):
        _resolve(read_ds_config(REPO / "ds_configs" / "cpu.json"), TrainConfig(**options), source="cpu.json")


def test_a_schedule_option_without_a_scheduler_block_says_what_to_add():
    raw = read_ds_config(REPO / "ds_configs" / "cpu.json")
    del raw["scheduler"]
    for options in (dict(lr_scheduler="linear"), dict(warmup_steps=3)):
        with pytest.raises(DsdpoError, match=r'needs a scheduler block: add "scheduler": \{"type": "auto"\}'):
            _resolve(raw, TrainConfig(**options))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(warmup_steps=2, warmup_ratio=0.1), "train.warmup_steps and train.warmup_ratio: give one"),
        (dict(warmup_ratio=1.5), "train.warmup_ratio: a fraction of the run"),
        (dict(learning_rate=-1.0), "train.learning_rate must be a finite number >= 0"),
        (dict(learning_rate=math.nan), "train.learning_rate must be a finite number >= 0"),
        (dict(per_device_batch_size=0), "train.per_device_batch_size must be at least 1"),
        (dict(report_to="tensorboard,comet"), "train.report_to: unknown comet"),
    ],
)
def test_bad_option_values_name_the_field(options, message):
    with pytest.raises(DsdpoError, match=message):
        TrainConfig(**options).validate()


def _engine_rates(resolved: dict, steps: int) -> list[float]:
    """The learning rate a DeepSpeed engine reports before each of `steps` optimizer steps of a tiny
    linear model, built from the resolved config (its scheduler, its optimizer)."""
    import deepspeed
    import torch

    from dsdpo.runtime.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=resolved)
    rates = []
    for _ in range(steps):
        engine.backward(engine(torch.ones(1, 4)).sum())
        rates.append(float(engine.get_lr()[0]))
        engine.step()
    return rates


def _transformers_rates(kind: str, peak: float, warmup: int, steps: int) -> list[float]:
    """transformers' own schedule: the rate of each step, as its Trainer applies them."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_the_engines_rates_are_transformers_schedule_one_step_late_in_the_warmup(kind):
    """--lr-scheduler builds DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR (the shipped
    configs' kind, checkpointed with the engine). With a linear warmup from 0 (the "auto" block's
    default) they are transformers' schedules, but DeepSpeed's scheduler first steps after the first
    update, so its warmup runs one step late; WarmupDecayLR's decay too, while WarmupCosineLR counts
    its decay from the warmup's last step and so meets transformers' cosine after the warmup."""
    peak, warmup, steps = 1e-3, 3, 10
    options = TrainConfig(
        lr_scheduler=kind, learning_rate=peak, warmup_steps=warmup, per_device_batch_size=1,
        gradient_accumulation_steps=1,
    )  # fmt: skip
    raw = _auto_config()
    raw.pop("gradient_clipping")
    engine = _engine_rates(_resolve(raw, options, total_steps=steps), steps)
    reference = _transformers_rates(kind, peak, warmup, steps)
    late = [reference[0], *reference[:-1]]  # step k applies transformers' rate of step k - 1
    expected = [*late[: warmup + 1], *reference[warmup + 1 :]] if kind == "cosine" else late
    assert engine == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(engine) == pytest.approx(peak if kind != "cosine" else reference[warmup + 1])


def test_dsdpo_train_refuses_a_value_given_both_ways_before_deepspeed_starts(tiny_gemma_dir, tmp_path):
    from dsdpo.training.demo import addition_pairs, write_jsonl
    from tests.cli_helpers import run

    data = write_jsonl(addition_pairs(8, seed=3), tmp_path / "pairs.jsonl")
    ds_config = REPO / "ds_configs" / "cpu.json"
    args = ["--ds_config", ds_config, "--model", tiny_gemma_dir, "--data", data, "--output", tmp_path / "run"]
    result = run("train", *args, "--learning-rate", "1e-4")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {ds_config}: optimizer.params.lr is 0.002 and --learning-rate (train.learning_rate) 0.0001 "
        'is given too: set it in one place (write "auto" in the JSON to take the option)'
    )
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_yaml_config_sets_the_same_options(tmp_path):
    from dsdpo.config import config_from_dict, load_config_file

    (tmp_path / "train.yaml").write_text(
        "model: {path: m}\ndata: {path: d.jsonl}\n"
        "train: {learning_rate: 2e-6, lr_scheduler: cosine, warmup_ratio: 0.25,\n"
        "        gradient_accumulation_steps: 4}\n"
    )
    options = config_from_dict(load_config_file(tmp_path / "train.yaml")).validate().train
    resolved = _resolve(read_ds_config(REPO / "ds_configs" / "rtx4080.json"), options, total_steps=10)
    assert resolved["optimizer"]["params"]["lr"] == 2e-6 and resolved["gradient_accumulation_steps"] == 4
    assert resolved["scheduler"]["type"] == "WarmupCosineLR"
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 3  # ceil(0.25 × 10)
