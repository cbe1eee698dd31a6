"""Exponential moving average of a network's weights: what both training stages validate, sample and ship."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from histosynth.errors import InputError
from histosynth.runtime import dist


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
