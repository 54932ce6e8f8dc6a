"""A non-finite loss never reaches the weights: the step is skipped and counted, and a run of them
stops training with a clear error (in-process training on real ZeRO-3 engines)."""

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

import dsdpo.objective.gradient
from dsdpo.errors import DsdpoError
from dsdpo.objective.losses import LossConfig
from dsdpo.training.loop import train
from tests.run_helpers import metrics_by_step
from tests.tiny_runs import addition_data, constant_lr_ds_config, tiny_run_config


@pytest.fixture
def nan_on_calls(monkeypatch):
    """Make the preference loss NaN on the given (1-based) calls: one call per micro-batch."""
    calls, real = [], dsdpo.objective.gradient.preference_loss

    def install(bad_calls):
        calls.clear()  # counted from the next run's first micro-batch

        def loss(*args, **kwargs):
            calls.append(1)
            out = real(*args, **kwargs)
            if len(calls) in bad_calls:
                out.losses = out.losses * float("nan")
            return out

        monkeypatch.setattr(dsdpo.objective.gradient, "preference_loss", loss)

    return install


def _run(tmp_path, model_dir, steps, max_bad_steps, beta=0.5, micro_batch=2):
    ds_config = constant_lr_ds_config(tmp_path, micro=micro_batch, accumulation=2 // micro_batch)
    config = tiny_run_config(
        model_dir, addition_data(tmp_path), tmp_path / "run", loss=LossConfig(beta=beta),
        max_steps=steps, save_every=1, keep_last=10, max_bad_steps=max_bad_steps,
    )  # fmt: skip
    return train(config, ds_config)


def _weights(run, step):
    return get_fp32_state_dict_from_zero_checkpoint(str(run), tag=f"step_{step:06d}")


def test_skipped_steps_leave_weights_untouched_and_training_goes_on(tiny_gemma_dir, tmp_path, nan_on_calls):
    nan_on_calls({2, 3})
    _run(tmp_path, tiny_gemma_dir, steps=4, max_bad_steps=3)
    run = tmp_path / "run"
    metrics = metrics_by_step(run)
    assert [metrics[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    after_1, after_3, after_4 = _weights(run, 1), _weights(run, 3), _weights(run, 4)
    assert all(torch.equal(after_1[k], after_3[k]) for k in after_1)  # steps 2 and 3 changed nothing
    assert any(not torch.equal(after_3[k], after_4[k]) for k in after_3)  # step 4 trained again
    assert metrics[4]["loss"] == metrics[4]["loss"]  # finite again


def test_a_run_of_non_finite_steps_stops_training_after_saving(tiny_gemma_dir, tmp_path, nan_on_calls):
    nan_on_calls(set(range(2, 100)))
    with pytest.raises(DsdpoError, match="2 steps in a row had a non-finite loss or gradient"):
        _run(tmp_path, tiny_gemma_dir, steps=10, max_bad_steps=2)
    assert (tmp_path / "run" / "latest").read_text() == "step_000003"


def test_a_finite_loss_with_an_infinite_gradient_is_a_skipped_step(tiny_gemma_dir, tmp_path):
    """beta 1e30: the loss is log 2 at the start, its gradient overflows; DeepSpeed skips the update
    (its global gradient norm is not finite) and dsdpo counts it like a non-finite loss."""
    from dsdpo.models.loading import load_model

    with pytest.raises(DsdpoError, match="2 steps in a row had a non-finite loss or gradient"):
        _run(tmp_path, tiny_gemma_dir, steps=10, max_bad_steps=2, beta=1e30)
    run = tmp_path / "run"
    metrics = metrics_by_step(run)
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-6)  # finite
    assert [metrics[s]["skipped_steps"] for s in (1, 2)] == [1, 2] and "grad_norm" not in metrics[2]
    start = load_model(tiny_gemma_dir).state_dict()
    saved = {name.removeprefix("model."): tensor for name, tensor in _weights(run, 2).items()}
    assert all(torch.equal(saved[name], start[name]) for name in saved if name in start)
    assert len(set(saved) & set(start)) > 5


def test_a_skipped_step_drops_the_gradient_of_its_finite_micro_batches(
    tiny_gemma_dir, tmp_path, nan_on_calls
):
    """Two micro-batches a step, NaN in the second of step 2: the first one's gradient must not reach
    step 3. Step 3's weights equal those of a run whose step 2 was NaN in both micro-batches."""
    (tmp_path / "second").mkdir(), (tmp_path / "both").mkdir()
    nan_on_calls({4})
    _run(tmp_path / "second", tiny_gemma_dir, steps=3, max_bad_steps=3, micro_batch=1)
    nan_on_calls({3, 4})
    _run(tmp_path / "both", tiny_gemma_dir, steps=3, max_bad_steps=3, micro_batch=1)
    second, both = _weights(tmp_path / "second" / "run", 3), _weights(tmp_path / "both" / "run", 3)
    assert metrics_by_step(tmp_path / "second" / "run")[3]["skipped_steps"] == 1
    assert all(torch.equal(second[k], both[k]) for k in second)
    assert any(not torch.equal(second[k], _weights(tmp_path / "both" / "run", 1)[k]) for k in second)


def test_nan_in_the_starting_weights_is_refused_before_start_up(tiny_gemma_dir, tmp_path):
    """Issue 20: NaN in the model's weights was not checked at load (every step was then skipped)."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_gemma_dir, model)
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[3]
    weights[name].view(-1)[5] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DsdpoError) as refused:
        _run(tmp_path, model, steps=1, max_bad_steps=3)
    assert str(refused.value) == (
        f"{model / 'model.safetensors'}: {name} holds NaN or infinite values; the model's weights are broken"
    )
