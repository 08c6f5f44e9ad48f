"""Learning-rate schedules as multipliers of the peak rate: cosine, WSD, constant (all with linear warm-up)."""
from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(
    schedule: str, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.1, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """Return step -> factor of the peak learning rate."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = (step - warmup) / max(total_steps - warmup, 1)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "wsd":
            # Warmup-stable-decay: hold the peak, then decay linearly over the last `decay_fraction` of steps.
            decay_steps = max(int(round(total_steps * decay_fraction)), 1)
            decay_start = total_steps - decay_steps
            if step < decay_start:
                return 1.0
            progress = (step - decay_start + 1) / decay_steps
            return 1.0 - (1 - min_ratio) * min(progress, 1.0)
        raise ValueError(f"unknown schedule {schedule!r}")

    return factor
