"""lm-evaluation-harness (0.4.x) on dsdpo's sampler and ELBO: the model "dsdpo" of lm_eval.

    lm = DsdpoLM(model, tokenizer, mask_token_id=m, sampler=dict(gen_length=256, block_length=8, steps=256))
    results = run_tasks(lm, ["gsm8k"], num_fewshot=4)     # or, by name, after importing this module:
    lm_eval.simple_evaluate(model="dsdpo", model_args="pretrained=DIR,gen_length=256", tasks=["gsm8k"])

What each request type runs:
- generate_until: the family's sampler (dsdpo.evaluation.sampler.generate; a block model's own,
dsdpo.evaluation.block_sampler),
  with the settings the LM was built with, as `dsdpo eval accuracy` samples: the answer is decoded up to
  its first stop token (EOS, end of turn), then cut before the first of the task's `until` strings. The
  task's other generation keywords (max_gen_toks, temperature, do_sample) are not read: the sampler's
  settings are the run's, the same for every task (LLaDA's own harness model does the same).
- loglikelihood: the Monte Carlo ELBO (dsdpo.objective.elbo.elbo) of the continuation as the response to the
  context as the prompt, a lower bound on log p(continuation | context). Its draws are keyed on the
  request's token ids and the seed (dsdpo.objective.draws), so the same request gives the same number in
  any batch,
  task or run. is_greedy: whether greedy denoising (temperature 0, one token a step, the most confident
  first: LLaDA's suffix_greedy_prediction) reproduces the continuation, computed only with
  check_greedy=True; otherwise False, as LLaDA's published runs set is_check_greedy=False: it costs one
  forward per continuation token, and only tasks that report greedy accuracy (lambada) read it.
- loglikelihood_rolling (perplexity tasks: wikitext, ...): refused. A diffusion model has no per-token
  conditionals to roll a window over; the ELBO bounds the whole text's likelihood instead.

Chat: with chat=True (and a tokenizer with a chat template) pass apply_chat_template=True to lm_eval
(run_tasks does): lm_eval renders the context with the template (few-shot examples as turns), and the
rendered text is tokenised without adding special tokens again, as
dsdpo.evaluation.text_generation.encode_prompt does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dsdpo.config import SamplerConfig
from dsdpo.data.collate import collate_pairs
from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.sampler import generate
from dsdpo.evaluation.text_generation import answer_texts
from dsdpo.objective.draws import draw_keys
from dsdpo.objective.elbo import elbo
from dsdpo.objective.scoring import ScoreSettings

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ImportError:
    raise DsdpoError(
        "lm-evaluation-harness is not installed: pip install 'dsdpo[harness]' (lm_eval 0.4.x)"
    ) from None

# The sampler's settings by name through lm_eval: those of dsdpo.config.SamplerConfig, as every command
# takes them (chat is its own model_arg); those not given come from the model, as in `dsdpo eval accuracy`.
SAMPLER_KNOBS = tuple(spec.name for spec in fields(SamplerConfig) if spec.name != "chat")
ROLLING_REFUSED = (
    "loglikelihood_rolling (perplexity tasks such as wikitext) is not defined for a masked diffusion "
    "model in dsdpo: it has no per-token conditionals to roll a window over; use loglikelihood "
    "(multiple-choice) or generate_until tasks"
)


def cut_at_until(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any of the `until` strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _until_of(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@register_model("dsdpo")
class DsdpoLM(LM):
    """A masked diffusion model (a plain module, in eval mode) as an lm_eval language model."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        mask_token_id: int,
        sampler: dict | None = None,
        chat: bool = True,
        batch_size: int = 8,
        score: ScoreSettings | None = None,
        check_greedy: bool = False,
        progress: bool = True,
    ):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise DsdpoError("the tokenizer has no pad token: loglikelihood batches cannot be padded")
        self.model, self.tokenizer, self.mask_token_id = model.eval(), tokenizer, mask_token_id
        self.sampler = dict(sampler or {})  # dsdpo.evaluation.sampler.generate's keywords
        self.chat = bool(chat and getattr(tokenizer, "chat_template", None))
        self.batch_size, self.check_greedy = batch_size, check_greedy
        self.score = score or ScoreSettings(batch_size=batch_size)  # the ELBO's draws and batching
        self.progress = progress
        self._device = next(model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DsdpoLM:
        """lm_eval's `--model dsdpo --model_args pretrained=DIR,gen_length=256,...` (see from_folder)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_folder(**args, **{k: v for k, v in extra.items() if k in ("batch_size", "device")})

    @classmethod
    def from_folder(
        cls,
        pretrained: str,
        *,
        device: str = "auto",
        dtype: str = "fp32",
        mask_token_id: int | None = None,
        trust_remote_code: bool = False,
        trust_checkpoint: bool = False,
        seed: int = 0,
        budget: int = ScoreSettings.budget,
        chat: bool | None = None,
        batch_size: int = 8,
        check_greedy: bool = False,
        **sampler: Any,
    ) -> DsdpoLM:
        """Load a Hugging Face folder or a dsdpo checkpoint as `dsdpo eval accuracy` loads it; `sampler`:
        some of SAMPLER_KNOBS, the others and `chat` (None) as the model gives them (the family's
        published schedule, the chat template when its tokenizer has one:
        dsdpo.evaluation.sampler.sampler_for)."""
        from dsdpo.cli.common import _generator, _load_for_sampling, _resolve_device

        unknown = set(sampler) - set(SAMPLER_KNOBS)
        if unknown:
            raise DsdpoError(f"unknown dsdpo model_args {', '.join(sorted(unknown))}")
        if not str(batch_size).isdigit():
            raise DsdpoError(f"batch_size {batch_size!r}: dsdpo takes a number of prompts (no 'auto')")
        batch_size = int(batch_size)
        device = _resolve_device(device)
        settings = SamplerConfig(**sampler, chat=chat).validate()
        model, tokenizer, mask_id, settings = _load_for_sampling(
            pretrained, device, settings, mask_token_id=mask_token_id, trust_remote_code=trust_remote_code,
            trust_checkpoint=trust_checkpoint, dtype=dtype,
        )  # fmt: skip
        return cls(
            model, tokenizer, mask_token_id=mask_id, chat=settings.chat, batch_size=batch_size,
            sampler=dict(settings.generate_kwargs(), generator=_generator(seed, device)),
            score=ScoreSettings(budget=budget, seed=seed, batch_size=batch_size), check_greedy=check_greedy,
        )  # fmt: skip

    # --- lm_eval's chat hooks: the tokenizer's own template -------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if self.chat else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _encode_context(self, text: str) -> list[int]:
        """A rendered chat context already holds its special tokens (BOS): none are added again."""
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    # --- the three request types ----------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        answers = []
        with tqdm(total=len(requests), desc="generate_until", disable=not self.progress) as bar:
            for batch in _batches(requests, self.batch_size):
                prompt_ids = [self._encode_context(request.args[0]) for request in batch]
                texts = answer_texts(
                    self.model, self.tokenizer, prompt_ids, mask_token_id=self.mask_token_id, **self.sampler
                )
                answers += [
                    cut_at_until(text, _until_of(request.args[1]))
                    for text, request in zip(texts, batch, strict=True)
                ]
                bar.update(len(batch))
        return answers

    def _encode_pair(self, context: str, continuation: str) -> TokenizedPair:
        """Context as the prompt, continuation as the response (no EOS added: it is scored as given).
        A context's trailing spaces move to the continuation, as lm_eval's HF model and LLaDA's do."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        response = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not response:
            raise DsdpoError(f"loglikelihood: the continuation {continuation!r} has no tokens to score")
        return TokenizedPair("", self._encode_context(context), response, [], None)

    @torch.no_grad()
    def request_scores(self, pairs: Sequence[TokenizedPair]) -> torch.Tensor:
        """[N] the ELBO of each pair's response given its prompt; each request's draws are keyed on its
        token ids (TokenizedPair.digest) and the seed, nothing else."""
        scores = []
        for batch in _batches(pairs, self.score.batch_size):
            rows = collate_pairs(list(batch), self.tokenizer.pad_token_id, chosen_only=True)
            scores.append(
                elbo(
                    self.model, rows.input_ids.to(self._device), rows.response_mask.to(self._device),
                    attention_mask=rows.attention_mask.to(self._device), mask_token_id=self.mask_token_id,
                    budget=self.score.budget, estimator=self.score.estimator, steps=self.score.steps,
                    keys=draw_keys([pair.digest for pair in batch], seed=self.score.seed),
                    max_tokens_per_forward=self.score.max_tokens_per_forward,
                ).double().cpu()
            )  # fmt: skip
        return torch.cat(scores)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        scores = self.request_scores(pairs)
        greedy = [self._is_greedy(pair) if self.check_greedy else False for pair in pairs]
        return [(float(score), is_greedy) for score, is_greedy in zip(scores.tolist(), greedy, strict=True)]

    @torch.no_grad()
    def _is_greedy(self, pair: TokenizedPair) -> bool:
        """Greedy denoising of as many tokens as the continuation, one a step, gives the continuation."""
        length = len(pair.chosen_ids)
        answer = generate(
            self.model, [pair.prompt_ids], mask_token_id=self.mask_token_id, gen_length=length,
            block_length=length, steps=length, temperature=0.0, remasking="low_confidence",
        )  # fmt: skip
        return answer[0].tolist() == pair.chosen_ids

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise DsdpoError(ROLLING_REFUSED)


def sampler_record(sampler: dict) -> dict:
    """The sampler's settings for a results file (its generator left out: the seed is recorded beside)."""
    return {name: value for name, value in sampler.items() if name != "generator"}


def check_tasks(tasks: Sequence[str], include_path: str | None = None):
    """lm_eval's TaskManager for `tasks`, each checked before any model is loaded: it exists, and it asks
    for nothing this model refuses (loglikelihood_rolling)."""
    from lm_eval.tasks import TaskManager

    # Indexing lm_eval's own tasks takes seconds: skipped when --include-path holds every task named.
    task_manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if task_manager is None or not all(task_manager.match_tasks([name]) for name in tasks):
        task_manager = TaskManager(include_path=include_path)
    missing = [name for name in tasks if not task_manager.match_tasks([name])]
    if missing:
        where = f" (nor in --include-path {include_path})" if include_path else ""
        raise DsdpoError(f"unknown lm_eval task(s) {', '.join(missing)}{where}")
    rolling = [
        name
        for name, task in task_manager.load(list(tasks))["tasks"].items()
        if task.OUTPUT_TYPE == "loglikelihood_rolling"
    ]
    if rolling:
        raise DsdpoError(f"task(s) {', '.join(rolling)}: {ROLLING_REFUSED}")
    return task_manager


def run_tasks(
    lm: DsdpoLM,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    seed: int = 0,
    task_manager=None,
) -> dict:
    """lm_eval's simple_evaluate on `lm`, with the chat template applied exactly when lm.chat;
    `task_manager`: check_tasks's, when the tasks were checked already."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
        task_manager=task_manager or check_tasks(tasks, include_path), apply_chat_template=lm.chat,
        fewshot_as_multiturn=lm.chat, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )  # fmt: skip
