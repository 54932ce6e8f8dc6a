"""LLaDA-MoE beyond what tests/test_families.py checks of every family (logits, padding, exact ELBO,
scoring, LoRA targets, training and export): how a released folder is told from dense LLaDA, that
the fixture's router exercises the expert bias, ZeRO-3 with the experts as modules, an exact chunked
step, router statistics in metrics.jsonl and an exact resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from dsdpo.errors import DsdpoError
from dsdpo.families import LLADA, LLADA_MOE, family_of, family_of_config_dict, family_of_folder
from dsdpo.families.llada_moe import LLaDAMoEConfig
from dsdpo.families.routing import router_metrics, take_router_counts
from dsdpo.models.loading import load_config, load_model, resolve_mask_token_id
from dsdpo.models.tiny import build_tokenizer
from dsdpo.objective.logprobs import MaskedTokenScorer
from tests.ds_helpers import cpu_ds_config, engines_for, full_weights, micro_step, pair_batch
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

FIXTURES = Path(__file__).parent / "fixtures" / "families"
FIXTURE = FIXTURES / "llada_moe"
# ZeRO-3 keeps parameters under this many elements whole on every rank; 0 partitions the tiny experts.
PARTITION_ALL = {"stage3_param_persistence_threshold": 0}


def test_released_config_is_told_from_dense_llada_by_its_moe_fields(tmp_path):
    moe = json.loads((FIXTURE / "config.json").read_text())
    dense = json.loads((FIXTURES / "llada" / "config.json").read_text())
    assert moe["model_type"] == dense["model_type"] == "llada"
    assert family_of_config_dict(moe) is LLADA_MOE
    assert family_of_config_dict(dense) is LLADA
    assert family_of_config_dict({**moe, "model_type": "lladamoe"}) is LLADA_MOE  # dllm's copy
    config = load_config(FIXTURE)
    assert type(config) is LLaDAMoEConfig and family_of(config) is LLADA_MOE
    # What a checkpoint writes (config.save_pretrained) keeps the released model_type and is told again.
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llada"
    assert family_of_folder(tmp_path) is LLADA_MOE


def test_mask_token_falls_back_to_the_published_one(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text())
    del config["mask_token_id"]  # the released config.json names none (its tokenizer's <|mask|>)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_mask_token_id(None, load_config(tmp_path), None) == 156895


def test_a_config_without_partial_rotary_factor_is_refused(tmp_path):
    """The published config class defaults it to -1, and transformers 4.57 then fails to build the
    published model (a negative arange in _compute_default_rope_parameters: checked by hand)."""
    config = json.loads((FIXTURE / "config.json").read_text())
    del config["partial_rotary_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURE / "model.safetensors", tmp_path)
    with pytest.raises(DsdpoError, match="partial_rotary_factor = -1 rotates -8 dimensions"):
        load_model(tmp_path)


def test_the_fixture_router_depends_on_the_expert_bias():
    """Without the bias (or with it used for the choice of experts only, as LLaDA2.0 uses its own) the
    logits move far beyond the tolerance of test_families' comparison with the published code."""
    tensors = load_file(FIXTURE / "expected.safetensors")
    model = load_model(FIXTURE).eval()
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.expert_bias.zero_()
        unbiased = model(input_ids=tensors["input_ids"]).logits
    assert (unbiased - tensors["logits_fp32"]).abs().max() > 0.5


def _scores(scorer, batch):
    scored = batch.response_mask & (torch.arange(batch.input_ids.shape[1]) % 2 == 0)
    masked = torch.where(scored, build_tokenizer().mask_token_id, batch.input_ids)
    with torch.no_grad():
        return scorer(
            input_ids=masked, attention_mask=batch.attention_mask, scored=scored, targets=batch.input_ids
        )


def test_zero3_partitions_every_expert_and_gathers_each_as_a_module(tokenizer):
    engines = engines_for(FIXTURE, cpu_ds_config(**PARTITION_ALL))
    model = engines.policy.module.model
    experts = [
        expert
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
        for expert in layer.mlp.experts
    ]
    params = [p for expert in experts for p in expert.parameters()]
    assert params and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in params)
    # ZeRO-3 gathers a module's own parameters in its pre-forward hook: an expert's three linears.
    linears = [linear for expert in experts for linear in expert.children()]
    whole_while_running = []
    for linear in linears:
        linear.register_forward_pre_hook(  # runs after ZeRO's own pre-hook
            lambda module, *_: whole_while_running.append(
                module.weight.ds_status == ZeroParamStatus.AVAILABLE
            )
        )
    batch, _ = pair_batch(tokenizer, [0, 1, 2, 3])
    engines.policy.eval()
    partitioned = _scores(engines.policy, batch)
    assert whole_while_running == [True] * len(linears)  # every expert ran, gathered when it ran
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)  # and released after
    whole = _scores(MaskedTokenScorer(load_model(FIXTURE).eval()), batch)
    assert torch.allclose(partitioned, whole, atol=1e-5)


def test_router_counts_leave_out_the_recomputation_of_a_checkpointed_layer():
    ids = load_file(FIXTURE / "expected.safetensors")["input_ids"]
    counts = []
    for checkpointing in (False, True):
        model = load_model(FIXTURE).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        counts.append(take_router_counts(model))
    assert counts[0].shape == (1, 4) and int(counts[0].sum()) == 2 * ids.numel()  # top-2 of every token
    assert torch.equal(counts[0], counts[1])
    assert int(take_router_counts(model).sum()) == 0  # taking them restarts the count


def test_router_metrics_by_hand():
    metrics = router_metrics(torch.tensor([[4, 2, 2, 0], [2, 2, 2, 2]]))  # layer means 2 and 2
    assert metrics == {"router/load_max": 2.0, "router/load_min": 0.0, "router/idle_experts": 1.0}


def _one_step(tokenizer, max_tokens):
    engines = engines_for(FIXTURE, cpu_ds_config(micro=4, **PARTITION_ALL))
    before = full_weights(engines.policy)
    result = micro_step(engines, tokenizer, [0, 1, 2, 3], max_tokens=max_tokens)[0]
    engines.policy.step()
    return before, full_weights(engines.policy), result


def test_a_chunked_moe_step_equals_the_unchunked_one(tokenizer):
    before, whole, whole_result = _one_step(tokenizer, 1 << 20)
    _, chunked, chunked_result = _one_step(tokenizer, 1)
    assert chunked_result.sweeps > whole_result.sweeps  # one row per forward
    assert chunked_result.metrics["loss"] == pytest.approx(whole_result.metrics["loss"], abs=1e-6)
    experts = [name for name in before if ".mlp.experts." in name]
    assert max(float((whole[k] - before[k]).abs().max()) for k in experts) > 1e-3  # experts trained
    for name in before:
        assert torch.allclose(chunked[name], whole[name], atol=1e-6, rtol=0), name


def test_a_lora_step_trains_adapters_beside_the_experts_not_on_them(tokenizer):
    engines = engines_for(FIXTURE, cpu_ds_config(micro=2, **PARTITION_ALL), lora_rank=4)
    trained = {name for name, p in engines.policy.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name for name in trained)
    assert not any(".experts." in name or ".mlp.gate." in name for name in trained)
    assert any(".shared_expert." in name for name in trained)
    before = full_weights(engines.policy)
    micro_step(engines, tokenizer, [0, 1])
    engines.policy.step()
    after = full_weights(engines.policy)
    assert max(float((after[k] - before[k]).abs().max()) for k in trained) > 1e-3
    assert all(torch.equal(after[k], before[k]) for k in before if k not in trained)


STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llada-moe")
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("expected*"), dirs_exist_ok=True)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from dsdpo.training.demo import addition_pairs, write_jsonl

    return write_jsonl(addition_pairs(16, seed=3), tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _args(model_dir, data_file, output):
    options = dict(max_steps=STEPS, epochs=10, budget=2, beta=0.5, save_every=2)
    return train_args(REPO / "ds_configs" / "cpu.json", model_dir, data_file, output, **options)


@pytest.fixture(scope="module")
def straight(model_dir, data_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    result = run_train(_args(model_dir, data_file, output))
    assert result.returncode == 0, tail(result)
    return output


def test_router_statistics_are_in_the_metrics(straight):
    for record in metrics_by_step(straight).values():
        # 4 experts, top-2: an expert's load is 0 to 2 times an even share.
        assert 1 <= record["router/load_max"] <= 2
        assert 0 <= record["router/load_min"] <= 1
        assert (record["router/idle_experts"] > 0) == (record["router/load_min"] == 0)


def test_killed_after_a_checkpoint_resumes_exactly(model_dir, data_file, straight, tmp_path):
    args = _args(model_dir, data_file, tmp_path)
    killed = run_train(args, env={"DSDPO_FAULT": f"after_save:{STEPS // 2}"})
    assert killed.returncode == -9, tail(killed)
    resumed = run_train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, tail(resumed)
    expected, got = metrics_by_step(straight), metrics_by_step(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        for name in ("loss", "router/load_max", "router/load_min"):
            assert got[step][name] == expected[step][name], (step, name)
    tag = f"step_{STEPS:06d}"
    a = get_fp32_state_dict_from_zero_checkpoint(str(straight), tag=tag)
    b = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=tag)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_two_ranks_train_with_different_routing_on_each(model_dir, data_file, tmp_path):
    """Each rank routes its own pairs, and the ZeRO-3 gathers of the experts stay in step. (Here every
    expert gets tokens on both ranks, so this would not catch an idle expert skipped on one rank: the
    block runs every expert for that reason, dsdpo/families/llada_moe.py.)"""
    options = dict(max_steps=2, budget=2, beta=0.5)
    args = train_args(REPO / "ds_configs" / "cpu.json", model_dir, data_file, tmp_path, **options)
    result = run_train(args, ranks=2, timeout=300)
    assert result.returncode == 0, tail(result)
    assert sorted(metrics_by_step(tmp_path)) == [1, 2]
