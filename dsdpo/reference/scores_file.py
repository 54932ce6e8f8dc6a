"""The precomputed reference scores file: written once before training, read back and checked during it.

The reference is frozen and the draws are keyed on (seed, example id, epoch, draw index), so its
per-draw ELBO terms for every response and epoch can be computed once, before training, and read back
during it: the policy then sees exactly the masks the reference was scored on (antithetic still),
and a 16 GB card streams one model per step instead of two.

The file is safetensors: one tensor `terms` [epochs, pairs, 2 (chosen, rejected), budget] and, in
its metadata, the example ids and everything the terms depend on besides the model's weights: the
settings (estimator, budget, trajectory steps, seed, max_length, max_prompt_length, the precision
the reference ran in), the tokenizer's fingerprint (vocabulary, special tokens, chat template), and
for every pair its token ids' digest and its two response lengths. Training checks each of them, so
scores made with another precision, tokenizer or an edited data file are refused, naming the
difference, instead of training silently against a stale reference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from dsdpo import __version__
from dsdpo.data.tokenize import TokenizedPair, tokenizer_fingerprint
from dsdpo.errors import DsdpoError
from dsdpo.objective.scoring import ScoreSettings, score_pairs


@dataclass(frozen=True)
class ReferenceSettings:
    """What the reference's terms depend on besides its weights; training must use the same."""

    estimator: str
    budget: int
    steps: int | None
    seed: int
    max_length: int
    max_prompt_length: int | None
    dtype: str  # "fp32", "bf16", "fp16": bf16 terms differ from fp32 ones by far more than noise


def _pair_record(pair: TokenizedPair) -> list:
    """What the file records of each pair: [token ids' digest, chosen length, rejected length]."""
    return [pair.digest, len(pair.chosen_ids), len(pair.rejected_ids)]


def precompute_reference_scores(
    model: nn.Module,
    pairs: list[TokenizedPair],
    out: str | Path,
    *,
    settings: ScoreSettings,
    max_length: int,
    max_prompt_length: int | None,
    dtype: str,
    tokenizer,
    epochs: int,
    mask_token_id: int,
    pad_token_id: int,
    source: str = "",
) -> Path:
    """Score every pair's chosen and rejected response for `epochs` epochs (the draws of epoch e use
    `settings` with epoch e); write the file. max_length, max_prompt_length and tokenizer are those
    the pairs were tokenised with, dtype the precision `model` runs in: training checks them."""
    if epochs < 1:
        raise DsdpoError(f"epochs must be at least 1, got {epochs}")
    per_epoch = []
    for epoch in range(epochs):
        scores = score_pairs(
            model,
            pairs,
            mask_token_id=mask_token_id,
            pad_token_id=pad_token_id,
            desc=f"epoch {epoch}",
            settings=replace(settings, epoch=epoch),
        )
        per_epoch.append(torch.stack([scores.chosen_terms, scores.rejected_terms], dim=1))
    reference_settings = ReferenceSettings(
        estimator=settings.estimator,
        budget=settings.budget,
        steps=settings.steps,
        seed=settings.seed,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        dtype=dtype,
    )
    meta = {
        "settings": asdict(reference_settings),
        "ids": [p.example_id for p in pairs],
        "pairs": [_pair_record(p) for p in pairs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "epochs": epochs,
        "reference": source,
        "dsdpo_version": __version__,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    terms = torch.stack(per_epoch).to(torch.float32)  # the trainer's scores are fp32 sums
    save_file({"terms": terms}, str(path), metadata={"dsdpo": json.dumps(meta)})
    return path


class ReferenceScoresFile:
    """A reference-scores file read back: the per-draw terms by example id and epoch, and what they
    were computed with, checked against the training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self.table = handle.get_tensor("terms")  # [epochs, pairs, 2, budget]
                meta = json.loads((handle.metadata() or {})["dsdpo"])
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise DsdpoError(f"{self.path}: not a dsdpo reference-scores file ({err})") from err
        try:
            self.settings = ReferenceSettings(**meta["settings"])
            self.pair_records, self.tokenizer = meta["pairs"], meta["tokenizer"]
        except (KeyError, TypeError):
            raise DsdpoError(
                f"{self.path} was written by dsdpo {meta.get('dsdpo_version', '?')}, which did not record "
                "the precision, tokenizer and pairs it scored: run `dsdpo precompute-reference` again"
            ) from None
        self.epochs = meta["epochs"]
        self.row_of = {example_id: row for row, example_id in enumerate(meta["ids"])}

    def check(
        self, settings: ReferenceSettings, pairs: list[TokenizedPair], tokenizer, epochs_needed: int
    ) -> None:
        """Every difference from the training run (settings, tokenizer, the pairs' tokens) is an
        error naming it."""
        saved, wanted = asdict(self.settings), asdict(settings)
        wrong = [
            f"{name} {saved[name]!r} (training: {wanted[name]!r})"
            for name in saved
            if saved[name] != wanted[name]
        ]
        if wrong:
            raise DsdpoError(
                f"{self.path} was computed with other settings: {', '.join(wrong)}; precompute it again "
                "with the training run's settings"
            )
        self._check_scored(pairs, "pairs")
        if tokenizer_fingerprint(tokenizer) != self.tokenizer:
            raise DsdpoError(
                f"{self.path} was computed with another tokenizer or chat template than this run's: "
                "precompute it again with the training model's tokenizer"
            )
        self._check_pairs(pairs)
        if self.epochs < epochs_needed:
            raise DsdpoError(
                f"{self.path} covers {self.epochs} epochs, training needs {epochs_needed}: "
                f"precompute with --epochs {epochs_needed}"
            )

    def check_held_out(self, pairs: list[TokenizedPair], eval_data: str) -> None:
        """Held-out evaluation reads its reference terms here too (epoch 0: the draws it scores with),
        so its pairs must have been scored; without them eval/* would be reference-free, silently."""
        self._check_scored(
            pairs,
            f"held-out pairs of {eval_data}",
            remedy="; precompute the reference on the training and held-out rows together",
        )
        self._check_pairs(pairs)

    def _check_scored(self, pairs: list[TokenizedPair], what: str, remedy: str = "") -> None:
        missing = [pair.example_id for pair in pairs if pair.example_id not in self.row_of]
        if missing:
            raise DsdpoError(
                f"{self.path} has no scores for {len(missing)} {what}, e.g. id {missing[0]!r}{remedy}"
            )

    def _check_pairs(self, pairs: list[TokenizedPair]) -> None:
        """Each pair's response lengths and token ids must be those that were scored."""
        changed = [p for p in pairs if _pair_record(p) != self.pair_records[self.row_of[p.example_id]]]
        if not changed:
            return
        pair = changed[0]
        _, chosen, rejected = self.pair_records[self.row_of[pair.example_id]]
        now = (len(pair.chosen_ids), len(pair.rejected_ids))
        what = (
            f"its responses are now {now[0]} and {now[1]} tokens, scored at {chosen} and {rejected}"
            if now != (chosen, rejected)
            else "its text changed"
        )
        raise DsdpoError(
            f"{self.path} is stale: {len(changed)} pairs differ from those it scored, e.g. id "
            f"{pair.example_id!r} ({what}); precompute it again on this data"
        )

    def lookup(self, example_ids: list[str], epoch: int) -> Tensor:
        """[2P, n] terms in PairBatch order: the P chosen responses, then the P rejected ones."""
        rows = torch.tensor([self.row_of[example_id] for example_id in example_ids])
        pair_terms = self.table[epoch, rows]  # [P, 2, n]
        return torch.cat([pair_terms[:, 0], pair_terms[:, 1]])
