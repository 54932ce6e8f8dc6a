"""Export round trip: a checkpoint of a trained ZeRO-3 policy -> HF folder -> same scores."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from dsdpo.cli import main
from dsdpo.errors import DsdpoError
from dsdpo.models.loading import load_config, load_model, load_tokenizer
from dsdpo.objective.elbo import forward_rows
from dsdpo.objective.logprobs import MaskedTokenScorer
from dsdpo.runtime.checkpoint import (
    STATE_FILE,
    TrainState,
    check_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dsdpo.runtime.dist import barrier
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.ds_helpers import MASK, cpu_ds_config, engines_for, micro_step


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, tokenizer, tmp_path_factory):
    """A policy after one real optimizer step, its checkpoint, and its scores on some rows."""
    engines = engines_for(tiny_gemma_dir, cpu_ds_config())
    _, batch, draws = micro_step(engines, tokenizer, [0, 1])
    engines.policy.step()
    output = tmp_path_factory.mktemp("run")
    hf_config, hf_tokenizer = load_config(tiny_gemma_dir), load_tokenizer(tiny_gemma_dir)
    save_checkpoint(
        engines.policy,
        output,
        TrainState(step=1),
        config={},
        world_size=1,
        is_rank0=True,
        save_hf_files=lambda f: (hf_config.save_pretrained(f), hf_tokenizer.save_pretrained(f)),
        keep_last=2,
        barrier=barrier,
    )
    inputs = forward_rows(batch, draws, torch.arange(draws.num_rows), MASK)
    with torch.no_grad():
        policy_scores = engines.policy(**inputs)
        reference_scores = engines.reference(**inputs)
    return output, inputs, policy_scores, reference_scores


def test_exported_folder_loads_with_transformers_and_scores_like_the_policy(trained, tmp_path):
    output, inputs, policy_scores, reference_scores = trained
    result = CliRunner().invoke(main, ["export", str(output), str(tmp_path / "hf"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        exported = MaskedTokenScorer(model)(**inputs)
    assert torch.allclose(exported, policy_scores, atol=1e-5)
    assert not torch.allclose(exported, reference_scores, atol=1e-3)  # training moved it
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tie kept
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_bf16_sharded_export_has_an_index_and_loads(trained, tmp_path):
    output, inputs, policy_scores, _ = trained
    result = CliRunner().invoke(
        main, ["export", str(output / "step_000001"), str(tmp_path / "hf"), "--max-shard-size", "40KB"]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        exported = MaskedTokenScorer(model.float())(**inputs)
    assert torch.allclose(exported, policy_scores, rtol=2e-2, atol=0.1)  # bf16 rounding of the weights


def test_dsdpo_commands_take_a_checkpoint_folder_as_a_model(trained):
    output, inputs, policy_scores, _ = trained
    model = load_model(output)  # the run folder: its newest complete checkpoint
    with torch.no_grad():
        assert torch.allclose(MaskedTokenScorer(model.eval())(**inputs), policy_scores, atol=1e-5)
    assert load_tokenizer(output).mask_token == "[MASK]"


def test_export_of_a_partial_or_missing_checkpoint_is_a_one_line_error(tmp_path):
    partial = tmp_path / "step_000009"
    partial.mkdir()
    for target in (partial, tmp_path / "nothing"):
        result = CliRunner().invoke(main, ["export", str(target), str(tmp_path / "out")])
        assert result.exit_code == 1
        assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


def test_checkpoint_from_another_world_size_or_corrupt_is_a_clear_error(trained, tmp_path):
    output, *_ = trained
    with pytest.raises(
        DsdpoError, match=r"written with world size 1 and this run has 2.*dsdpo convert-checkpoint"
    ):
        load_checkpoint(None, output / "step_000001", world_size=2)
    copy = tmp_path / "step_000001"
    shutil.copytree(output / "step_000001", copy)
    (copy / STATE_FILE).write_text("{truncated")
    with pytest.raises(DsdpoError, match=r"dsdpo_state\.json: corrupt checkpoint state"):
        check_checkpoint(copy)


def _edited_copy(trained, tmp_path, file: str, change):
    """A copy of the checkpoint with hf/FILE changed and no digests (a checkpoint of an older dsdpo,
    whose files are not verified: the digests would refuse the edit first)."""
    output, *_ = trained
    copy = tmp_path / "run" / "step_000001"
    shutil.copytree(output / "step_000001", copy)
    path = copy / "hf" / file
    settings = json.loads(path.read_text()) if path.is_file() else {}
    change(settings)
    path.write_text(json.dumps(settings))
    meta = json.loads((copy / STATE_FILE).read_text())
    del meta["digests"]
    (copy / STATE_FILE).write_text(json.dumps(meta))
    return copy


def test_a_config_of_another_size_is_one_line_for_export_and_score(trained, tmp_path):
    """Issue 20: export said "exported" and wrote a broken folder; loading it was a long traceback."""
    copy = _edited_copy(
        trained, tmp_path, "config.json", lambda c: c.update(intermediate_size=2 * c["intermediate_size"])
    )
    data = write_jsonl(addition_pairs(2), tmp_path / "pairs.jsonl")
    score = ["score", "--model", str(copy), "--data", str(data), "--out", str(tmp_path / "scores.jsonl")]
    for command in (["export", str(copy), str(tmp_path / "out")], score):
        result = CliRunner().invoke(main, command)
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert errors[0].startswith(
            f"Error: {copy}/hf/config.json does not describe the checkpoint's weights: model.layers.0.mlp"
        )
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_adapter_config_with_rank_0_is_one_line(trained, tmp_path):
    copy = _edited_copy(trained, tmp_path, "adapter_config.json", lambda c: c.update(r=0, lora_alpha=16))
    result = CliRunner().invoke(main, ["export", str(copy), str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    expected = f"Error: {copy}/hf/adapter_config.json: r must be a positive integer and lora_alpha a number"
    assert result.exit_code == 1 and "Traceback" not in result.output and errors == [f"{expected}, got r=0"]
