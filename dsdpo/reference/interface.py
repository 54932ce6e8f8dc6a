"""The reference model, four ways, behind one interface.

docs/design.md, "Reference model: four ways". Training asks a `Reference` for the per-draw terms
of a batch's responses on given draws, and never asks what kind it is:

    ModelReference(engine)          a frozen ZeRO-3 engine, or the policy with its LoRA adapters off
                                    (AdapterDisabledReference)
    PrecomputedReference(path)      terms read from `dsdpo precompute-reference`'s file
    NoReference()                   reference-free losses and SFT: no terms
    FixedTerms(terms)               given terms (tests, experiments)

Precomputed scores: train with no reference model in memory; the file's format, its writing and its
checks are in dsdpo.reference.scores_file.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dsdpo.objective.draws import Draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.scoring import engine_terms
from dsdpo.reference.scores_file import ReferenceScoresFile


class Reference:
    """Per-draw reference terms of a batch of responses (rows 0..P-1 chosen, P..2P-1 rejected).

    `terms` returns ([2P, n] terms on the batch's device, or None for no reference; the forwards it
    ran). Every rank calls it for every micro-batch (an engine's forwards are collective).
    `model` scores other pairs (held-out evaluation) when the reference is a model, else None.
    """

    model = None

    def terms(
        self,
        batch: ScoringBatch,
        draws: Draws,
        *,
        mask_token_id: int,
        max_tokens: int,
        example_ids: Sequence[str] = (),
        epoch: int = 0,
    ) -> tuple[Tensor | None, int]:
        raise NotImplementedError


class NoReference(Reference):
    """Reference-free losses (B̂_ref := 0) and SFT."""

    def terms(self, batch, draws, **_) -> tuple[None, int]:
        return None, 0


class ModelReference(Reference):
    """A model called like an engine (the reference engine, or AdapterDisabledReference below): it
    scores the draws it is given, without gradients, in chunks of at most `max_tokens`."""

    def __init__(self, model):
        self.model = model

    def terms(self, batch, draws, *, mask_token_id, max_tokens, **_) -> tuple[Tensor, int]:
        return engine_terms(self.model, batch, draws, mask_token_id=mask_token_id, max_tokens=max_tokens)


class FixedTerms(Reference):
    """The same given [2P, n] terms for every batch (for a single micro-batch: tests, experiments)."""

    def __init__(self, terms: Tensor):
        self.fixed = terms

    def terms(self, batch, draws, **_) -> tuple[Tensor, int]:
        return self.fixed.to(batch.input_ids.device), 0


class AdapterDisabledReference:
    """The reference of a LoRA run: the policy engine with its adapters switched off (docs/design.md,
    "Reference model: four ways"). Called like an engine, under no_grad, by dsdpo.objective.gradient."""

    def __init__(self, policy_engine):
        self.policy = policy_engine

    def __call__(self, **inputs):
        with self.policy.module.model.disable_adapter():
            return self.policy(**inputs)


class PrecomputedReference(ReferenceScoresFile, Reference):
    """The reference's per-draw terms, looked up by example id and epoch in the file ReferenceScoresFile
    reads and checks."""

    def terms(self, batch, draws, *, example_ids, epoch, **_) -> tuple[Tensor, int]:
        return self.lookup(example_ids, epoch).to(batch.input_ids.device), 0


def as_reference(reference) -> Reference:
    """A Reference from what a caller holds: a Reference, a model or engine, terms, or None."""
    if isinstance(reference, Reference):
        return reference
    if reference is None:
        return NoReference()
    if isinstance(reference, Tensor):
        return FixedTerms(reference)
    return ModelReference(reference)
