"""Noise-range experts: several UNets of one task, each run at its own range of timesteps.

eDiff-I (Balaji et al. 2022) trains copies of one diffusion model on parts of the noise range: each copy has the
whole network's capacity for its part, and sampling still calls one network per step, so quality can rise at an
unchanged sampling cost (which bounds the UNet's size on the CPU: docs/generate.md). Here an expert is a UNet
fine-tuned on timesteps `t_min <= t < t_max` (`LDMTrainConfig.t_min`/`t_max`); a bundle ships the lowest range
as `unet.*` and each noisier one beside it (`bundle.manifest.Manifest.unet_experts`).

`switch_denoiser` is the sampler side, a pure function over `denoise(x, t, y)` callables like the guidance
wrappers of `diffusion.samplers`; `NoiseRangeSwitch` is the same as a module, for code that takes a UNet
(training's sample grids and sample check).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def switch_denoiser(base: Denoise, experts: Sequence[tuple[int, Denoise]]) -> Denoise:
    """Route each row to the network whose timestep range holds its `t`.

    `experts` are (t_min, denoise) in ascending t_min: row i goes to the last expert with t_min <= t_i, and to
    `base` when t_i is below every t_min. A batch whose rows all fall in one range (every sampler step) is a
    single call of that network; mixed batches are split and put back in row order.
    """
    starts = [s for s, _ in experts]
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"expert t_min must ascend strictly, got {starts}")
    nets = [base, *(d for _, d in experts)]
    if not experts:
        return base
    bounds = torch.tensor(starts, dtype=torch.long)

    def switched(x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        # bucketize(right=True): the number of starts <= t, i.e. the index into nets
        which = torch.bucketize(t.detach().to("cpu", torch.long), bounds, right=True)
        first = int(which[0])
        if bool((which == first).all()):
            return nets[first](x, t, class_ids)
        out: torch.Tensor | None = None
        for k in torch.unique(which).tolist():
            rows = torch.nonzero(which == k).flatten().to(x.device)
            part = nets[k](x[rows], t[rows], class_ids[rows])
            if out is None:
                out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
            out[rows.to(part.device)] = part
        assert out is not None
        return out

    return switched


class NoiseRangeSwitch(nn.Module):
    """`switch_denoiser` as a module: `base` below the first t_min, each expert from its t_min on."""

    def __init__(self, base: nn.Module, experts: Sequence[tuple[int, nn.Module]]) -> None:
        super().__init__()
        self.base = base
        self.starts = [s for s, _ in experts]
        self.experts = nn.ModuleList([m for _, m in experts])
        self._switched = switch_denoiser(base, list(zip(self.starts, self.experts)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self._switched(x, t, class_ids)


def range_with_partner(expert: nn.Module, partner: nn.Module, t_min: int, t_max: int,
                       num_train_steps: int) -> nn.Module:
    """A full-range model: `expert` on t_min <= t < t_max, `partner` (e.g. the network it was fine-tuned from)
    everywhere else. With the full range it is `expert` itself."""
    experts: list[tuple[int, nn.Module]] = []
    base = expert if t_min == 0 else partner
    if t_min > 0:
        experts.append((t_min, expert))
    if t_max < num_train_steps:
        experts.append((t_max, partner))
    return NoiseRangeSwitch(base, experts) if experts else expert
