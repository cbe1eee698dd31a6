"""Pieces every training loop shares: seeding, an exponential moving average of weights, the export file.

Checkpoints that resume a run live in `histosynth.runtime.checkpointing`; metrics logs and the progress
bar in `histosynth.runtime.tracking`.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch

from histosynth.errors import InputError
from histosynth.runtime import dist
from histosynth.runtime.weights import save_checkpoint

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


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (fp32 shadow copy).

    ``shadow = d_n * shadow + (1 - d_n) * param`` after the n-th optimizer step. With `warmup` the decay
    grows as ``d_n = min(decay, (1 + n) / (10 + n))`` (the schedule of TensorFlow's and timm's EMA): a fixed
    0.999 from step 0 leaves a short run's average mostly at the random initialisation (after 2,000 steps
    13.5% of it is still the init), while the warmed-up average tracks the weights early and smooths late.
    Integer buffers (counters) are copied as they are. The shadow lives on the module's device;
    `state_dict` / `load_state_dict` make it (with the update count) part of a resume checkpoint,
    `copy_to` / `averaged` give a module with the averaged weights.
    """

    COUNT_KEY = "__ema_updates__"  # the update count n, stored beside the shadow weights

    def __init__(self, module: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise InputError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in dist.unwrap(module).state_dict().items()
        }

    def current_decay(self) -> float:
        """The decay the next `update` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Move the average one step toward `module`'s current weights."""
        decay = self.current_decay()
        for key, value in dist.unwrap(module).state_dict().items():
            shadow = self.shadow[key]
            if value.is_floating_point():
                shadow.lerp_(value.detach().float(), 1.0 - decay)
            else:
                shadow.copy_(value)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into `module` (cast to its dtypes)."""
        target = dist.unwrap(module)
        own = target.state_dict()
        target.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()}, strict=True)

    def averaged(self, module: torch.nn.Module) -> torch.nn.Module:
        """A deep copy of `module` holding the averaged weights (the original is untouched)."""
        clone = copy.deepcopy(dist.unwrap(module))
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights and the update count (for a resume checkpoint)."""
        return {**self.shadow, self.COUNT_KEY: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by `state_dict`.

        A checkpoint from before the warm-up existed has no count; it resumes with the full decay.
        """
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for key in self.shadow:
            self.shadow[key].copy_(state[key])
        count = state.get(self.COUNT_KEY)
        self.updates = int(count) if count is not None else 10**9


class _ShadowModule(torch.nn.Module):
    """Adapter so an `EMA` goes through `save/load_resume_checkpoint` like any module."""

    def __init__(self, ema: EMA) -> None:
        super().__init__()
        self.ema = ema

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.ema.load_state_dict(state_dict)


def ema_as_module(ema: EMA) -> torch.nn.Module:
    """Wrap an `EMA` so checkpointing sees it as a module with a state dict."""
    return _ShadowModule(ema)


def save_export(
    module: torch.nn.Module,
    path: str | Path,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    dtype: Literal["float16", "float32"] = "float16",
) -> Path | None:
    """Write the small export checkpoint (weights only, floats cast to `dtype`) on rank 0.

    It is `histosynth.runtime.weights`'s format, so `load_checkpoint` and the bundle builder read it;
    load it into an fp32 network for further training or encoding (`weights.load_state_dict` casts).
    """
    if not dist.is_main():
        return None
    torch_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    state = {
        k: v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()
        for k, v in dist.unwrap(module).state_dict().items()
    }
    return save_checkpoint(state, path, config, {**dict(extra or {}), "dtype": dtype})


def resumable_batches(loader: torch.utils.data.DataLoader, sampler: dist.ResumableSampler, epoch: int = 0,
                      position: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, position, batch)`` forever, starting `position` samples into `epoch`.

    `position` is how many samples of the epoch this rank has consumed *after* the batch: store it in
    `TrainState.epoch_position` with the epoch, and a resumed run continues with the next unseen batch.
    `loader` must iterate `sampler` (a `ResumableSampler`) and yield tensors (or tuples of them) whose
    first dimension is the batch.
    """
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(position)
        for batch in loader:
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            position += int(first.shape[0])
            yield epoch, position, batch
        epoch, position = epoch + 1, 0
