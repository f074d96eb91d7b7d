"""Sentence similarity (BIOSSES): a regression head on `[CLS] s1 [SEP] s2 [SEP]`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blurbtune.errors import DataError
from blurbtune.tasks.base import Example, SequenceTask, read_tsv, register

if TYPE_CHECKING:
    import torch  # type hints only: reading data needs no torch


@register("similarity")
class Similarity(SequenceTask):
    problem_type = "regression"

    def read(self, path: Path, task: Any) -> list[Example]:
        examples = []
        for line, (pair_id, s1, s2, score) in read_tsv(
            path, 4, ("pair_id", "sent1", "sent2", "score")
        ):
            try:
                value = float(score)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):  # a NaN gold score would read as a diverged run
                raise DataError(path, f"expected a numeric score, got {score!r}", line)
            examples.append({"id": pair_id, "text": s1, "text_pair": s2, "gold": value})
        return examples

    def num_labels(self, task: Any) -> int:
        return 1

    def decode_one(self, logits: torch.Tensor) -> Any:
        return float(logits.reshape(-1)[0].item())

    def to_json(self, value: Any, task: Any) -> Any:
        return float(value)

    def collapsed(self, preds: list[Any], task: Any) -> bool:
        """True when the predictions barely vary (std under 1% of BIOSSES' 0-4 range)."""
        return len(preds) > 1 and float(np.std(preds)) < 0.04
