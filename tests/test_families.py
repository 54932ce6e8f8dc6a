"""LLaDA and Dream as published: dsdpo's own implementations against the published code's numbers.

tests/fixtures/families/ holds tiny random checkpoints in the published format and what the
published modelling code (transformers 4.57, see build.py there) computed on them: logits in fp32
and bf16, logits of a right-padded batch, and exact ELBOs by enumeration (Dream's logits shifted as
its own sampler shifts them). Nothing here runs the published code.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsdpo.diffusion import exact_elbo
from dsdpo.engine import lora_targets
from dsdpo.errors import DsdpoError
from dsdpo.families import DREAM, LLADA, family_of_model
from dsdpo.generate import denoiser_logits
from dsdpo.logprobs import MaskedTokenScorer
from dsdpo.models import load_config, load_model, load_tokenizer, resolve_mask_token_id
from dsdpo.tiny import build_tokenizer
from tests.cli_helpers import run

FIXTURES = Path(__file__).parent / "fixtures" / "families"
FAMILIES = {"llada": LLADA, "dream": DREAM}
# Stands in for the published code files: loading must never import them.
POISON = "raise RuntimeError('the model folder\\'s own code was run')\n"


def expected(name):
    return load_file(FIXTURES / name / "expected.safetensors"), json.loads(
        (FIXTURES / name / "expected.json").read_text()
    )


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


@pytest.mark.parametrize("name", list(FAMILIES))
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
    assert torch.allclose(padded[1, :8], tensors["logits_alone_row1_fp32"][0], atol=1e-5)
    bf16 = load_model(FIXTURES / name, dtype="bf16").eval()
    with torch.no_grad():
        logits = bf16(input_ids=ids).logits.float()
    # bf16 rounding differs from fp32 by ~0.25 here; the published bf16 path is matched to ~0.
    assert (tensors["logits_bf16"] - tensors["logits_fp32"]).abs().max() > 0.1
    assert torch.allclose(logits, tensors["logits_bf16"], atol=0.02)


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
    with torch.no_grad():
        logits = denoiser_logits(model, ids, torch.ones_like(ids))
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
    result = run("score", "--model", folder, "--trust-remote-code", "--data", data, "--budget", 256,
                 "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    for case, score in zip(cases["cases"], scores, strict=True):
        error = abs(score["chosen_elbo"] - case["exact_elbo"])
        assert error < 4 * score["chosen_std_error"] + 1e-3, (case, score)


def test_padded_and_unpadded_scores_agree(family_dir):
    _, folder = family_dir
    tokenizer, model = load_tokenizer(folder), MaskedTokenScorer(load_model(folder).eval())
    mask_id = resolve_mask_token_id(None, load_config(folder), tokenizer)
    short, long = [10, 11, mask_id, 12, 3], [20, 21, 22, 23, mask_id, 24, mask_id, 3]
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, : len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    attention = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    scored = ids == mask_id
    with torch.no_grad():
        together = model(ids, attention, scored, ids.roll(1, 1))
        alone = model(ids[:1, : len(short)], attention[:1, : len(short)], scored[:1, : len(short)],
                      ids.roll(1, 1)[:1, : len(short)])
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
def test_lora_auto_targets_every_block_linear_and_not_the_output_layer(name):
    from peft import LoraConfig, get_peft_model

    model = load_model(FIXTURES / name)
    family = FAMILIES[name]
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=lora_targets("auto", family)))
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft.named_modules()
               if n.endswith(".lora_A")}
    head = family.head
    assert adapted == linear - {head}
