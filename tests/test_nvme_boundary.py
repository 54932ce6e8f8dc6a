"""The gradient boundary of an optimizer swapped to NVMe, one sub-group at a time
(dsdpo.runtime.zero.finalize_swapped_gradients): the step DeepSpeed's own finalize gives, without holding
every parameter's fp32 gradient at once (on a GPU: 4 bytes a parameter, 29.9 GiB for LLaDA-8B)."""

import pytest
import torch

from dsdpo.config import ModelConfig
from dsdpo.models.tiny import init_tiny
from dsdpo.objective.losses import LossConfig
from dsdpo.planner.measure import LiveTensorBytes
from dsdpo.runtime.ds_config import resolve_ds_config
from dsdpo.runtime.engine import build_engines, init_distributed
from dsdpo.runtime.zero import finalize_swapped_gradients
from tests.ds_helpers import cpu_ds_config, full_weights, micro_step
from tests.run_helpers import nvme_available

pytestmark = pytest.mark.skipif(not nvme_available(), reason="NVMe offload needs libaio")
SUB_GROUP = 2**19  # elements: one or two of the model's 256 x 2048 matrices a sub-group


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Matrices of 2 MiB: DeepSpeed swaps only sub-groups above its aio threshold.
    folder = tmp_path_factory.mktemp("swapped")
    return init_tiny(folder / "model", hidden_size=256, intermediate_size=2048, num_heads=4)


def _policy(model_dir, swap_folder):
    swap_folder.mkdir()
    config = cpu_ds_config()
    # On a GPU each gradient's copy to the device is a new tensor; on the CPU accelerator there is no
    # copy, and only the fp32 cast of a bf16 gradient is new: accumulate in bf16 to see the casts.
    config["bf16"] = {"enabled": True}
    config["data_types"] = {"grad_accum_dtype": "bf16"}
    config["zero_optimization"].update(
        offload_optimizer={"device": "nvme", "nvme_path": str(swap_folder), "buffer_count": 4},
        sub_group_size=SUB_GROUP,
    )
    init_distributed()
    resolved = resolve_ds_config(config, world_size=1, total_steps=10)
    return build_engines(ModelConfig(path=str(model_dir)), resolved, with_reference=False)


class LiveCasts(LiveTensorBytes):
    """Live and peak bytes of the tensors dtype and device casts create (the boundary's fp32
    gradients), not the swap buffers or norms beside them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten._to_copy.default:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _boundary_peak(finalize) -> int:
    mode = LiveCasts()
    with mode:
        finalize()
    return mode.peak


def test_the_boundary_by_sub_group_gives_deepspeeds_step_and_holds_one_sub_group(
    model_dir, tmp_path, tokenizer
):
    deepspeeds, ours = _policy(model_dir, tmp_path / "a"), _policy(model_dir, tmp_path / "b")
    start = full_weights(ours.policy)
    peaks = {}
    for name, engines, finalize in (
        ("deepspeed", deepspeeds, deepspeeds.policy.optimizer.finalize_gradient_accumulation_boundary),
        ("dsdpo", ours, lambda: finalize_swapped_gradients(ours.policy)),
    ):
        micro_step(
            engines, tokenizer, [0, 1], budget=2, loss_config=LossConfig(beta=0.5, reference_free=True)
        )
        peaks[name] = _boundary_peak(finalize)
        engines.policy.step()
    assert ours.policy.optimizer.swap_optimizer  # the sub-groups really are swapped
    parameters = sum(p.ds_numel for p in ours.policy.module.parameters())
    groups = [sum(p.ds_numel for p in group) for group in ours.policy.optimizer.fp16_groups]
    # DeepSpeed keeps every fp32 cast until its one swap-out; dsdpo one sub-group's, beside the casts
    # too small to swap, which DeepSpeed keeps until the step (optimizer_utils: unswapped_gradients).
    assert len(groups) >= 4
    assert peaks["deepspeed"] >= 0.9 * 4 * parameters
    assert peaks["dsdpo"] <= 4 * 2 * max(groups)
    assert peaks["dsdpo"] < peaks["deepspeed"] / 2
    before, after = full_weights(deepspeeds.policy), full_weights(ours.policy)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(start[name], after[name]) for name in after)  # the step moved weights
