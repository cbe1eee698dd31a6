"""Learning-rate schedules shared by the trainers: pure functions of the step, so a resumed run needs no state."""

from __future__ import annotations

import math
from typing import Literal

LRDecay = Literal["none", "linear", "cosine"]  # configio checks a config's value against these


def decay_factor(step: int, start: int, end: int, shape: LRDecay, floor: float) -> float:
    """Multiplier of a base learning rate: 1 up to `start`, then `shape` down to `floor` at `end`, `floor` after.

    `floor` is the final learning rate as a share of the base one (min_lr / lr). A cool-down at the end of a long
    constant-lr run settles the weights that the EMA averages.
    """
    if shape == "none" or step <= start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, end - start))
    fall = 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * fall


def lr_factor(step: int, warmup: int, decay_start: int, end: int, shape: LRDecay, floor: float) -> float:
    """`decay_factor` after a linear warm-up over the first `warmup` steps ((step + 1) / warmup up to 1).

    A fresh optimizer (a new run, or a round that restarts Adam from committed weights) takes its first steps at a
    fraction of the rate: Adam's early updates are about lr per weight whatever the gradient's size.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return decay_factor(step, decay_start, end, shape, floor)
