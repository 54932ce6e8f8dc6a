"""The block families' samplers as published: block by block, each block denoised given the finished ones.

SDAR: reference-models/sdar/generate.py, `block_diffusion_generate` (JetAstra/SDAR @c2041a8). The canvas is
prompt + gen_length masks, rounded up to whole blocks counted from position 0 (79-81); the blocks
the prompt fills are context, the others are denoised in order (108-199): each step predicts the
block's tokens from the logits at their own positions, draws every one of them (31-48), and keeps
some by the remasking rule; after each block, generation stops once a stop token appears anywhere
after the prompt (201-202). The published code feeds each block to a KV cache of the finished
ones; running the prefix up to the block's end through the block-causal model is the same
computation (docs/published_code.md, "sdar"), so no cache is kept here.

The published draw always samples: there is no greedy branch, and temperature 0 divides by zero
(39-40). Its greedy is top_k = 1 (the draw then falls on the argmax), which is what
`dsdpo generate --temperature 0` asks of it.

LLaDA 2.x: reference-models/llada2_moe/modeling_llada2_moe.py, `generate` (1261-1431), the same
algorithm with three differences, each an option here: its only remasking rule is the threshold one
(`low_confidence_dynamic`, threshold 0.95), a step keeps at most the block's masked tokens
(`keep_at_most_masked`, 1396-1400: SDAR's may redraw decoded ones), and the steps per block are at
most gen_length // minimal_topk (1331). Its stopping rule is SDAR's (1413-1418: EOS anywhere after
the prompt, checked after each block). Its published draw samples at temperature 0 too: 0 skips the
division (1241) and torch.multinomial draws at temperature 1; dllm fixed it later with a greedy
branch (dllm/pipelines/llada2/sampler.py @9a2c4ee, `sample_tokens`: the argmax of the top-k/top-p
filtered probabilities, and its probability as the confidence), which temperature 0 is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsdpo.errors import DsdpoError

REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclass(frozen=True)
class BlockSampling:
    """A block family's published sampler where dsdpo generate's options leave it open (its family
    names it: dsdpo.families)."""

    remasking: str  # what dsdpo's 'low_confidence' is in it
    confidence_threshold: float = 0.85  # its default threshold (low_confidence_dynamic)
    minimal_topk: int | None = None
    keep_at_most_masked: bool = False
    greedy_by_argmax: bool = False  # temperature 0: the argmax branch, else top_k 1 at temperature 1

    def options(self, temperature: float) -> dict:
        """block_generate's options for dsdpo's `temperature` (0: greedy)."""
        if temperature:
            draw = {"temperature": temperature}
        else:
            draw = {"temperature": 0.0} if self.greedy_by_argmax else {"temperature": 1.0, "top_k": 1}
        return {
            "remasking": self.remasking,
            "confidence_threshold": self.confidence_threshold,
            "minimal_topk": self.minimal_topk,
            "keep_at_most_masked": self.keep_at_most_masked,
            **draw,
        }


def _top_k(logits: Tensor, k: int) -> Tensor:
    """generate.py:8-14: logits below the k-th largest become -inf."""
    if k <= 0:
        return logits
    smallest_kept = torch.topk(logits, k).values[..., -1, None]
    return torch.where(logits < smallest_kept, torch.full_like(logits, float("-inf")), logits)


def _top_p(logits: Tensor, p: float) -> Tensor:
    """generate.py:17-28: keep the smallest set of most likely tokens whose probability passes p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    beyond = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > p
    beyond[..., 1:] = beyond[..., :-1].clone()
    beyond[..., 0] = False
    dropped = torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, order, beyond)
    return logits.masked_fill(dropped, float("-inf"))


def draw_tokens(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """[L] tokens drawn from [L, V] logits and their probabilities (generate.py:31-48); at temperature 0
    the most probable ones (dllm's greedy branch for LLaDA 2.x, see above)."""
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logits = _top_k(logits, top_k)
    if top_p < 1.0:
        logits = _top_p(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    if temperature == 0:
        tokens = probs.argmax(-1, keepdim=True)
    else:
        tokens = torch.multinomial(probs, num_samples=1, generator=generator)
    return tokens[:, 0], probs.gather(-1, tokens)[:, 0]


def transfer_counts(block_length: int, steps: int) -> list[int]:
    """Tokens to keep at each step: block_length spread evenly, the first steps one more (51-56)."""
    base, remainder = divmod(block_length, steps)
    return [base + (step < remainder) for step in range(steps)]


def kept(
    remasking: str,
    masked: Tensor,
    confidence: Tensor,
    count: int,
    threshold: float,
    at_most_masked: bool = False,
) -> Tensor:
    """[L] bool: which drawn tokens the step keeps (generate.py:147-172), among the masked ones; the
    `count` most confident may include decoded tokens (redrawn) unless `at_most_masked`."""
    keep = torch.zeros_like(masked)
    if remasking == "sequential":  # the next `count` masked positions, left to right
        first = int(masked.nonzero()[0])
        keep[first : first + count] = True
        return keep
    confidence = torch.where(masked, confidence, -torch.inf)
    if remasking == "low_confidence_dynamic" and int((confidence > threshold).sum()) >= count:
        return confidence > threshold  # every token above the threshold, at least `count` of them
    if at_most_masked:
        count = min(count, int(masked.sum()))
    keep[torch.topk(confidence, count).indices] = True  # the `count` most confident
    return keep


@torch.no_grad()
def block_generate(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    mask_token_id: int,
    block_length: int,
    gen_length: int,
    denoising_steps: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.85,
    minimal_topk: int | None = None,
    keep_at_most_masked: bool = False,
    stop_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """The whole canvas [T] (prompt, answer, the last block's tail; masks after an early stop) of one
    prompt, as generate.py's block_diffusion_generate returns it for a batch of one (LLaDA 2.x's
    generate() returns the answer of it, cut after the first EOS)."""
    if remasking not in REMASKING:
        raise DsdpoError(
            f"unknown remasking {remasking!r} for a block model; choose one of {', '.join(REMASKING)}"
        )
    if block_length != model.config.block_size:
        size = model.config.block_size
        raise DsdpoError(f"block_length {block_length} is not the model's block size {size} (config.json)")
    device = device if device is not None else next(model.parameters()).device
    num_blocks = -(-(len(prompt) + gen_length) // block_length)
    canvas = torch.full((num_blocks * block_length,), mask_token_id, dtype=torch.long, device=device)
    canvas[: len(prompt)] = torch.as_tensor(list(prompt), device=device)
    if minimal_topk is not None:
        denoising_steps = min(denoising_steps, gen_length // minimal_topk)
    counts = transfer_counts(block_length, denoising_steps)
    for block in range(len(prompt) // block_length, num_blocks):
        span = slice(block * block_length, (block + 1) * block_length)
        for count in counts:
            masked = canvas[span] == mask_token_id
            if not bool(masked.any()):
                break
            logits = model(input_ids=canvas[None, : span.stop]).logits[0, span]
            tokens, confidence = draw_tokens(logits.float(), temperature, top_k, top_p, generator)
            keep = kept(remasking, masked, confidence, count, confidence_threshold, keep_at_most_masked)
            canvas[span] = torch.where(keep, tokens, canvas[span])
        if any(token in stop_token_ids for token in canvas[len(prompt) :].tolist()):
            break
    return canvas
