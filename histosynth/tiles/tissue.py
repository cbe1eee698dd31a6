"""Tissue detection on a low-resolution thumbnail: Otsu threshold, morphological cleanup, tissue fractions.

Glass (background) in an H&E scan is bright and nearly grey; stained tissue is saturated and absorbs
light. Either signal separates them:

- ``saturation``: HSV saturation ``(max - min) / max`` of RGB;
- ``od``: optical density ``-log10(I / 255)`` averaged over the three channels (Beer-Lambert; dark
  debris and pen marks are also high, but so is tissue, and it ignores the hue of the stain).

Otsu's threshold finds the valley between the glass and tissue modes. On an image with no glass at all
(a crop from the middle of a section) there is no such valley and Otsu would split the tissue itself, so the
threshold is clipped to a range in which glass never lies above and stain never lies below (`CLIP`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

TissueMethod = Literal["saturation", "od"]

# Allowed threshold range per method (see module docstring). Glass scans at saturation < 0.04 and
# OD < 0.05; pale eosin and cytoplasm at saturation > 0.15 and OD > 0.12.
CLIP: dict[str, tuple[float, float]] = {"saturation": (0.04, 0.15), "od": (0.05, 0.12)}


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 ``(H, W, 3)`` image."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over RGB, ``-log10(max(I, 1) / 255)``; 0 for white, ~2.4 for black."""
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    return od.mean(axis=-1)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram of `values`."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)  # pixels at or below each bin
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    # The cut after bin i puts bins 0..i in class 0. Empty bins in the valley give equal scores; take the
    # middle of that plateau rather than its first bin, which hugs the lower class.
    between = between[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


@dataclass
class TissueMap:
    """A boolean tissue mask over a slide and its scale to level-0 pixels."""

    mask: np.ndarray  # (h, w) bool, True = tissue
    scale_x: float  # level-0 pixels per mask pixel
    scale_y: float
    threshold: float  # the threshold actually used
    method: TissueMethod

    def __post_init__(self) -> None:
        # Summed-area table with a zero border: the tissue count of any rectangle in four lookups.
        self._integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Fraction of tissue in a level-0 rectangle (mask pixels whose centre lies inside it)."""
        h, w = self.mask.shape
        x0 = int(np.clip(round(x / self.scale_x), 0, w))
        x1 = int(np.clip(round((x + width) / self.scale_x), 0, w))
        y0 = int(np.clip(round(y / self.scale_y), 0, h))
        y1 = int(np.clip(round((y + height) / self.scale_y), 0, h))
        if x1 <= x0 or y1 <= y0:  # a rectangle smaller than one mask pixel: sample its centre
            cx = int(np.clip((x + width / 2) / self.scale_x, 0, w - 1))
            cy = int(np.clip((y + height / 2) / self.scale_y, 0, h - 1))
            return float(self.mask[cy, cx])
        s = self._integral
        count = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return float(count) / ((x1 - x0) * (y1 - y0))

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole slide that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_mask(
    rgb: np.ndarray,
    method: TissueMethod = "saturation",
    threshold: float | None = None,
    smoothing: int = 1,
    min_object_fraction: float = 1e-4,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail and the threshold used.

    `threshold` None means Otsu clipped to `CLIP[method]`. Cleanup, in mask pixels: closing then opening
    with a disk of radius `smoothing` (bridges gaps between nuclei, drops specks), then connected pieces
    smaller than `min_object_fraction` of the image are removed (dust, debris). Holes are not filled: a
    large lumen or tear inside a section is glass, and a tile over it should not count as tissue.
    """
    if method == "saturation":
        values = saturation(rgb)
    elif method == "od":
        values = optical_density(rgb)
    else:
        raise ValueError(f"unknown tissue method {method!r}; allowed: saturation, od")
    if threshold is None:
        lo, hi = CLIP[method]
        threshold = float(np.clip(otsu_threshold(values), lo, hi))
    mask = values > threshold
    if smoothing > 0:
        # Edge padding so that tissue running off the image border is not eroded by the closing.
        disk, r = _disk(smoothing), smoothing
        padded = np.pad(mask, r, mode="edge")
        padded = ndimage.binary_closing(padded, structure=disk)
        padded = ndimage.binary_opening(padded, structure=disk)
        mask = padded[r:-r, r:-r]
    if min_object_fraction > 0 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= max(1.0, min_object_fraction * mask.size)
        keep[0] = False
        mask = keep[labels]
    return mask, threshold


def detect_tissue(
    thumbnail: np.ndarray, scale_x: float, scale_y: float, method: TissueMethod = "saturation"
) -> TissueMap:
    """A `TissueMap` from a slide thumbnail and its level-0 scale (see `Slide.thumbnail`)."""
    mask, threshold = tissue_mask(thumbnail, method)
    return TissueMap(mask, scale_x, scale_y, threshold, method)
