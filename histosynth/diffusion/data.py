"""What a diffusion run trains on: the latent cache, per-tile labels, the conditions and the batch stream.

The cache is memory-mapped (`train encode` writes it); a batch is a sorted read of its rows, so one step
costs one UNet forward/backward and no image decoding. Each tile's condition is its class from
`review apply` (cLDM), the null class (LDM), or - with joint IMC - whatever the head says, mapped through
the label map's `clusters` table.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from histosynth.errors import InputError
from histosynth.labels import read_label_map
from histosynth.runtime import dist


@dataclass
class LatentData:
    """The training latents (memory-mapped) and, per latent, its tile key and class id (-1 = not used)."""

    latents: np.ndarray  # (N, C, h, w) float16, memory-mapped
    keys: list[str]  # tile of each row (index.csv `path`; several rows when the cache holds dihedral views)
    latent_scale: float
    meta: dict[str, Any]  # latents.json (tile size, source data, ...)


def open_latents(path: Path) -> LatentData:
    """Open the latent cache at `path` (see `histosynth.autoencoder.latents.LatentCache`)."""
    from histosynth.autoencoder.latents import LatentCache

    cache = LatentCache.open(path)
    return LatentData(latents=cache.latents, keys=list(cache.paths), latent_scale=float(cache.latent_scale),
                      meta=dict(cache.meta))


def read_labels(path: Path, keys: Sequence[str]) -> np.ndarray:
    """Class id of every cache row from a per-tile labels CSV (`tile`, `class_id`); -1 for unlisted tiles.

    Tiles that review excluded (background, artefacts) are absent from the CSV or have an empty or
    negative `class_id`; they are not trained on. A listed tile that is not in the cache is an error,
    since it means the labels belong to another dataset.
    """
    if not Path(path).is_file():
        raise InputError(f"labels: file not found: {path}")
    rows_of: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        rows_of.setdefault(k, []).append(i)
    find = _tile_finder(list(rows_of))
    ids = np.full(len(keys), -1, dtype=np.int64)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for needed in ("tile", "class_id"):
            if needed not in columns:
                raise InputError(f"{path}: needs columns 'tile' and 'class_id'; has {', '.join(columns) or 'none'}")
        for line, row in enumerate(reader, start=2):
            tile, value = find(row["tile"], f"{path}:{line}"), (row["class_id"] or "").strip()
            if value == "":
                continue
            try:
                class_id = int(value)
            except ValueError:
                raise InputError(f"{path}:{line}: class_id {value!r} is not an integer") from None
            ids[rows_of[tile]] = class_id if class_id >= 0 else -1
    if (ids >= 0).sum() == 0:
        raise InputError(f"{path}: no tile of the latent cache has a class; nothing to train on")
    return ids


def _tile_finder(keys: Sequence[str]):
    """Match a labels-CSV tile to a cache key: exactly, or as the key's trailing path components.

    Review sheets name tiles relative to a data folder (`pcam/train/x.jpg`) while `train encode` keys them
    by the path it was given (often absolute), so a label file stays usable when the data moves; a suffix
    that fits several keys is refused rather than guessed.
    """
    exact = set(keys)
    by_suffix: dict[str, list[str]] = {}
    for k in keys:
        parts = k.replace("\\", "/").split("/")
        for i in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), []).append(k)

    def find(tile: str, where: str) -> str:
        if tile in exact:
            return tile
        rel = tile.replace("\\", "/")
        while rel.startswith("./"):
            rel = rel[2:]
        found = by_suffix.get(rel, [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{where}: tile {tile!r} fits {len(found)} tiles of the latent cache "
                             f"({found[0]}, {found[1]}, ...); give a longer path")
        raise InputError(f"{where}: tile {tile!r} is not in the latent cache "
                         + (f"(its keys look like {keys[0]!r})" if keys else ""))

    return find


def class_count(label_map: Optional[Path], labels: Optional[np.ndarray], head_k: Optional[int],
                num_classes: int, labels_path: Optional[Path] = None) -> tuple[int, list[str]]:
    """How many classes a cLDM has, and their names.

    From the label map (class names) if given, else from the largest class id of `labels`, else from the
    IMC head's K; `num_classes` (the config's `model.num_classes`) must be 0 or agree.
    """
    names: list[str] = []
    if label_map is not None:
        names = read_label_map(label_map).names
    if names:
        n = len(names)
    elif labels is not None:
        n = int(labels.max()) + 1
    else:
        n = int(head_k or 0)
    if labels is not None and labels.max() >= n:
        raise InputError(f"{labels_path}: class_id {int(labels.max())} is outside the label map's 0..{n - 1}")
    if num_classes not in (0, n):
        raise InputError(f"cldm.model.num_classes: {num_classes} does not match the {n} classes of "
                         "the labels; leave it at 0 to take it from them")
    return n, names


def cluster_to_class(label_map: Optional[Path], k: int, names: list[str]) -> Optional[torch.Tensor]:
    """cluster id -> class id (-1 = excluded) from the label map's `clusters` table, for joint IMC."""
    if label_map is None:
        return None
    parsed = read_label_map(label_map)  # checks that the table names classes
    if not parsed.cluster_to_class:
        raise InputError(f"{label_map}: joint_imc needs a 'clusters' table (cluster id -> class name)")
    out = torch.full((k,), -1, dtype=torch.long)
    for c, classes in parsed.cluster_classes().items():
        if not 0 <= c < k:
            raise InputError(f"{label_map}: clusters: cluster {c} is outside the head's 0..{k - 1}")
        if len(classes) > 1:
            # The head gives one cluster per tile, so it cannot say which part of a split cluster a tile is.
            raise InputError(f"{label_map}: clusters.{c}: the cluster is split into "
                             f"{', '.join(parsed.names[i] for i in classes)}; joint IMC cannot follow a split: "
                             "train on the per-tile labels instead (labels: <label map>_tiles.csv, joint_imc: false)")
        if classes:
            out[c] = names.index(parsed.names[classes[0]])
    return out


class LatentRows(torch.utils.data.Dataset):
    """The cache rows a run trains on; the sampler shards and shuffles positions in this list."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


class ReadRows:
    """DataLoader ``collate_fn``: a batch of cache rows -> ``(latents float32 (B, C, h, w), class_ids (B,))``.

    The rows are read sorted (sequential reads in the memory map), and the batch keeps that order.
    """

    def __init__(self, data: LatentData, class_of_row: np.ndarray) -> None:
        self.data, self.class_of_row = data, class_of_row

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        cache_rows = np.sort(np.asarray(rows))
        latents = torch.from_numpy(np.asarray(self.data.latents[cache_rows], dtype=np.float32))
        return latents, torch.from_numpy(self.class_of_row[cache_rows])


def latent_loader(data: LatentData, rows: np.ndarray, class_of_row: np.ndarray, batch_size: int,
                  info: dist.DistInfo, seed: int) -> tuple[torch.utils.data.DataLoader, dist.ResumableSampler, int]:
    """The loader of `rows` for `runtime.batches.resumable_batches`, its sampler, and the batch size used.

    Each rank gets a disjoint shuffled share of the rows per epoch (order a function of seed and epoch);
    whole batches only. The batch is `batch_size`, or this rank's whole share when that is smaller.
    """
    dataset = LatentRows(rows)
    sampler = dist.make_sampler(dataset, info, shuffle=True, seed=seed, drop_last=True)
    batch = min(batch_size, len(sampler))
    # Its own generator: the loader would otherwise draw a seed from the global RNG at each epoch.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                         collate_fn=ReadRows(data, class_of_row),
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler, batch
