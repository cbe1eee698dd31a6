"""Seeding every random generator a training run draws from, per rank."""

from __future__ import annotations

import random

import numpy as np
import torch

from histosynth.errors import InputError

# Ranks are offset by this much from the user's seed, and resumed runs that cannot restore RNG states
# by the step, so no two (rank, step) pairs share a stream for any realistic run length.
RANK_SEED_STRIDE = 1_000_003


def seed_everything(seed: int, rank: int = 0, offset: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA) for this rank; returns the seed used.

    Each rank gets ``seed + rank * RANK_SEED_STRIDE + offset``: ranks draw different augmentations and
    dropout masks (otherwise N processes would do the same work), yet a run is reproducible from `seed`.
    """
    if seed < 0:
        raise InputError(f"--seed: must be >= 0, got {seed}")
    value = seed + rank * RANK_SEED_STRIDE + offset
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device
    return value
