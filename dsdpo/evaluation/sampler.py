"""LLaDA's sampler: reverse masked diffusion with block semi-autoregressive low-confidence remasking.

    answers = generate(model, [prompt_ids, ...], mask_token_id=m, gen_length=128, block_length=32, steps=64)

The answer starts as `gen_length` mask tokens after the prompt (LLaDA paper, section 2.4: the reverse
process from t=1 to t=0). The answer is cut into blocks decoded left to right; each block gets
steps/num_blocks steps and, at each step, the model predicts every still-masked token of the block
and the plan's number of them are kept: the most confident ones ('low_confidence' remasking, LLaDA
Algorithm 5) or random ones ('random', Algorithm 4). The rest stay masked for the next step.

Only those positions can be revealed, so the output layer runs on them alone, a slice of positions
at a time, and the float64 Gumbel noise and softmax are made per slice (docs/design.md, "The output
layer a slice at a time"): memory does not grow with the canvas times the vocabulary.

The canvas and its forward (left padding hidden, guidance) are in dsdpo.evaluation.canvas; text in
and out (prompts encoded, answers decoded up to their stop token) in dsdpo.evaluation.text_generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsdpo.config import REMASKING, SamplerConfig, check_schedule
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.block_sampler import block_generate
from dsdpo.evaluation.canvas import Batch, Denoised, denoise_canvas, guided_logits, left_padded_batch
from dsdpo.families import block_size_of_model, family_of, family_of_model
from dsdpo.objective.logprobs import position_slices, positions_per_slice


@dataclass(frozen=True)
class StepTrace:
    """What one denoising step did; given to the `on_step` callback (tests, debugging, demos)."""

    block: int
    step: int  # within the block
    canvas: Tensor  # [B, P + gen_length] after the step: left-padded prompts, then the answer
    revealed: Tensor  # [B, P + gen_length] bool: positions unmasked at this step
    answer_start: int  # column P where every answer starts


def reveal_plan(block_length: int, steps: int) -> list[int]:
    """How many tokens each step of a block reveals.

    LLaDA's schedule is linear in t, so the expected number of tokens unmasked per step is the same
    at every step: block_length // steps each, the remainder one extra for the earliest steps
    (LLaDA generate.py, get_num_transfer_tokens).
    """
    base, extra = divmod(block_length, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Gumbel-max sampling from softmax(logits / temperature); argmax at temperature 0.

    In float64: low-precision Gumbel noise lowers generation quality for MDMs (arXiv:2409.02908, as
    LLaDA's generate.py notes). argmax(l + T·g) with g ~ Gumbel(0, 1) samples softmax(l / T). The
    noise is built in place: one float64 copy of the logits.
    """
    if temperature == 0:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    gumbel = uniform.clamp_(min=torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()
    return gumbel.mul_(temperature).add_(logits).argmax(-1)


def remasking_scores(
    logits: Tensor, proposal: Tensor, remasking: str, generator: torch.Generator | None
) -> Tensor:
    """Per-position priority for keeping a proposed token: higher is revealed first."""
    if remasking == "low_confidence":
        # LLaDA Algorithm 5: the model's probability of its own proposal (before temperature).
        probs = F.softmax(logits.double(), dim=-1)
        return probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
    return torch.rand(proposal.shape, generator=generator, dtype=torch.float64, device=proposal.device)


def propose(
    denoised: Denoised,
    rows: Tensor,
    columns: Tensor,
    *,
    mask_token_id: int,
    temperature: float,
    remasking: str,
    cfg_scale: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """([n] proposed tokens, [n] their remasking scores) at the positions (rows, columns).

    A slice of positions at a time (dsdpo.objective.logprobs.HEAD_SLICE_BYTES): the logits and their float64
    copies exist for one slice only.
    """
    tokens, scores = [], []
    for part in position_slices(len(rows), positions_per_slice(denoised.vocab)):
        logits = guided_logits(denoised, rows[part], columns[part], cfg_scale)
        # A revealed token must be a real token: the mask token gets zero probability (MDLM's "zero
        # masking probabilities"); an untrained denoiser would otherwise propose it and stay masked.
        logits[:, mask_token_id] = -torch.inf
        proposal = sample_tokens(logits, temperature, generator)
        tokens.append(proposal)
        scores.append(remasking_scores(logits, proposal, remasking, generator))
    return torch.cat(tokens), torch.cat(scores)


def denoise_step(
    model: nn.Module,
    batch: Batch,
    canvas: Tensor,
    block: slice,
    count: int,
    *,
    temperature: float,
    remasking: str,
    cfg_scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Reveal `count` masked tokens of the current block in every row; return the revealed positions.

    Only still-masked tokens of this block compete (later blocks wait their turn: semi-autoregressive),
    so only they are decoded.
    """
    denoised = denoise_canvas(model, batch, canvas, cfg_scale)
    masked = canvas[:, block] == batch.mask_token_id
    rows, columns = masked.nonzero(as_tuple=True)
    proposal, scores = propose(
        denoised, rows, block.start + columns,
        mask_token_id=batch.mask_token_id, temperature=temperature, remasking=remasking,
        cfg_scale=cfg_scale, generator=generator,
    )  # fmt: skip
    priority = torch.full(masked.shape, -torch.inf, dtype=torch.float64, device=canvas.device)
    chosen = priority.index_put_((rows, columns), scores).topk(count, dim=-1).indices
    revealed_in_block = torch.zeros_like(masked).scatter_(1, chosen, True)
    proposals = canvas[:, block].index_put((rows, columns), proposal)
    canvas[:, block] = torch.where(revealed_in_block, proposals, canvas[:, block])
    revealed = torch.zeros_like(canvas, dtype=torch.bool)
    revealed[:, block] = revealed_in_block
    return revealed


def _every_row_stopped(answer: Tensor, stop_token_ids: Sequence[int]) -> bool:
    if not stop_token_ids:
        return False
    stops = torch.tensor(list(stop_token_ids), device=answer.device)
    return bool(torch.isin(answer, stops).any(dim=1).all())


def _block_model_answers(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    gen_length: int,
    steps: int,
    temperature: float,
    remasking: str,
    cfg_scale: float,
    generator: torch.Generator | None,
    stop_token_ids: Sequence[int],
    device: torch.device | None,
) -> Tensor:
    """[B, gen_length] answers of a block model by its own sampler (dsdpo.evaluation.block_sampler), one
    prompt at a time: its blocks count from position 0 of each row, so rows of other prompt lengths do
    not align. This sampler's options map onto it: the blocks are the model's own (config.json's block size,
    whatever block_length says: a block model denoises no other), `steps` keep their number per answer
    token (steps · block size / gen_length a block, at least one), 'low_confidence' is the family's
    low-confidence rule (SDAR: the plan's number of most confident tokens a step, its
    'low_confidence_static'; LLaDA 2.x: its only rule, the 0.95 threshold), temperature 0 is its greedy
    (SDAR: top_k 1; LLaDA 2.x: dllm's argmax branch). The canvas ends at a block boundary; its tokens
    past gen_length are dropped, and after an early stop the answer is filled with the first stop
    token, as LLaDA's is."""
    if remasking != "low_confidence" or cfg_scale:
        raise DsdpoError(
            "a block model's sampler has low_confidence remasking only and no guidance (cfg_scale 0)"
        )
    block_size = block_size_of_model(model)
    steps_per_block = min(block_size, max(1, steps * block_size // gen_length))
    options = family_of_model(model).block_sampling.options(temperature)
    answers = torch.full((len(prompt_ids), gen_length), mask_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        canvas = block_generate(
            model, prompt, mask_token_id=mask_token_id, block_length=block_size, gen_length=gen_length,
            denoising_steps=steps_per_block, stop_token_ids=stop_token_ids, generator=generator,
            device=device, **options,
        )  # fmt: skip
        answers[row] = canvas[len(prompt) : len(prompt) + gen_length].cpu()
    if stop_token_ids:
        answers[answers == mask_token_id] = stop_token_ids[0]
    return answers.to(device if device is not None else next(model.parameters()).device)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    stop_token_ids: Sequence[int] = (),
    on_step: Callable[[StepTrace], None] | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Sample answers for a batch of prompts; return their token ids [B, gen_length].

    stop_token_ids: once every row holds one of these in its finished blocks, the remaining blocks
    are filled with the first of them instead of decoded. The text up to the first stop token is the
    same either way; it only saves forward passes (an instruct LLaDA pads its answers with EOS).
    generator: the source of all randomness (Gumbel noise, random remasking); seed it to reproduce.
    device: where the canvas lives (default: the model's first parameter's device; a ZeRO-3 engine's
    partitioned parameters do not say it).
    """
    if remasking not in REMASKING:
        raise DsdpoError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")
    if temperature < 0:
        raise DsdpoError(f"temperature must be >= 0, got {temperature}")
    family = family_of_model(model)
    if family is not None and family.block_size_field is not None:
        return _block_model_answers(
            model, prompt_ids, mask_token_id=mask_token_id, gen_length=gen_length, steps=steps,
            temperature=temperature, remasking=remasking, cfg_scale=cfg_scale, generator=generator,
            stop_token_ids=stop_token_ids, device=device,
        )  # fmt: skip
    steps_per_block = check_schedule(gen_length, block_length, steps)
    device = device if device is not None else next(model.parameters()).device
    batch = left_padded_batch(prompt_ids, gen_length=gen_length, mask_token_id=mask_token_id, device=device)
    canvas = batch.canvas.clone()
    plan = reveal_plan(block_length, steps_per_block)
    for block_index in range(gen_length // block_length):
        start = batch.answer_start + block_index * block_length
        block = slice(start, start + block_length)
        for step, count in enumerate(plan):
            revealed = denoise_step(
                model, batch, canvas, block, count,
                temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                generator=generator,
            )  # fmt: skip
            if on_step is not None:
                on_step(StepTrace(block_index, step, canvas.clone(), revealed, batch.answer_start))
        if _every_row_stopped(canvas[:, batch.answer_start : block.stop], stop_token_ids):
            canvas[:, block.stop :] = stop_token_ids[0]
            break
    return canvas[:, batch.answer_start :]


def sampler_for(settings: SamplerConfig, config, tokenizer, *, section: str = "sampler") -> SamplerConfig:
    """The sampler's settings for this model, every field set (SamplerConfig.resolved): the schedule
    its family publishes (dsdpo.families) where the settings leave it open, the chat template when its
    tokenizer has one."""
    family = family_of(config)
    return settings.resolved(
        gen_length=family.gen_length if family else None,
        block_length=family.block_length if family else None,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        section=section,
    )
