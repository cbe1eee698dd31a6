"""Small PNG plots drawn with PIL (matplotlib is not a dependency): line plots with error bars,
confusion matrices and image grids. Pillow's built-in bitmap font keeps them self-contained."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histosynth.imageops import tile_grid
from histosynth.io import atomic_path

# Colour-blind-safe palette (Okabe & Ito).
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0), (240, 228, 66), (0, 0, 0))

MARKERS = ("circle", "square", "diamond")  # one per pass through the palette: series 9-16 get squares, ...

Series = Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - start) / step - 1e-9)  # enough steps that the last tick reaches hi
    return [round(start + i * step, 10) for i in range(count + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def x_tick_values(xs: Sequence[float], to_px: Callable[[float], float], lo: float, hi: float, log_x: bool,
                  min_gap: float = 40.0) -> list[float]:
    """The data's own x values as ticks, unless there are more than 10 or their labels would overlap (closer than
    `min_gap` pixels); then round values inside the axis range [lo, hi] (log10 units when `log_x`)."""
    ticks = sorted(set(xs))
    gap = min((to_px(b) - to_px(a) for a, b in zip(ticks, ticks[1:])), default=min_gap)
    if len(ticks) <= 10 and gap >= min_gap:
        return ticks
    if log_x:  # 1, 2 and 5 times powers of ten (steps of 0.5 in log10 would label 31.6228)
        for mantissas in ((1, 2, 5), (1,)):
            inside = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas
                      if lo - 1e-9 <= k + math.log10(m) <= hi + 1e-9]
            if len(inside) <= 8:
                break
        return inside
    return [t for t in nice_ticks(lo, hi) if lo <= t <= hi]  # nice_ticks may overshoot the range


def line_plot(
    series: Series,
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_x: bool = False,
    size: tuple[int, int] = (640, 420),
) -> Path:
    """Write a line plot: ``series[name] = (xs, ys, errors or None)``; error bars are +- errors."""
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    # The legend sits right of the plot: wide enough for its longest name.
    legend = max((draw.textlength(name, font=font) for name in series), default=0)
    left, right, top, bottom = 70, max(150, 46 + int(legend)), 36, 50
    xs_all = [x for xs, _, _ in series.values() for x in xs]
    ys_all = [y + s * e for _, ys, es in series.values() for y, e in zip(ys, es or [0] * len(ys)) for s in (-1, 1)]
    ys_all = [y for y in ys_all if math.isfinite(y)]
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: float(v))
    x_lo, x_hi = (min(map(tx, xs_all)), max(map(tx, xs_all))) if xs_all else (0.0, 1.0)
    y_ticks = nice_ticks(min(ys_all), max(ys_all)) if ys_all else [0.0, 1.0]
    y_lo, y_hi = y_ticks[0], y_ticks[-1] if y_ticks[-1] > y_ticks[0] else y_ticks[0] + 1
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (tx(x) - x_lo) / (x_hi - x_lo) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for y in y_ticks:
        _, yy = px(10 ** x_lo if log_x else x_lo, y)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.line([left + 1, yy, left + pw - 1, yy], fill=(230, 230, 230))
        draw.text((left - 8, yy), _fmt(y), fill="black", font=font, anchor="rm")
    x_ticks = x_tick_values(xs_all, lambda x: px(x, y_lo)[0], x_lo, x_hi, log_x)
    for x in x_ticks:
        xx, _ = px(x, y_lo)
        draw.line([xx, top + ph, xx, top + ph + 4], fill="black")
        draw.text((xx, top + ph + 6), _fmt(x), fill="black", font=font, anchor="mt")
    for i, (name, (xs, ys, errors)) in enumerate(series.items()):
        colour, marker = series_style(i)
        points = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            if marker == MARKERS[0]:
                draw.line(points, fill=colour, width=2)
            else:  # a later pass through the palette: dashed, so a colour's two series stay apart
                _dashed(draw, points, colour, width=2)
        for j, (x, y) in enumerate(zip(xs, ys)):
            if not math.isfinite(y):
                continue
            cx, cy = px(x, y)
            if errors is not None and math.isfinite(errors[j]) and errors[j] > 0:
                _, y0 = px(x, y - errors[j])
                _, y1 = px(x, y + errors[j])
                draw.line([cx, y0, cx, y1], fill=colour, width=1)
                draw.line([cx - 3, y0, cx + 3, y0], fill=colour)
                draw.line([cx - 3, y1, cx + 3, y1], fill=colour)
            _marker(draw, marker, cx, cy, colour)
        ly = top + 8 + 16 * i
        if marker == MARKERS[0]:
            draw.line([width - right + 10, ly, width - right + 30, ly], fill=colour, width=3)
        else:
            _dashed(draw, [(width - right + 10, ly), (width - right + 30, ly)], colour, width=3)
        _marker(draw, marker, width - right + 20, ly, colour)
        draw.text((width - right + 36, ly), name, fill="black", font=font, anchor="lm")
    draw.text((left + pw / 2, 12), title, fill="black", font=font, anchor="mm")
    draw.text((left + pw / 2, height - 14), xlabel + (" (log scale)" if log_x else ""), fill="black", font=font, anchor="mm")
    draw.text((8, top - 20), ylabel, fill="black", font=font, anchor="lm")
    return _save(img, path)


def series_style(index: int) -> tuple[tuple[int, int, int], str]:
    """Colour and marker of the `index`-th series: the palette in turn, then again with the next marker."""
    return PALETTE[index % len(PALETTE)], MARKERS[(index // len(PALETTE)) % len(MARKERS)]


def _marker(draw: ImageDraw.ImageDraw, marker: str, cx: float, cy: float, colour: tuple[int, int, int]) -> None:
    r = 3
    if marker == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif marker == "diamond":
        draw.polygon([(cx, cy - r - 1), (cx + r + 1, cy), (cx, cy + r + 1), (cx - r - 1, cy)], fill=colour)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _dashed(draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], colour: tuple[int, int, int], *,
            width: int, dash: float = 6.0, gap: float = 4.0) -> None:
    """A polyline drawn in dashes that continue across its vertices."""
    phase = 0.0  # distance into the current dash + gap period
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            in_dash = phase < dash
            step = min((dash - phase) if in_dash else (dash + gap - phase), length - pos)
            if in_dash:
                a, b = pos / length, (pos + step) / length
                draw.line([x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)],
                          fill=colour, width=width)
            pos += step
            phase = (phase + step) % (dash + gap)


def confusion_plot(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path, *,
                   title: str = "", xlabel: str = "assigned", ylabel: str = "generated as") -> Path:
    """Write a confusion matrix as a heat map with counts; rows are normalised for the colour."""
    matrix = np.asarray(matrix)
    cell = 48
    left, top = 110, 60
    width, height = left + cell * len(cols) + 20, top + cell * len(rows) + 40
    img = Image.new("RGB", (max(width, 260), height), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    share = matrix / totals
    for i, row in enumerate(rows):
        draw.text((left - 6, top + i * cell + cell / 2), row[:16], fill="black", font=font, anchor="rm")
        for j in range(len(cols)):
            v = float(share[i, j])
            shade = (int(255 - 255 * v), int(255 - 141 * v), int(255 - 77 * v))  # white -> blue
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell]
            draw.rectangle(box, fill=shade, outline=(200, 200, 200))
            draw.text((box[0] + cell / 2, box[1] + cell / 2), str(int(matrix[i, j])),
                      fill="white" if v > 0.6 else "black", font=font, anchor="mm")
    for j, col in enumerate(cols):
        draw.text((left + j * cell + cell / 2, top - 6), col[:8], fill="black", font=font, anchor="mb")
    draw.text((left, 12), title, fill="black", font=font, anchor="lm")
    draw.text((left + cell * len(cols) / 2, top - 24), xlabel, fill="black", font=font, anchor="mb")
    draw.text((6, top - 24), ylabel, fill="black", font=font, anchor="lb")
    return _save(img, path)


def image_grid(images: Sequence[np.ndarray], columns: int = 8, pad: int = 2) -> Image.Image:
    """Tile uint8 ``(H, W, 3)`` images (all one size) into one grid image with a white gap."""
    return Image.fromarray(tile_grid(images, columns, gap=pad, margin=pad))


def _save(img: Image.Image, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
