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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_activations_match_the_cuda_allocators_peak(checkpointing):
    """The planner's activation formula against torch.cuda.max_memory_allocated of one scored chunk
    (forward and backward, bf16, dsdpo's LLaDA) above what was allocated before it."""
    from dsdpo.families.llada import LLaDAModelLM
    from dsdpo.logprobs import MaskedTokenScorer
    from dsdpo.planner.measure import scored_inputs
    from dsdpo.planner.memory import activation_bytes
    from dsdpo.planner.shapes import model_shape
    from tests.test_planner import tiny_llada

    config = tiny_llada(
        d_model=512, n_heads=8, n_kv_heads=8, n_layers=4, mlp_hidden_size=1536, vocab_size=16384,
        embedding_size=16384, mask_token_id=16383,
    )  # fmt: skip
    model = LLaDAModelLM(config).to("cuda", torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = {k: v.cuda() for k, v in scored_inputs(16384, 4, 512, 256, mask_token_id=16383).items()}
    scorer = MaskedTokenScorer(model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    scorer(**inputs).sum().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - start
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    predicted = activation_bytes(model_shape(config), 4 * 512, 4 * 256, 2, checkpointing=checkpointing)
    # The CUDA peak also holds the parameter gradients made before it (at most all of them).
    assert 0.75 * predicted <= measured <= 1.25 * (predicted + grads), (predicted, measured, grads)


def test_auto_chunks_on_the_gpu_train_and_report_gpu_memory(tiny_gemma_dir, tmp_path):
    data = write_jsonl(addition_pairs(32), tmp_path / "pairs.jsonl")
    args = train_args(
        REPO / "ds_configs" / "rtx4080.json", tiny_gemma_dir, data, tmp_path / "run", max_steps=2, budget=4
    )
    result = run_train([*args, "--max-tokens-per-forward", "auto"], ranks=1, env={"DS_ACCELERATOR": "cuda"})
    assert result.returncode == 0, tail(result)
    assert "--max-tokens-per-forward auto:" in result.stdout + result.stderr
    metrics = metrics_by_step(tmp_path / "run")
    assert 0 < metrics[2]["gpu_peak_memory_mb"] < 2048 and metrics[2]["cpu_memory_mb"] > 0
