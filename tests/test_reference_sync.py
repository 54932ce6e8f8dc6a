"""TR-DPO's reference refresh: the mix is θ_ref ← α·θ + (1 − α)·θ_ref through real ZeRO-3 engines,
checkpoints carry the refreshed reference, and a resumed run equals a straight one."""

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.objective.losses import LossConfig
from dsdpo.reference.refresh import REFERENCE_WEIGHTS, mix_reference
from dsdpo.training.loop import train
from tests.ds_helpers import cpu_ds_config, engines_for, full_weights, micro_step
from tests.run_helpers import metrics_by_step
from tests.tiny_runs import addition_data, constant_lr_ds_config, tiny_run_config


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_mix_moves_the_reference_towards_the_policy(tiny_gemma_dir, tokenizer, alpha):
    engines = engines_for(tiny_gemma_dir, cpu_ds_config())
    micro_step(engines, tokenizer, [0, 1])
    engines.policy.step()
    policy, reference = full_weights(engines.policy), full_weights(engines.reference)
    assert any(not torch.equal(policy[n], reference[n]) for n in policy)  # they differ before
    mix_reference(engines.policy, engines.reference, alpha, is_rank0=True)
    mixed = full_weights(engines.reference)
    for name in policy:
        assert torch.allclose(mixed[name], alpha * policy[name] + (1 - alpha) * reference[name], atol=1e-6)
    assert full_weights(engines.policy).keys() == policy.keys()


@pytest.fixture(scope="module")
def sync_runs(tiny_gemma_dir, tmp_path_factory):
    """Four steps with a refresh every two: straight, and stopped after step 2 then resumed."""
    folder = tmp_path_factory.mktemp("tr-dpo")
    # The learning rate from step 1, so the policy (and then the reference) moves.
    ds_config, data = constant_lr_ds_config(folder, lr=2e-2), addition_data(folder, seed=4)

    def config(output, max_steps):
        return tiny_run_config(
            tiny_gemma_dir, data, folder / output, loss=LossConfig(beta=0.5),
            max_steps=max_steps, save_every=2, ref_sync_steps=2,
        )  # fmt: skip

    train(config("straight", 4), ds_config)
    train(config("resumed", 2), ds_config)
    train(config("resumed", 4), ds_config, resume="auto")
    return folder


def test_checkpoints_after_a_refresh_carry_the_reference(sync_runs):
    assert (sync_runs / "straight" / "step_000002" / REFERENCE_WEIGHTS).is_file()


def test_resumed_run_equals_the_straight_one(sync_runs):
    straight, resumed = metrics_by_step(sync_runs / "straight"), metrics_by_step(sync_runs / "resumed")
    assert straight[3]["rewards/margins"] != 0.0  # the refreshed reference differs from the policy
    for step in (3, 4):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert resumed[step][key] == straight[step][key], (step, key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"reference_scores": "ref.safetensors"}}, "drop --reference-scores"),
        ({"model": {"lora_rank": 4}}, "drop --lora-rank"),
        ({"loss": {"reference_free": True}}, "drop --reference-free"),
    ],
)
def test_a_refresh_without_a_reference_engine_is_refused(change, message):
    from dsdpo.config import config_from_dict

    settings = {"model": {"path": "m"}, "data": {"path": "d"}, "train": {"ref_sync_steps": 2}}
    for section, values in change.items():
        settings.setdefault(section, {}).update(values)
    with pytest.raises(DsdpoError, match=message):
        config_from_dict(settings).validate()


def test_the_loop_refreshes_at_step_two_with_the_configured_alpha(sync_runs, tiny_gemma_dir):
    from safetensors.torch import load_file

    from dsdpo.models.loading import load_model

    checkpoint = sync_runs / "straight" / "step_000002"
    refreshed = load_file(checkpoint / REFERENCE_WEIGHTS)
    policy = dict(load_model(checkpoint).named_parameters())  # the policy after step 2
    start = dict(load_model(tiny_gemma_dir).named_parameters())
    for name, param in policy.items():
        expected = 0.6 * param.detach() + 0.4 * start[name].detach()
        assert torch.allclose(refreshed[f"model.{name}"], expected, atol=1e-6), name
