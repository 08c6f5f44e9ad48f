"""Teacher-confidence weighting of the KD term: positions where the teacher is sure count more.

Each trained position i gets a confidence c_i in [0, 1] from the teacher's distribution at T = 1 (its own
confidence, whatever the KD temperature): its top-1 probability (`teacher_confidence`), or one less its entropy
over the log of the vocabulary (`teacher_entropy`: 1 for a one-hot teacher, 0 for a uniform one). The raw weight is
r_i = max(c_i, floor) ** (1 / temperature) (temperature > 1 flattens the weights, < 1 sharpens them), and the KD
term's per-position divergences are multiplied by w_i = r_i / mean_j(r_j) over the micro-batch's trained positions,
so the weights average 1 and the loss keeps its scale. The CE term is not weighted.

From the cache (top-k log-probs plus the tail mass), the top-1 probability is exact; the entropy spreads the tail
mass uniformly over the V - k tokens outside the top-k, the same approximation the sparse loss uses for temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from distill.errors import DistillError

WEIGHTINGS = ("none", "teacher_confidence", "teacher_entropy")


@dataclass(frozen=True)
class Weighting:
    """How the KD term's positions are weighted: the kind, the floor under each confidence, the temperature."""

    kind: str = "none"
    floor: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTINGS:
            raise DistillError(f"method.weighting: unknown weighting {self.kind!r}; choose one of "
                               f"{', '.join(WEIGHTINGS)}")
        if not 0.0 < self.floor <= 1.0:
            raise DistillError(f"method.weighting_floor: must be in (0, 1], got {self.floor}")
        if self.temperature <= 0:
            raise DistillError(f"method.weighting_temperature: must be > 0, got {self.temperature}")

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def confidence(self, log_probs: Tensor) -> Tensor:
        """[n] confidences of [n, V] teacher log-probs at T = 1 (normalised over the V columns given)."""
        if self.kind == "teacher_confidence":
            return log_probs.max(dim=1).values.exp()
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        return 1.0 - entropy / math.log(max(log_probs.size(1), 2))

    def sparse_confidence(self, ids: Tensor, log_probs: Tensor, tail: Tensor, vocab_size: int) -> Tensor:
        """[n] confidences from top-k rows (log-probs over the full vocabulary at T = 1) and the log tail mass."""
        if self.kind == "teacher_confidence":
            return log_probs.max(dim=1).values.exp()
        log_probs, tail = log_probs.double(), tail.double()
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        tail_tokens = vocab_size - ids.size(1)
        if tail_tokens > 0:
            # The tail mass spread evenly: -p_tail * log(p_tail / M).
            entropy = entropy - tail.exp() * (tail - math.log(tail_tokens))
        return 1.0 - entropy / math.log(max(vocab_size, 2))

    def weights(self, confidence: Tensor) -> Tensor:
        """[n] weights averaging 1: max(c, floor) ** (1 / temperature), divided by their mean."""
        raw = confidence.double().clamp(min=self.floor, max=1.0) ** (1.0 / self.temperature)
        return raw / raw.mean()


def weighted_sum(per_row: Tensor, weights: Optional[Tensor]) -> Tensor:
    """The sum of per-row values, each times its weight when weights are given."""
    if weights is None:
        return per_row.sum()
    return (per_row * weights.to(per_row.dtype)).sum()
