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
    import copy
    import json

    from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
    from dsdpo.training.demo import addition_pairs, write_jsonl
    from dsdpo.training.loop import train
    from tests.ds_helpers import CPU_CONFIG
    from tests.run_helpers import metrics_by_step

    ds = copy.deepcopy(CPU_CONFIG)
    ds.pop("scheduler")
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    data = write_jsonl(addition_pairs(16, seed=5), tmp_path / "pairs.jsonl")

    def config(output, max_steps):
        return Config(
            model=ModelConfig(path=str(tiny_gemma_dir), freeze="embeddings,layers:1"),
            data=DataConfig(path=str(data)),
            score=ScoreConfig(budget=2),
            train=TrainConfig(output=str(tmp_path / output), max_steps=max_steps, save_every=2),
        )

    train(config("straight", 4), tmp_path / "ds.json")
    train(config("resumed", 2), tmp_path / "ds.json")
    train(config("resumed", 4), tmp_path / "ds.json", resume="auto")
    straight, resumed = metrics_by_step(tmp_path / "straight"), metrics_by_step(tmp_path / "resumed")
    assert [resumed[s]["loss"] for s in (3, 4)] == [straight[s]["loss"] for s in (3, 4)]
