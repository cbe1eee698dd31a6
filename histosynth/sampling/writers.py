"""Image files, written whole or not at all: a temporary name in the same folder, then an atomic rename."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histosynth.errors import InputError, RunError

TMP_MARK = ".tmp-"


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95, microns_per_pixel: float | None = None) -> bytes:
    """Encode one uint8 (H, W, 3) tile. TIFF carries the resolution (pixels per centimetre) in its tags."""
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "tiff":
        extra = {}
        if microns_per_pixel:
            per_cm = 1e4 / microns_per_pixel  # 10,000 um in a centimetre
            extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
        tifffile.imwrite(buffer, pixels, photometric="rgb", compression="zlib",
                         description=f"histosynth synthetic tile; mpp={microns_per_pixel}", metadata=None, **extra)
    else:
        raise ValueError(f"unknown image format {fmt!r}; allowed: png, jpeg, tiff")
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes, tag: str = "") -> None:
    """Write `data` to `path` so that readers only ever see the whole file (or none).

    The temporary file is `.<name>.tmp-<tag>` beside the target, so concurrent shards never share one and a
    resumed run can find and remove its own leftovers.
    """
    tmp = path.with_name(f".{path.name}{TMP_MARK}{tag or os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def check_writable(folder: Path, option: str = "--out") -> None:
    """Fail early, before any model is loaded and creating nothing, if `folder` cannot be an output folder.

    A file where the folder or one of its parents should be is bad input (`InputError`, naming `option`); a
    folder that cannot be written is a `RunError`. The nearest existing folder gets a probe file, removed at
    once, because permission bits do not tell the whole story (read-only mounts, ACLs).
    """
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == Path(folder) else f" (in the way of {folder})"
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder{where}; choose a folder path")
    try:
        probe = existing / f".histosynth-write-test{TMP_MARK}{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output folder {folder} is not writable: {e.strerror or e}") from None
