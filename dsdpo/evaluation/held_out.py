"""Evaluation on held-out data during training (`--eval-data FILE --eval-every N`).

Every evaluation scores the same pairs with the same keyed draws (epoch 0 of the run's seed), so a
change of `eval/*` between two evaluations is the policy's, not Monte Carlo noise; and the reference
sees those draws too (antithetic, docs/design.md, "VRPO"). The engines are ZeRO-3's, so every rank
scores every held-out pair, in step with the others (each forward gathers parameters collectively).

Preference runs log TRL's metrics of dsdpo.evaluation.reports (eval/loss, eval/rewards/accuracies, ...), SFT
runs the held-out NLL per response token (eval/loss) and mean ELBO (eval/logps/chosen).

`--eval-problems FILE` adds generation accuracy (HeldOutAccuracy): the policy answers held-out
problems with LLaDA's sampler (dsdpo.evaluation.sampler; the section eval_sampler sets it), seeded with the
run's seed at every evaluation, and each answer is judged as `dsdpo eval accuracy` judges
(eval/accuracy with its 95% Wilson interval).
Every rank generates every answer, so the ZeRO-3 forwards stay in lockstep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from dsdpo.data.collate import collate_pairs
from dsdpo.data.tokenize import TokenizedPair
from dsdpo.evaluation.accuracy import AccuracyReport, judge
from dsdpo.evaluation.answers import Problem
from dsdpo.evaluation.reports import preference_report
from dsdpo.evaluation.sampler import generate
from dsdpo.evaluation.text_generation import cut_at_stop, encode_prompt, stop_ids_of
from dsdpo.objective.draws import pair_draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.losses import LossConfig, sft_losses
from dsdpo.objective.scoring import PairScores, ScoreSettings, engine_terms
from dsdpo.reference.interface import PrecomputedReference, Reference
from dsdpo.runtime.dist import device, world_size

EVAL_BATCH = 8  # held-out pairs scored together (and problems answered together)
GENERATIONS = "eval_generations"  # --eval-problems: OUTPUT/eval_generations/step_NNNNNN.jsonl


class HeldOutEvaluation:
    """Scores held-out pairs with the training engines; `run` returns the `eval/*` metrics."""

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        loss: LossConfig,
        settings: ScoreSettings,
        max_tokens_no_grad: int,
        mask_token_id: int,
        pad_token_id: int,
        block_size: int | None = None,
    ):
        self.pairs = list(pairs)  # SFT: completions already padded with EOS (plan_run, dsdpo.objective.sft)
        self.loss = loss
        self.settings = replace(settings, epoch=0)  # the same draws at every evaluation
        self.max_tokens = max_tokens_no_grad
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.block_size = block_size  # a block model's: its draws are made per block

    def _terms(self, engine, pairs: list[TokenizedPair]) -> Tensor:
        """[2P, n] (or [P, n] for SFT) per-draw ELBO terms of a batch, on the CPU in float64."""
        supervised = self.loss.supervised
        batch = collate_pairs(pairs, self.pad_token_id, chosen_only=supervised)
        scoring = ScoringBatch.build(
            batch.input_ids.to(device()), batch.response_mask.to(device()), batch.attention_mask.to(device())
        )
        draws = pair_draws(
            batch.example_ids,
            scoring.response_lengths,
            self.settings.budget,
            self.settings.estimator,
            seed=self.settings.seed,
            epoch=self.settings.epoch,
            steps=self.settings.steps,
            chosen_only=supervised,
            block_size=self.block_size,
            response_starts=scoring.response_starts,
        )
        terms, _ = engine_terms(
            engine, scoring, draws, mask_token_id=self.mask_token_id, max_tokens=self.max_tokens
        )
        return terms.to("cpu", torch.float64)

    @torch.no_grad()
    def _chosen_and_rejected_terms(self, engine) -> tuple[Tensor, Tensor | None]:
        chosen, rejected = [], []
        for start in range(0, len(self.pairs), EVAL_BATCH):
            pairs = self.pairs[start : start + EVAL_BATCH]
            terms = self._terms(engine, pairs)
            chosen.append(terms[: len(pairs)])
            rejected.append(terms[len(pairs) :])
        return torch.cat(chosen), None if self.loss.supervised else torch.cat(rejected)

    def run(self, policy, reference: Reference) -> dict[str, float]:
        """`reference`: the training run's reference. A model (an engine, or the adapter-off policy)
        scores the held-out pairs; precomputed scores are looked up (plan_run checked that they hold
        these pairs); a reference-free or SFT run's held-out rewards are reference-free."""
        chosen, rejected = self._chosen_and_rejected_terms(policy)
        lengths = torch.tensor([len(pair.chosen_ids) for pair in self.pairs])
        if self.loss.supervised:
            elbos = chosen.mean(1)
            loss = sft_losses(elbos, lengths.to(elbos), self.loss.sft_per_response).mean()
            return {"eval/logps/chosen": float(elbos.mean()), "eval/loss": float(loss)}
        policy_scores = PairScores.of(self.pairs, chosen, rejected)
        report = preference_report(policy_scores, self._reference_scores(reference), self.loss, self.settings)
        return {f"eval/{name}": value for name, value in report.trl_metrics().items()}

    def _reference_scores(self, reference: Reference) -> PairScores | None:
        if reference.model is not None:
            return PairScores.of(self.pairs, *self._chosen_and_rejected_terms(reference.model))
        if isinstance(reference, PrecomputedReference):
            terms = reference.lookup([pair.example_id for pair in self.pairs], epoch=0).to(torch.float64)
            return PairScores.of(self.pairs, terms[: len(self.pairs)], terms[len(self.pairs) :])
        return None


class HeldOutAccuracy:
    """Generation accuracy of the training policy on held-out problems; `run` returns eval/accuracy
    and its 95% Wilson bounds, and the per-answer records (as `dsdpo eval accuracy --out` writes).

    The generator is seeded with `seed` at every evaluation and the problems go through the sampler
    in batches of `batch_size`, in file order (each repeated `samples` times), so one sample per
    problem equals `dsdpo eval accuracy --seed SEED --batch-size BATCH_SIZE` of the saved policy.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        *,
        tokenizer,
        mask_token_id: int,
        sampler: dict,
        samples: int = 1,
        seed: int = 0,
        batch_size: int = EVAL_BATCH,
        chat: bool = True,
    ):
        self.problems = list(problems)
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.sampler = dict(sampler)
        self.samples = samples
        self.seed = seed
        self.batch_size = batch_size
        self.chat = chat

    @torch.no_grad()
    def run(self, policy) -> tuple[dict[str, float], list[dict]]:
        """`policy`: the training engine (its module is a dsdpo.objective.logprobs.MaskedTokenScorer)."""
        model = policy.module.model
        was_training = model.training
        model.eval()
        stops = stop_ids_of(self.tokenizer)
        # Stopping early (every row has ended) is decided per rank on its own outputs; under several
        # ranks the ranks must run the same forwards (ZeRO-3 gathers collectively), so all blocks are
        # decoded. The text before the first stop token is the same either way.
        early_stop = stops if world_size() == 1 else ()
        generator = torch.Generator(device=device()).manual_seed(self.seed)
        jobs = [problem for problem in self.problems for _ in range(self.samples)]
        records = []
        try:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start : start + self.batch_size]
                prompt_ids = [encode_prompt(self.tokenizer, p.question, chat=self.chat) for p in batch]
                answers = generate(
                    model,
                    prompt_ids,
                    mask_token_id=self.mask_token_id,
                    stop_token_ids=early_stop,
                    generator=generator,
                    device=device(),
                    **self.sampler,
                )
                for problem, row in zip(batch, answers, strict=True):
                    text = self.tokenizer.decode(cut_at_stop(row.tolist(), stops), skip_special_tokens=True)
                    records.append({**judge(problem, text.strip()), "chat": self.chat})
        finally:
            model.train(was_training)
        report = AccuracyReport.from_counts(sum(r["correct"] for r in records), len(records))
        metrics = {
            "eval/accuracy": report.accuracy,
            "eval/accuracy_ci95_low": report.ci95_low,
            "eval/accuracy_ci95_high": report.ci95_high,
        }
        return metrics, records


def write_generations(output: Path, tag: str, records: list[dict]) -> Path:
    """One evaluation's judged answers, as `dsdpo eval accuracy --out` writes them."""
    folder = Path(output) / GENERATIONS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
