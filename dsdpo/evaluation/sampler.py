"""LLaDA's sampler: reverse masked diffusion with block semi-autoregressive low-confidence remasking.

    answers = generate(model, [prompt_ids, ...], mask_token_id=m, gen_length=128, block_length=32, steps=64)
    texts = generate_text(model, tokenizer, ["What is 2+3?"], mask_token_id=m, ...)

The answer starts as `gen_length` mask tokens after the prompt (LLaDA paper, section 2.4: the reverse
process from t=1 to t=0). The answer is cut into blocks decoded left to right; each block gets
steps/num_blocks steps and, at each step, the model predicts every still-masked token of the block
and the plan's number of them are kept: the most confident ones ('low_confidence' remasking, LLaDA
Algorithm 5) or random ones ('random', Algorithm 4). The rest stay masked for the next step.

Only those positions can be revealed, so the output layer runs on them alone, a slice of positions
at a time, and the float64 Gumbel noise and softmax are made per slice (docs/design.md, "The output
layer a slice at a time"): memory does not grow with the canvas times the vocabulary.

Prompts of different lengths are left-padded so every answer starts at the same column. Padding is
hidden from every query (a key-padding mask, 4D for bidirectional decoders, see
dsdpo.objective.logprobs.bidirectional_attention_mask) and position ids restart at each row's first real
token,
so a row decodes as it would alone.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsdpo.config import REMASKING, SamplerConfig, check_schedule
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.block_sampler import block_generate
from dsdpo.families import FAMILIES, block_size_of_model, family_of, family_of_model, source_positions
from dsdpo.models.loading import is_remote_code
from dsdpo.models.padding import ignores_padding, logits_without_padding
from dsdpo.objective.logprobs import (
    bidirectional_attention_mask,
    output_size,
    position_slices,
    positions_per_slice,
    trunk_and_head,
)


@dataclass(frozen=True)
class StepTrace:
    """What one denoising step did; given to the `on_step` callback (tests, debugging, demos)."""

    block: int
    step: int  # within the block
    canvas: Tensor  # [B, P + gen_length] after the step: left-padded prompts, then the answer
    revealed: Tensor  # [B, P + gen_length] bool: positions unmasked at this step
    answer_start: int  # column P where every answer starts


@dataclass(frozen=True)
class Batch:
    """Left-padded prompts followed by a fully masked answer."""

    canvas: Tensor  # [B, P + G] token ids
    attention_mask: Tensor  # [B, P + G] long, 0 on left padding
    prompt: Tensor  # [B, P + G] bool, True on real prompt tokens
    answer_start: int
    mask_token_id: int


def reveal_plan(block_length: int, steps: int) -> list[int]:
    """How many tokens each step of a block reveals.

    LLaDA's schedule is linear in t, so the expected number of tokens unmasked per step is the same
    at every step: block_length // steps each, the remainder one extra for the earliest steps
    (LLaDA generate.py, get_num_transfer_tokens).
    """
    base, extra = divmod(block_length, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def left_padded_batch(
    prompt_ids: Sequence[Sequence[int]], *, gen_length: int, mask_token_id: int, device: torch.device
) -> Batch:
    if not prompt_ids:
        raise DsdpoError("no prompts to generate from")
    width = max(len(ids) for ids in prompt_ids)
    rows = len(prompt_ids)
    canvas = torch.full((rows, width + gen_length), mask_token_id, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(canvas)
    prompt = torch.zeros_like(canvas, dtype=torch.bool)
    for row, ids in enumerate(prompt_ids):
        start = width - len(ids)
        # Padding's value is never seen (attention hides it); 0 keeps it distinct from the mask token.
        canvas[row, :start] = 0
        attention_mask[row, :start] = 0
        canvas[row, start:width] = torch.tensor(list(ids), dtype=torch.long, device=device)
        prompt[row, start:width] = True
    return Batch(canvas, attention_mask, prompt, width, mask_token_id)


def _accepts_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def _model_dtype(model: nn.Module) -> torch.dtype:
    return getattr(model, "dtype", None) or next(model.parameters(), torch.empty(0)).dtype


@dataclass(frozen=True)
class Denoised:
    """One forward pass over the canvas, stopped before the output layer where the model lets it be
    split off (dsdpo.objective.logprobs.trunk_and_head): then `states` are the final hidden states and
    `head` is
    the output layer; any other model gives its logits as states and an identity head."""

    states: Tensor  # [B, S, d] hidden states, or [B, S, V] logits
    head: nn.Module
    shift: int  # the family's logit shift (dsdpo.families)
    vocab: int

    def logits(self, rows: Tensor, columns: Tensor) -> Tensor:
        """[n, V] logits of the tokens at (rows, columns): the output layer runs on these positions only."""
        return self.head(self.states[rows, source_positions(columns, self.shift)])


def denoise(model: nn.Module, canvas: Tensor, attention_mask: Tensor) -> Denoised:
    """The model's forward over `canvas`, left padding hidden and positions counted per row."""
    split = trunk_and_head(model)
    if not bool(attention_mask.all()) and _ignores_padding(model, canvas):
        unpadded = lambda ids, mask: _as_logits(model(input_ids=ids))  # noqa: E731
        head, states = nn.Identity(), logits_without_padding(unpadded, canvas, attention_mask)
    elif split is None:
        inputs = _padded_inputs(model, model, canvas, attention_mask)
        head, states = nn.Identity(), _as_logits(model(**inputs))
    else:
        trunk, head = split
        states = trunk(**_padded_inputs(model, trunk, canvas, attention_mask)).last_hidden_state
    family = family_of_model(model)
    return Denoised(states, head, family.logit_shift if family else 0, output_size(model, head, states))


def _padded_inputs(model: nn.Module, module: nn.Module, canvas: Tensor, attention_mask: Tensor) -> dict:
    """The inputs of `module` (the model or its trunk) that hide left padding from every query."""
    inputs = {"input_ids": canvas}
    if bool(attention_mask.all()):
        return inputs
    if getattr(getattr(model, "config", None), "use_bidirectional_attention", False):
        # A 2D mask with zeros would make this decoder causal (transformers 5.23): pass the 4D one.
        inputs["attention_mask"] = bidirectional_attention_mask(attention_mask, _model_dtype(model))
    else:
        inputs["attention_mask"] = attention_mask
    if _accepts_position_ids(module):
        # Each row's first real token is position 0, as if it had been run alone.
        inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return inputs


def _ignores_padding(model: nn.Module, canvas: Tensor) -> bool:
    """Probed once per model with its own code (dsdpo.models.padding); other models honour the mask."""
    if not is_remote_code(model):
        return False
    if not hasattr(model, "_dsdpo_ignores_padding"):
        padded = lambda ids, mask: _as_logits(model(input_ids=ids, attention_mask=mask))  # noqa: E731
        model._dsdpo_ignores_padding = ignores_padding(padded, canvas)
    return model._dsdpo_ignores_padding


def _as_logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def denoise_canvas(model: nn.Module, batch: Batch, canvas: Tensor, cfg_scale: float) -> Denoised:
    """The forward of one step; with classifier-free guidance (cfg_scale > 0) the rows of the
    unconditional pass follow those of the canvas: the same canvas with the prompt masked (LLaDA
    paper, section B.3; generate.py)."""
    if cfg_scale <= 0:
        return denoise(model, canvas, batch.attention_mask)
    unconditional = canvas.masked_fill(batch.prompt, batch.mask_token_id)
    return denoise(model, torch.cat([canvas, unconditional]), batch.attention_mask.repeat(2, 1))


def guided_logits(denoised: Denoised, rows: Tensor, columns: Tensor, cfg_scale: float) -> Tensor:
    """[n, V] logits at (rows, columns); with guidance uncond + (cfg_scale + 1) * (cond - uncond)."""
    if cfg_scale <= 0:
        return denoised.logits(rows, columns)
    unconditional_rows = rows + denoised.states.shape[0] // 2
    both = denoised.logits(torch.cat([rows, unconditional_rows]), columns.repeat(2))
    conditional, unconditional = both.chunk(2)
    return unconditional + (cfg_scale + 1) * (conditional - unconditional)


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
    prompt at
    a time: its blocks count from position 0 of each row, so rows of other prompt lengths do not align.
    This sampler's options map onto it: the blocks are the model's own (config.json's block size,
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


def cut_at_stop(token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (EOS): what follows is filler, not answer."""
    stops = set(stop_token_ids)
    for index, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[:index])
    return list(token_ids)


def stop_ids_of(tokenizer) -> list[int]:
    """EOS, plus the families' end-of-turn tokens that the tokenizer has (LLaDA's instruct model ends
    with <|eot_id|>, Dream's with <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in dict.fromkeys(token for family in FAMILIES.values() for token in family.stop_tokens):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def encode_prompt(tokenizer, text: str, *, chat: bool) -> list[int]:
    """Token ids of a prompt; as a user turn with the tokenizer's chat template when `chat` and it has one."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        # The template already holds any BOS; adding special tokens again would double it.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


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


def generate_text(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, mask_token_id: int, chat: bool = True, **sampler
) -> list[str]:
    """Generate answers to text prompts; each is decoded up to its first stop token (EOS)."""
    prompt_ids = [encode_prompt(tokenizer, text, chat=chat) for text in prompts]
    return answer_texts(model, tokenizer, prompt_ids, mask_token_id=mask_token_id, **sampler)


def answer_texts(
    model: nn.Module, tokenizer, prompt_ids: Sequence[Sequence[int]], *, mask_token_id: int, **sampler
) -> list[str]:
    """Generate answers to tokenised prompts; each is decoded up to its first stop token (EOS)."""
    stop_ids = stop_ids_of(tokenizer)
    answers = generate(model, prompt_ids, mask_token_id=mask_token_id, stop_token_ids=stop_ids, **sampler)
    return [
        tokenizer.decode(cut_at_stop(row.tolist(), stop_ids), skip_special_tokens=True).strip()
        for row in answers
    ]


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """Prompts from a JSONL file whose rows hold a 'prompt' (or a 'question') string."""
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such data file")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DsdpoError(f"{file}:{number}: not JSON ({err})") from None
        text = row.get("prompt", row.get("question")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DsdpoError(f"{file}:{number}: a row needs a 'prompt' or 'question' string")
        prompts.append(text)
    if not prompts:
        raise DsdpoError(f"{file}: no prompts in the file")
    return prompts
