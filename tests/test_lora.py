"""LoRA training: the reference is the policy engine with its adapters off (no second model), the
chunked exact gradient still equals the unchunked one, and export merges the adapters."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from dsdpo.cli import main
from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
from dsdpo.models.loading import load_model
from dsdpo.objective.draws import sample_draws
from dsdpo.objective.elbo import forward_rows
from dsdpo.objective.logprobs import MaskedTokenScorer
from dsdpo.objective.losses import LossConfig
from dsdpo.reference.interface import AdapterDisabledReference
from dsdpo.training.demo import addition_pairs, write_jsonl
from dsdpo.training.loop import train
from tests.ds_helpers import CPU_CONFIG, MASK, cpu_ds_config, engines_for, micro_step, pair_batch
from tests.run_helpers import metrics_by_step

LORA = dict(lora_rank=4, lora_alpha=8.0)


def test_lora_chunked_step_equals_unchunked_and_the_reference_is_the_base(tiny_gemma_dir, tokenizer):
    base = MaskedTokenScorer(load_model(tiny_gemma_dir).eval())  # before any ZeRO-3 config is alive
    after = {}
    for max_tokens in (1 << 20, 1):
        engines = engines_for(tiny_gemma_dir, cpu_ds_config(), **LORA)
        assert isinstance(engines.reference, AdapterDisabledReference)
        micro_step(engines, tokenizer, [0, 1, 2], max_tokens=max_tokens)
        engines.policy.step()
        batch, keys = pair_batch(tokenizer, [3])  # scores after the step
        draws = sample_draws(len(keys), batch.response_lengths, 4, keys=keys)
        inputs = forward_rows(batch, draws, torch.arange(draws.num_rows), MASK)
        with torch.no_grad():
            after[max_tokens] = (engines.policy(**inputs), engines.reference(**inputs))
    (policy_a, reference_a), (policy_b, _reference_b) = after[1 << 20], after[1]
    assert torch.allclose(policy_a, policy_b, atol=1e-5)  # chunking changes nothing
    with torch.no_grad():
        assert torch.allclose(reference_a, base(**inputs), atol=1e-5)  # adapters off = the base model
    assert not torch.allclose(policy_a, reference_a, atol=1e-4)  # the adapters trained


@pytest.fixture(scope="module")
def lora_run(tiny_gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    ds = copy.deepcopy(CPU_CONFIG)
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    ds["optimizer"]["params"]["lr"] = ds["scheduler"]["params"]["warmup_max_lr"] = 2e-2
    (folder / "ds.json").write_text(json.dumps(ds))
    data = write_jsonl(addition_pairs(32, seed=2), folder / "pairs.jsonl")
    config = Config(
        model=ModelConfig(path=str(tiny_gemma_dir), **LORA),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(budget=4),
        loss=LossConfig(beta=0.5),
        train=TrainConfig(output=str(folder / "run"), epochs=2),
    )
    train(config, folder / "ds.json")
    return folder / "run"


def test_lora_run_learns_the_preference(lora_run):
    metrics = metrics_by_step(lora_run)
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert metrics[16]["rewards/accuracies"] == 1.0 and metrics[16]["rewards/margins"] > 0.5


def test_lora_export_merges_the_adapters_into_a_plain_model(lora_run, tmp_path, tiny_gemma_dir):
    result = CliRunner().invoke(main, ["export", str(lora_run), str(tmp_path / "hf"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "hf" / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from_checkpoint = load_model(lora_run).eval()  # the same merge, in memory
    base = load_model(tiny_gemma_dir).eval()
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (exported, from_checkpoint, base))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # the merged adapters changed the model
