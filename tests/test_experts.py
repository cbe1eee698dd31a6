"""Noise-range experts: the switch routes each row by its timestep, as one call per range."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histosynth.diffusion.experts import NoiseRangeSwitch, range_with_partner, switch_denoiser


def _constant(value: float, calls: list[int]):
    def denoise(x, t, y):
        calls.append(x.shape[0])
        return torch.full_like(x, value) + 0 * t.view(-1, 1, 1, 1)

    return denoise


def test_rows_go_to_the_network_of_their_range_in_one_call_per_range():
    calls: dict[str, list[int]] = {"lo": [], "mid": [], "hi": []}
    switched = switch_denoiser(_constant(0.0, calls["lo"]),
                               [(300, _constant(1.0, calls["mid"])), (700, _constant(2.0, calls["hi"]))])
    x = torch.zeros(6, 2, 3, 3)
    t = torch.tensor([0, 299, 300, 699, 700, 999])
    out = switched(x, t, torch.zeros(6, dtype=torch.long))
    assert out[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert calls == {"lo": [2], "mid": [2], "hi": [2]}
    # a sampler step: every row at one timestep is a single call of that range's network, not a copy
    out = switched(x[:4], torch.full((4,), 500), torch.zeros(4, dtype=torch.long))
    assert out.eq(1.0).all() and calls["mid"] == [2, 4]


def test_no_experts_is_the_base_itself_and_starts_must_ascend():
    calls: list[int] = []
    base = _constant(0.0, calls)
    assert switch_denoiser(base, []) is base
    with pytest.raises(ValueError, match="ascend"):
        switch_denoiser(base, [(500, base), (500, base)])


class _Const(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x, t, y):
        return self.value.expand_as(x)


@pytest.mark.parametrize("t_min, t_max, expected", [
    (0, 400, [1.0, 0.0, 0.0]),     # the cleaner range: the expert below 400, the partner above
    (400, 1000, [0.0, 1.0, 1.0]),  # the noisier range
    (400, 800, [0.0, 1.0, 0.0]),   # a middle range: the partner on both sides
])
def test_range_with_partner(t_min, t_max, expected):
    model = range_with_partner(_Const(1.0), _Const(0.0), t_min, t_max, 1000)
    out = model(torch.zeros(3, 1, 2, 2), torch.tensor([100, 500, 900]), torch.zeros(3, dtype=torch.long))
    assert out[:, 0, 0, 0].tolist() == expected
    assert isinstance(model, NoiseRangeSwitch)
    expert = _Const(1.0)
    assert range_with_partner(expert, _Const(0.0), 0, 1000, 1000) is expert
