"""The sampler's settings (SamplerConfig, the section eval_sampler) and its block/step schedule check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dsdpo.errors import DsdpoError
from dsdpo.settings import setting

# The choices the settings offer, importable without torch (the command line is built from them):
REMASKING = ("low_confidence", "random")  # which proposals LLaDA's sampler keeps (dsdpo.evaluation.sampler)


def check_schedule(gen_length: int, block_length: int, steps: int) -> int:
    """Validate the sampler's block/step plan; return the number of steps per block."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise DsdpoError(
            f"gen_length ({gen_length}), block_length ({block_length}) and steps ({steps}) must be positive"
        )
    if gen_length % block_length:
        raise DsdpoError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise DsdpoError(f"steps {steps} must be a multiple of the number of blocks ({num_blocks})")
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
        raise DsdpoError(
            f"{steps_per_block} steps per block exceed block_length {block_length}: "
            f"a step would reveal nothing; use at most {gen_length} steps"
        )
    return steps_per_block


# The sampler's schedule for a model whose family has no published one (dsdpo.families.Family).
DEFAULT_GEN_LENGTH, DEFAULT_BLOCK_LENGTH = 128, 32


@dataclass
class SamplerConfig:
    """LLaDA's sampler (dsdpo.evaluation.sampler), set the same way by every command that generates: `dsdpo
    generate`, `dsdpo eval accuracy`, `dsdpo make-pairs` (--gen-length ... --chat/--no-chat) and
    training's held-out accuracy (the section eval_sampler: --eval-gen-length ... --eval-chat). A
    field left None is filled from the model when it is loaded (`resolved`)."""

    gen_length: int | None = setting(
        None,
        "answer tokens; the answer starts fully masked, text after EOS is dropped (default: the model "
        f"family's published setting, dsdpo/families, else {DEFAULT_GEN_LENGTH})",
    )
    block_length: int | None = setting(
        None,
        "blocks are decoded left to right (semi-autoregressive); the gen length must be a multiple. "
        f"Default: the model family's published setting, else {DEFAULT_BLOCK_LENGTH} (at most the gen "
        "length). A block-diffusion model (SDAR) always uses its own",
    )
    steps: int | None = setting(
        None,
        "denoising steps (model forwards) in all, split evenly over the blocks; fewer reveal more "
        "tokens each: faster, usually worse. At most, and by default, the gen length",
    )
    temperature: float = setting(0.0, "sampling temperature of each proposed token (Gumbel-max); 0: greedy")
    remasking: str = setting(
        "low_confidence",
        "which proposals each step keeps: the most confident ones, or random ones",
        choices=REMASKING,
    )
    cfg_scale: float = setting(
        0.0, "classifier-free guidance: > 0 pushes away from a pass with the prompt masked (a second forward)"
    )
    chat: bool | None = setting(
        None,
        "give each prompt as a user turn of the tokenizer's chat template, or plain (default: the chat "
        "template when the tokenizer has one, said when used)",
    )

    def validate(self, section: str = "sampler") -> SamplerConfig:
        if self.temperature < 0:
            raise DsdpoError(f"{section}.temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise DsdpoError(f"{section}.cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise DsdpoError(
                f"{section}.remasking: unknown {self.remasking!r}; choose one of {', '.join(REMASKING)}"
            )
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DsdpoError(f"{section}.{name} must be at least 1, got {value}")
        if None not in (self.gen_length, self.block_length, self.steps):
            try:
                check_schedule(self.gen_length, self.block_length, self.steps)
            except DsdpoError as err:
                raise DsdpoError(f"{section}.gen_length/block_length/steps: {err}") from None
        return self

    def resolved(
        self,
        *,
        gen_length: int | None,
        block_length: int | None,
        chat_template: bool,
        section: str = "sampler",
    ) -> SamplerConfig:
        """Every field set: where this leaves them unset, the schedule from the model family's
        published `gen_length` and `block_length` (None: dsdpo's defaults), the block at most the gen
        length, and steps = gen length (one token a step); chat when the tokenizer has a chat template,
        unless set (a template the tokenizer lacks cannot be used)."""
        gen = self.gen_length or gen_length or DEFAULT_GEN_LENGTH
        block = self.block_length or min(gen, block_length or DEFAULT_BLOCK_LENGTH)
        chat = chat_template if self.chat is None else self.chat and chat_template
        steps = self.steps or gen
        resolved = dataclasses.replace(self, gen_length=gen, block_length=block, steps=steps, chat=chat)
        return resolved.validate(section)

    def summary(self) -> str:
        """One line saying how a (resolved) sampler generates, and how it gives the prompts."""
        chat = (
            "prompts as user turns of the chat template" if self.chat else "plain prompts (no chat template)"
        )
        return (
            f"sampler: gen length {self.gen_length}, block length {self.block_length}, steps {self.steps}, "
            f"temperature {self.temperature}, remasking {self.remasking}, cfg scale {self.cfg_scale}; {chat}"
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of dsdpo.evaluation.sampler.generate (a resolved config)."""
        names = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale")
        return {name: getattr(self, name) for name in names}
