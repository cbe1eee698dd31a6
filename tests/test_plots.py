"""Line plots: x ticks stay readable when the data's x values crowd the axis (the model card's FID curve)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from histosynth.evaluate.plots import line_plot, x_tick_values


def test_data_ticks_when_they_fit_round_ticks_when_they_crowd() -> None:
    to_px = lambda x: x  # noqa: E731 - one pixel per unit
    assert x_tick_values([100, 300, 200], to_px, 100, 300, False) == [100, 200, 300]
    crowded = x_tick_values([22.4, 62.4, 86.4, 102.4, 142.4, 816], to_px, 22.4, 816, False)
    assert crowded == [200, 400, 600, 800]  # inside the range: no tick at 0 or 1,000
    assert all(b - a >= 40 for a, b in zip(crowded, crowded[1:]))
    assert len(x_tick_values(list(range(0, 1200, 100)), to_px, 0, 1100, False)) < 12  # more than 10 values


def test_crowded_log_axis_gets_1_2_5_ticks() -> None:
    to_px = lambda x: 100 * math.log10(x)  # noqa: E731 - 100 px a decade
    xs = [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112]  # thousands of samples, crowded at the right
    lo, hi = math.log10(8), math.log10(112)
    assert x_tick_values(xs, to_px, lo, hi, True) == [10, 20, 50, 100]
    wide = x_tick_values([1, 10**6], to_px, 0, 6, True, min_gap=1000)  # too close for min_gap: round ticks  # 1-2-5 would give 19 ticks: decades only
    assert wide == [10.0**k for k in range(7)]


def test_line_plot_writes_an_image(tmp_path: Path) -> None:
    out = line_plot({"a": ([22.4, 62.4, 86.4, 816], [105, 91, 73, 67], None)}, tmp_path / "p.png", title="t")
    assert Image.open(out).size == (640, 420)
