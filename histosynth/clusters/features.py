"""A fixed summary of VQ-GAN latents for clustering tissue type, and the scaler that standardises it.

`latent_features(latents)` maps each tile's latent map `(C, h, w)` to one vector of `D = C*(C+5)/2 + 16*C`
numbers, in five blocks (C = latent channels; C = 3 gives D = 60):

| block          | size       | what it captures                                                     |
|----------------|------------|----------------------------------------------------------------------|
| `mean`         | C          | overall stain/colour balance of the tile                             |
| `std`          | C          | contrast within the tile                                             |
| `corr`         | C(C-1)/2   | correlation between channels (colour mixture, e.g. H vs E dominance) |
| `texture`      | C          | mean absolute spatial gradient (fine texture: nuclei vs smooth fat)  |
| `grid`         | 16*C       | channel means on a 4x4 grid (layout; coarse morphology)              |

The blocks are measured in different units and have very different sizes, so `FeatureScaler` standardises
every column to zero mean and unit variance over the training tiles and then weights each block by
`1/sqrt(block size)`: each block contributes the same total variance, and the 16*C grid columns cannot
drown the global colour and texture statistics. The scaler stores its statistics so new tiles map the same
way. Everything here is plain tensor arithmetic: cheap, deterministic, differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histosynth.errors import InputError

GRID = 4  # side of the average-pooled layout grid


def feature_blocks(channels: int) -> list[tuple[str, int]]:
    """The `(name, size)` of each feature block, in column order, for latents with `channels` channels."""
    return [
        ("mean", channels),
        ("std", channels),
        ("corr", channels * (channels - 1) // 2),
        ("texture", channels),
        ("grid", GRID * GRID * channels),
    ]


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """Summarise latents `(N, C, h, w)` into raw (unstandardised) features `(N, D)`; see the module doc."""
    if latents.ndim != 4:
        raise InputError(f"latents: expected shape (N, C, h, w), got {tuple(latents.shape)}")
    n, c, h, w = latents.shape
    if h < 2 or w < 2:
        raise InputError(f"latents: spatial size must be at least 2x2, got {h}x{w}")
    x = latents.float()
    flat = x.reshape(n, c, h * w)
    mean = flat.mean(dim=2)  # (N, C)
    centred = flat - mean[:, :, None]
    std = centred.pow(2).mean(dim=2).clamp_min(1e-12).sqrt()  # (N, C)
    # Pearson correlation of each channel pair; eps keeps flat tiles (all background) finite.
    cov = centred @ centred.transpose(1, 2) / (h * w)  # (N, C, C)
    denom = std[:, :, None] * std[:, None, :] + 1e-6
    iu = torch.triu_indices(c, c, offset=1)
    corr = (cov / denom)[:, iu[0], iu[1]]  # (N, C(C-1)/2)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(2, 3))
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(2, 3))
    texture = 0.5 * (dx + dy)  # (N, C)
    grid = F.adaptive_avg_pool2d(x, GRID).reshape(n, c * GRID * GRID)  # (N, 16C)
    return torch.cat([mean, std, corr, texture, grid], dim=1)


@dataclass
class FeatureScaler:
    """Per-column standardisation plus per-block weights, fitted on the training tiles."""

    mean: list[float]  # per-column mean of the raw features
    std: list[float]  # per-column standard deviation (floored, so constant columns map to 0)
    weight: list[float]  # per-column block weight, 1/sqrt(size of the column's block)

    @classmethod
    def fit(cls, features: torch.Tensor, channels: int | None = None,
            blocks: list[int] | None = None) -> "FeatureScaler":
        """Fit on raw features `(N, D)`; pass `channels` for block weights of `latent_features` output, or
        the block sizes `blocks` of any other features (feature_kinds.py); neither: every weight is 1."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise InputError(f"features: expected shape (N >= 2, D), got {tuple(features.shape)}")
        f = features.double()
        mean = f.mean(dim=0)
        std = f.std(dim=0).clamp_min(1e-6)
        d = features.shape[1]
        if channels is not None:
            blocks = [size for _, size in feature_blocks(channels) if size]
        if blocks is None:
            weight = [1.0] * d
        else:
            weight = [w for size in blocks for w in [1.0 / math.sqrt(size)] * size]
            if len(weight) != d:
                what = f"latent_features of {channels} channels" if channels is not None else f"blocks {blocks}"
                raise InputError(f"features: {d} columns do not match {what}")
        return cls(mean=mean.tolist(), std=std.tolist(), weight=weight)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Standardise and weight raw features `(N, D)`; differentiable, same dtype and device as the input."""
        if features.ndim != 2 or features.shape[1] != len(self.mean):
            raise InputError(
                f"features: expected shape (N, {len(self.mean)}), got {tuple(features.shape)}"
            )
        kw = {"dtype": features.dtype, "device": features.device}
        mean = torch.tensor(self.mean, **kw)
        scale = torch.tensor(self.weight, **kw) / torch.tensor(self.std, **kw)
        return (features - mean) * scale
