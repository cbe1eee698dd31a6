"""benchmarks/latent_equivariance.py: an encoder that commutes with the flips scores zero, one that does not scores
above zero, and the noise step from which the two cannot be told apart follows the error."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from latent_equivariance import equivariance  # noqa: E402

from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402

SCHEDULE = NoiseSchedule(ScheduleConfig())
CODEBOOK = torch.linspace(-1, 1, 9)


def _lookup(latents: torch.Tensor) -> torch.Tensor:
    return (latents[:, :1] - CODEBOOK.view(1, -1, 1, 1)).abs().argmin(dim=1)


def _upsample(latents: torch.Tensor) -> torch.Tensor:
    return F.interpolate(latents[:, :1].expand(-1, 3, -1, -1), scale_factor=4)


def test_a_commuting_encoder_scores_zero() -> None:
    tiles = torch.rand(4, 3, 16, 16) * 2 - 1
    rows = equivariance(lambda x: F.avg_pool2d(x, 4), _lookup, _upsample, tiles, 1.0, SCHEDULE)
    assert len(rows) == 7 and {r["view"] for r in rows} >= {"rot90", "flip", "rot270+flip"}
    for r in rows:
        assert r["rel_rms"] < 1e-6 and r["codes_same"] == 1.0 and r["t_equal"] == 0
        assert abs(r["decode_rms"] - r["decode_rms_direct"]) < 1e-6


def test_an_oriented_encoder_does_not() -> None:
    torch.manual_seed(0)
    tiles = torch.rand(4, 3, 16, 16) * 2 - 1
    kernel = torch.zeros(1, 3, 3, 3)
    kernel[0, :, 1, 2], kernel[0, :, 1, 0] = 1.0, -1.0  # a horizontal gradient: turned tiles give other maps

    def encode(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.conv2d(x, kernel, padding=1), 4)

    rows = {r["view"]: r for r in equivariance(encode, _lookup, _upsample, tiles, 1.0, SCHEDULE)}
    assert rows["rot90"]["rel_rms"] > 0.5 and rows["rot90"]["t_equal"] > 0
    assert rows["rot180"]["rel_rms"] > 1.0  # a half turn flips the gradient's sign
