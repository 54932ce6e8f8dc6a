"""LLaDA 2.x beyond what every family (tests/test_families.py: logits, padding, exact block ELBO,
scoring, LoRA targets, training and export) and every block family (tests/test_blocks.py,
tests/test_block_sampler.py) is checked for: the released config's layout, that the fixture's router
exercises its group limit and expert bias, dFactory's block-diffusion training forward (recorded from
the published model and dFactory's mask function by tests/fixtures/families/build_llada2.py) against
dsdpo's one-forward block scoring, and an exact chunked step under ZeRO-3 with every expert
partitioned."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsdpo.families import LLADA2, block_size_of, family_of_config_dict, family_of_folder
from dsdpo.models.loading import load_config, load_model, resolve_mask_token_id
from dsdpo.objective.blocks import block_diffusion_inputs
from dsdpo.objective.logprobs import MaskedTokenScorer
from dsdpo.planner.shapes import model_shape
from tests.ds_helpers import MASK, cpu_ds_config, engines_for, full_weights, micro_step

FIXTURE = Path(__file__).parent / "fixtures" / "families" / "llada2"
TENSORS = load_file(FIXTURE / "expected.safetensors")
BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE).eval()


def test_released_config_is_the_family_with_its_defaults(tmp_path):
    released = json.loads((FIXTURE / "config.json").read_text())
    assert family_of_config_dict(released) is LLADA2
    # dFactory's own copy fuses the experts into stacked parameters: other weight names, not this family.
    assert family_of_config_dict({**released, "model_type": "llada2_moe_veomni"}) is None
    for field in ("block_size", "mask_token_id"):  # dsdpo's fields: the released config.json has neither
        del released[field]
    (tmp_path / "config.json").write_text(json.dumps(released))
    config = load_config(tmp_path)
    assert block_size_of(config) == 32  # generate()'s block_length, dFactory's recipe
    assert resolve_mask_token_id(None, config, None) == 156895
    config.save_pretrained(tmp_path / "saved")  # what a checkpoint writes is told again
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "llada2_moe"
    assert family_of_folder(tmp_path / "saved") is LLADA2


def test_the_fixture_router_depends_on_its_group_limit_and_expert_bias(model):
    """Routing over every expert at once, or without the bias, moves the logits far beyond the 1e-5 of
    test_families' comparison with the published code: the fixture checks both."""
    gate = model.model.layers[1].mlp.gate
    ids = TENSORS["input_ids"]
    with torch.no_grad():
        gate.n_group, gate.topk_group = 1, 1  # one group holding all 8 experts: plain top-2
        ungrouped = model(input_ids=ids).logits
        gate.n_group, gate.topk_group = 4, 2
        assert torch.allclose(model(input_ids=ids).logits, TENSORS["logits_fp32"], atol=1e-5)
        bias = gate.expert_bias.clone()
        gate.expert_bias.zero_()
        unbiased = model(input_ids=ids).logits
        gate.expert_bias.copy_(bias)
    assert (ungrouped - TENSORS["logits_fp32"]).abs().max() > 0.5
    assert (unbiased - TENSORS["logits_fp32"]).abs().max() > 0.5


def test_one_forward_block_scoring_equals_dfactorys_training_forward(model):
    """dFactory's training forward ([x_t ; x_0], positions twice, its block_diffusion_mask) gave these
    x_t logits in the published model; dsdpo's scorer, fed block_diffusion_inputs, reads the same
    per-token log-probabilities at the masked positions. dFactory's additive mask, given as it is,
    gives the same logits too."""
    noisy, clean = TENSORS["bd_noisy_ids"], TENSORS["bd_clean_ids"]
    published = TENSORS["logits_bd_noisy_fp32"]
    inputs = block_diffusion_inputs(noisy, clean, torch.ones_like(noisy), BLOCK)
    scored = noisy == MASK
    rows, positions = scored.nonzero(as_tuple=True)
    logprobs = published.log_softmax(-1)[rows, positions, clean[rows, positions]]
    expected = torch.zeros(len(noisy)).index_add(0, rows, logprobs)
    additive = torch.zeros(inputs["attention_mask"].shape).masked_fill(
        ~inputs["attention_mask"], float("-inf")
    )
    with torch.no_grad():
        sums = MaskedTokenScorer(model)(**inputs, scored=scored, targets=clean)
        logits = model(**{**inputs, "attention_mask": additive}).logits[:, : noisy.shape[1]]
    assert scored.sum(1).min() > 0
    assert torch.allclose(sums, expected, atol=1e-4)
    assert torch.allclose(logits, published, atol=1e-5)


def _one_step(tokenizer, max_tokens):
    # 0 keeps no parameter whole on every rank: the tiny experts are partitioned too.
    engines = engines_for(FIXTURE, cpu_ds_config(micro=2, stage3_param_persistence_threshold=0))
    before = full_weights(engines.policy)
    result = micro_step(engines, tokenizer, [0, 1], max_tokens=max_tokens, budget=2, block_size=BLOCK)[0]
    engines.policy.step()
    return before, full_weights(engines.policy), result


def test_a_chunked_step_equals_the_unchunked_one_with_every_expert_partitioned(tokenizer):
    before, whole, whole_result = _one_step(tokenizer, 1 << 20)
    _, chunked, chunked_result = _one_step(tokenizer, 64)  # a few rows a forward
    assert chunked_result.sweeps > whole_result.sweeps
    assert chunked_result.metrics["loss"] == pytest.approx(whole_result.metrics["loss"], abs=1e-6)
    experts = [name for name in before if ".mlp.experts." in name]
    assert max(float((whole[k] - before[k]).abs().max()) for k in experts) > 1e-3  # experts trained
    for name in before:
        assert torch.allclose(chunked[name], whole[name], atol=1e-6, rtol=0), name


def test_dsdpo_plan_builds_the_released_layout_on_the_meta_device():
    """The released config.json carries dFactory's `rotary_dim` beside partial_rotary_factor (which is
    what the published model reads); the planner builds the family's model from it. 8 experts, top 2:
    a token passes over 6 of the MoE layer's experts."""
    config = {**json.loads((FIXTURE / "config.json").read_text()), "rotary_dim": 8}
    shape = model_shape(config)
    weights = load_file(FIXTURE / "model.safetensors")
    total = sum(w.numel() for name, w in weights.items() if not name.endswith("expert_bias"))
    expert = sum(w.numel() for name, w in weights.items() if ".mlp.experts.0." in name)
    assert shape.parameters == total
    assert shape.active_parameters == total - 6 * expert
