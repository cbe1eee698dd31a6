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


def test_a_ninth_series_is_told_apart_from_the_first_by_its_marker_and_dashes(tmp_path: Path) -> None:
    """The palette has 8 colours: the FID curve has more series, and a repeated colour must not read as one."""
    from histosynth.evaluate.plots import PALETTE, series_style

    styles = [series_style(i) for i in range(2 * len(PALETTE) + 1)]
    assert len(set(styles)) == len(styles)  # no two series look alike
    assert styles[8][0] == styles[0][0] and styles[8][1] != styles[0][1]
    # a flat line at one y: the solid one is unbroken, the dashed one (series 9, same colour) has gaps
    flat = {f"s{i}": ([1, 2], [float(i), float(i)], None) for i in range(9)}
    img = Image.open(line_plot(flat, tmp_path / "p.png")).convert("RGB")
    colour = PALETTE[0]

    def run_of(y: int) -> list[bool]:
        return [img.getpixel((x, y)) == colour for x in range(120, 400)]

    rows = [y for y in range(img.height) if sum(run_of(y)) > 100]  # the rows the two lines of colour 0 cover
    assert rows
    coverage = sorted({sum(run_of(y)) for y in rows})
    assert coverage[-1] >= 270 and coverage[0] < 220  # one line unbroken, the other dashed
