"""The data section (DataConfig): the preference pairs and how they are cut and padded."""

from __future__ import annotations

from dataclasses import dataclass

from dsdpo.errors import DsdpoError
from dsdpo.settings import setting


@dataclass
class DataConfig:
    path: str = setting(
        "", "preference pairs (prompt/chosen/rejected): JSONL, JSON, Parquet, datasets folder", flag="--data"
    )
    max_length: int = setting(1024, "prompt + response tokens")
    max_prompt_length: int | None = setting(None, "prompt tokens kept (its end)")
    skip_invalid: bool = setting(False, "skip bad rows (counted by reason) instead of stopping")
    refuse_long_prompts: bool = setting(
        False,
        "a prompt that fills --max-length is an error (skipped with --skip-invalid); default: its start "
        "is cut so the response fits, and counted",
    )
    pad_responses_to: int | str | None = setting(
        None,
        "fill every response with EOS to this many tokens, the sampler's gen length: answers are then "
        'scored on the canvas generation fills; "auto": the held-out sampler\'s gen length '
        "(--eval-gen-length, or the model family's) (default: the answer and one EOS)",
    )

    def tokenize_options(self) -> dict:
        """How dsdpo.data.tokenize_pairs cuts and pads this data (training and held-out alike)."""
        return dict(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            skip_invalid=self.skip_invalid,
            refuse_long_prompts=self.refuse_long_prompts,
            pad_responses_to=self.pad_responses_to,
        )

    def validate(self):
        if not self.path:
            raise DsdpoError("data.path is required: a preference data file (--data FILE)")
        if self.max_length < 2:
            raise DsdpoError(f"data.max_length must be at least 2, got {self.max_length}")
        pad = self.pad_responses_to
        if (isinstance(pad, str) and pad != "auto") or (isinstance(pad, int) and pad < 1):
            raise DsdpoError(f'data.pad_responses_to: a positive number or "auto", got {pad!r}')
