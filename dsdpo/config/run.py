"""A run's whole config (Config): one section per settings dataclass, and the checks across sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dsdpo.config.data import DataConfig
from dsdpo.config.model import ModelConfig
from dsdpo.config.sampler import SamplerConfig
from dsdpo.config.score import ScoreConfig
from dsdpo.config.train import TrainConfig
from dsdpo.errors import DsdpoError
from dsdpo.objective.loss_config import LossConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_sampler: SamplerConfig = field(default_factory=SamplerConfig)  # --eval-problems' sampler

    def validate(self) -> Config:
        for section in (self.model, self.data, self.score, self.train):
            section.validate()
        self.eval_sampler.validate("eval_sampler")
        if self.train.eval_samples > 1 and self.eval_sampler.temperature == 0:
            raise DsdpoError(
                f"train.eval_samples {self.train.eval_samples} with eval_sampler.temperature 0 gives copies "
                "of one answer: set --eval-temperature > 0"
            )
        if not self.score.antithetic and (self.model.reference_scores or self.loss.objective == "per_draw"):
            raise DsdpoError(
                "score.antithetic false gives the reference its own draws: not with --reference-scores "
                "(scored on the policy's draws) or --objective per_draw (a loss per shared draw)"
            )
        if self.loss.supervised and (self.train.keep_best or "").startswith("eval/rewards/"):
            raise DsdpoError(
                f"train.keep_best {self.train.keep_best}: an SFT run has no rewards; "
                "use eval/loss or eval/accuracy"
            )
        if self.train.ref_sync_steps:
            # TR-DPO moves a reference engine towards the policy: there must be one to move.
            without_engine = [
                (self.model.reference_scores, "--reference-scores (fixed scores)"),
                (self.loss.reference_free, "--reference-free"),
                (self.model.lora_rank, "--lora-rank (the reference is the policy with its adapters off)"),
                (self.model.reference_path, "--ref-model (the refresh mixes the policy into its own start)"),
            ]
            for given, option in without_engine:
                if given:
                    raise DsdpoError(f"train.ref_sync_steps (TR-DPO) needs a reference engine: drop {option}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
