"""Variance-preserving noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021) and prediction targets.

`alphas_cumprod[t]` is the paper's alpha-bar_t. With alpha_t = sqrt(alpha-bar_t) and
sigma_t = sqrt(1 - alpha-bar_t), a noisy latent is x_t = alpha_t * x_0 + sigma_t * eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from histosynth.configio import require


@dataclass(frozen=True)
class ScheduleConfig:
    """How noise is added during training; stored in every bundle so sampling uses the same schedule."""

    kind: Literal["linear", "cosine"] = "linear"  # the paper: linear betas 1e-4..0.02 over T=1000
    num_train_steps: int = 1000  # T, the number of discrete training timesteps
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    prediction: Literal["epsilon", "v"] = "epsilon"  # what the network predicts (v: Salimans & Ho 2022)

    def validate(self, path: str) -> None:
        require(2 <= self.num_train_steps <= 100_000, f"{path}.num_train_steps", "must be in 2..100000")
        require(0 < self.beta_start < self.beta_end < 1, f"{path}.beta_start",
                "need 0 < beta_start < beta_end < 1")


class NoiseSchedule:
    """The discrete VP schedule: alpha-bar per timestep, forward noising and training targets."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()) -> None:
        self.config = config
        T = config.num_train_steps
        if config.kind == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        else:
            # Nichol & Dhariwal (2021) eq. 17, s = 0.008, betas capped at 0.999 (diffusers "squaredcos_cap_v2").
            def f(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64

    @property
    def num_train_steps(self) -> int:
        return self.config.num_train_steps

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for integer timesteps `t` (N,), shaped (N, 1, 1, 1) to broadcast over `like`."""
        abar = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): alpha_t x_0 + sigma_t eps."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target for the network: eps, or v = alpha_t eps - sigma_t x_0."""
        if self.config.prediction == "epsilon":
            return noise
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def timesteps(self, steps: int) -> list[int]:
        """`steps` descending training timesteps, "trailing" spacing: always starts at T-1.

        Trailing spacing (Lin et al. 2024, table 2) starts sampling from pure noise even with few steps,
        unlike "leading" spacing whose first step is at T - T/steps.
        """
        T = self.num_train_steps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        ts = [int(round(T - i * T / steps)) - 1 for i in range(steps)]
        return ts
