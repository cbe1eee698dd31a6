"""Memorization audit: did the model copy training tiles? (`histosynth evaluate memorization`)

Diffusion models can reproduce training images (Carlini et al. 2023; Somepalli et al. 2023). For every
generated tile this module finds its nearest training tiles, confirms the closest candidates in pixel space,
and flags the tiles that are closer to a training tile than real tiles never trained on ever are.

**Search feature.** Each tile is turned to grey (ITU-R 601 weights), box-downsampled to ``feature_size``
(16) px per side, centred and scaled to unit length. The Euclidean distance of two such vectors is
``sqrt(2 (1 - r))``, where r is the Pearson correlation of the two downsampled grey tiles; it lies in [0, 2].
The distance of a generated tile to a training tile is the smallest over the 8 dihedral views of the
generated tile (tiles have no orientation), so a flipped or rotated copy is found exactly.
Why this feature, measured on PCam (600-2,000 training tiles, 500 held-out `pcam/valid` tiles, 200 planted
copies; no pretrained network may be downloaded):

- Copies sit far inside the real spread. Copies that were exact, flipped or rotated, JPEG-recompressed
  (quality 75) or colour-jittered (brightness, contrast and saturation within 15 %, hue within 3 %) were all
  at most 0.09 from their source. The held-out real tiles were at least 0.57 from their nearest training
  tile. Against all 19,171 training tiles, copies stayed within 0.17 and percentile 1 of the real tiles was
  0.51 (below).
- Centring and scaling per tile make the feature blind to brightness and contrast. Grey makes it nearly
  blind to colour jitter. Averaging 6x6 pixel blocks washes out JPEG artefacts.
- The size was measured: 12, 16, 24 and 32 px gave copy/real margins of 5.6, 6.2, 6.1 and ~6x. Colour
  features (per-channel centring) gave smaller margins, because jitter moves the channels apart. 16 px costs
  a 256-dimensional dot product per pair and view.
- Vectors of equal length matter. An earlier variant divided by ``std + eps``. It shrank near-flat tiles
  towards the origin, where they became every tile's nearest neighbour ("hubs").

The search is a batched matrix product in torch: each chunk of queries, in all 8 views, is multiplied by
all training features in one product, and the top ``top_k`` candidates are kept. The arithmetic for 20k
training x 3k generated tiles is about 230 GFLOP per search; decoding the images and the SSIMs cost as
much again (docs/evaluation.md has the measured time).

**Confirmation.** Each of the ``top_k`` candidates is compared with the generated tile in pixel space by
SSIM (the definition of `histosynth.metrics.ssim.ssim`, data range 2). The generated tile is first put in
the dihedral view that matched that candidate best. Both tiles are standardised per channel (zero mean,
unit std). That undoes colour jitter. It also measures structure against each tile's own contrast. Without
it, SSIM's stabilising constants make the blank areas of two mostly-blank tiles look alike.
A tile's SSIM is the best over its candidates. Measured on the copies and on the 50 held-out tiles
nearest to the training set (10 %, 0.57-0.86 from their nearest neighbour), 2,000 training tiles:

| SSIM variant | copies, JPEG / jitter (lowest) | nearest held-out tiles (highest) |
|---|---|---|
| raw | 0.98 / 0.48 | 0.85 |
| means and stds matched to the candidate's | 0.98 / 0.92 | 0.87 |
| standardised (used) | 0.95 / 0.71 | 0.49 |
| standardised grey | 0.97 / 0.76 | 0.57 |

**Calibration.** Real tiles that were never trained on (``--reference``, or a held-out fraction of the
training tiles) are put through the same search. They are the "not a copy" reference.

- The copy threshold ``threshold`` is percentile ``percentile`` (1) of their distances.
- The SSIM bar ``ssim_threshold`` is percentile ``ssim_percentile`` (99) of the SSIMs of the reference
  tiles *nearest* to the training set (the closest ``near_fraction``, 10 %). A tile that passes the
  distance test is close by construction, and close non-copies score higher SSIMs than the average tile.
  Only these reference tiles need SSIMs, a tenth of the cost.
- A generated tile is **flagged** when its distance is below the threshold and its SSIM reaches the bar.
- ``fraction_below_threshold`` reports the distance test alone. It flags about 1 % of new real tiles by
  construction.

Measured at full size, with the 19,171 `pcam/train` tiles as the training set, the 2,882 `pcam/valid`
tiles that are not near-flat as the reference, and 200 planted copies:

- The threshold was 0.507. The copies were at most 0.167 from their source, and every copy's nearest
  training tile was its source.
- The 29 reference tiles below the threshold scored SSIMs of 0.03-0.62.
- The copies scored at least 0.966 (JPEG) and 0.547 (jitter; the next lowest was 0.79).
- Three ways to set the SSIM bar compare as follows:

| SSIM bar | value | reference tiles flagged | copies missed |
|---|---|---|---|
| percentile 99 of all reference SSIMs | 0.402 | 11 (0.38 %) | 0 |
| percentile 99 of the nearest 10 % (used) | 0.571 | 2 (0.07 %) | 1 (0.5 %) |
| percentile 95 of the nearest 10 % | 0.431 | 8 (0.28 %) | 0 |

Near-flat tiles have a grey-level std below ``flat_std`` = 10 on 0-255 (the flat-tile statistic of the
model card). They take no part: they are never flagged, never candidates, and left out of the calibration
and of the scores below; they are only counted. A blank background tile carries no patient information.
Its feature is only noise and illumination, and it correlates by chance with the coarse layout of real
tissue. When near-flat training tiles were candidates, a dense tissue tile was matched to a black tile,
and the SSIM of the two, after matching their colour moments, was close to 1.

**Alaa et al. (2022), "How faithful is your synthetic data?"**, computed in the same feature space, with
every nearest-neighbour distance taken over the 8 views:

- The real side is a seeded random subset of the training tiles, as many as there are generated tiles
  (precision and recall depend on the sample sizes).
- ``alpha_precision``: the real alpha-support is the ball around the real mean with radius r_alpha, the
  alpha-quantile of the real tiles' distances to that mean. The mean is averaged over the 8 views, so
  distances to it do not depend on a tile's orientation. P_alpha is the share of generated tiles inside the
  ball. The score is ``1 - 2 mean_alpha |P_alpha - alpha|`` over ``alpha_steps`` (30) values of alpha in
  [0, 1]. It is 1 when the curve follows the diagonal.
- ``beta_recall``: each real tile x has a nearest generated tile g(x). x counts at level beta when g(x) is
  no farther from x than x's nearest other real tile is, and g(x) lies within the beta-quantile radius of
  the g(x)'s around the generated mean. The score is ``1 - 2 mean_beta |R_beta - beta|``. This is the
  estimator of the authors' code (and synthcity). For two equal-size samples of one distribution, g(x) is
  nearer than x's nearest real neighbour only about half the time, so real data score about 0.5 (0.49 for
  `pcam/valid` against `pcam/train`; alpha-precision 0.93 and authenticity 0.92 there).
- ``authenticity``: a generated tile is authentic when it is farther from its nearest training tile x* than
  x* is from its own nearest other training tile (Alaa et al., Sec. 3.3). Both distances use the full
  training set. The score is the authentic share. Code that indexes the real-real distances by the
  *generated* tile's index computes another number.
- Alaa et al. embed the data with a one-class network, so that the real data fill a hypersphere. Here the
  fixed feature above stands in for it, which makes these scores an approximation.

**Inputs.** ``train`` is a folder of tiles (searched recursively) or a latent cache folder. For a cache,
the tiles listed in its ``index.csv`` are used once each, including ``array.npy[i]`` rows of a tile array.
Tiles must be square, since the 8 views need square tiles. A training tile of another size than the
generated one is resized to it for SSIM.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from histosynth.autoencoder.latents import INDEX_FILE
from histosynth.configio import require
from histosynth.errors import InputError, RunError
from histosynth.evaluate.features import list_images, read_rgb
from histosynth.imageops import DIHEDRAL, apply_dihedral, dihedral_name, to_uint8
from histosynth.io import write_bytes
from histosynth.metrics.ssim import gaussian_window

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# ITU-R BT.601 luma weights: the grey level of the search feature and of the flat-tile test.
GREY = (0.299, 0.587, 0.114)
_ARRAY_ITEM = re.compile(r"^(?P<path>.+\.npy)\[(?P<index>\d+)\]$")
PERTURBATIONS = ("exact", "dihedral", "jpeg", "jitter")


@dataclass
class MemorizationConfig:
    """How the audit searches, confirms and calibrates; the defaults are the measured choice (module docstring)."""

    feature_size: int = 16  # search feature: grey tiles box-downsampled to this many pixels per side
    top_k: int = 3  # feature-space candidates per tile confirmed by SSIM
    percentile: float = 1.0  # copy threshold: this percentile of the reference tiles' distances
    ssim_percentile: float = 99.0  # SSIM bar: this percentile of the nearest reference tiles' SSIMs
    near_fraction: float = 0.1  # the SSIM bar comes from this share of the reference, the tiles nearest to training
    flat_std: float = 10.0  # grey-level std (0-255) below which a tile is near-flat and takes no part
    reference_fraction: float = 0.1  # held out of the training tiles when no reference folder is given
    min_reference: int = 20  # fewer usable reference tiles than this cannot place a percentile
    pairs: int = 24  # closest pairs kept in the result (JSON `closest`, contact sheet)
    alpha_steps: int = 30  # alpha/beta grid of alpha-precision and beta-recall (as Alaa et al.'s code)
    chunk: int = 256  # query rows per matrix product (memory ~ chunk x training tiles x 48 bytes)
    batch_size: int = 256  # tiles decoded (and SSIM pairs formed) per batch
    workers: int = 2  # threads decoding image files
    seed: int = 0  # held-out split and the equal-n real subset

    def validate(self, path: str) -> None:
        """Cross-field checks for configio and `evaluate_memorization`."""
        require(4 <= self.feature_size <= 64, f"{path}.feature_size", f"must be in [4, 64], got {self.feature_size}")
        require(self.top_k >= 1, f"{path}.top_k", f"must be at least 1, got {self.top_k}")
        require(0 < self.percentile < 50, f"{path}.percentile", f"must be in (0, 50), got {self.percentile}")
        require(50 < self.ssim_percentile <= 100, f"{path}.ssim_percentile",
                f"must be in (50, 100], got {self.ssim_percentile}")
        require(self.flat_std >= 0, f"{path}.flat_std", f"must be at least 0, got {self.flat_std}")
        require(0 < self.near_fraction <= 1, f"{path}.near_fraction", f"must be in (0, 1], got {self.near_fraction}")
        require(0 < self.reference_fraction < 1, f"{path}.reference_fraction",
                f"must be in (0, 1), got {self.reference_fraction}")
        for name in ("min_reference", "pairs", "chunk", "batch_size", "workers"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"must be at least 1, got {getattr(self, name)}")
        require(self.alpha_steps >= 2, f"{path}.alpha_steps", f"must be at least 2, got {self.alpha_steps}")


# --- tiles ---------------------------------------------------------------------------------------------


def read_tile(name: str, arrays: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """One tile as uint8 ``(H, W, 3)``: an image file, or ``array.npy[i]`` (row i of an ``(N, H, W, 3)`` array)."""
    match = _ARRAY_ITEM.match(name)
    if match is None or Path(name).exists():
        return read_rgb(Path(name))
    arrays = {} if arrays is None else arrays
    path = match["path"]
    if path not in arrays:
        try:
            arrays[path] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RunError(f"{path}: cannot be read as a tile array: {e}") from None
    array = arrays[path]
    index = int(match["index"])
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or index >= len(array):
        raise RunError(f"{name}: not a tile of {path} ({array.dtype} {tuple(array.shape)})")
    return np.asarray(array[index])


class TileReader:
    """Decodes batches of tiles on a few threads (Pillow releases the GIL while it decodes)."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._arrays: dict[str, np.ndarray] = {}

    def read(self, names: Sequence[str]) -> list[np.ndarray]:
        """The tiles, in order; every one checked to be square."""
        tiles = list(self._pool.map(lambda n: read_tile(n, self._arrays), names))
        for name, tile in zip(names, tiles):
            if tile.shape[0] != tile.shape[1]:
                raise InputError(f"{name}: {tile.shape[1]}x{tile.shape[0]} px; the memorization audit compares "
                                 "tiles under the 8 flips and quarter turns of the square, so tiles must be square")
        return tiles

    def close(self) -> None:
        """Stop the decoding threads."""
        self._pool.shutdown(wait=True)


def training_tiles(path: str | Path, option: str = "--train") -> tuple[list[str], str]:
    """The training tiles' names and the kind of source: ``"folder"`` or ``"latent cache"``.

    A latent cache lists each tile once per encoded view in ``index.csv``; every tile is used once. Relative
    paths are read from the working folder, else from the cache folder.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{option} {p}: not found; expected a folder of tiles or a latent cache folder ({INDEX_FILE})")
    if not p.is_dir():
        raise InputError(f"{option} {p}: not a folder; expected a folder of tiles or a latent cache folder "
                         f"({INDEX_FILE})")
    if not (p / INDEX_FILE).is_file():
        try:
            return [str(f) for f in list_images(p)], "folder"
        except InputError as e:
            raise InputError(f"{option}: {e}") from None
    try:
        with (p / INDEX_FILE).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise InputError(f"{option} {p / INDEX_FILE}: no 'path' column (columns: {reader.fieldnames})")
            listed = list(dict.fromkeys(row["path"] for row in reader))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{option} {p / INDEX_FILE}: unreadable: {e}") from None
    if not listed:
        raise InputError(f"{option} {p / INDEX_FILE}: lists no tiles")
    names, missing = [], []
    for name in listed:
        match = _ARRAY_ITEM.match(name)
        file = Path(match["path"]) if match and not Path(name).exists() else Path(name)
        if not file.is_absolute() and not file.exists() and (p / file).exists():
            file, name = p / file, str(p / name)
        (names if file.exists() else missing).append(name)
    if missing:
        raise InputError(f"{option} {p / INDEX_FILE}: {len(missing)} of {len(listed)} listed tiles are missing, "
                         f"e.g. {missing[0]}; the cache was made from tiles that are no longer there")
    return names, "latent cache"


def image_files(path: str | Path, option: str) -> list[str]:
    """Every image under folder ``path`` (recursive), or an `InputError` naming ``option``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{option} {p}: not found; expected a folder of image tiles")
    try:
        return [str(f) for f in list_images(p)]
    except InputError as e:
        raise InputError(f"{option}: {e}") from None


# --- features and search -----------------------------------------------------------------------------


def _to_float(tiles: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` tiles of one size -> float32 ``(N, 3, H, W)`` in [0, 255]."""
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()


def tile_features(tiles: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Search features ``(N, size*size)`` (centred, unit length) and grey-level std ``(N,)`` of uint8 tiles."""
    features = torch.empty(len(tiles), size * size)
    stds = torch.empty(len(tiles))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tiles):
        by_shape.setdefault(t.shape, []).append(i)
    weights = torch.tensor(GREY).view(1, 3, 1, 1)
    for rows in by_shape.values():
        grey = (_to_float([tiles[i] for i in rows]) * weights).sum(dim=1, keepdim=True)  # (n, 1, H, W)
        stds[rows] = grey.flatten(1).std(dim=1, unbiased=False)
        small = F.adaptive_avg_pool2d(grey, size).flatten(1)  # box average: JPEG blocks wash out
        small = small - small.mean(dim=1, keepdim=True)
        # Unit length, so distances compare shapes, not contrast; a constant tile stays the zero vector.
        features[rows] = small / small.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return features, stds


@dataclass
class Neighbours:
    """The ``k`` nearest base rows of each query: distances, base indices and dihedral views ``(Q, k)``."""

    distance: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor


@torch.inference_mode()
def nearest(
    queries: torch.Tensor,
    base: torch.Tensor,
    size: int,
    k: int = 1,
    *,
    exclude_self: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Neighbours:
    """The ``k`` nearest rows of ``base`` to each query, the distance being the minimum over the query's 8 views.

    ``exclude_self[q]`` is a base index query q may not match (itself); ``drop`` a bool ``(B,)`` mask of base
    rows left out for every query. ``progress(done)`` is called after each chunk.
    """
    available = base.shape[0] - (int(drop.sum()) if drop is not None else 0) - (exclude_self is not None)
    if available < 1:
        raise InputError("nearest: every base row is left out (drop, exclude_self); nothing to search")
    k = min(k, available)
    base_t = base.T.contiguous()  # (D, B)
    base_sq = (base * base).sum(dim=1)  # (B,)
    out_d = torch.empty(len(queries), k)
    out_i = torch.empty(len(queries), k, dtype=torch.long)
    out_v = torch.empty(len(queries), k, dtype=torch.long)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        maps = q.reshape(len(q), size, size)
        views = torch.stack([apply_dihedral(maps, t, f) for t, f in DIHEDRAL]).reshape(len(DIHEDRAL) * len(q), -1)
        # One product for all 8 views, then the best view of every (query, base) pair.
        best, view = (views @ base_t).view(len(DIHEDRAL), len(q), -1).max(dim=0)  # (c, B) each
        if drop is not None:
            best[:, drop] = -torch.inf
        if exclude_self is not None:
            best[torch.arange(len(q)), exclude_self[start : start + chunk]] = -torch.inf
        # A view permutes the entries, so |view(q)|^2 = |q|^2: the largest dot product is the smallest distance.
        d2 = (q * q).sum(dim=1, keepdim=True) + base_sq[None, :] - 2 * best
        values, index = torch.topk(d2, k, dim=1, largest=False)
        out_d[start : start + chunk] = values.clamp_min(0).sqrt()
        out_i[start : start + chunk] = index
        out_v[start : start + chunk] = view.gather(1, index)
        if progress:
            progress(min(start + chunk, len(queries)))
    return Neighbours(out_d, out_i, out_v)


def symmetric_mean(features: torch.Tensor, size: int) -> torch.Tensor:
    """Mean feature averaged over the 8 views: distances to it do not depend on a tile's orientation."""
    mean = features.mean(dim=0).view(size, size)
    return torch.stack([apply_dihedral(mean, t, f) for t, f in DIHEDRAL]).mean(dim=0).flatten()


# --- SSIM confirmation -------------------------------------------------------------------------------


def _band(n: int, window: torch.Tensor) -> torch.Tensor:
    """``(n, n - k + 1)`` matrix whose columns hold the window: ``x @ band`` is the valid 1-D filtering."""
    k = window.numel()
    out = torch.zeros(n, n - k + 1, dtype=window.dtype)
    for j in range(n - k + 1):
        out[j : j + k, j] = window
    return out


def ssim_pairs(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-pair SSIM ``(N,)`` of ``(N, C, H, W)`` batches, as `histosynth.metrics.ssim.ssim` defines it.

    Same 11-px Gaussian window (sigma 1.5), valid positions, K1 = 0.01, K2 = 0.03. The separable filter runs
    as two products with a band matrix instead of a grouped convolution: on one CPU core that is about 5x
    faster for 96-px tiles (measured: 263 vs 54 pairs/s), and the audit forms thousands of pairs.
    """
    window = gaussian_window(11, 1.5, a.dtype, a.device)
    band_h, band_w = _band(a.shape[-2], window), _band(a.shape[-1], window)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return band_h.T @ x @ band_w

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``x (N, C, H, W)`` with each tile's channels set to zero mean and unit std (colour jitter undone)."""
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + 1e-6)


def _aligned(tile: np.ndarray, view: int) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(3, H, W)`` in [-1, 1], in dihedral view ``view``."""
    turns, flip = DIHEDRAL[view]
    return apply_dihedral(torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 127.5 - 1.0, turns, flip)


def confirm(queries: Sequence[np.ndarray], candidates: Sequence[np.ndarray], views: Sequence[int]) -> np.ndarray:
    """SSIM of each query (in its view) with its candidate tile, both standardised per channel: ``(N,)``."""
    if not queries:
        return np.empty(0)
    q = torch.stack([_aligned(t, v) for t, v in zip(queries, views)])
    size = q.shape[-2:]
    cands = []
    for c in candidates:
        if c.shape[:2] != tuple(size):
            c = np.asarray(Image.fromarray(c).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        cands.append(_aligned(c, 0))
    return ssim_pairs(standardise(q), standardise(torch.stack(cands))).numpy()


# --- result ------------------------------------------------------------------------------------------


@dataclass
class Match:
    """One generated tile and its nearest training tile."""

    file: str
    nearest: str
    distance: float  # feature distance, min over the 8 views
    ssim: float  # best SSIM over the top-k candidates (each in its matched view, colour moments matched)
    view: str  # the view of the generated tile that matches `nearest`: identity, rot90, ..., rot270+flip
    flagged: bool


@dataclass
class MemorizationResult:
    """Everything `evaluate memorization` reports; `to_json` gives the documented keys."""

    n: int
    n_train: int
    n_train_flat: int  # near-flat training tiles (no candidates)
    n_reference: int
    n_reference_near: int  # the nearest reference tiles whose SSIMs set the bar
    reference_source: str  # "folder" or "held-out"
    n_flat: int  # near-flat generated tiles (never flagged)
    threshold: float
    ssim_threshold: float
    n_below_threshold: int
    flagged: list[Match]
    closest: list[Match]
    alpha_precision: float
    beta_recall: float
    authenticity: float
    curves: dict[str, list[float]]
    distances: dict[str, dict[str, float]]  # quantiles of the generated and reference distances
    ssims: dict[str, dict[str, float]]  # quantiles of the nearest reference tiles' SSIMs
    config: MemorizationConfig
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fraction_flagged(self) -> float:
        """Share of generated tiles flagged as copies."""
        return len(self.flagged) / self.n

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "memorization"``)."""
        return {
            "metric": "memorization",
            "n": self.n,
            "n_train": self.n_train,
            "n_train_flat": self.n_train_flat,
            "n_reference": self.n_reference,
            "n_reference_near": self.n_reference_near,
            "reference_source": self.reference_source,
            "n_flat": self.n_flat,
            "threshold": self.threshold,
            "percentile": self.config.percentile,
            "ssim_threshold": self.ssim_threshold,
            "ssim_percentile": self.config.ssim_percentile,
            "near_fraction": self.config.near_fraction,
            "n_below_threshold": self.n_below_threshold,
            "fraction_below_threshold": self.n_below_threshold / self.n,
            "flagged": [_match_json(m) for m in self.flagged],
            "fraction_flagged": self.fraction_flagged,
            "closest": [_match_json(m) for m in self.closest],
            "alpha_precision": self.alpha_precision,
            "beta_recall": self.beta_recall,
            "authenticity": self.authenticity,
            "curves": dict(self.curves),
            "distances": dict(self.distances),
            "ssims": dict(self.ssims),
            "feature": f"grey {self.config.feature_size}px, centred, unit length; min over 8 dihedral views",
            "config": asdict(self.config),
            "warnings": list(self.warnings),
            "inputs": dict(self.inputs),
            "seconds": dict(self.seconds),
        }


def _match_json(m: Match) -> dict[str, Any]:
    return {"file": m.file, "nearest": m.nearest, "distance": m.distance, "ssim": m.ssim, "view": m.view,
            "flagged": m.flagged}


def _quantiles(values: np.ndarray, percents: Sequence[int] = (1, 5, 50)) -> dict[str, float]:
    """min, max and percentiles (``p1``, ..., ``p50``) of ``values``; empty for no values."""
    if len(values) == 0:
        return {}
    q = np.percentile(values, percents)
    return {"min": float(values.min()), **{f"p{p}": float(v) for p, v in zip(percents, q)}, "max": float(values.max())}


# --- Alaa et al. 2022 ----------------------------------------------------------------------------------


def alpha_precision_beta_recall(
    real: torch.Tensor, generated: torch.Tensor, size: int, steps: int = 30, chunk: int = 256
) -> tuple[float, float, dict[str, list[float]]]:
    """Integrated alpha-precision and beta-recall and their curves (definitions: module docstring)."""
    alphas = np.linspace(0.0, 1.0, steps)
    centre_r = symmetric_mean(real, size)
    real_to_centre = (real - centre_r).norm(dim=1).numpy()
    gen_to_centre = (generated - centre_r).norm(dim=1).numpy()
    radii = np.quantile(real_to_centre, alphas)
    precision = [float((gen_to_centre <= r).mean()) for r in radii]

    to_gen = nearest(real, generated, size, 1, chunk=chunk)
    to_real = nearest(real, real, size, 1, exclude_self=torch.arange(len(real)), chunk=chunk)
    centre_g = symmetric_mean(generated, size)
    closest_to_centre = (generated[to_gen.index[:, 0]] - centre_g).norm(dim=1).numpy()
    gen_radii = np.quantile(closest_to_centre, alphas)
    inside_ball = (to_gen.distance[:, 0] <= to_real.distance[:, 0]).numpy()
    recall = [float((inside_ball & (closest_to_centre <= r)).mean()) for r in gen_radii]
    score = lambda curve: float(1.0 - 2.0 * np.mean(np.abs(np.asarray(curve) - alphas)))  # noqa: E731
    curves = {"alphas": alphas.tolist(), "alpha_precision": precision, "beta_recall": recall}
    return score(precision), score(recall), curves


# --- the audit -----------------------------------------------------------------------------------------


def _features(reader: TileReader, names: Sequence[str], cfg: MemorizationConfig, stage: str,
              progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    feats, stds = [], []
    for start in range(0, len(names), cfg.batch_size):
        f, s = tile_features(reader.read(names[start : start + cfg.batch_size]), cfg.feature_size)
        feats.append(f)
        stds.append(s)
        if progress:
            progress(stage, min(start + cfg.batch_size, len(names)), len(names))
    return torch.cat(feats), torch.cat(stds)


def _confirm_all(reader: TileReader, names: Sequence[str], rows: np.ndarray, found: Neighbours,
                 train_names: Sequence[str], cfg: MemorizationConfig, stage: str,
                 progress: Progress | None) -> np.ndarray:
    """Best SSIM over the top-k candidates for each of ``rows`` (indices into ``names`` and ``found``)."""
    best = np.full(len(rows), -1.0)
    k = found.index.shape[1]
    per_batch = max(1, cfg.batch_size // k)
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        queries = reader.read([names[i] for i in batch])
        cand_index = found.index[batch].numpy()  # (b, k)
        unique = list(dict.fromkeys(cand_index.ravel().tolist()))
        pixels = dict(zip(unique, reader.read([train_names[j] for j in unique])))
        scores = confirm([queries[r] for r in range(len(batch)) for _ in range(k)],
                         [pixels[j] for j in cand_index.ravel().tolist()],
                         found.view[batch].ravel().tolist())
        best[start : start + len(batch)] = scores.reshape(len(batch), k).max(axis=1)
        if progress:
            progress(stage, min(start + per_batch, len(rows)), len(rows))
    return best


def _stage(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    """`nearest`'s ``progress(done)`` reporting as ``progress(stage, done, total)``."""
    if progress is None:
        return None
    return lambda done: progress(stage, done, total)


def evaluate_memorization(
    train: str | Path,
    generated: str | Path,
    reference: str | Path | None = None,
    config: MemorizationConfig | None = None,
    progress: Progress | None = None,
) -> MemorizationResult:
    """Audit ``generated`` tiles for copies of ``train`` tiles, calibrated on ``reference`` (or held-out) tiles.

    ``progress(stage, done, total)`` is called as each stage advances. All inputs are checked before the long
    work starts.
    """
    cfg = config or MemorizationConfig()
    cfg.validate("memorization")
    train_names, train_kind = training_tiles(train)
    gen_names = image_files(generated, "--generated")
    rng = np.random.default_rng(cfg.seed)
    held_out: np.ndarray | None = None
    if reference is not None:
        ref_names = image_files(reference, "--reference")
        source = "folder"
    else:
        n_ref = int(round(cfg.reference_fraction * len(train_names)))
        if n_ref < cfg.min_reference or len(train_names) - n_ref < 1:
            raise InputError(f"--train: {len(train_names)} tiles; holding out {cfg.reference_fraction:g} of them gives "
                             f"{n_ref} reference tiles, fewer than {cfg.min_reference}; give --reference DIR with real "
                             "tiles the model never saw, or a larger --reference-fraction")
        held_out = np.sort(rng.choice(len(train_names), n_ref, replace=False))
        ref_names = [train_names[i] for i in held_out]
        source = "held-out"

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    reader = TileReader(cfg.workers)
    try:
        train_f, train_std = _features(reader, train_names, cfg, "features (train)", progress)
        gen_f, gen_std = _features(reader, gen_names, cfg, "features (generated)", progress)
        # Near-flat training tiles are no candidates: their feature is noise, and SSIM finds flat areas alike.
        train_flat = train_std < cfg.flat_std
        if bool(train_flat.all()):
            raise InputError(f"--train: all {len(train_names)} tiles are near-flat (grey std < {cfg.flat_std:g}); "
                             "there is no tissue to compare with")
        drop = train_flat.clone()
        if held_out is None:
            ref_f, ref_std = _features(reader, ref_names, cfg, "features (reference)", progress)
        else:
            ref_f, ref_std = train_f[held_out], train_std[held_out]
            drop[held_out] = True  # held-out tiles are searched against the rest only
        seconds["features"] = time.perf_counter() - clock

        gen_rows = np.flatnonzero((gen_std >= cfg.flat_std).numpy())
        ref_rows = np.flatnonzero((ref_std >= cfg.flat_std).numpy())
        if len(ref_rows) < cfg.min_reference:
            raise InputError(f"reference: {len(ref_rows)} of {len(ref_names)} reference tiles are not near-flat "
                             f"(grey std >= {cfg.flat_std:g}); at least {cfg.min_reference} are needed to place a "
                             "percentile; give more real tiles the model never saw")
        clock = time.perf_counter()
        found = nearest(gen_f[gen_rows], train_f, cfg.feature_size, cfg.top_k, drop=train_flat, chunk=cfg.chunk,
                        progress=_stage(progress, "search (generated)", len(gen_rows)))
        ref_found = nearest(ref_f[ref_rows], train_f, cfg.feature_size, cfg.top_k, drop=drop, chunk=cfg.chunk,
                            progress=_stage(progress, "search (reference)", len(ref_rows)))
        seconds["search"] = time.perf_counter() - clock
        ref_d = ref_found.distance[:, 0].numpy()
        threshold = float(np.percentile(ref_d, cfg.percentile))
        gen_d = found.distance[:, 0].numpy()

        clock = time.perf_counter()
        # Close non-copies set the SSIM bar: the reference tiles nearest to the training set.
        near = np.argsort(ref_d, kind="stable")[: max(cfg.min_reference, math.ceil(cfg.near_fraction * len(ref_d)))]
        ref_ssim = _confirm_all(reader, [ref_names[i] for i in ref_rows], near, ref_found, train_names, cfg,
                                "SSIM (reference)", progress)
        ssim_threshold = float(np.percentile(ref_ssim, cfg.ssim_percentile))
        # Only tiles that pass the distance test can be flagged; the closest few are shown whatever they score.
        order = np.argsort(gen_d, kind="stable")
        confirm_rows = np.union1d(np.flatnonzero(gen_d < threshold), order[: cfg.pairs])
        gen_ssim = np.full(len(gen_rows), np.nan)
        gen_ssim[confirm_rows] = _confirm_all(reader, [gen_names[i] for i in gen_rows], confirm_rows, found,
                                              train_names, cfg, "SSIM (generated)", progress)
        seconds["ssim"] = time.perf_counter() - clock

        clock = time.perf_counter()
        stage = "authenticity, alpha-precision, beta-recall"
        if progress:
            progress(stage, 0, 1)
        # Authenticity (Alaa et al. 2022): farther from the nearest training tile than it is from its own.
        nearest_train = found.index[:, 0]
        unique, inverse = torch.unique(nearest_train, return_inverse=True)
        own = nearest(train_f[unique], train_f, cfg.feature_size, 1, exclude_self=unique, drop=train_flat,
                      chunk=cfg.chunk)
        authentic = found.distance[:, 0] > own.distance[inverse, 0]
        authenticity = float(authentic.float().mean()) if len(gen_rows) else float("nan")
        tissue = np.flatnonzero(~train_flat.numpy())
        n_real = min(len(tissue), len(gen_rows))
        if n_real >= 2:
            real_rows = torch.from_numpy(np.sort(rng.choice(tissue, n_real, replace=False)))
            alpha_precision, beta_recall, curves = alpha_precision_beta_recall(
                train_f[real_rows], gen_f[gen_rows], cfg.feature_size, cfg.alpha_steps, cfg.chunk)
        else:
            alpha_precision, beta_recall, curves = float("nan"), float("nan"), {}
        if progress:
            progress(stage, 1, 1)
        seconds["faithfulness"] = time.perf_counter() - clock
    finally:
        reader.close()

    below = gen_d < threshold
    flagged_mask = below & (gen_ssim >= ssim_threshold)
    views = found.view[:, 0].tolist()

    def match(r: int) -> Match:
        return Match(gen_names[gen_rows[r]], train_names[int(nearest_train[r])], float(gen_d[r]), float(gen_ssim[r]),
                     dihedral_name(*DIHEDRAL[views[r]]), bool(flagged_mask[r]))

    warnings = []
    if len(ref_rows) < 1000:
        warnings.append(f"the threshold is percentile {cfg.percentile:g} of {len(ref_rows)} reference distances and "
                        f"the SSIM bar rests on {len(near)} of them; below 1,000 reference tiles both move "
                        "noticeably between samples")
    if source == "held-out":
        warnings.append("the reference tiles were held out of --train, so they come from the same slides as the "
                        "training tiles; --reference with tiles from other slides or patients is the sounder reference")
    if n_real < 2:
        warnings.append("fewer than 2 generated tiles that are not near-flat: no alpha-precision or beta-recall")
    return MemorizationResult(
        n=len(gen_names),
        n_train=len(train_names),
        n_train_flat=int(train_flat.sum()),
        n_reference=len(ref_rows),
        n_reference_near=len(near),
        reference_source=source,
        n_flat=len(gen_names) - len(gen_rows),
        threshold=threshold,
        ssim_threshold=ssim_threshold,
        n_below_threshold=int(below.sum()),
        flagged=[match(r) for r in order if flagged_mask[r]],
        closest=[match(r) for r in order[: cfg.pairs]],
        alpha_precision=alpha_precision,
        beta_recall=beta_recall,
        authenticity=authenticity,
        curves=curves,
        distances={"generated": _quantiles(gen_d), "reference": _quantiles(ref_d)},
        ssims={"reference": _quantiles(ref_ssim, (50, 95, 99))},
        config=cfg,
        warnings=warnings,
        inputs={"train": str(train), "train_kind": train_kind, "generated": str(generated),
                "reference": None if reference is None else str(reference)},
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )


# --- contact sheet -------------------------------------------------------------------------------------


def contact_sheet(pairs: Sequence[Match] | Sequence[dict[str, Any]], path: str | Path, columns: int = 4) -> Path:
    """Write a PNG of (generated, nearest training) pairs with distance and SSIM; flagged pairs framed red.

    The generated tile is shown in the view that matches the training tile, so a copy looks like one.
    Accepts `Match` objects or their JSON dicts (so `evaluate report` can redraw it).
    """
    items = [asdict(p) if isinstance(p, Match) else dict(p) for p in pairs]
    if not items:
        raise InputError("contact sheet: no pairs to draw")
    tiles = []
    for p in items:
        view = next(i for i, (t, f) in enumerate(DIHEDRAL) if dihedral_name(t, f) == p.get("view", "identity"))
        generated = _aligned(read_tile(p["file"]), view)
        tiles.append((to_uint8(generated[None])[0], read_tile(p["nearest"])))
    side = max(t.shape[0] for pair in tiles for t in pair)
    pad, label = 6, 14
    cell_w, cell_h = 2 * side + 3 * pad, side + 2 * pad + label
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, (p, (gen, train)) in enumerate(zip(items, tiles)):
        x0, y0 = (n % columns) * cell_w, (n // columns) * cell_h
        if p.get("flagged"):
            draw.rectangle([x0 + 1, y0 + 1, x0 + cell_w - 2, y0 + cell_h - 2], outline=(213, 0, 0), width=3)
        sheet.paste(Image.fromarray(gen), (x0 + pad, y0 + pad))
        sheet.paste(Image.fromarray(train), (x0 + 2 * pad + side, y0 + pad))
        text = f"d {p['distance']:.3f}  SSIM {p['ssim']:.2f}" + ("  COPY" if p.get("flagged") else "")
        draw.text((x0 + pad, y0 + pad + side + 2), text, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())


# --- planted copies (to check the audit on your own data) ----------------------------------------------


def perturb_tile(tile: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a uint8 ``(H, W, 3)`` tile as a memorizing model might emit it.

    ``exact``: unchanged; ``dihedral``: a random flip/quarter turn; ``jpeg``: a random view, re-encoded as
    JPEG quality 75; ``jitter``: a random view with brightness, contrast and saturation within 15 % and hue
    within 3 % of the circle.
    """
    if kind not in PERTURBATIONS:
        raise InputError(f"perturbation: unknown kind {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
    if kind == "exact":
        return tile.copy()
    turns, flip = DIHEDRAL[int(rng.integers(1, len(DIHEDRAL)))]
    out = np.ascontiguousarray(np.rot90(tile, turns, axes=(0, 1)))
    out = np.ascontiguousarray(out[:, ::-1]) if flip else out
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, format="JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    if kind == "jitter":
        img = Image.fromarray(out)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(float(rng.uniform(0.85, 1.15)))
        hue, sat, val = img.convert("HSV").split()
        shift = int(round(rng.uniform(-0.03, 0.03) * 255))
        hue = hue.point(lambda h: (h + shift) % 256)
        return np.asarray(Image.merge("HSV", (hue, sat, val)).convert("RGB"))
    return out
