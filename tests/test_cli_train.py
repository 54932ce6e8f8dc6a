"""`dsdpo train` is built from the settings schema, and `launch/train.py` is a shim over it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import click
import pytest
from click.testing import CliRunner

from dsdpo.cli import main
from dsdpo.cli.schema import schema_option
from dsdpo.cli.train import SCHEMA_OPTIONS, build_config
from dsdpo.config import ESTIMATORS, KEEP_BEST_METRICS, REMASKING, Config, config_from_dict, setting
from dsdpo.objective.losses import F_DIVERGENCES, OBJECTIVES
from dsdpo.runtime.ds_config import LR_SCHEDULERS
from tests.run_helpers import REPO

# Every flag launch/train.py documented before it became a shim: the same spelling, the same field.
DOCUMENTED = {
    "--model": "model.path", "--ref-model": "model.reference_path",
    "--reference-scores": "model.reference_scores", "--mask-token-id": "model.mask_token_id",
    "--trust-remote-code": "model.trust_remote_code",
    "--no-gradient-checkpointing": "model.gradient_checkpointing", "--lora-rank": "model.lora_rank",
    "--lora-alpha": "model.lora_alpha", "--lora-target-modules": "model.lora_target_modules",
    "--freeze": "model.freeze", "--data": "data.path", "--max-length": "data.max_length",
    "--max-prompt-length": "data.max_prompt_length", "--skip-invalid": "data.skip_invalid",
    "--refuse-long-prompts": "data.refuse_long_prompts", "--pad-responses-to": "data.pad_responses_to",
    "--estimator": "score.estimator",
    "--budget": "score.budget", "--trajectory-steps": "score.steps",
    "--max-tokens-per-forward": "score.max_tokens_per_forward",
    "--max-tokens-no-grad": "score.max_tokens_no_grad", "--no-antithetic": "score.antithetic",
    "--loss": "loss.type", "--beta": "loss.beta", "--label-smoothing": "loss.label_smoothing",
    "--reference-free": "loss.reference_free", "--loss-weights": "loss.weights",
    "--f-divergence": "loss.f_divergence", "--f-alpha": "loss.f_alpha",
    "--discopop-tau": "loss.discopop_tau", "--wpo-unaligned": "loss.wpo_unaligned",
    "--sft-weight": "loss.sft_weight", "--sft-per-response": "loss.sft_per_response",
    "--chosen-floor": "loss.chosen_floor", "--chosen-floor-per-token": "loss.chosen_floor_per_token",
    "--objective": "loss.objective", "--output": "train.output", "--overwrite": "train.overwrite",
    "--epochs": "train.epochs", "--max-steps": "train.max_steps", "--seed": "train.seed",
    "--log-every": "train.log_every", "--save-every": "train.save_every", "--keep-last": "train.keep_last",
    "--max-bad-steps": "train.max_bad_steps", "--ref-sync-steps": "train.ref_sync_steps",
    "--ref-sync-alpha": "train.ref_sync_alpha", "--eval-data": "train.eval_data",
    "--eval-every": "train.eval_every", "--eval-problems": "train.eval_problems",
    "--eval-num-problems": "train.eval_num_problems", "--eval-samples": "train.eval_samples",
    "--keep-best": "train.keep_best", "--eval-gen-length": "eval_sampler.gen_length",
    "--eval-block-length": "eval_sampler.block_length", "--eval-steps": "eval_sampler.steps",
    "--eval-temperature": "eval_sampler.temperature", "--eval-remasking": "eval_sampler.remasking",
    "--eval-cfg-scale": "eval_sampler.cfg_scale", "--eval-chat": "eval_sampler.chat",
    "--learning-rate": "train.learning_rate", "--lr-scheduler": "train.lr_scheduler",
    "--warmup-steps": "train.warmup_steps", "--warmup-ratio": "train.warmup_ratio",
    "--weight-decay": "train.weight_decay", "--per-device-batch-size": "train.per_device_batch_size",
    "--gradient-accumulation-steps": "train.gradient_accumulation_steps", "--report-to": "train.report_to",
}  # fmt: skip
RUN_FLAGS = {"--ds_config", "--deepspeed_config", "--config", "--set", "--resume", "--trust-checkpoint",
             "--nvme-path", "--demo"}  # fmt: skip


REQUIRED = {"model__path": "model", "data__path": "pairs.jsonl"}  # validation needs them


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", help_text))


@pytest.fixture(scope="module")
def helps():
    shim = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--help"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert shim.returncode == 0, shim.stderr
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return shim.stdout, result.output


def test_every_config_field_is_one_flag_of_its_documented_spelling():
    flags = {option.opts[0]: dotted for dotted, _, option in SCHEMA_OPTIONS}
    assert flags == DOCUMENTED
    fields = {
        f"{s}.{f.name}" for s, cls in typing.get_type_hints(Config).items() for f in dataclasses.fields(cls)
    }
    assert set(flags.values()) == fields


def test_dsdpo_train_and_the_shim_list_the_same_flags(helps):
    shim, command = helps
    assert _flags(shim) >= set(DOCUMENTED) | RUN_FLAGS
    assert {flag for flag in _flags(shim) if flag != "--help"} == {
        flag for flag in _flags(command) if flag != "--help"
    }
    assert "--local_rank" not in shim  # the launcher's, hidden


def test_choices_come_from_the_modules_that_implement_them():
    choices = {
        dotted: option.type.choices for dotted, _, option in SCHEMA_OPTIONS if hasattr(option.type, "choices")
    }
    assert choices == {
        "score.estimator": ESTIMATORS, "loss.f_divergence": F_DIVERGENCES, "loss.objective": OBJECTIVES,
        "train.keep_best": tuple(KEEP_BEST_METRICS), "eval_sampler.remasking": REMASKING,
        "train.lr_scheduler": tuple(LR_SCHEDULERS),
    }  # fmt: skip


@pytest.mark.parametrize("flag", ["--budget", "--max-length", "--beta", "--estimator", "--keep-last"])
def test_a_default_is_the_schemas_in_both_helps_and_in_a_config_file(helps, flag, tmp_path):
    """The default is written once, in dsdpo/config/: change it there and both helps and a config
    file without the field follow (checked by hand with score.budget 8 -> 5)."""
    dotted = DOCUMENTED[flag]
    section, name = dotted.split(".")
    default = getattr(getattr(Config(), section), name)
    for text in helps:
        line = " ".join(text.split())  # help wraps
        assert re.search(rf"{flag} \S+ .*?\(default {re.escape(str(default))}\)", line), (flag, text)
    empty = tmp_path / "train.yaml"
    empty.write_text(f"{section}: {{}}\n")
    values = {name: None for _, name, _ in SCHEMA_OPTIONS} | REQUIRED
    config, _ = build_config(values, config_file=str(empty), assignments=[], demo=False)
    assert getattr(getattr(config, section), name) == default


def test_file_then_flags_then_set_later_wins(tmp_path):
    file = tmp_path / "train.yaml"
    file.write_text("score:\n  budget: 3\n  estimator: one_over_t\nloss:\n  beta: 0.2\n")
    values = (
        {name: None for _, name, _ in SCHEMA_OPTIONS}
        | REQUIRED
        | {
            "score__budget": 5,
            "model__gradient_checkpointing": False,
        }
    )
    config, _ = build_config(values, config_file=str(file), assignments=["loss.beta=0.3"], demo=False)
    assert (config.score.budget, config.score.estimator, config.loss.beta) == (5, "one_over_t", 0.3)
    assert config.model.gradient_checkpointing is False and config.score.antithetic is True


def test_a_bad_value_is_one_error_line_with_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--model", str(tmp_path), "--data", "x.jsonl",
         "--set", "score.budgt=4", "--ds_config", str(REPO / "ds_configs" / "cpu.json")],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: command line: unknown field score.budgt")


def test_a_union_field_is_text_that_the_config_converts_naming_the_field():
    """A new option such as `max_tokens_per_forward: int | str | None` (a number or "auto") needs
    nothing but its field: the option passes the text on, dsdpo.config converts it."""

    @dataclasses.dataclass
    class Section:
        tokens: int | str | None = setting(None, "a number or auto")

    (spec,) = dataclasses.fields(Section)
    option = schema_option("score", spec, int | str | None, None)
    assert option.opts == ["--tokens"] and option.type is click.STRING
    assert config_from_dict({"score": {"budget": "5"}}).score.budget == 5  # text converted per field
