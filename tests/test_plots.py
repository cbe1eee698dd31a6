"""Line plots: x ticks stay readable when the data's x values crowd the axis (the model card's FID curve)."""

from __future__ import annotations

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


def test_line_plot_writes_an_image(tmp_path: Path) -> None:
    out = line_plot({"a": ([22.4, 62.4, 86.4, 816], [105, 91, 73, 67], None)}, tmp_path / "p.png", title="t")
    assert Image.open(out).size == (640, 420)
