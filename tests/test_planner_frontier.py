"""The planner on the frontier families: a mixture of experts' total and active parameters (LLaDA-MoE,
and the module layout LLaDA 2.x publishes), block-diffusion rows of [noised ; clean] (SDAR), and the
plans of LLaDA-MoE-7B-A1B and SDAR-8B-Chat on an RTX 4080 with the shipped DeepSpeed configs, against
numbers worked out by hand."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dsdpo.families.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from dsdpo.planner.activations import activation_bytes, no_grad_activation_bytes
from dsdpo.planner.cards import card
from dsdpo.planner.chunking import auto_chunk_tokens
from dsdpo.planner.measure import measured_activation_bytes, scored_inputs
from dsdpo.planner.memory import RunShape, memory_plan
from dsdpo.planner.report import plan, run_shape_from
from dsdpo.planner.shapes import _idle_expert_parameters, _moe_mlp_width, model_shape
from dsdpo.planner.sweeps import sweeps_per_step
from tests.cli_helpers import run

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
GIB = 2**30


def tiny_moe(layers=2, hidden=64, experts=16, top_k=4, expert_width=32, shared=32) -> LLaDAMoEConfig:
    return LLaDAMoEConfig(
        vocab_size=512, hidden_size=hidden, dense_intermediate_size=4 * hidden,
        expert_intermediate_size=expert_width, shared_expert_intermediate_size=shared,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, rope_theta=50000.0,
        partial_rotary_factor=1.0, num_experts_per_tok=top_k, num_experts=experts, qk_layernorm=True,
        moe_layer_freq=[1] * layers, moe_router_enable_expert_bias=True, mask_token_id=511, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip


def test_llada_moe_7b_total_and_active_parameters_by_hand():
    """LLaDA-MoE-7B-A1B (tests/fixtures/planner/SOURCES.md): 16 layers of attention 4·d² (d 2048, 16
    heads of 128, q/k norms 2·128), router d·64, 64 experts of 3·d·1024, 2 norms 2·d; untied
    embedding and output layer V·d each (V 157184), a final norm d. A token runs 8 of the 64 experts:
    active = total - 16·56·3·d·1024; without the input embedding that is the paper's 1.4B."""
    d, v, expert = 2048, 157184, 3 * 2048 * 1024
    layer = 4 * d * d + 2 * 128 + d * 64 + 64 * expert + 2 * d
    total = 16 * layer + 2 * v * d + d
    shape = model_shape(FIXTURES / "planner" / "llada-moe-7b-a1b.json")
    assert shape.parameters == total == 7_356_880_896
    assert shape.active_parameters == total - 16 * 56 * expert == 1_719_736_320
    assert (shape.active_parameters - v * d) / 1e9 == pytest.approx(1.4, abs=0.01)
    assert shape.intermediate == 8 * 1024 and (shape.experts, shape.experts_per_token) == (64, 8)


class GatedMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)


def test_the_moe_protocol_reads_the_layout_llada2_publishes():
    """modeling_llada2_moe.py's layout (reference-models/llada2_moe, 201-338, 553-566): the sparse block
    holds `experts`, `shared_experts` and a `gate` whose `top_k` says how many experts a token runs; the
    first layer is a dense MLP (first_k_dense_replace). LLaDA2.0-mini's widths divided by 16: d 128,
    experts 32 (of 256), top-8, expert width 32 (512), one shared expert of 32, dense width 320 (5120)."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.top_k = nn.Parameter(torch.zeros(32, 128)), 8

    class SparseMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.shared_experts = Gate(), GatedMLP(128, 32)
            self.experts = nn.ModuleList(GatedMLP(128, 32) for _ in range(32))

    config = None  # top_k comes from the gate: the config is not read
    dense, moe = nn.Module(), nn.Module()
    dense.mlp, moe.mlp = GatedMLP(128, 320), SparseMoeBlock()
    assert _moe_mlp_width(dense, config) == 320
    assert _moe_mlp_width(moe, config) == 8 * 32 + 32  # the top-8 experts and the shared one
    per_expert = 3 * (128 * 32) + 2 * 32 + 128  # weights and biases of one expert
    assert _idle_expert_parameters(moe, config) == (32 - 8) * per_expert


def test_moe_activations_are_those_measured():
    """Live tensor bytes of a scored chunk (dsdpo/planner/measure.py) through a tiny LLaDA-MoE with 4
    of 16 experts a token: the experts' copies of each token (3b·k·d a token, memory.py) are most of
    an MoE layer; a formula that counts only the experts' MLP width (and no q/k norms) predicted
    0.63-0.72 of this."""
    config = tiny_moe()
    torch.manual_seed(0)
    model, shape = LLaDAMoEModelLM(config).train(), model_shape(config)
    inputs = scored_inputs(512, 4, 64, 32, mask_token_id=511)
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        predicted = activation_bytes(shape, 256, 128, 4, checkpointing=checkpointing)
        assert 0.8 < predicted / measured_activation_bytes(model, inputs) < 1.25, checkpointing
    predicted = no_grad_activation_bytes(shape, 256, 128, 4)
    assert 0.8 < predicted / measured_activation_bytes(model, inputs, grad=False) < 1.6  # a bound


def test_block_model_activations_of_noised_and_clean_rows_are_those_measured():
    """SDAR scoring 4 rows of [noised ; clean] (dsdpo.objective.blocks, 2 x 64 tokens, 32 masked positions
    a row in
    the noised copy), with head_dim 32 for 4 heads of a 64-wide model (d_q = 128 = 2d, as SDAR-4B's
    32 x 128 heads on hidden 2560) and q/k norms: measured 1.03 and 1.05 of the live tensor bytes with
    and without checkpointing; 0.79-0.83 with the q/k norms left out, less with d_q taken as d."""
    from dsdpo.families.sdar import SDARConfig, SDARForCausalLM
    from dsdpo.objective.blocks import block_diffusion_inputs

    config = SDARConfig(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, block_size=4, mask_token_id=511, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model, shape = SDARForCausalLM(config).train(), model_shape(config)
    assert (shape.q_width, shape.kv_width, shape.qk_norms) == (128, 64, True)
    plain = scored_inputs(512, 4, 64, 32, mask_token_id=511)
    inputs = block_diffusion_inputs(plain["input_ids"], plain["targets"], plain["attention_mask"], 4)
    inputs |= {
        "scored": torch.cat([plain["scored"], torch.zeros_like(plain["scored"])], dim=1),
        "targets": plain["targets"].repeat(1, 2),
    }
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        predicted = activation_bytes(shape, 4 * 128, 4 * 32, 4, checkpointing=checkpointing)
        assert 0.9 < predicted / measured_activation_bytes(model, inputs) < 1.15, checkpointing


def test_a_block_models_rows_are_twice_their_length():
    """SDAR scores [noised ; clean] rows (dsdpo.objective.blocks): with rows of 64 tokens a forward of 256
    tokens
    holds 2 rows, not 4 (dsdpo.objective.elbo.plan_chunks counts the same), each with its 64 masked
    positions; 16 rows a micro-batch take 8 forwards with gradients and 2 without (1024 tokens)."""
    shape = model_shape(FIXTURES / "families" / "sdar")
    assert shape.block_size == 4
    run = RunShape(max_length=64, budget=4, micro_batch=2, max_tokens_per_forward=256)
    chunk = memory_plan(shape, {}, run, accelerator="cpu").chunk
    assert (chunk["rows"], chunk["tokens"], chunk["masked"]) == (2, 256, 2 * 64)
    assert chunk["activations"] == activation_bytes(shape, 256, 128, 4, checkpointing=True)
    assert (chunk["no_grad_rows"], chunk["no_grad_tokens"]) == (8, 1024)
    sweeps = sweeps_per_step(shape, run)
    assert (sweeps.policy_grad, sweeps.policy_no_grad, sweeps.reference) == (8, 2, 2)


def test_auto_chunks_of_a_block_model_are_those_of_rows_of_twice_the_length():
    """--max-tokens-per-forward auto for SDAR with rows of S = 64 tokens (64 response positions) is
    what it is for the same model scoring plain rows of 2S = 128 tokens with 64 response positions:
    whole [noised ; clean] rows, a multiple of 128 tokens."""
    shape = model_shape(FIXTURES / "families" / "sdar")
    plain = dataclasses.replace(shape, block_size=None)
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    block_run = RunShape(max_length=64, response_length=64, budget=8, micro_batch=2)
    plain_run = RunShape(max_length=128, response_length=64, budget=8, micro_batch=2)
    free = 3e6
    tokens, no_grad, room = auto_chunk_tokens(shape, config, block_run, free)
    assert (tokens, no_grad, room) == auto_chunk_tokens(plain, config, plain_run, free)
    rows = tokens // 128
    assert tokens % 128 == 0 and 1 < rows < 32
    assert activation_bytes(shape, rows * 128, rows * 64, 4, checkpointing=True) <= room
    assert activation_bytes(shape, (rows + 1) * 128, (rows + 1) * 64, 4, checkpointing=True) > room


def test_auto_says_a_block_models_rows_are_noised_and_clean():
    """What training prints for --max-tokens-per-forward auto (here on the CPU, from its free RAM)."""
    from dsdpo.config import ScoreConfig
    from dsdpo.planner.chunking import resolve_chunk_sizes

    score = ScoreConfig(max_tokens_per_forward="auto")
    note = resolve_chunk_sizes(
        score, model=str(FIXTURES / "families" / "sdar"), max_length=64, budget=4, micro_batch=1,
        ds_config=json.loads((REPO / "ds_configs/cpu.json").read_text()), gradient_checkpointing=True,
        reference="engine", device=torch.device("cpu"),
    )  # fmt: skip
    rows = score.max_tokens_per_forward // 128
    assert score.max_tokens_per_forward == rows * 128 and score.no_grad_tokens % 128 == 0
    assert f"({rows} rows of 2 x 64 ([noised ; clean])) per forward with gradients" in note


def _plans(model: str) -> dict[str, dict]:
    from dsdpo.cli.plan import _checked_ds_config

    shape = model_shape(FIXTURES / "planner" / model)
    plans = {}
    for name in ("rtx4080.json", "rtx4080_nvme.json", "rtx4080_hybrid.json"):
        config = _checked_ds_config(REPO / "ds_configs" / name, 1, shape.largest_parameter)
        plans[name] = plan(shape, config, run_shape_from(config), card("rtx4080"))
    return plans


def test_llada_moe_7b_on_an_rtx4080_by_hand():
    """LLaDA-MoE-7B-A1B (P = 7,356,880,896; 16 micro-batches of 1 pair, budget 8, rows of 1024, bf16,
    fp32 gradient accumulation), `dsdpo plan`'s defaults:
    - activations of 4 rows (T = 4096 tokens, all masked) with checkpointing: 16 layers' inputs
      16·2·T·2048 = 0.25 GiB + the recomputed layer: norms 2·8·T·d (0.125), attention 2·T·4d + 4·T·16
      (0.063), q/k norms 8·T·2d (0.125), MLP of the 8 experts 4·2·T·8192 (0.25), the experts' copies
      T·(3·2·8·d + 4·64 + 24·8) (0.377), backward 2·T·(2d + 2·8192) (0.156): 1.096 GiB; 1.346 in all.
    - GPU, rtx4080.json: the backward, activations 1.346 + gathered parameters (reuse 3e8/2 + the
      output layer V·d, 2 bytes each: 0.879) + that module's gradients (0.600) + the bucket's copy and
      fp32 cast (0.093 + 0.186) = 3.104 GiB, just above the gradient boundary (fp32 copy of the output
      layer's gradient 4·V·d = 1.20 GiB beside an fp64 norm chunk of 2.5e8 elements, 1.86: 3.06),
      plus the resident reduce bucket (2 bytes x 5e7, 0.093): 3.20 GiB. NVMe configs (no prefetch, no
      reuse: 0.600 gathered) peak at the boundary with a sub-group's casts, 3.31 + 0.093 = 3.41 GiB.
      All fit 16 GiB.
    - CPU RAM, rtx4080.json: Adam 12·P = 82.2 GiB, pinned 16-bit partition 2·P -> 16 GiB, pinned fp32
      flat gradients 4·P -> 32 GiB, 68 sub-groups' fp32 gradients (4·P, each rounded up: 37 GiB), the
      reference's 2·P = 13.7 GiB (14.5 rounded), 0.44 baseline: 182 GiB. NVMe moves Adam and most
      parameters to the drive (82.2 + 11.8 + 13.7 = 107.8 GiB), leaving 50 GiB; hybrid 73 GiB.
    - sweeps: 16 rows a micro-batch, 4 a forward with gradients, 16 without: 4 + 4 + 1 + 1 = 10
      per micro-batch, 160 a step."""
    plans = _plans("llada-moe-7b-a1b.json")
    cpu_offload = plans["rtx4080.json"]
    assert cpu_offload["model"]["active_parameters"] == 1_719_736_320
    assert cpu_offload["totals"]["gpu"] / GIB == pytest.approx(3.20, abs=0.02)
    assert cpu_offload["chunk"]["activations"] / GIB == pytest.approx(1.346, abs=0.01)
    assert cpu_offload["totals"]["cpu"] / GIB == pytest.approx(182.2, abs=0.5)
    assert cpu_offload["sweeps"]["total"] == 160
    nvme, hybrid = plans["rtx4080_nvme.json"], plans["rtx4080_hybrid.json"]
    assert nvme["totals"]["gpu"] / GIB == pytest.approx(3.41, abs=0.02)
    assert nvme["totals"]["nvme"] / GIB == pytest.approx(107.8, abs=0.1)
    assert 45 < nvme["totals"]["cpu"] / GIB < 55 and 65 < hybrid["totals"]["cpu"] / GIB < 80
    assert all(result["fits_gpu"] for result in plans.values())


def test_sdar_8b_on_an_rtx4080_by_hand():
    """SDAR-8B-Chat's released config.json (P = 8,190,735,360: 36 layers of q,o 4096², k,v 4096·1024,
    MLP 3·4096·12288, norms 2·4096 + 2·128; untied 151936 x 4096 embedding and output layer; block 4):
    - rows of 1024 go as [noised ; clean], 2048 tokens: 4096 tokens a forward hold 2 rows, 16384
      without gradients 8: sweeps 8 + 8 + 2 + 2 = 20 a micro-batch, 320 a step (LLaDA-MoE's: 160).
    - activations of 2 rows (T = 4096 tokens, 2048 masked) with checkpointing: 36·2·T·4096 = 1.125 GiB
      of layer inputs + the recomputed layer (norms 2·8·T·d 0.25, attention 2·T·(2·4096 + 2·1024) +
      4·T·32 0.079, q/k norms 8·T·(4096 + 1024) 0.156, MLP 4·2·T·12288 0.375, backward
      2·T·(2·4096 + 2·12288) 0.25 GiB): 2.235 GiB.
    - GPU, rtx4080.json: the boundary (4·V·d = 2.32 GiB + the fp64 norm chunk 1.86 GiB) 4.18 GiB, the
      backward 2.235 + 1.439 + 1.159 + 0.093 + 0.186 = 5.11 GiB, larger: 5.21 GiB with the bucket; fits.
    - CPU RAM, rtx4080.json: Adam 12·P = 91.5 GiB, 16 + 32 GiB pinned partitions, 56 sub-groups' fp32
      gradients 53 GiB, the reference 20.3 GiB, the baseline: 213 GiB."""
    plans = _plans("sdar-8b-chat.json")
    cpu_offload = plans["rtx4080.json"]
    assert cpu_offload["model"]["parameters"] == 8_190_735_360
    assert (cpu_offload["chunk"]["rows"], cpu_offload["chunk"]["no_grad_rows"]) == (2, 8)
    assert cpu_offload["sweeps"]["total"] == 320
    assert cpu_offload["chunk"]["activations"] / GIB == pytest.approx(2.235, abs=0.01)
    assert cpu_offload["totals"]["gpu"] / GIB == pytest.approx(5.21, abs=0.02)
    assert cpu_offload["totals"]["cpu"] / GIB == pytest.approx(213.3, abs=0.5)
    assert all(result["fits_gpu"] for result in plans.values())


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (
            "llada-moe-7b-a1b.json",
            "7.357 B parameters (counted on the meta device; 1.720 B active per token, 8 of 64",
        ),
        (
            "sdar-8b-chat.json",
            "rows of 1024 tokens (responses 1024; a forward's row is [noised ; clean], 2048",
        ),
    ],
)
def test_dsdpo_plan_prints_the_total_and_active_counts_and_block_rows(model, says):
    result = run(
        "plan", "--model", FIXTURES / "planner" / model, "--ds_config", REPO / "ds_configs/rtx4080.json"
    )
    assert result.exit_code == 0, result.output
    assert says in result.output


def test_a_model_type_nobody_knows_is_one_short_line(tmp_path):
    """As dFactory's copy of LLaDA2.0-mini's config.json ("llada2_moe_veomni", fused experts) is: the
    file, the type and dsdpo's families, not transformers' list of every model type it knows (10,000
    characters)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model", "hidden_size": 8}))
    result = run("plan", "--model", tmp_path, "--ds_config", REPO / "ds_configs/rtx4080.json")
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {tmp_path / 'config.json'}: model_type 'no_such_model' is not one")
    assert "nor a dsdpo family's (Dream, llada, llada2_moe, lladamoe, sdar" in line and len(line) < 300


def test_llada2_mini_total_and_active_parameters_by_hand_and_its_plans_on_an_rtx4080():
    """LLaDA2.0-mini (tests/fixtures/planner/SOURCES.md): 20 layers of attention (fused q/k/v d·(2048 +
    2·512), output d², q/k norms 2·128) and 2 norms; layer 0 a dense MLP 3·d·5120, layers 1-19 a
    router 256·d, 256 experts of 3·d·512 and a shared expert of the same width; untied V·d embedding
    and output layer (V 157184), a final norm. A token runs 8 of the 256 experts: active = total -
    19·248·3·d·512, the model page's "16B total, 1.4B active".
    On an RTX 4080 every shipped config fits the card (activations follow the active count); full
    fine-tuning needs ~391 GiB of CPU RAM with rtx4080.json (Adam 12·P = 181.7 GiB, pinned 16-bit and
    fp32 partitions rounded up to 32 + 64 GiB, the sub-groups' fp32 gradients 4·P, the reference 2·P):
    only LoRA fits a 64 GB box."""
    d, v, expert = 2048, 157184, 3 * 2048 * 512
    attention = d * (2048 + 2 * 512) + d * d + 2 * 128
    moe_layer = 256 * d + 256 * expert + expert
    total = 20 * (attention + 2 * d) + 3 * d * 5120 + 19 * moe_layer + 2 * v * d + d
    shape = model_shape(FIXTURES / "planner" / "llada2-mini.json")
    assert shape.parameters == total == 16_255_638_528
    assert shape.active_parameters == total - 19 * 248 * expert == 1_432_968_192
    assert shape.block_size == 32  # not in the config: the family's default (generate()'s)
    plans = _plans("llada2-mini.json")
    assert all(result["fits_gpu"] for result in plans.values())
    assert plans["rtx4080.json"]["totals"]["cpu"] / GIB == pytest.approx(390.8, abs=1)
    result = run(
        "plan", "--model", FIXTURES / "planner" / "llada2-mini.json", "--ds_config",
        REPO / "ds_configs/rtx4080_lora.json", "--lora-rank", "16", "--ram-gib", "64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no full fine-tuning setting fits" in result.output
    assert "fastest LoRA (rank 16) that fits: rtx4080_lora.json" in result.output
