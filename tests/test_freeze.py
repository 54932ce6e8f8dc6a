"""--freeze: frozen parameters keep their weights through a real ZeRO-3 step; the rest train."""

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.models.freeze import frozen_names
from dsdpo.models.loading import load_model
from tests.ds_helpers import cpu_ds_config, engines_for, full_weights, micro_step


def test_freeze_keeps_the_frozen_weights_and_trains_the_rest(tiny_gemma_dir, tokenizer):
    spec = "embeddings,layers:1,norm"
    expected = {f"model.{name}" for name in frozen_names(load_model(tiny_gemma_dir), spec)}
    engines = engines_for(tiny_gemma_dir, cpu_ds_config(), freeze=spec)
    before = full_weights(engines.policy)
    micro_step(engines, tokenizer, [0, 1])
    engines.policy.step()
    after = full_weights(engines.policy)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert expected and moved and moved == set(before) - expected
    assert "layers.0." in " ".join(expected) and "layers.1.self_attn" not in " ".join(expected)
    report = engines.freeze_report
    assert report.frozen == sum(before[name].numel() for name in expected)
    assert report.total == sum(tensor.numel() for tensor in before.values())
    assert "frozen:" in report.summary() and "GiB instead of" in report.summary()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("layers:99", "the model has 2 layers"),
        ("nothing_like_this", "matches no parameter"),
        ("[", "regular"),
    ],
)
def test_bad_freeze_specs_name_the_item(tiny_gemma_dir, spec, message):
    with pytest.raises(DsdpoError, match=message):
        frozen_names(load_model(tiny_gemma_dir), spec)


def test_a_frozen_run_resumes_exactly(tiny_gemma_dir, tmp_path):
    from dsdpo.training.loop import train
    from tests.run_helpers import metrics_by_step
    from tests.tiny_runs import addition_data, constant_lr_ds_config, tiny_run_config

    ds_config, data = constant_lr_ds_config(tmp_path), addition_data(tmp_path, seed=5)

    def config(output, max_steps):
        return tiny_run_config(
            tiny_gemma_dir, data, tmp_path / output, model=dict(freeze="embeddings,layers:1"),
            max_steps=max_steps, save_every=2,
        )  # fmt: skip

    train(config("straight", 4), ds_config)
    train(config("resumed", 2), ds_config)
    train(config("resumed", 4), ds_config, resume="auto")
    straight, resumed = metrics_by_step(tmp_path / "straight"), metrics_by_step(tmp_path / "resumed")
    assert [resumed[s]["loss"] for s in (3, 4)] == [straight[s]["loss"] for s in (3, 4)]
