"""The CUDA-only paths (pinned host memory, bf16 on the device, CUDA peak memory): run where a GPU is.

On CPU-only machines these are skipped; their logic (config resolution, offload, checkpoints) is
covered by the CPU tests.
"""

import pytest
import torch

from dsdpo.demo import addition_pairs, write_jsonl
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_rtx4080_config_trains_on_the_gpu_with_pinned_cpu_offload(tiny_gemma_dir, tmp_path):
    data = write_jsonl(addition_pairs(32), tmp_path / "pairs.jsonl")
    args = train_args(
        REPO / "ds_configs" / "rtx4080.json", tiny_gemma_dir, data, tmp_path / "run", max_steps=2, budget=4
    )
    result = run_train(args, ranks=1, env={"DS_ACCELERATOR": "cuda"})
    assert result.returncode == 0, tail(result)
    metrics = metrics_by_step(tmp_path / "run")
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-3)  # bf16 scores: a looser tolerance
    assert 0 < metrics[2]["peak_memory_mb"] < 2048  # CUDA memory of a tiny model, not host memory
    assert (tmp_path / "run" / "latest").read_text() == "step_000002"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_train_with_nccl_collectives(tiny_gemma_dir, tmp_path):
    """NCCL reduces CUDA tensors only: the trainer's collectives (dsdpo.dist) must be on the GPU."""
    data = write_jsonl(addition_pairs(32), tmp_path / "pairs.jsonl")
    args = train_args(
        REPO / "ds_configs" / "multi_gpu.json", tiny_gemma_dir, data, tmp_path / "run", max_steps=2, budget=4
    )
    result = run_train(args, ranks=2, env={"DS_ACCELERATOR": "cuda"})
    assert result.returncode == 0, tail(result)
    assert sorted(metrics_by_step(tmp_path / "run")) == [1, 2]
