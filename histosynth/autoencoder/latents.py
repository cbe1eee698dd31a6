"""The latent cache: encode a tile dataset once with the frozen VQ-GAN, train diffusion from disk.

A cache is a folder::

    latents.npy    float16 (N, C, h, w): pre-quantization encoder outputs (the diffusion model's data)
    index.csv      index,path,transform: row i of latents.npy came from tile `path` under `transform`
    latents.json   shape, dtype, count, mean, std, latent_scale = 1/std, per-channel mean/std, the tile size,
                   the VQ-GAN's fingerprint (and path, when known), the dataset it came from

Encoding writes ``latents.npy.partial`` chunk by chunk with its progress in ``encode-progress.json``; an
interrupted `encode_dataset` continues where it stopped (same model fingerprint and tile list), and the
finished array is renamed into place, so ``latents.npy`` is always complete.

Augmented views are *not* made by transforming latents (a conv encoder is only roughly equivariant); with
``dihedral=True`` each tile is encoded under all 8 flips/rotations instead, as 8 rows, and with ``view_names``
under the named ones (``identity`` and some of the other 7: a fraction of the encoding time of all 8).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from histosynth.autoencoder.vqgan import VQGAN
from histosynth.errors import InputError, RunError
from histosynth.progress import progress_bar
from histosynth.imageops import DIHEDRAL, apply_dihedral, dihedral_name
from histosynth.io import write_csv, write_json

LATENTS_FILE = "latents.npy"
INDEX_FILE = "index.csv"
META_FILE = "latents.json"
PARTIAL_FILE = "latents.npy.partial"
PROGRESS_FILE = "encode-progress.json"
CACHE_VERSION = 1

def tile_names(dataset: Dataset) -> list[str]:
    """Where each item of a tile dataset came from (file path, or ``array.npy[i]``), for index.csv."""
    if isinstance(dataset, Subset):
        inner = tile_names(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    files = getattr(dataset, "files", None)
    if files is not None:
        # Absolute: the keys stay valid whatever folder `cluster` and `review` later run from.
        return [str(Path(p).resolve()) for p in files]
    path = getattr(dataset, "path", None)
    if path is not None:
        return [f"{path}[{i}]" for i in range(len(dataset))]  # type: ignore[arg-type]
    return [str(i) for i in range(len(dataset))]  # type: ignore[arg-type]


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model's weights, to tie a cache to the autoencoder that made it."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LatentCache:
    """An opened cache: `latents` is a read-only memory map, rows in `index` order."""

    directory: Path
    latents: np.ndarray  # float16 (N, C, h, w), memory-mapped
    paths: list[str]
    transforms: list[str]
    meta: dict[str, Any] = field(repr=False)

    @property
    def latent_scale(self) -> float:
        """Diffusion runs on ``latents * latent_scale`` (1 / std of the cached latents)."""
        return float(self.meta["latent_scale"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    @classmethod
    def open(cls, directory: str | Path) -> LatentCache:
        """Open a finished cache (memory-mapped; nothing is read until used)."""
        d = Path(directory)
        for name in (LATENTS_FILE, INDEX_FILE, META_FILE):
            if not (d / name).is_file():
                hint = " (encoding was interrupted; run `histosynth train encode` again)" \
                    if (d / PARTIAL_FILE).exists() else ""
                raise InputError(f"{d}: not a latent cache, {name} is missing{hint}")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{d / META_FILE}: unreadable: {e}") from None
        if int(meta.get("version", 0)) > CACHE_VERSION:
            raise InputError(f"{d}: latent cache version {meta.get('version')} is newer than this histosynth reads")
        try:
            latents = np.load(d / LATENTS_FILE, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{d / LATENTS_FILE}: not a readable .npy array: {e}") from None
        with (d / INDEX_FILE).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != latents.shape[0] or list(latents.shape) != list(meta.get("shape", [])):
            raise RunError(f"{d}: latents.npy has shape {latents.shape}, index.csv {len(rows)} rows, "
                           f"latents.json says {meta.get('shape')}; the cache is inconsistent, encode again")
        return cls(d, latents, [r["path"] for r in rows], [r["transform"] for r in rows], meta)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        """One latent as float32 (C, h, w), unscaled."""
        return torch.from_numpy(np.asarray(self.latents[index], dtype=np.float32))

    def dataset(self, scaled: bool = True) -> LatentDataset:
        """A torch `Dataset` of float32 latents, multiplied by `latent_scale` when `scaled`."""
        return LatentDataset(self, self.latent_scale if scaled else 1.0)


class LatentDataset(Dataset):
    """Rows of a `LatentCache` as float32 tensors times `scale`; reopens the memory map in each worker."""

    def __init__(self, cache: LatentCache, scale: float = 1.0) -> None:
        self.directory = cache.directory
        self.scale = scale
        self._length = len(cache)
        self._latents: np.ndarray | None = cache.latents

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_latents"] = None  # workers map the file themselves
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._latents is None:
            self._latents = np.load(self.directory / LATENTS_FILE, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.asarray(self._latents[index], dtype=np.float32)) * self.scale


def _stats(latents: np.ndarray, chunk: int = 4096) -> dict[str, Any]:
    """Global and per-channel mean/std of an (N, C, h, w) array, in float64, streamed over chunks."""
    c = latents.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for start in range(0, latents.shape[0], chunk):
        x = np.asarray(latents[start:start + chunk], dtype=np.float64)
        total += x.sum(axis=(0, 2, 3))
        total_sq += (x * x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    ch_mean = total / count
    ch_std = np.sqrt(np.maximum(total_sq / count - ch_mean**2, 0.0))
    mean = total.sum() / (count * c)
    std = float(np.sqrt(max(total_sq.sum() / (count * c) - mean**2, 0.0)))
    if not np.isfinite(std) or std <= 0:
        raise RunError(f"the latents have std {std}; the autoencoder output is constant or not finite")
    return {"mean": float(mean), "std": std, "latent_scale": 1.0 / std,
            "channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist()}


@torch.no_grad()
def encode_dataset(
    vqgan: VQGAN,
    dataset: Dataset,
    out_dir: str | Path,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
    dihedral: bool = False,
    view_names: Sequence[str] | None = None,
    num_workers: int = 0,
    chunk_batches: int = 16,
    source: dict[str, Any] | None = None,
    show_progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> LatentCache:
    """Encode every tile of `dataset` (float (3, H, W) in [-1, 1]) and write a latent cache to `out_dir`.

    Resumes an interrupted run for the same model and tiles; an existing finished cache for the same
    model and tiles is returned as is, one for another model or tile list is an `InputError`.
    `chunk_batches` batches are encoded between progress saves. `source` adds facts (e.g. the VQ-GAN's
    path, the data path) to latents.json. `dihedral` encodes all 8 views of every tile, `view_names` the named ones
    (`select_views`).
    """
    out = Path(out_dir)
    if batch_size < 1:
        raise InputError(f"--batch-size: must be at least 1, got {batch_size}")
    n_tiles = len(dataset)  # type: ignore[arg-type]
    if n_tiles == 0:
        raise InputError("the dataset holds no tiles to encode")
    vqgan = vqgan.to(device).eval()
    views = select_views(view_names, dihedral)
    names = tile_names(dataset)
    fingerprint = model_fingerprint(vqgan)
    tiles_hash = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    # Caches of the tile alone or of all 8 views keep the key they always had (a count); a subset is named.
    view_key: int | list[str] = len(views) if views in (DIHEDRAL, DIHEDRAL[:1]) \
        else [dihedral_name(k, flip) for k, flip in views]
    key = {"model": fingerprint, "tiles": tiles_hash, "count": n_tiles, "views": view_key}

    if (out / META_FILE).is_file():
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        if {k: meta.get("key", {}).get(k) for k in key} == key:
            return LatentCache.open(out)
        raise InputError(f"{out}: already holds a latent cache of another model or tile set; choose a new folder")

    # Shape of one latent, from the first tile.
    first = dataset[0]
    f = vqgan.downsample_factor
    if first.ndim != 3 or first.shape[-1] % f or first.shape[-2] % f:
        raise InputError(f"tiles of shape {tuple(first.shape)} do not fit the VQ-GAN (3, H, W with H, W multiples of {f})")
    if first.shape[-1] != first.shape[-2] and any(k % 2 for k, _ in views):
        keeping = ", ".join(dihedral_name(k, fl) for k, fl in DIHEDRAL if k % 2 == 0)
        raise InputError(f"tiles of {first.shape[-2]}x{first.shape[-1]} px are not square: quarter turns would "
                         f"change their shape; allowed views: {keeping}")
    c, h, w = vqgan.config.latent_channels, first.shape[-2] // f, first.shape[-1] // f
    shape = (n_tiles * len(views), c, h, w)

    out.mkdir(parents=True, exist_ok=True)
    partial, progress_file = out / PARTIAL_FILE, out / PROGRESS_FILE
    done = 0
    if partial.is_file() and progress_file.is_file():
        saved = json.loads(progress_file.read_text(encoding="utf-8"))
        if saved.get("key") == key and saved.get("shape") == list(shape):
            done = int(saved["done"])
    if done:
        array = np.lib.format.open_memmap(partial, mode="r+")
    else:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape)
        write_json(progress_file, {"key": key, "shape": list(shape), "done": 0}, sort_keys=True)

    # `done` counts whole tiles (all their views); restart at the first tile of an unfinished batch.
    remaining = Subset(dataset, range(done, n_tiles))
    loader = DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the caller's global RNG alone
    bar = progress_bar("tiles", disable=not show_progress)
    with bar:
        task = bar.add_task("encoding", total=n_tiles, completed=done)
        for b, images in enumerate(loader):
            images = images.to(device)
            n = images.shape[0]
            for v, (k, flip) in enumerate(views):
                latents = vqgan.encode(apply_dihedral(images, k, flip))  # (n, C, h, w)
                if not torch.isfinite(latents).all():
                    raise RunError(f"non-finite latents for tiles {done}..{done + n - 1}; the autoencoder is broken")
                # Row layout: tile-major, views inner: row = tile * views + view.
                rows = np.arange(done, done + n) * len(views) + v
                array[rows] = latents.float().cpu().numpy().astype(np.float16)
            done += n
            bar.update(task, completed=done)
            if (b + 1) % chunk_batches == 0 or done == n_tiles:
                array.flush()
                write_json(progress_file, {"key": key, "shape": list(shape), "done": done}, sort_keys=True)
            if on_progress is not None:
                on_progress(done, n_tiles)
    array.flush()
    del array

    stats = _stats(np.load(partial, mmap_mode="r", allow_pickle=False))
    write_csv(out / INDEX_FILE, ["index", "path", "transform"],
              ([i * len(views) + v, name, dihedral_name(k, flip)]
               for i, name in enumerate(names) for v, (k, flip) in enumerate(views)))
    os.replace(partial, out / LATENTS_FILE)
    meta = {
        "version": CACHE_VERSION,
        "shape": list(shape),
        "dtype": "float16",
        "count": shape[0],
        "tiles": n_tiles,
        "views": [dihedral_name(k, flip) for k, flip in views],
        "tile_size": [int(first.shape[-2]), int(first.shape[-1])],
        "downsample_factor": f,
        "key": key,
        **stats,
        "source": dict(source or {}),
    }
    write_json(out / META_FILE, meta, sort_keys=True)  # written last: its presence marks a finished cache
    progress_file.unlink(missing_ok=True)
    return LatentCache.open(out)


def select_views(names: Sequence[str] | None, dihedral: bool = False) -> tuple[tuple[int, bool], ...]:
    """The views to encode, as (quarter turns, flip): all 8 (`dihedral`), the `names` (which must include
    ``identity``; returned identity first, then in `DIHEDRAL` order, so a cache's layout does not depend on how
    they were listed), or the tile alone."""
    if names is None:
        return DIHEDRAL if dihedral else DIHEDRAL[:1]
    allowed = [dihedral_name(k, flip) for k, flip in DIHEDRAL]
    if dihedral:
        raise InputError("--dihedral and --views: give one (--dihedral is every view: " + ",".join(allowed) + ")")
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in allowed]
    if unknown:
        raise InputError(f"--views: unknown view {unknown[0]!r}; allowed: {', '.join(allowed)}")
    if len(set(wanted)) != len(wanted):
        raise InputError(f"--views: {next(n for n in wanted if wanted.count(n) > 1)!r} is listed twice")
    if "identity" not in wanted:
        # The identity rows are the tiles themselves (clustering reads them; the others are its views).
        raise InputError(f"--views: must include identity (the tile itself); got {', '.join(wanted) or 'none'}")
    return tuple(v for v, name in zip(DIHEDRAL, allowed) if name in wanted)


def encode_tiles(
    vqgan_path: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    tile_size: int | None = None,
    size_policy: str = "error",
    batch_size: int = 64,
    device: str = "auto",
    dihedral: bool = False,
    view_names: Sequence[str] | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
) -> LatentCache:
    """`histosynth train encode`: load an exported VQ-GAN (file or run folder) and cache the latents of `data`.

    `tile_size` defaults to the size the VQ-GAN was trained on (its checkpoint's ``tile_size``).
    """
    from histosynth.autoencoder.train import EXPORT_NAME, load_vqgan
    from histosynth.runtime.devices import resolve_device
    from histosynth.runtime.weights import read_checkpoint_metadata
    from histosynth.tiles.dataset import open_tiles

    path = Path(vqgan_path)
    file = path / EXPORT_NAME if path.is_dir() else path
    _, extra = read_checkpoint_metadata(file)
    if tile_size is None:
        tile_size = extra.get("tile_size")
        if not isinstance(tile_size, int):
            raise InputError(f"{file}: records no tile_size; pass --tile-size")
    resolved = resolve_device(device)
    model = load_vqgan(file, resolved)
    dataset = open_tiles(data, tile_size, size_policy, show_progress=show_progress) if Path(data).is_dir() \
        else open_tiles(data, tile_size, size_policy)  # type: ignore[arg-type]
    source = {"vqgan": str(file), "vqgan_step": extra.get("step"), "data": str(data),
              "size_policy": size_policy, "dataset_report": dataset.report.summary()}
    return encode_dataset(model, dataset, out_dir, batch_size, device=resolved, dihedral=dihedral,
                          view_names=view_names, num_workers=num_workers, source=source, show_progress=show_progress)


# A bank of *generated* latents (`histosynth.sampling.latent_bank`, written downstream by the diffusion model's
# sampler) is stored like the cache's latents.npy; a decoder GAN phase reads it here (`adapt_latents`).
BANK_LATENTS = "latents.npy"


def load_latent_bank(path: str | Path) -> np.ndarray:
    """The (N, C, h, w) float16 latents of a bank folder (or its latents.npy); an `InputError` when missing."""
    path = Path(path)
    file = path / BANK_LATENTS if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no latent bank here (expected {BANK_LATENTS}, written by "
                         "`histosynth train latent-bank`)")
    bank = np.load(file, mmap_mode="r")
    if bank.ndim != 4 or len(bank) == 0:
        raise InputError(f"{file}: a latent bank is (N, C, h, w) with N >= 1, got shape {tuple(bank.shape)}")
    return bank
