"""Whole runs through the real `deepspeed` launcher on the CPU accelerator: the policy learns a
synthetic preference with CPU offload and with NVMe offload; two ranks match one."""

import copy
import json

import pytest

from dsdpo.models.tiny import init_tiny
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.run_helpers import REPO, metrics_by_step, nvme_available, run_train, tail, train_args


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(addition_pairs(32, seed=1), tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _learn(ds_config, model_dir, data_file, output, *extra, timeout=600):
    """Two epochs of the synthetic preference through the `deepspeed` launcher; must succeed."""
    args = [*train_args(ds_config, model_dir, data_file, output, epochs=2, budget=4, beta=0.5), *extra]
    result = run_train(args, ranks=1, timeout=timeout)
    assert result.returncode == 0, tail(result)


def _assert_learned(output, steps):
    metrics = metrics_by_step(output)
    assert sorted(metrics) == list(range(1, steps + 1))
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at the start
    # The lr logged is the one applied; the shipped warmup starts above 0, so step 1 moves the policy.
    assert metrics[1]["lr"] == pytest.approx(2e-4) and metrics[3]["lr"] == pytest.approx(2e-3)
    assert abs(metrics[2]["loss"] - 0.693147) > 1e-4
    late = [metrics[s] for s in range(steps - 3, steps + 1)]
    assert min(m["rewards/accuracies"] for m in late) == 1.0
    assert min(m["rewards/margins"] for m in late) > 1.0
    assert all(m["skipped_steps"] == 0 for m in late)


def test_cpu_offload_run_learns_the_preference(tiny_gemma_dir, data_file, tmp_path):
    _learn(REPO / "ds_configs" / "cpu.json", tiny_gemma_dir, data_file, tmp_path)
    _assert_learned(tmp_path, steps=16)
    assert (tmp_path / "latest").read_text() == "step_000016"
    assert json.loads((tmp_path / "ds_config.json").read_text())["train_batch_size"] == 4
    assert (tmp_path / "train_config.yaml").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is a dev extra


def _swapping_config(recipe: str, folder) -> str:
    """cpu.json's run with `recipe`'s ZeRO and aio settings, unpinned (no CUDA to pin for)."""
    config = json.loads((REPO / "ds_configs" / recipe).read_text())
    test_config = copy.deepcopy(json.loads((REPO / "ds_configs" / "cpu.json").read_text()))
    test_config["zero_optimization"] = config["zero_optimization"]
    test_config["aio"] = config["aio"]
    for block in ("offload_param", "offload_optimizer"):
        test_config["zero_optimization"][block]["pin_memory"] = False
    path = folder / recipe
    path.write_text(json.dumps(test_config))
    return path


@pytest.mark.skipif(not nvme_available(), reason="NVMe offload needs libaio (apt-get install libaio-dev)")
def test_nvme_offload_run_learns_and_really_swaps(data_file, tmp_path):
    # FFN matrices of 256 x 2048 fp32 (2 MiB): DeepSpeed swaps only parameters over ~1 MiB.
    model_dir = init_tiny(tmp_path / "model", hidden_size=256, intermediate_size=2048, num_heads=4)
    ds_config = _swapping_config("rtx4080_nvme.json", tmp_path)
    (tmp_path / "swap").mkdir()  # --nvme-path must name an existing folder (a mounted drive), not make one
    # The first use compiles DeepSpeed's async_io op (3-5 minutes on 2 cores).
    _learn(ds_config, model_dir, data_file, tmp_path / "run", "--nvme-path", tmp_path / "swap", timeout=1500)
    # buffer_size "auto": the largest parameter, the 256 x 2048 FFN matrices (not the ~100 x 256 embedding).
    resolved = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["offload_param"]["buffer_size"] == 256 * 2048
    swapped = list((tmp_path / "swap" / "policy").rglob("*.swp"))
    assert swapped, "no parameter was swapped to NVMe"
    assert list((tmp_path / "swap" / "reference").rglob("*.swp")), "the reference engine did not swap"
    _assert_learned(tmp_path / "run", steps=16)


@pytest.mark.skipif(not nvme_available(), reason="NVMe offload needs libaio (apt-get install libaio-dev)")
def test_hybrid_run_keeps_parameters_in_ram_and_swaps_the_optimizer_state(data_file, tmp_path):
    model_dir = init_tiny(tmp_path / "model", hidden_size=256, intermediate_size=2048, num_heads=4)
    ds_config = _swapping_config("rtx4080_hybrid.json", tmp_path)
    (tmp_path / "swap").mkdir()
    _learn(ds_config, model_dir, data_file, tmp_path / "run", "--nvme-path", tmp_path / "swap", timeout=1500)
    swapped = [path.relative_to(tmp_path / "swap" / "policy") for path in (tmp_path / "swap").rglob("*.swp")]
    assert swapped, "the optimizer state was not swapped to NVMe"
    assert all(path.parts[:2] == ("zero_stage_3", "optimizer") for path in swapped), swapped  # no parameter
    assert not (tmp_path / "swap" / "reference").exists()  # the reference's parameters stay in RAM
    _assert_learned(tmp_path / "run", steps=16)


def test_two_ranks_give_the_loss_of_one_rank_with_twice_the_accumulation(tiny_gemma_dir, data_file, tmp_path):
    base = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    losses = {}
    for ranks, accumulation in ((2, 2), (1, 4)):
        config = {**base, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation}
        (tmp_path / f"ds{ranks}.json").write_text(json.dumps(config))
        output = tmp_path / f"ranks{ranks}"
        args = train_args(
            tmp_path / f"ds{ranks}.json", tiny_gemma_dir, data_file, output, max_steps=5, budget=2, beta=0.5
        )
        result = run_train(
            args,
            ranks=ranks,
        )
        assert result.returncode == 0, tail(result)
        losses[ranks] = [metrics_by_step(output)[s]["loss"] for s in range(1, 6)]
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
    assert losses[1][-1] < losses[1][0]  # not a trivial equality of untrained losses
