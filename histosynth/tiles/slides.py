"""Whole-slide images and plain large images behind one small `Slide` interface.

A `Slide` has pyramid `levels` (level 0 is the finest), microns per pixel (`mpp`) and objective
magnification where the file says so, and reads RGB regions of any level. Pyramidal TIFF/SVS files are read
with tifffile + imagecodecs one compressed TIFF tile (or strip) at a time, so a region costs only the tiles
it touches and a slide is never decoded whole at level 0 unless it has no coarser level or thumbnail.
Plain images (PNG, JPEG, ...) are read with Pillow as a one-level slide.

Where the physical scale comes from, in order:
1. Aperio ImageDescription ``MPP = 0.499`` (and ``AppMag = 20`` for magnification);
2. TIFF ``XResolution``/``YResolution`` with ``ResolutionUnit`` centimetre or inch, trusted only inside
   `PLAUSIBLE_MPP` (a default 72 dpi tag would otherwise claim 353 um/px);
3. ``assume_mpp`` given by the user for sources without either (plain PNG/JPEG dpi is never trusted).
"""

from __future__ import annotations

import math
import re
import struct
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from histosynth.errors import InputError

# Microscopy scans lie between ~0.1 um/px (100x oil) and ~16 um/px (0.625x); outside it a resolution tag
# is almost certainly a screen dpi, not a scanner's.
PLAUSIBLE_MPP = (0.05, 20.0)

# Two scales within 2% are treated as equal: a 0.499 um/px scan *is* a 0.5 um/px level; resampling by
# 1.002 would only blur it.
SCALE_TOLERANCE = 0.02

MppSource = Literal["aperio", "tiff-resolution", "assumed", "unknown"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Level:
    """One resolution of a slide."""

    index: int
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level
    mpp: float | None  # microns per pixel at this level, None when the slide's scale is unknown


@dataclass(frozen=True)
class LevelChoice:
    """Where to read tiles for a target scale: `level`, then resample by `resample` (level px per output px)."""

    level: int
    resample: float  # 1.0 means tiles are cut at the level's own resolution
    mpp: float | None  # the scale of the output tiles (before rounding of the read size)


class Slide(ABC):
    """A pyramid of RGB levels with optional physical scale. Use as a context manager."""

    path: Path
    kind: str  # "svs", "tiff" or "image"
    levels: tuple[Level, ...]
    mpp: float | None  # level 0
    mpp_source: MppSource
    magnification: float | None  # objective magnification at level 0 (e.g. Aperio AppMag)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    @abstractmethod
    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` at `level`; `x`, `y` are in that level's pixels and in bounds."""

    @abstractmethod
    def _thumbnail_sources(self) -> list[tuple[float, float, "_Reader"]]:
        """(downsample_x, downsample_y, reader of the whole image) for each level or associated thumbnail."""

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, float, float]:
        """An RGB image about `downsample` times smaller than level 0, and its exact (scale_x, scale_y).

        Uses the coarsest level (or Aperio thumbnail) at least as fine as asked for, then box-averages it
        by an integer factor band by band, so memory stays bounded on a slide without a pyramid.
        """
        downsample = max(1.0, downsample)
        sources = sorted(self._thumbnail_sources(), key=lambda s: max(s[0], s[1]))
        usable = [s for s in sources if max(s[0], s[1]) <= downsample * (1 + SCALE_TOLERANCE)]
        ds_x, ds_y, reader = usable[-1] if usable else sources[0]
        factor = max(1, int(downsample / max(ds_x, ds_y) + SCALE_TOLERANCE))
        image = reader.reduced(factor)
        w0, h0 = self.dimensions
        return image, w0 / image.shape[1], h0 / image.shape[0]

    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line: kind, size, levels, scale."""
        w, h = self.dimensions
        mpp = f"{self.mpp:.4g} um/px ({self.mpp_source})" if self.mpp else "scale unknown"
        mag = f", {self.magnification:g}x" if self.magnification else ""
        return f"{self.kind} {w}x{h}, {len(self.levels)} level(s), {mpp}{mag}"


class _Reader:
    """Reads a whole image reduced by an integer factor, in bands of rows."""

    def __init__(self, width: int, height: int, read_rows) -> None:
        self.width, self.height, self._read_rows = width, height, read_rows

    def reduced(self, factor: int) -> np.ndarray:
        # Bands are a multiple of `factor` rows so every box lies inside one band, and hold about 64 MB
        # (a full-width band of a 100k-pixel-wide level is ~200 rows).
        rows = max(1, min(1024, (64 * 2**20) // (3 * self.width)))
        band = factor * max(1, rows // factor)
        parts = []
        for y in range(0, self.height, band):
            rows = self._read_rows(y, min(band, self.height - y))
            img = Image.fromarray(rows)
            parts.append(np.asarray(img.reduce(factor) if factor > 1 else img))
        return np.concatenate(parts, axis=0)


def _to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 (H, W, 3) from grey, grey+alpha, RGB or RGBA samples; other sample types are refused."""
    if array.dtype != np.uint8:
        raise InputError(f"{what}: samples are {array.dtype}; only 8-bit images are supported")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    channels = array.shape[2]
    if channels in (1, 2):
        return np.repeat(array[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise InputError(f"{what}: {channels} samples per pixel; expected 1, 3 or 4")


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _check_assumed(assume_mpp: float | None) -> None:
    if assume_mpp is not None and not (assume_mpp > 0 and math.isfinite(assume_mpp)):
        raise InputError(f"assume_mpp: must be a positive number of microns per pixel, got {assume_mpp!r}")


class TiffSlide(Slide):
    """A (pyramidal) TIFF or Aperio SVS read tile by tile."""

    # Decoded TIFF tiles kept for neighbouring regions (tiles overlap when stride < tile size).
    CACHE_BYTES = 96 * 2**20

    def __init__(self, path: Path, assume_mpp: float | None = None) -> None:
        _check_assumed(assume_mpp)
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, struct.error) as e:
            raise InputError(f"{path}: not a readable TIFF: {e}") from None
        try:
            self._open(assume_mpp)
        except BaseException:
            self._tif.close()
            raise
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0

    def _open(self, assume_mpp: float | None) -> None:
        tif = self._tif
        if not tif.series:
            raise InputError(f"{self.path}: TIFF holds no image")
        series = tif.series[0]
        self.kind = "svs" if tif.is_svs else "tiff"
        self._pages = [lvl.keyframe for lvl in series.levels]
        base = self._pages[0]
        for page in self._pages:
            if page.planarconfig != 1 and page.samplesperpixel > 1:
                raise InputError(f"{self.path}: planar (separate) sample layout is not supported")
            if page.dtype != np.uint8:
                raise InputError(f"{self.path}: samples are {page.dtype}; only 8-bit slides are supported")

        description = base.description or ""
        mpp: float | None = None
        mpp_source: MppSource = "unknown"
        magnification: float | None = None
        if tif.is_svs:
            m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
            if m:
                mpp = _plausible(float(m.group(1)))
                mpp_source = "aperio" if mpp else "unknown"
            m = re.search(r"\|\s*AppMag\s*=\s*([0-9.eE+-]+)", description)
            if m and float(m.group(1)) > 0:
                magnification = float(m.group(1))
        if mpp is None:
            mpp = _resolution_mpp(base)
            mpp_source = "tiff-resolution" if mpp else "unknown"
        if mpp is None and assume_mpp is not None:
            mpp, mpp_source = assume_mpp, "assumed"
        self.mpp, self.mpp_source, self.magnification = mpp, mpp_source, magnification

        h0, w0 = base.imagelength, base.imagewidth
        levels = []
        for i, page in enumerate(self._pages):
            ds = (w0 / page.imagewidth + h0 / page.imagelength) / 2
            levels.append(Level(i, page.imagewidth, page.imagelength, ds, mpp * ds if mpp else None))
        self.levels = tuple(levels)

        # Aperio's associated thumbnail is a small strip image of the whole slide: a cheap tissue map when
        # the pyramid has no coarse level (as in CMU-1-Small-Region.svs).
        self._thumb_page = None
        for s in tif.series[1:]:
            if s.name == "Thumbnail" and s.keyframe.dtype == np.uint8:
                self._thumb_page = s.keyframe

    def close(self) -> None:
        self._tif.close()

    # -- region reading ---------------------------------------------------------------------------------

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Decoded TIFF tile/strip `index` of `level` as (rows, cols, samples), LRU-cached."""
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            raise InputError(f"{self.path}: level {level} segment {index} is missing (zero bytes)")
        fh = self._tif.filehandle
        fh.seek(offset)
        data = fh.read(count)
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        segment = segment.reshape(segment.shape[-3:]) if segment.ndim > 3 else segment
        self._cache[key] = segment
        self._cache_bytes += segment.nbytes
        while self._cache_bytes > self.CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return segment

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lvl = self.levels[level]
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > lvl.width or y + height > lvl.height:
            raise ValueError(f"region {x},{y} {width}x{height} outside level {level} ({lvl.width}x{lvl.height})")
        page = self._pages[level]
        if page.is_tiled:
            seg_w, seg_h = page.tilewidth, page.tilelength
        else:
            seg_w, seg_h = page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)
        across = math.ceil(page.imagewidth / seg_w)
        samples = page.samplesperpixel
        out = np.empty((height, width, samples), np.uint8)
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                segment = self._segment(level, row * across + col)
                sy, sx = row * seg_h, col * seg_w
                # Intersection of the region with this segment, in image coordinates.
                y0, y1 = max(y, sy), min(y + height, sy + seg_h)
                x0, x1 = max(x, sx), min(x + width, sx + seg_w)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = segment[y0 - sy : y1 - sy, x0 - sx : x1 - sx]
        return _to_rgb(out, str(self.path))

    def _thumbnail_sources(self) -> list[tuple[float, float, _Reader]]:
        w0, h0 = self.dimensions
        sources = []
        for lvl in self.levels:
            def rows(y: int, n: int, i: int = lvl.index, w: int = lvl.width) -> np.ndarray:
                return self.read_region(i, 0, y, w, n)

            sources.append((w0 / lvl.width, h0 / lvl.height, _Reader(lvl.width, lvl.height, rows)))
        if self._thumb_page is not None:
            page = self._thumb_page
            whole: list[np.ndarray] = []

            def thumb_rows(y: int, n: int) -> np.ndarray:
                if not whole:  # a small strip image: decode it once
                    whole.append(_to_rgb(page.asarray(), f"{self.path} thumbnail"))
                return whole[0][y : y + n]

            sources.append(
                (w0 / page.imagewidth, h0 / page.imagelength, _Reader(page.imagewidth, page.imagelength, thumb_rows))
            )
        return sources


def _resolution_mpp(page: tifffile.TiffPage) -> float | None:
    """Microns per pixel from the X/Y resolution tags, when their unit is physical and the value plausible."""
    try:
        unit = int(page.resolutionunit)
        rx, ry = page.resolution
    except (AttributeError, TypeError, ValueError):
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # microns per inch / per centimetre
    if per_unit is None or rx <= 0 or ry <= 0:
        return None
    return _plausible(per_unit / ((rx + ry) / 2))


class ImageSlide(Slide):
    """A plain image (PNG, JPEG, BMP, ...) as a one-level slide, decoded once with Pillow."""

    def __init__(self, path: Path, assume_mpp: float | None = None) -> None:
        _check_assumed(assume_mpp)
        self.path = path
        self.kind = "image"
        try:
            with Image.open(path) as img:
                img.load()
                if "A" in img.getbands() or "transparency" in img.info:
                    # Transparent areas become glass (white), not black, which would read as dense tissue.
                    rgba = img.convert("RGBA")
                    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                    rgb = rgb.convert("RGB")
                else:
                    rgb = img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise InputError(f"{path}: {e}; store very large images as pyramidal TIFF") from None
        except UnidentifiedImageError:
            raise InputError(f"{path}: not an image or slide (neither TIFF nor a format Pillow reads)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{path}: unreadable image ({e})") from None
        self._array = np.asarray(rgb)
        h, w = self._array.shape[:2]
        # Screen dpi in PNG/JPEG headers says nothing about a microscope, so only the user's value counts.
        self.mpp = assume_mpp
        self.mpp_source = "assumed" if assume_mpp else "unknown"
        self.magnification = None
        self.levels = (Level(0, w, h, 1.0, assume_mpp),)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lvl = self.levels[level]
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > lvl.width or y + height > lvl.height:
            raise ValueError(f"region {x},{y} {width}x{height} outside the image ({lvl.width}x{lvl.height})")
        return self._array[y : y + height, x : x + width].copy()

    def _thumbnail_sources(self) -> list[tuple[float, float, _Reader]]:
        w, h = self.dimensions
        return [(1.0, 1.0, _Reader(w, h, lambda y, n: self._array[y : y + n]))]


def open_slide(path: str | Path, assume_mpp: float | None = None) -> Slide:
    """Open a TIFF/SVS (by its magic bytes) or a plain image; `InputError` if it is neither or unreadable.

    `assume_mpp` is the scale to use when the file's metadata has none.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic in _TIFF_MAGIC:
        return TiffSlide(p, assume_mpp)
    return ImageSlide(p, assume_mpp)


def choose_level(
    slide: Slide, target_mpp: float | None = None, magnification: float | None = None
) -> LevelChoice:
    """The level to cut tiles from for a target scale, and the remaining resample factor.

    Rule: take the coarsest level that is at least as fine as the target (so tiles are only ever
    downsampled, never invented by upsampling), then resample by ``target / level`` scale. Scales within
    `SCALE_TOLERANCE` count as equal. A target magnification M is converted with the slide's own level-0
    magnification (Aperio AppMag) when known, else with the usual convention 10 / mpp (20x ~ 0.5 um/px).
    With neither target, tiles are cut from level 0 as they are. Raises `InputError` when the slide's
    scale is unknown or its finest level is coarser than the target.
    """
    if target_mpp is not None and magnification is not None:
        raise InputError("give a target mpp or a magnification, not both")
    base = slide.levels[0]
    if target_mpp is None and magnification is None:
        return LevelChoice(0, 1.0, base.mpp)
    if target_mpp is not None:
        if not target_mpp > 0:
            raise InputError(f"mpp: must be positive, got {target_mpp}")
        if slide.mpp is None:
            raise InputError(
                f"{slide.path}: microns per pixel unknown (no MPP metadata); pass the source's scale "
                "(--source-mpp) or tile without --mpp"
            )
        factor = target_mpp / slide.mpp  # level-0 pixels per output pixel
        what = f"{target_mpp:g} um/px"
    else:
        assert magnification is not None
        if not magnification > 0:
            raise InputError(f"magnification: must be positive, got {magnification}")
        base_mag = slide.magnification or (10.0 / slide.mpp if slide.mpp else None)
        if base_mag is None:
            raise InputError(
                f"{slide.path}: magnification unknown (no AppMag or MPP metadata); pass the source's "
                "scale (--source-mpp) or tile without --magnification"
            )
        factor = base_mag / magnification
        what = f"{magnification:g}x"
    if factor < 1 - SCALE_TOLERANCE:
        finest = f"{slide.mpp:.4g} um/px" if slide.mpp else "its level 0"
        raise InputError(
            f"{slide.path}: target {what} is finer than the slide's finest level ({finest}); "
            "upsampling would invent detail"
        )
    best = slide.levels[0]
    for lvl in slide.levels:
        if lvl.downsample <= factor * (1 + SCALE_TOLERANCE) and lvl.downsample > best.downsample:
            best = lvl
    resample = factor / best.downsample
    if abs(resample - 1) <= SCALE_TOLERANCE:
        resample = 1.0
    resample = max(resample, 1.0)
    return LevelChoice(best.index, resample, best.mpp * resample if best.mpp else None)
