"""The CUDA-only paths (pinned host memory, bf16 on the device, CUDA peak memory): run where a GPU is.

On CPU-only machines these are skipped; their logic (config resolution, offload, checkpoints) is
covered by the CPU tests.
"""

import os

import pytest
import torch

from dsdpo.models.tiny import init_tiny
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.run_helpers import REPO, metrics_by_step, nvme_available, run_train, tail, train_args

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
    """NCCL reduces CUDA tensors only: the trainer's collectives (dsdpo.runtime.dist) must be on the GPU."""
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
    from dsdpo.objective.logprobs import MaskedTokenScorer
    from dsdpo.planner.activations import activation_bytes
    from dsdpo.planner.measure import scored_inputs
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


def _grad_norm_of_first_step(model_dir, data, output, max_tokens) -> float:
    args = train_args(REPO / "ds_configs" / "rtx4080.json", model_dir, data, output, max_steps=1, budget=4)
    result = run_train([*args, "--max-tokens-per-forward", max_tokens], env={"DS_ACCELERATOR": "cuda"})
    assert result.returncode == 0, tail(result)
    return metrics_by_step(output)[1]["grad_norm"]


def test_chunked_bf16_step_on_cuda_has_the_unchunked_gradient(tiny_gemma_dir, tmp_path):
    """rtx4080.json (bf16, fp32 accumulation): 16 micro-batches in one backward each, or in chunks of
    one row (~130 backward calls). On the CPU the two bf16 gradients are 1.0% apart as vectors
    (tests/test_bf16_accumulation.py); their norms within 3%."""
    data = write_jsonl(addition_pairs(16), tmp_path / "pairs.jsonl")
    whole = _grad_norm_of_first_step(tiny_gemma_dir, data, tmp_path / "whole", 1 << 20)
    chunked = _grad_norm_of_first_step(tiny_gemma_dir, data, tmp_path / "chunked", 16)
    assert whole > 0 and chunked == pytest.approx(whole, rel=0.03)


@pytest.mark.skipif(not nvme_available(), reason="NVMe offload needs libaio (apt-get install libaio-dev)")
def test_nvme_config_trains_on_the_gpu_and_swaps(tmp_path):
    # FFN matrices of 256 x 4096 in bf16 (2 MiB): DeepSpeed swaps only parameters over ~1 MiB.
    model_dir = init_tiny(tmp_path / "model", hidden_size=256, intermediate_size=4096, num_heads=4)
    data = write_jsonl(addition_pairs(32), tmp_path / "pairs.jsonl")
    (tmp_path / "swap").mkdir()
    args = train_args(
        REPO / "ds_configs" / "rtx4080_nvme.json", model_dir, data, tmp_path / "run", max_steps=2, budget=4,
        nvme_path=tmp_path / "swap",
    )  # fmt: skip
    result = run_train(args, ranks=1, env={"DS_ACCELERATOR": "cuda"})
    assert result.returncode == 0, tail(result)
    assert list((tmp_path / "swap" / "policy").rglob("*.swp")), "no parameter was swapped to NVMe"
    metrics = metrics_by_step(tmp_path / "run")
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-3)
    assert metrics[2]["gpu_peak_memory_mb"] > 0


def test_a_real_cuda_out_of_memory_is_retried_with_halved_chunks(tmp_path):
    """A LLaDA with LLaDA's 126464-token vocabulary and hidden 64, rows of 70 tokens, budget 32: one
    micro-batch's 64 rows in one chunk need 2.9 GiB of activations (the planner: mostly the output
    layer's fp32 log-softmax and gradients, 12 bytes × ~2080 masked positions × vocabulary), 2.4 GiB
    without gradients; half of them ~1.6 and ~1.35 GiB. The process is capped at 2 GiB of CUDA memory
    (a sitecustomize calling torch.cuda.set_per_process_memory_fraction): the first try runs out of
    memory for real, the step is redone with halved chunks and training goes on."""
    from benchmarks.gpu_check import build_model

    model_dir = build_model(tmp_path / "model", (64, 2, 4, 128, 126464), "cpu")
    data = write_jsonl(addition_pairs(32), tmp_path / "pairs.jsonl")  # 2 steps of 16 micro-batches
    cap_gib = 2.0
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import torch\n"
        f"torch.cuda.set_per_process_memory_fraction({cap_gib * 2**30} / torch.cuda.mem_get_info()[1])\n"
    )
    args = train_args(
        REPO / "ds_configs" / "rtx4080.json", model_dir, data, tmp_path / "run", max_steps=2, budget=32,
        pad_responses_to=64, max_length=80, max_tokens_per_forward=64 * 80, max_tokens_no_grad=64 * 80,
    )  # fmt: skip
    env = {"DS_ACCELERATOR": "cuda", "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"}
    result = run_train(args, env=env)
    assert result.returncode == 0, tail(result)
    assert "out of device memory in a chunk" in result.stdout + result.stderr
    metrics = metrics_by_step(tmp_path / "run")
    assert metrics[1]["oom_retries"] >= 1 and metrics[2]["skipped_steps"] == 0
    assert metrics[1]["loss"] == pytest.approx(0.693147, abs=1e-3)  # the redone step is the same step
    assert metrics[2]["gpu_peak_memory_mb"] < cap_gib * 1024  # the cap was in force
