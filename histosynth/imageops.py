"""Image conversions every stage shares (a leaf module: imports nothing of histosynth).

- pixels: model images are float ``(N, 3, H, W)`` in [-1, 1]; images on disk are uint8 ``(N, H, W, 3)``
  (`to_uint8`);
- the 8 symmetries of a square tile (histology has no orientation): fixed views for encoding every view
  of a tile (`DIHEDRAL`, `apply_dihedral`, `dihedral_name`) and one random view per tile for augmentation
  (`random_dihedral`, `dihedral_views`);
- file encodings (`encode_image`: PNG, JPEG, TIFF with resolution tags) and grids of tiles (`tile_grid`).
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_FORMATS = ("png", "jpeg", "tiff")

# The 8 symmetries of the square as (quarter turns, left-right flip after the turn); view i is
# (i % 4, i >= 4), so index 0 is the identity and 4..7 are the flipped turns.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((k, f) for f in (False, True) for k in range(4))
# The 4 that keep a non-square (H != W) shape: identity, left-right, up-down (= half turn + left-right), half turn.
_SHAPE_KEEPING: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, True), (2, False))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``(N, 3, H, W)`` in [-1, 1] -> uint8 ``(N, H, W, 3)``, clamped and rounded to the nearest level."""
    pixels = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def dihedral_name(k: int, flip: bool) -> str:
    """Name of a view: ``identity``, ``rot90``, ``rot180``, ``rot270``, ``flip``, ``rot90+flip``, ..."""
    parts = ([f"rot{90 * k}"] if k else []) + (["flip"] if flip else [])
    return "+".join(parts) or "identity"


def apply_dihedral(images: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """`images (..., H, W)` turned by k quarter turns, then flipped left-right if `flip`."""
    out = torch.rot90(images, k, dims=(-2, -1)) if k else images
    return torch.flip(out, dims=(-1,)) if flip else out


def dihedral_views(images: torch.Tensor, turns: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Tile i of `images (N, C, H, W)` in view ``(turns[i], flips[i])`` (one batched op per distinct view)."""
    turns, flips = turns.cpu(), flips.cpu().bool()
    out = torch.empty_like(images)
    for k in range(4):
        for flip in (False, True):
            rows = ((turns == k) & (flips == flip)).nonzero().flatten().to(images.device)
            if rows.numel():
                out[rows] = apply_dihedral(images.index_select(0, rows), k, flip)
    return out


def random_dihedral(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each tile of `images (N, C, H, W)` in one of the 8 views, drawn uniformly (one draw per tile).

    Non-square tiles get one of the 4 views that keep their shape. Without `generator` the global torch RNG
    draws, so a resumed training run that restores it replays the same views.
    """
    square = images.shape[-1] == images.shape[-2]
    views = DIHEDRAL if square else _SHAPE_KEEPING
    choice = torch.randint(0, len(views), (images.shape[0],), generator=generator)
    table = torch.tensor(views, dtype=torch.long)  # (V, 2): turns, flip
    return dihedral_views(images, table[choice, 0], table[choice, 1])


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95, microns_per_pixel: float | None = None,
                 *, png_level: int = 6) -> bytes:
    """Encode one uint8 ``(H, W, 3)`` image as PNG, JPEG (4:4:4) or TIFF (zlib, resolution in its tags).

    `png_level` is zlib's effort (0-9): the tiler uses 3 (many files, speed first), generated sets 6.
    """
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=png_level)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "tiff":
        import tifffile  # only TIFF output needs it; every stage imports this module

        extra = {}
        if microns_per_pixel:
            per_cm = 1e4 / microns_per_pixel  # 10,000 um in a centimetre
            extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
        tifffile.imwrite(buffer, pixels, photometric="rgb", compression="zlib",
                         description=f"histosynth synthetic tile; mpp={microns_per_pixel}", metadata=None, **extra)
    else:
        raise ValueError(f"unknown image format {fmt!r}; allowed: {', '.join(IMAGE_FORMATS)}")
    return buffer.getvalue()


def tile_grid(images: Sequence[np.ndarray] | np.ndarray, columns: int, *, gap: int = 0, margin: int = 0) -> np.ndarray:
    """uint8 ``(H, W, 3)`` images (all one size) in rows of `columns`, `gap` white pixels between them and a
    white border of `margin`: one uint8 image ``(rows*H + (rows-1)*gap + 2*margin, ...)``."""
    if len(images) == 0:
        raise ValueError("tile_grid: no images")
    h, w, c = np.asarray(images[0]).shape
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    out = np.full((rows * h + (rows - 1) * gap + 2 * margin, columns * w + (columns - 1) * gap + 2 * margin, c),
                  255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = margin + r * (h + gap), margin + col * (w + gap)
        out[y:y + h, x:x + w] = image
    return out
