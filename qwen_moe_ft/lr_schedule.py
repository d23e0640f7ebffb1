"""Learning-rate schedule: linear warmup, then cosine decay to a floor or constant."""
from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `step` (0-based), for torch's LambdaLR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
