"""SDAR's network (dsdpo/families/sdar.py) against the published code's numbers.

tests/fixtures/families/sdar/ holds a tiny random checkpoint in the published format and the logits
the published modeling_sdar.py (transformers 4.52.4, see build_sdar.py there) computed on it under
its sampler's block-causal mask. SDAR is not a dsdpo family yet (its score, the block-diffusion
ELBO, is not implemented): these tests load the class directly.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from dsdpo.families.sdar import SDARForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "families" / "sdar"


def test_logits_equal_the_published_code_under_its_block_causal_mask():
    tensors = load_file(FIXTURE / "expected.safetensors")
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    model = SDARForCausalLM.from_pretrained(FIXTURE).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tensors["logits_fp32"], atol=1e-5)
        padded = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(padded[real], tensors["logits_padded_fp32"][real], atol=1e-5)
    assert torch.allclose(padded[1, :8], tensors["logits_alone_row1_fp32"][0], atol=1e-5)


def test_bf16_logits_are_within_bf16_rounding_of_the_published_ones():
    """Not bit for bit: given the published (1, T, T) mask layout, torch's CPU attention picks another
    kernel than for dsdpo's (B, 1, T, T) one (with it, the logits were checked equal bit for bit).
    The two differ by about what bf16 rounding moves either from fp32."""
    tensors = load_file(FIXTURE / "expected.safetensors")
    model = SDARForCausalLM.from_pretrained(FIXTURE, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=tensors["input_ids"]).logits.float()
    gap = (tensors["logits_bf16"] - tensors["logits_fp32"]).abs()
    ours = (logits - tensors["logits_bf16"]).abs()
    assert gap.max() > 0.05
    assert ours.max() <= 0.15 and ours.mean() <= gap.mean(), (ours.max(), ours.mean(), gap.mean())


def test_blocks_are_counted_from_position_zero():
    """Block b (positions 4b..4b+3) sees blocks 0..b, whole: a token changed in block 1 moves the
    logits of blocks 1 and 2 and leaves block 0's alone."""
    ids = load_file(FIXTURE / "expected.safetensors")["input_ids"][:1]
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 100 + 5
    model = SDARForCausalLM.from_pretrained(FIXTURE).eval()
    with torch.no_grad():
        moved = (model(input_ids=ids).logits - model(input_ids=changed).logits).abs().amax(-1)[0]
    assert torch.all(moved[:4] == 0) and torch.all(moved[4:] > 0)


def test_gradient_checkpointing_gives_the_same_gradient():
    ids = load_file(FIXTURE / "expected.safetensors")["input_ids"]
    gradients = []
    for checkpointing in (False, True):
        model = SDARForCausalLM.from_pretrained(FIXTURE).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)
