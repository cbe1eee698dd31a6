"""Tile datasets for training: a folder of image files or one ``(N, H, W, 3)`` uint8 ``.npy`` array.

Both return float32 ``(3, H, W)`` tensors in ``[-1, 1]`` (the project's image contract) and carry a
`DatasetReport`: what was found, what was skipped and why, which sizes were seen.

Files are checked once, up front: every file is fully decoded (a truncated JPEG often opens fine and
fails only on decode), bad ones are skipped with their reason, and the verdicts are cached by path, size and
modification time so the next run decodes only new or changed files.

Tiles of another size than `tile_size` follow an explicit `size_policy`:

- ``"error"`` (default): refuse the dataset, naming the first such file and its size;
- ``"crop"``: centre crop to ``tile_size``; files smaller than that are skipped (and reported);
- ``"resize"``: Lanczos resize so the shorter side is ``tile_size``, then centre crop (keeps aspect ratio).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, get_args

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torch.utils.data import Dataset

from histosynth.errors import InputError, RunError
from histosynth.progress import progress_bar
from histosynth.imageops import apply_dihedral
from histosynth.io import write_json

SizePolicy = Literal["error", "crop", "resize"]
SIZE_POLICIES: tuple[str, ...] = get_args(SizePolicy)
TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Pillow modes that convert to RGB without losing meaning (16-bit and float modes would be clipped).
_RGB_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr"}
_CACHE_VERSION = 1

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DatasetReport:
    """What a tile dataset found and what it left out."""

    source: Path
    tile_size: int
    size_policy: SizePolicy
    found: int = 0  # candidate files (or array items)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)  # (width, height) -> usable tiles
    decoded: int = 0  # files decoded in this scan (the rest came from the cache)

    @property
    def usable(self) -> int:
        """Tiles the dataset serves."""
        return sum(self.sizes.values())

    @property
    def adjusted(self) -> int:
        """Usable tiles of another size, cropped or resized by the policy."""
        return sum(n for (w, h), n in self.sizes.items() if (w, h) != (self.tile_size, self.tile_size))

    def summary(self) -> str:
        """A few lines for logs and the CLI."""
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.sizes.items(), key=lambda kv: -kv[1]))
        lines = [
            f"{self.source}: {self.usable} tiles of {self.found} found; {len(self.skipped)} skipped; "
            f"sizes {sizes or 'none'}"
        ]
        if self.adjusted:
            verb = {"crop": "centre-cropped", "resize": "resized"}.get(self.size_policy, self.size_policy)
            lines.append(f"  {self.adjusted} tiles {verb} to {self.tile_size}x{self.tile_size}")
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _check_policy(size_policy: str) -> None:
    if size_policy not in SIZE_POLICIES:
        raise InputError(f"size_policy: unknown value {size_policy!r}; allowed: {', '.join(SIZE_POLICIES)}")


def _check_tile_size(tile_size: int | None) -> None:
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0):
        raise InputError(f"tile_size: must be a positive integer, got {tile_size!r}")


def _fit(image: Image.Image, tile_size: int, size_policy: SizePolicy, name: str) -> Image.Image:
    """Apply the size policy to one decoded image (already checked at scan time)."""
    w, h = image.size
    if (w, h) == (tile_size, tile_size):
        return image
    if size_policy == "resize":
        scale = tile_size / min(w, h)
        nw, nh = max(tile_size, round(w * scale)), max(tile_size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
        w, h = nw, nh
    elif size_policy != "crop":
        raise InputError(_size_message(name, (w, h), tile_size))
    left, top = (w - tile_size) // 2, (h - tile_size) // 2
    return image.crop((left, top, left + tile_size, top + tile_size))


def _size_message(name: str, size: tuple[int, int], tile_size: int, others: int = 0) -> str:
    more = f" (and {others} more tiles of other sizes)" if others else ""
    return (
        f"{name}: tile is {size[0]}x{size[1]}, expected {tile_size}x{tile_size}{more}; "
        f"choose a size_policy: {', '.join(SIZE_POLICIES)} (crop = centre crop, resize = Lanczos)"
    )


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _progress(show: bool) -> Progress:
    return progress_bar("files", disable=not show)


def default_cache_dir() -> Path:
    """Where scan verdicts are kept: ``$HISTOSYNTH_CACHE`` or ``$XDG_CACHE_HOME/histosynth`` or ~/.cache."""
    if os.environ.get("HISTOSYNTH_CACHE"):
        return Path(os.environ["HISTOSYNTH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "histosynth"


def _check_file(path: Path) -> tuple[int, int, str]:
    """(width, height, "") for a fully decodable RGB-like image, else (0, 0, reason)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode every byte: truncated files fail here, not at open
            if img.mode not in _RGB_MODES:
                return 0, 0, f"unsupported pixel mode {img.mode}"
            w, h = img.size
            return w, h, ""
    except Image.DecompressionBombError as e:
        return 0, 0, f"too large: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return 0, 0, str(e) or type(e).__name__


class TileFolder(Dataset):
    """Every PNG/JPEG/TIFF under `root` (recursive, sorted; hidden folders left out) that decodes.

    `tile_size` None means the most common size in the folder. `transform` (e.g. `random_dihedral`) is
    applied to each tensor. `cache`: True keeps scan verdicts under `default_cache_dir()`, a path names the
    cache file, False decodes every file on each construction.
    """

    def __init__(
        self,
        root: str | Path,
        tile_size: int | None = None,
        size_policy: SizePolicy = "error",
        transform: Transform | None = None,
        cache: bool | str | Path = True,
        show_progress: bool = True,
    ) -> None:
        _check_policy(size_policy)
        _check_tile_size(tile_size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a folder of tiles")
        self.size_policy: SizePolicy = size_policy
        self.transform = transform
        candidates = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in TILE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.is_file()
        )
        if not candidates:
            raise InputError(f"{self.root}: no PNG, JPEG or TIFF files found")
        verdicts, decoded = self._scan(candidates, cache, show_progress)

        good = [(p, (w, h)) for p, (w, h, reason) in zip(candidates, verdicts) if not reason]
        skipped = [(p, reason) for p, (_, _, reason) in zip(candidates, verdicts) if reason]
        if tile_size is None:
            if not good:
                raise InputError(f"{self.root}: none of {len(candidates)} files could be decoded")
            (w, h), _ = Counter(size for _, size in good).most_common(1)[0]
            if w != h:
                raise InputError(f"{self.root}: most tiles are {w}x{h}, not square; give tile_size")
            tile_size = w
        self.tile_size: int = tile_size

        self.files: list[Path] = []
        sizes: Counter[tuple[int, int]] = Counter()
        off = [(p, size) for p, size in good if size != (tile_size, tile_size)]
        if off and size_policy == "error":
            first, size = off[0]
            raise InputError(_size_message(str(first), size, tile_size, len(off) - 1))
        for p, (w, h) in good:
            if size_policy == "crop" and (w < tile_size or h < tile_size):
                skipped.append((p, f"{w}x{h} is smaller than {tile_size}x{tile_size}; cannot crop"))
                continue
            self.files.append(p)
            sizes[(w, h)] += 1
        skipped.sort()
        self.report = DatasetReport(
            self.root, tile_size, size_policy, len(candidates), skipped, dict(sizes), decoded
        )
        if not self.files:
            raise InputError(f"{self.root}: no usable tiles\n{self.report.summary()}")

    def _scan(
        self, files: list[Path], cache: bool | str | Path, show_progress: bool
    ) -> tuple[list[tuple[int, int, str]], int]:
        """Decode each file once (or reuse a cached verdict for an unchanged file)."""
        cache_path: Path | None
        if cache is True:
            key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:16]
            cache_path = default_cache_dir() / "tilefolder" / f"{key}.json"
        elif cache is False:
            cache_path = None
        else:
            cache_path = Path(cache)
        known: dict[str, list] = {}
        if cache_path is not None and cache_path.is_file():
            try:
                data = json.loads(cache_path.read_text(encoding="utf-8"))
                if data.get("version") == _CACHE_VERSION and data.get("root") == str(self.root.resolve()):
                    known = data["files"]
            except (OSError, ValueError, KeyError, TypeError):
                known = {}  # a damaged cache only costs a rescan

        verdicts: list[tuple[int, int, str]] = []
        entries: dict[str, list] = {}
        decoded = 0
        with _progress(show_progress) as progress:
            task = progress.add_task(f"checking tiles in {self.root.name}", total=len(files))
            for p in files:
                rel = p.relative_to(self.root).as_posix()
                st = p.stat()
                entry = known.get(rel)
                if not (isinstance(entry, list) and len(entry) == 5 and entry[:2] == [st.st_size, st.st_mtime_ns]):
                    entry = [st.st_size, st.st_mtime_ns, *_check_file(p)]
                    decoded += 1
                entries[rel] = entry
                verdicts.append((int(entry[2]), int(entry[3]), str(entry[4])))
                progress.advance(task)

        if cache_path is not None and decoded:
            payload = {"version": _CACHE_VERSION, "root": str(self.root.resolve()), "files": entries}
            try:
                write_json(cache_path, payload, indent=None)
            except OSError:
                pass  # the cache is only a speed-up; a read-only home must not stop training
        return verdicts, decoded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as e:
            raise RunError(f"{path}: unreadable now ({e}); it changed after the dataset was checked") from None
        tensor = _to_tensor(_fit(image, self.tile_size, self.size_policy, str(path)))
        return self.transform(tensor) if self.transform else tensor


class TileArray(Dataset):
    """Tiles from an ``(N, H, W, 3)`` uint8 ``.npy`` file, memory-mapped (opened lazily in each worker)."""

    def __init__(
        self,
        npy_path: str | Path,
        tile_size: int | None = None,
        size_policy: SizePolicy = "error",
        transform: Transform | None = None,
    ) -> None:
        _check_policy(size_policy)
        _check_tile_size(tile_size)
        self.path = Path(npy_path)
        self.size_policy: SizePolicy = size_policy
        self.transform = transform
        self._array: np.ndarray | None = None
        array = self._open()
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise InputError(
                f"{self.path}: expected an (N, H, W, 3) uint8 array, got {tuple(array.shape)} {array.dtype}"
            )
        n, h, w, _ = array.shape
        if n == 0:
            raise InputError(f"{self.path}: the array holds no tiles")
        if tile_size is None:
            if w != h:
                raise InputError(f"{self.path}: tiles are {w}x{h}, not square; give tile_size")
            tile_size = w
        self.tile_size: int = tile_size
        if (w, h) != (tile_size, tile_size):
            if size_policy == "error":
                raise InputError(_size_message(str(self.path), (w, h), tile_size, n - 1))
            if size_policy == "crop" and (w < tile_size or h < tile_size):
                raise InputError(f"{self.path}: tiles are {w}x{h}, smaller than {tile_size}x{tile_size}; cannot crop")
        self.report = DatasetReport(self.path, tile_size, size_policy, n, [], {(w, h): n}, 0)

    def _open(self) -> np.ndarray:
        if self._array is None:
            if not self.path.is_file():
                raise InputError(f"{self.path}: file not found")
            try:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise InputError(f"{self.path}: not a readable .npy array ({e})") from None
        return self._array

    def __getstate__(self) -> dict:
        # DataLoader workers get the path, not a pickled copy of the whole memory map.
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return self.report.found

    def __getitem__(self, index: int) -> torch.Tensor:
        tile = np.asarray(self._open()[index])
        if tile.shape[:2] != (self.tile_size, self.tile_size):
            tile = np.asarray(_fit(Image.fromarray(tile), self.tile_size, self.size_policy, f"{self.path}[{index}]"))
        tensor = _to_tensor(tile)
        return self.transform(tensor) if self.transform else tensor


def open_tiles(
    path: str | Path,
    tile_size: int | None = None,
    size_policy: SizePolicy = "error",
    transform: Transform | None = None,
    **folder_options: object,
) -> TileFolder | TileArray:
    """`TileArray` for a ``.npy`` file, `TileFolder` for a folder (`folder_options`: cache, show_progress)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".npy":
        return TileArray(p, tile_size, size_policy, transform)
    if p.is_dir():
        return TileFolder(p, tile_size, size_policy, transform, **folder_options)  # type: ignore[arg-type]
    if not p.exists():
        raise InputError(f"{p}: not found; expected a folder of tiles or an .npy array")
    raise InputError(f"{p}: expected a folder of PNG/JPEG/TIFF tiles or an (N, H, W, 3) uint8 .npy file")


def random_dihedral(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One of the 8 flips/90-degree rotations of a ``(..., H, W)`` tile, uniformly at random.

    Histology has no preferred orientation, so these are label-preserving and cost no interpolation. Off
    by default; pass as ``transform=random_dihedral`` to a dataset.
    """
    k = int(torch.randint(0, 4, (), generator=generator))
    flip = bool(torch.randint(0, 2, (), generator=generator))
    return apply_dihedral(image, k, flip)
