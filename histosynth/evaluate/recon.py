"""The paper's paired metrics between real tiles and their VQ-GAN reconstructions: SSIM, MS-SSIM, PSNR, MSE.

Tiles are read as uint8, mapped to ``[-1, 1]``, encoded, quantized and decoded; reconstructions are clamped
to ``[-1, 1]`` (as the bundle's decoder does) and compared in float with ``data_range = 2``. MS-SSIM on 96-px
tiles uses 4 scales (see `histosynth.metrics.ssim`); the JSON records how many.

The reconstruction is either the VQ-GAN checkpoint's own decoder (``vqgan``), or, with a ``bundle``, the
bundle's shipped decoder on the checkpoint encoder's latents times the bundle's ``latent_scale`` (a bundle
holds no encoder, so the checkpoint it was exported from is needed either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from histosynth.errors import InputError
from histosynth.evaluate.features import list_images, read_rgb, select_files
from histosynth.imageops import encode_image, to_uint8
from histosynth.io import write_bytes
from histosynth.metrics import ms_ssim, ms_ssim_scales, mse, psnr, ssim

METRICS = ("ssim", "ms_ssim", "psnr", "mse")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class ReconMetrics:
    """Per-image values of each metric and the facts needed to read them."""

    values: dict[str, list[float]]
    ms_ssim_scales: int
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values["ssim"])

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {mean, std, n}}``; PSNR's mean leaves out identical pairs (infinite PSNR), counted apart."""
        out: dict[str, dict[str, float]] = {}
        for name in METRICS:
            v = np.asarray(self.values[name], dtype=np.float64)
            finite = v[np.isfinite(v)]
            out[name] = {
                "mean": float(finite.mean()) if len(finite) else float("nan"),
                "std": float(finite.std()) if len(finite) else float("nan"),
                "n": int(len(finite)),
            }
            if len(finite) < len(v):
                out[name]["n_infinite"] = int(len(v) - len(finite))
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "recon"``)."""
        return {"metric": "recon", "n": self.n, "data_range": 2.0, "ms_ssim_scales": self.ms_ssim_scales,
                **self.summary(), "inputs": dict(self.inputs)}


def paired_metrics(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
    """Per-image SSIM, MS-SSIM, PSNR and MSE of two ``[-1, 1]`` batches."""
    a, b = originals.float(), reconstructions.float()
    return {
        "ssim": ssim(a, b, reduction="none").tolist(),
        "ms_ssim": ms_ssim(a, b, reduction="none").tolist(),
        "psnr": psnr(a, b, reduction="none").tolist(),
        "mse": mse(a, b, reduction="none").tolist(),
    }


def make_reconstructor(
    vqgan: str | Path | None, bundle: str | Path | None, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """``images -> reconstructions`` from a VQ-GAN checkpoint (and optionally a bundle's decoder)."""
    from histosynth.autoencoder.train import load_vqgan

    if vqgan is None:
        if bundle is not None:
            raise InputError(
                "--bundle: a bundle holds no encoder; pass --vqgan CKPT too (the VQ-GAN checkpoint it was exported from)"
            )
        raise InputError("--vqgan: required (a VQ-GAN checkpoint, or a run folder holding vqgan.safetensors)")
    model = load_vqgan(vqgan, device)
    info: dict[str, Any] = {"vqgan": str(vqgan)}
    if bundle is None:
        return (lambda x: model.decode(model.encode(x)).clamp(-1.0, 1.0)), info
    from histosynth.bundle import load_bundle

    loaded = load_bundle(bundle)
    decoder = loaded.build_decoder(device)
    scale = float(loaded.manifest.latent_scale)
    info.update({"bundle": str(bundle), "bundle_hash": loaded.hash, "latent_scale": scale})
    return (lambda x: decoder(model.encode(x) * scale)), info


@torch.inference_mode()
def evaluate_recon(
    tiles: str | Path,
    *,
    vqgan: str | Path | None = None,
    bundle: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_images: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    write_dir: str | Path | None = None,
) -> ReconMetrics:
    """SSIM, MS-SSIM, PSNR and MSE over the tiles in ``tiles`` (all, or a seeded subset) and their reconstructions.

    With `write_dir`, each reconstruction is also written there as PNG under the tile's relative path (so
    `evaluate fid` / `evaluate budget` can score the autoencoder alone); each file appears whole or not at all.
    The colour, contrast and flat-tile statistics of tiles and reconstructions go into ``inputs["tile_stats"]``.
    """
    from histosynth.metrics.tilestats import compare, tile_stats
    from histosynth.runtime.devices import resolve_device

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    reconstruct, info = make_reconstructor(vqgan, bundle, dev)
    files = select_files(list_images(tiles), max_images, seed)
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    scales = 0
    root = Path(tiles)
    out_dir = Path(write_dir) if write_dir is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"--write: {out_dir} exists and is not a folder")
        if out_dir.resolve() == root.resolve():
            raise InputError("--write: must differ from --tiles (the reconstructions would replace the tiles)")
    originals_u8: list[np.ndarray] = []
    recon_u8: list[np.ndarray] = []
    for start in range(0, len(files), batch_size):
        names = files[start : start + batch_size]
        batch = [read_rgb(p) for p in names]
        shapes = {im.shape for im in batch}
        if len(shapes) != 1:
            raise InputError(f"{tiles}: tiles must all have one size; found {sorted(shapes)}")
        x = images_to_tensor(np.stack(batch)).to(dev)
        scales = ms_ssim_scales(x.shape[-2], x.shape[-1])
        if scales < 1:
            raise InputError(f"{tiles}: tiles of {x.shape[-1]} px are smaller than the 11-px SSIM window")
        recon = reconstruct(x)
        for name, vals in paired_metrics(x, recon).items():
            values[name].extend(vals)
        u8 = to_uint8(recon)
        originals_u8.append(np.stack(batch))
        recon_u8.append(u8)
        if out_dir is not None:
            for path, image in zip(names, u8):
                write_bytes((out_dir / path.relative_to(root)).with_suffix(".png"), encode_image(image, "png"))
        if progress:
            progress(min(start + batch_size, len(files)), len(files))
    info.update({"tiles": str(tiles), "device": str(dev)})
    if originals_u8:
        real_stats = tile_stats(np.concatenate(originals_u8))
        rec_stats = tile_stats(np.concatenate(recon_u8))
        info["tile_stats"] = {"real": real_stats.to_dict(), "reconstruction": rec_stats.to_dict(),
                              "vs_real": compare(rec_stats, real_stats)}
    if out_dir is not None:
        info["written_to"] = str(out_dir)
    return ReconMetrics(values, scales, info)
