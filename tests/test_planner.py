"""The planner (dsdpo/planner): parameter counts, byte formulas and activation estimates against
independent numbers (hand-worked sums, the instantiated models, measured peaks)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from dsdpo.cli import main
from dsdpo.families.dream import DreamConfig, DreamModel
from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
from dsdpo.planner.activations import activation_bytes, layer_bytes, no_grad_activation_bytes
from dsdpo.planner.measure import measured_activation_bytes, scored_inputs
from dsdpo.planner.memory import RunShape
from dsdpo.planner.model_states import PROCESS_BASELINE, Item, MemoryPlan, model_state_plan
from dsdpo.planner.shapes import model_shape
from dsdpo.planner.sweeps import sweeps_per_step
from dsdpo.planner.zero_settings import pinned, sub_groups

FIXTURES = Path(__file__).parent / "fixtures" / "planner"
REPO = Path(__file__).resolve().parents[1]


def tiny_llada(**fields) -> LLaDAConfig:
    published = json.loads((FIXTURES / "llada-8b.json").read_text())
    published.pop("model_type")
    published.update(
        d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=97,
        embedding_size=97, mask_token_id=96, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    published.update(fields)
    return LLaDAConfig(**published)


def tiny_dream() -> DreamConfig:
    return DreamConfig(
        vocab_size=101, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mask_token_id=100, pad_token_id=0,
    )  # fmt: skip


def test_published_shapes_count_their_parameters_by_hand():
    # LLaDA-8B: untied embedding and output layer, 32 blocks of q,k,v,out (d²) + 3 MLP matrices (d·f)
    # + 2 norms, a final norm.
    d, f, v, n = 4096, 12288, 126464, 32
    assert (
        model_shape(FIXTURES / "llada-8b.json").parameters
        == 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    )
    # Dream-7B (Qwen2-7B): 4 key/value heads of 128, biases on q, k, v.
    d, f, v, n, kv = 3584, 18944, 152064, 28, 512
    block = 2 * d * d + 2 * d * kv + (d + 2 * kv) + 3 * d * f + 2 * d
    shape = model_shape(FIXTURES / "dream-7b.json")
    assert shape.parameters == 2 * v * d + n * block + d == 7_615_616_512
    assert (shape.block_parameters, shape.largest_module, shape.kv_width) == (block, v * d, kv)


@pytest.mark.parametrize("kind", ["llada", "dream", "gemma"])
def test_parameter_count_is_the_instantiated_models(kind, tiny_gemma):
    if kind == "llada":
        config, model = tiny_llada(), LLaDAModelLM(tiny_llada())
    elif kind == "dream":
        config, model = tiny_dream(), DreamModel(tiny_dream())
    else:
        config, model = tiny_gemma.config, tiny_gemma
    shape = model_shape(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.layers == config.num_hidden_layers


def test_layer_and_output_bytes_by_hand():
    shape = model_shape(tiny_llada(d_model=8, n_heads=2, n_kv_heads=2, mlp_hidden_size=16))
    tokens, b = 10, 2
    norms = 2 * (4 + 2 * b) * tokens * 8  # 1280
    attention = b * tokens * (2 * 8 + 2 * 8) + 4 * tokens * 2  # 720
    mlp = 4 * b * tokens * 16  # 1280
    assert layer_bytes(shape, tokens, b) == norms + attention + mlp == 3280
    masked = 4
    head = (4 + 2 * b) * tokens * 8 + 12 * masked * 97 + 8 * tokens * 4
    assert activation_bytes(shape, tokens, masked, b, checkpointing=False) == 2 * 3280 + head
    recompute = 3280 + b * tokens * (2 * 8 + 2 * 16)
    assert activation_bytes(shape, tokens, masked, b, checkpointing=True) == 2 * b * tokens * 8 + max(
        head, recompute
    )
    assert no_grad_activation_bytes(shape, tokens, masked, b) == max(
        b * tokens * (3 * 8 + 3 * 16) + 4 * tokens * 8, 10 * masked * 97
    )


def test_model_states_of_cpu_offload_by_hand():
    shape = model_shape(tiny_llada())
    p = shape.parameters
    config = json.loads((REPO / "ds_configs" / "rtx4080.json").read_text())  # bf16, both offloaded to CPU
    plan = model_state_plan(shape, config, reference="engine", accelerator="cpu")
    # 16-bit policy, fp32 master and Adam's moments, fp32 flat gradient partitions (the recipes
    # accumulate in fp32), the fp32 gradient of its one sub-group, 16-bit reference; and the process.
    assert sum(item.bytes for item in plan.cpu) == PROCESS_BASELINE + (2 + 12 + 4 + 4 + 2) * p
    assert plan.nvme == []
    nvme = json.loads((REPO / "ds_configs" / "rtx4080_nvme.json").read_text())
    plan = model_state_plan(shape, nvme, reference="none", accelerator="cpu")
    assert sum(item.bytes for item in plan.nvme) == 12 * p  # parameters stay in RAM below max_in_cpu
    # Swap buffers in whole 1 KiB aio blocks: 4 for parameters, of the largest (the 97 x 32
    # embedding: 3104 elements, 3584 aligned); 4 fp32 ones of the one sub-group for the optimizer.
    assert shape.largest_parameter == 97 * 32
    buffers = 4 * 2 * 3584 + 4 * 4 * math.ceil(p / 256) * 256
    # and Adam's moments of the (one) sub-group, created outside the buffers at the first step
    assert MemoryPlan.total(plan.cpu) == PROCESS_BASELINE + 2 * p + 4 * p + 4 * p + buffers + 8 * p
    # DeepSpeed's estimator: 18 bytes a parameter on the CPU, times its 1.5 buffer factor.
    assert plan.cross_check["cpu_bytes"] == int(18 * p * 1.5)


def test_sub_groups_are_deepspeeds():
    """LLaDA-8B's parameters cut into optimizer sub-groups of 1e8 elements, by DeepSpeed's own code."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    def deepspeeds(sizes, sub_group_size):
        params = [SimpleNamespace(partition_numel=lambda n=n: n) for n in sizes]
        optimizer = SimpleNamespace(sub_group_size=sub_group_size)
        groups = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(optimizer, params)
        return [sum(p.partition_numel() for p in group) for group in groups]

    sizes = list(model_shape(FIXTURES / "llada-8b.json").parameter_sizes)
    expected = deepspeeds(sizes, 1e8)
    assert sub_groups(sizes, 1e8) == expected
    assert len(expected) > 60 and sum(expected) == sum(sizes)
    assert sub_groups([50, 50, 30, 80, 10], 100) == deepspeeds([50, 50, 30, 80, 10], 100) == [100, 110, 10]


def test_a_devices_peak_is_the_resident_bytes_and_the_larger_phase():
    items = [
        Item("states", 1),
        Item("gathered", 2, phase="backward"),
        Item("activations", 3, phase="backward"),
    ]
    assert MemoryPlan.total(items) == 1 + 2 + 3
    assert MemoryPlan.total([*items, Item("fp32 casts", 7, phase="boundary")]) == 1 + 7


def test_pinned_buffers_round_to_powers_of_two_on_cuda_only():
    assert pinned(3 * 2**20, "cuda") == 4 * 2**20
    assert pinned(4 * 2**20, "cuda") == 4 * 2**20
    assert pinned(3 * 2**20, "cpu") == 3 * 2**20


def test_llada_8b_needs_what_deepspeed_allocates_under_rtx4080():
    """CPU offload of policy and reference (bf16): 2 + 12 + 2 + 4 bytes a policy parameter (its
    16-bit partition, fp32 master and moments, 16-bit and fp32 gradient partitions) and 2 for the
    reference: 22 bytes, 164 GiB by hand; pinned buffers round up on CUDA, and the process."""
    shape = model_shape(FIXTURES / "llada-8b.json")
    config = json.loads((REPO / "ds_configs" / "rtx4080.json").read_text())
    plan = model_state_plan(shape, config, reference="engine")
    cpu = sum(item.bytes for item in plan.cpu) / 2**30
    by_hand = 22 * 8_016_216_064 / 2**30
    assert by_hand == pytest.approx(164.2, abs=0.1)
    assert by_hand < cpu
    assert 155 <= cpu <= 200
    without = sum(item.bytes for item in model_state_plan(shape, config, reference="none").cpu) / 2**30
    assert cpu - without >= 2 * 8_016_216_064 / 2**30  # the reference's 16-bit partitions, rounded up


def test_sweeps_count_as_the_micro_step_counts():
    # 2 pairs x 2 sides x 4 draws = 16 rows of 100 tokens; 400 tokens with grad = 4 rows a chunk (4 calls),
    # 1600 without = 16 rows (1 call): reference 1 + pass 1 1 + 4 forwards + 4 backwards, per micro-batch.
    run = RunShape(max_length=100, budget=4, micro_batch=2, accumulation=3, max_tokens_per_forward=400)
    shape = model_shape(FIXTURES / "llada-8b.json")
    sweeps = sweeps_per_step(shape, run)
    assert (sweeps.reference, sweeps.policy_no_grad, sweeps.policy_grad, sweeps.total) == (3, 3, 12, 30)
    one_pass = sweeps_per_step(
        shape, RunShape(max_length=100, budget=4, micro_batch=2, max_tokens_per_forward=1600)
    )
    assert (one_pass.one_pass, one_pass.total) == (True, 3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_within_a_quarter_of_the_measured_peak(checkpointing):
    config = tiny_llada(
        d_model=64, mlp_hidden_size=192, vocab_size=512, embedding_size=512, mask_token_id=511
    )
    torch.manual_seed(0)
    model = LLaDAModelLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = scored_inputs(512, 4, 128, 64, mask_token_id=511)
    predicted = activation_bytes(model_shape(config), 512, 256, 4, checkpointing=checkpointing)
    assert 0.75 < predicted / measured_activation_bytes(model, inputs) < 1.25
    predicted = no_grad_activation_bytes(model_shape(config), 512, 256, 4)
    assert 0.75 < predicted / measured_activation_bytes(model, inputs, grad=False) < 1.25


@pytest.mark.parametrize("slice_positions", [40, 256])
def test_the_output_layer_is_measured_one_slice_at_a_time(slice_positions):
    """A vocabulary large enough for the output layer to dominate, 256 masked positions: in slices of 40
    (backward included) the peak is that of one slice, as the formula says; in one slice, of all."""
    vocab = 8192
    config = tiny_llada(vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 1)
    torch.manual_seed(0)
    model, shape = LLaDAModelLM(config).train(), model_shape(config)
    inputs = scored_inputs(vocab, 4, 128, 64, mask_token_id=vocab - 1)
    slice_bytes = 4 * vocab * slice_positions
    predicted = activation_bytes(shape, 512, 256, 4, checkpointing=False, slice_bytes=slice_bytes)
    measured = measured_activation_bytes(model, inputs, slice_bytes=slice_bytes)
    assert 0.75 < predicted / measured < 1.25
    predicted = no_grad_activation_bytes(shape, 512, 256, 4, slice_bytes=slice_bytes)
    measured = measured_activation_bytes(model, inputs, grad=False, slice_bytes=slice_bytes)
    assert 0.75 < predicted / measured < 1.25


def test_the_measurement_sees_checkpointed_block_inputs():
    """Each checkpointed block keeps its input (b·T·d): more layers, more memory."""

    def measured(layers):
        config = tiny_llada(n_layers=layers, d_model=64, vocab_size=64, embedding_size=64, mask_token_id=63)
        model = LLaDAModelLM(config).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return measured_activation_bytes(model, scored_inputs(64, 4, 128, 8, mask_token_id=63))

    assert measured(6) - measured(2) == pytest.approx(4 * 4 * 512 * 64, rel=0.05)


def test_plan_command_prints_llada_8b_on_a_16_gb_card():
    model, ds_config = str(FIXTURES / "llada-8b.json"), str(REPO / "ds_configs/rtx4080.json")
    result = CliRunner().invoke(main, ["plan", "--model", model, "--ds_config", ds_config, "--ram-gib", "64"])
    assert result.exit_code == 0, result.output
    assert "8.016 B parameters" in result.output
    assert "DOES NOT FIT in 64 GiB" in result.output  # 16-bit policy and reference + 14 bytes a parameter
    assert "sweeps per optimizer step: 160" in result.output


def test_the_resource_monitor_reports_memory_and_drive_traffic(tmp_path):
    import os

    from dsdpo.planner.monitor import ResourceMonitor

    monitor = ResourceMonitor({"zero_optimization": {"offload_param": {"device": "nvme"}}})
    before = monitor.sample()
    held = torch.ones(50 * 2**20)  # 200 MiB, touched
    with (tmp_path / "swap.bin").open("wb") as file:
        file.write(os.urandom(16 * 2**20))
        file.flush()
        os.fsync(file.fileno())
    after = monitor.sample()
    assert after["cpu_memory_mb"] - before["cpu_memory_mb"] > 150
    assert after["cpu_peak_memory_mb"] >= after["cpu_memory_mb"] - 1
    assert after["nvme_written_mb"] >= 15  # the 16 MiB written and synced since the last sample
    assert "nvme_read_mb" in after
    del held
    assert "nvme_read_mb" not in ResourceMonitor({}).sample()  # only when offloading to NVMe
