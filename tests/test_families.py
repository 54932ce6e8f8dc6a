"""LLaDA, Dream, LLaDA-MoE, SDAR and LLaDA 2.x as published: dsdpo's own implementations against the
published code's numbers.

tests/fixtures/families/ holds tiny random checkpoints in the published format and what the
published modelling code (transformers 4.57, see build.py there; SDAR: 4.52.4, build_sdar.py;
LLaDA 2.x: 4.57.6, build_llada2.py) computed on them: logits in fp32 and bf16, logits of a
right-padded batch, and exact ELBOs by enumeration (Dream's logits shifted as its own sampler shifts
them; SDAR's and LLaDA 2.x's the block-diffusion ELBO, every block scored as its sampler sees it).
Nothing here runs the published code.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.canvas import denoise
from dsdpo.families import DREAM, LLADA, LLADA2, LLADA_MOE, SDAR, family_of_model, lora_targets
from dsdpo.models.loading import load_config, load_model, load_tokenizer, resolve_mask_token_id
from dsdpo.models.tiny import build_tokenizer
from dsdpo.objective.elbo import exact_elbo
from dsdpo.objective.logprobs import MaskedTokenScorer
from tests.cli_helpers import run

FIXTURES = Path(__file__).parent / "fixtures" / "families"
FAMILIES = {"llada": LLADA, "dream": DREAM, "llada_moe": LLADA_MOE, "sdar": SDAR, "llada2": LLADA2}
# SDAR's logits are checked in tests/test_sdar.py: under the published (1, T, T) block mask torch's CPU
# attention takes another bf16 kernel, so its bf16 bound is not this file's.
LOGIT_FAMILIES = [name for name in FAMILIES if name != "sdar"]
# Stands in for the published code files: loading must never import them.
POISON = "raise RuntimeError('the model folder\\'s own code was run')\n"


def expected(name):
    return load_file(FIXTURES / name / "expected.safetensors"), json.loads(
        (FIXTURES / name / "expected.json").read_text()
    )


@contextmanager
def torch_linear():
    """torch's own F.linear. A ZeRO-3 engine built earlier in this process (another test module)
    replaces it process-wide with DeepSpeed's matmul-then-add-bias, which rounds twice in bf16 where
    the published code's fused linear rounds once (0.1 apart on Dream's biased q/k/v)."""
    patched = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


def published_folder(name: str, out: Path) -> Path:
    """A model folder as a user has it: published config (auto_map), weights, code files, tokenizer."""
    shutil.copytree(FIXTURES / name, out, ignore=shutil.ignore_patterns("expected*"), dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    for module in {entry.split(".")[0] for entry in config["auto_map"].values()}:
        (out / f"{module}.py").write_text(POISON)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, published_folder(request.param, tmp_path_factory.mktemp(request.param))


def test_published_folder_loads_natively_without_running_its_code(family_dir):
    name, folder = family_dir
    model = load_model(folder, trust_remote_code=True)  # even when remote code is allowed
    assert type(model) is FAMILIES[name].model_class
    assert family_of_model(model) is FAMILIES[name]
    assert model.supports_gradient_checkpointing


@pytest.mark.parametrize("name", LOGIT_FAMILIES)
def test_logits_equal_the_published_code(name):
    tensors, _ = expected(name)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    model = load_model(FIXTURES / name).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tensors["logits_fp32"], atol=1e-5)
        padded = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(padded[real], tensors["logits_padded_fp32"][real], atol=1e-5)
    # A padded row gives the logits it has alone (the published LLaDA before 2025-10 did not).
    alone = tensors["logits_alone_row1_fp32"][0]
    assert torch.allclose(padded[1, : len(alone)], alone, atol=1e-5)
    bf16 = load_model(FIXTURES / name, dtype="bf16").eval()
    with torch.no_grad(), torch_linear():
        logits = bf16(input_ids=ids).logits.float()
    # bf16 rounding moves the published logits from fp32 by ~0.25 at most, ~0.03 on average. How bf16
    # GEMMs accumulate depends on the CPU's kernels (AVX-512 or AMX), so the published bf16 numbers are
    # matched to within that kernel noise, not bit for bit: on an AMX Xeon, max 0.0625 and mean 0.006
    # (LLaDA) / 0.008 (Dream); DeepSpeed's twice-rounding linear gives max 0.2, mean 0.026 on Dream.
    gap = (tensors["logits_bf16"] - tensors["logits_fp32"]).abs()
    assert gap.max() > 0.1
    ours = (logits - tensors["logits_bf16"]).abs()
    assert ours.max() <= 0.1 and ours.mean() <= 0.4 * gap.mean(), (ours.max(), ours.mean(), gap.mean())


def test_the_pre_2025_10_llada_code_ignored_padding():
    """Why the native implementation exists: the old published code scores a padded row differently."""
    tensors, _ = expected("llada")
    old = tensors["logits_padded_pre20251021_fp32"][1, :8]
    assert (old - tensors["logits_alone_row1_fp32"][0]).abs().max() > 0.5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_elbo_equals_the_published_code(name):
    _, cases = expected(name)
    model = MaskedTokenScorer(load_model(FIXTURES / name).eval())
    tokenizer = build_tokenizer()
    for case in cases["cases"]:
        prompt, response = case["prompt_ids"], case["response_ids"]
        ids = torch.tensor([prompt + response])
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        response_mask[0, len(prompt) :] = True
        value = exact_elbo(model, ids, response_mask, mask_token_id=tokenizer.mask_token_id)
        assert value.item() == pytest.approx(case["exact_elbo"], abs=1e-4), case


def test_dream_sampler_reads_the_logits_shifted_by_one():
    tensors, _ = expected("dream")
    ids = tensors["input_ids"]
    model = load_model(FIXTURES / "dream").eval()
    rows, columns = torch.ones_like(ids).nonzero(as_tuple=True)
    with torch.no_grad():
        logits = denoise(model, ids, torch.ones_like(ids)).logits(rows, columns).view(*ids.shape, -1)
    raw = tensors["logits_fp32"]
    published = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # generation_utils.py's _sample
    assert torch.allclose(logits, published, atol=1e-5)


def test_score_command_converges_to_the_published_exact_elbo(family_dir, tmp_path):
    name, folder = family_dir
    _, cases = expected(name)
    rows = [{"prompt": c["prompt"], "chosen": c["response"], "rejected": "zz"} for c in cases["cases"]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "scores.jsonl"
    result = run(
        "score",
        "--model",
        folder,
        "--trust-remote-code",
        "--data",
        data,
        "--budget",
        256,
        "--out",
        out,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    for case, score in zip(cases["cases"], scores, strict=True):
        error = abs(score["chosen_elbo"] - case["exact_elbo"])
        assert error < 4 * score["chosen_std_error"] + 1e-3, (case, score)


def test_padded_and_unpadded_scores_agree(family_dir):
    name, folder = family_dir
    if FAMILIES[name].block_size_field:
        pytest.skip("a block model's rows are [noised ; clean]: tests/test_blocks.py, padded rows alone")
    tokenizer, model = load_tokenizer(folder), MaskedTokenScorer(load_model(folder).eval())
    mask_id = resolve_mask_token_id(None, load_config(folder), tokenizer)
    short, long = [10, 11, mask_id, 12, 3], [20, 21, 22, 23, mask_id, 24, mask_id, 3]
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, : len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    attention = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    scored = ids == mask_id
    with torch.no_grad():
        together = model(ids, attention, scored, ids.roll(1, 1))
        alone = model(
            ids[:1, : len(short)],
            attention[:1, : len(short)],
            scored[:1, : len(short)],
            ids.roll(1, 1)[:1, : len(short)],
        )
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_mask_token_falls_back_to_the_published_one(tmp_path):
    folder = published_folder("llada", tmp_path / "llada")
    config = json.loads((folder / "config.json").read_text())
    del config["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_mask_token_id(None, load_config(folder), None) == 126336


def test_unsupported_published_option_is_named(tmp_path):
    folder = published_folder("llada", tmp_path / "llada")
    config = json.loads((folder / "config.json").read_text())
    config["block_type"] = "sequential"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DsdpoError, match="block_type = 'sequential' is not supported"):
        load_model(folder)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_auto_targets_every_block_linear_but_the_output_layer_and_routed_experts(name):
    from peft import LoraConfig, get_peft_model

    model = load_model(FIXTURES / name)
    family = FAMILIES[name]
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=lora_targets("auto", family)))
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in peft.named_modules()
        if n.endswith(".lora_A")
    }
    # LLaDA-MoE's and LLaDA 2.x's (whose router `mlp.gate` is no linear layer: a bare weight)
    routed = {n for n in linear if ".mlp.experts." in n or n.endswith(".mlp.gate")}
    assert bool(routed) == (family in (LLADA_MOE, LLADA2))
    assert adapted == linear - {family.head} - routed


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A full fine-tuning run on LLaDA, LLaDA-MoE, SDAR and LLaDA 2.x and a LoRA run on Dream, each
    with the trainer's defaults (ZeRO-3 partitioned loading, gradient checkpointing on, a reference
    engine or adapters off)."""
    from dsdpo.config import Config, DataConfig, ModelConfig, SamplerConfig, TrainConfig
    from dsdpo.training.demo import addition_pairs, write_jsonl
    from dsdpo.training.loop import train
    from tests.ds_helpers import CPU_CONFIG

    folder = tmp_path_factory.mktemp("family-runs")
    ds_config = {key: value for key, value in CPU_CONFIG.items() if key != "scheduler"}  # lr from step 1
    (folder / "ds.json").write_text(json.dumps(ds_config))
    data = write_jsonl(addition_pairs(8, seed=3), folder / "pairs.jsonl")
    problems = [
        {"question": row["prompt"], "answer": int(row["chosen"])} for row in addition_pairs(2, seed=4)
    ]
    # The block models also evaluate held-out pairs (their block ELBO) and problems (their own samplers)
    # at start and end.
    eval_pairs = [{**row, "id": f"held-{row['id']}"} for row in addition_pairs(2, seed=5)]
    held_out = {
        "eval_data": str(write_jsonl(eval_pairs, folder / "eval_pairs.jsonl")),
        "eval_problems": str(write_jsonl(problems, folder / "problems.jsonl")),
    }
    # Two blocks: one sampler forward per step, several seconds for 64 tokens.
    eval_sampler = SamplerConfig(gen_length=8)
    runs = {}
    for name, extra in (
        ("llada", {}),
        ("dream", {"lora_rank": 4}),
        ("llada_moe", {}),
        ("sdar", {}),
        ("llada2", {}),
    ):
        model_dir = published_folder(name, folder / f"{name}-model")
        config = Config(
            model=ModelConfig(path=str(model_dir), trust_remote_code=True, **extra),
            data=DataConfig(path=str(data)),
            train=TrainConfig(
                output=str(folder / f"{name}-run"), **(held_out if FAMILIES[name].block_size_field else {})
            ),
            eval_sampler=eval_sampler,
        )
        train(config, folder / "ds.json")
        runs[name] = (model_dir, folder / f"{name}-run", data)
    return runs


@pytest.mark.parametrize("name", ["sdar", "llada2"])
def test_a_block_model_run_evaluates_held_out_pairs_and_problems(trained_runs, name):
    _, run_dir, _ = trained_runs[name]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "eval/accuracy" in row]
    assert len(evaluated) >= 2 and all("eval/loss" in row for row in evaluated), rows


def test_a_llada2_run_logs_its_router_statistics(trained_runs):
    _, run_dir, _ = trained_runs["llada2"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in steps if "loss" in row]
    # 8 experts, top-2: an expert's load is 0 to 4 times an even share.
    assert steps and all(
        1 <= row["router/load_max"] <= 4 and 0 <= row["router/load_min"] <= 1 for row in steps
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trained_checkpoint_exports_in_the_published_format_and_scores(trained_runs, name, tmp_path):
    model_dir, run_dir, data = trained_runs[name]
    out = tmp_path / "export"
    result = run("export", run_dir, out, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    # The published layout: the same weight names and shapes, config fields, code files, tokenizer.
    published = load_file(FIXTURES / name / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in published.items()}
    assert not all(torch.equal(exported[k], published[k]) for k in published)  # training moved it
    config = json.loads((out / "config.json").read_text())
    original = json.loads((FIXTURES / name / "config.json").read_text())
    assert {k: config.get(k) for k in ("model_type", "auto_map", "architectures")} == {
        k: original[k] for k in ("model_type", "auto_map", "architectures")
    }
    for code_file in model_dir.glob("*.py"):
        assert (out / code_file.name).read_text() == code_file.read_text()
    assert (out / "tokenizer.json").is_file()
    scores = tmp_path / "scores.jsonl"
    result = run("score", "--model", out, "--data", data, "--budget", 2, "--out", scores, "--no-progress")
    assert result.exit_code == 0, result.output
    from_checkpoint = tmp_path / "from-checkpoint.jsonl"
    result = run(
        "score", "--model", run_dir, "--data", data, "--budget", 2, "--out", from_checkpoint, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    for a, b in zip(scores.read_text().splitlines(), from_checkpoint.read_text().splitlines(), strict=True):
        assert json.loads(a)["chosen_elbo"] == pytest.approx(json.loads(b)["chosen_elbo"], abs=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradient(name):
    ids = expected(name)[0]["input_ids"]
    gradients, norm_calls = [], []
    for checkpointing in (False, True):
        model = load_model(FIXTURES / name).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        first_norm = next(
            m
            for n, m in model.named_modules()
            if n.endswith("0.attn_norm") or n.endswith("0.input_layernorm")
        )
        calls = []
        first_norm.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        norm_calls.append(len(calls))
    assert norm_calls == [1, 2]  # the checkpointed block ran again in backward
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


IGNORES_PADDING_CODE = '''
from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM


class IgnoresPaddingConfig(LLaDAConfig):
    model_type = "llada-ignores-padding"


class IgnoresPaddingModel(LLaDAModelLM):
    """Like LLaDA's published code before 2025-10: attention_mask is accepted and ignored."""

    config_class = IgnoresPaddingConfig

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return super().forward(input_ids)
'''


@pytest.fixture(scope="module")
def ignores_padding_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ignores-padding")
    (folder / "modeling_ignores.py").write_text(IGNORES_PADDING_CODE)
    config = json.loads((FIXTURES / "llada" / "config.json").read_text())
    config.update(
        model_type="llada-ignores-padding",
        architectures=["IgnoresPaddingModel"],
        auto_map={
            "AutoConfig": "modeling_ignores.IgnoresPaddingConfig",
            "AutoModel": "modeling_ignores.IgnoresPaddingModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "llada" / "model.safetensors", folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_a_remote_model_that_ignores_padding_is_scored_without_padding(ignores_padding_dir, caplog):
    model = load_model(ignores_padding_dir, trust_remote_code=True).eval()
    assert type(model).__name__ == "IgnoresPaddingModel"  # its own code, not dsdpo's LLaDA
    scorer = MaskedTokenScorer(model)
    mask_id = build_tokenizer().mask_token_id
    ids = torch.tensor([[10, 11, mask_id, 12, 3, 0, 0], [20, 21, 22, mask_id, 23, mask_id, 3]])
    attention = (ids[:, :] != 0).long()
    targets, scored = ids.roll(1, 1), ids == mask_id
    with torch.no_grad():
        together = scorer(ids, attention, scored, targets)
        alone = scorer(ids[:1, :5], attention[:1, :5], scored[:1, :5], targets[:1, :5])
    assert scorer.ignores_padding
    assert "ignores the padding mask" in caplog.text
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    with torch.no_grad():  # the sampler too (left padding)
        left = denoise(model, torch.tensor([[0, 0, 10, 11, mask_id]]), torch.tensor([[0, 0, 1, 1, 1]]))
        single = denoise(model, torch.tensor([[10, 11, mask_id]]), torch.ones(1, 3, dtype=torch.long))
        columns = torch.arange(3)
    assert torch.allclose(
        left.logits(columns * 0, columns + 2), single.logits(columns * 0, columns), atol=1e-5
    )


def test_a_model_that_honours_padding_is_not_flagged():
    scorer = MaskedTokenScorer(load_model(FIXTURES / "llada").eval())
    assert scorer.ignores_padding is False  # dsdpo's own: known to honour the mask, never probed


def test_a_model_without_gradient_checkpointing_stops_before_training(ignores_padding_dir, tmp_path):
    from tests.ds_helpers import cpu_ds_config, engines_for

    folder = tmp_path / "no-checkpointing"
    shutil.copytree(ignores_padding_dir, folder)
    code = folder / "modeling_ignores.py"
    code.write_text(code.read_text() + "\n    supports_gradient_checkpointing = False\n")
    with pytest.raises(DsdpoError, match=r"does not support gradient checkpointing.*--no-gradient-check"):
        engines_for(folder, cpu_ds_config(), trust_remote_code=True)
    engines_for(folder, cpu_ds_config(), trust_remote_code=True, gradient_checkpointing=False)


def test_two_ranks_train_a_model_that_ignores_padding(ignores_padding_dir, tmp_path):
    """Issue 20 (confirmed): such a model runs one forward per distinct row length, a count that differs
    between ranks; ZeRO-3's collective gathers then hung. Every rank now runs the most any rank needs."""
    from dsdpo.training.demo import write_jsonl
    from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

    rows = [
        {
            "id": f"r{i}",
            "prompt": "q" * (1 + i % 5),
            "chosen": "a" * (1 + i % 3),
            "rejected": "b" * (1 + i % 4),
        }
        for i in range(16)
    ]
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    model = tmp_path / "model"
    shutil.copytree(ignores_padding_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = config["auto_map"]["AutoModel"]  # what training builds
    (model / "config.json").write_text(json.dumps(config))
    options = dict(max_steps=2, budget=2, beta=0.5, epochs=1)
    args = train_args(REPO / "ds_configs" / "cpu.json", model, data, tmp_path / "run", **options)
    result = run_train([*args, "--trust-remote-code"], ranks=2, timeout=240)
    assert result.returncode == 0, tail(result)
    assert sorted(metrics_by_step(tmp_path / "run")) == [1, 2]
