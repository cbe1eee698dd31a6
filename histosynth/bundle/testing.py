"""A real bundle from tiny random networks, exported in a couple of seconds: for tests of every later stage.

    from histosynth.bundle.testing import tiny_bundle
    bundle_dir = tiny_bundle(tmp_path, num_classes=3, tile_size=32)

The weights are random but not degenerate (zero-initialised output layers are perturbed), so images and
UNet outputs differ between classes and seeds; the bundle goes through the real exporter, ONNX parity
check included. Each distinct bundle is exported once per process and copied for later calls (an export
traces two networks, seconds on a busy 2-core CI machine); every caller gets its own copy to damage.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.bundle.export import export_bundle
from histosynth.bundle.manifest import Provenance
from histosynth.diffusion.schedule import ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig

_CACHE: dict[tuple, Path] = {}
_CACHE_ROOT: Path | None = None

TISSUE_NAMES = ("tumour", "stroma", "lymphocytes", "necrosis", "fat", "mucosa", "debris", "muscle")


def tiny_vqgan_config(latent_channels: int = 3) -> VQGANConfig:
    """A VQ-GAN with f=4 and a few thousand parameters."""
    return VQGANConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=latent_channels,
                       codebook_size=32, codebook_dim=latent_channels, norm_groups=4)


def tiny_unet_config(num_classes: int, latent_channels: int = 3) -> UNetConfig:
    """A two-level UNet with attention at the lower level and a few tens of thousands of parameters."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, base_channels=16,
                      channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                      num_classes=num_classes, dropout=0.0, norm_groups=8)


def tiny_networks(num_classes: int = 3, seed: int = 0, latent_channels: int = 3) -> tuple[VQGAN, UNet]:
    """Tiny random VQ-GAN and UNet, identical for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vqgan = VQGAN(tiny_vqgan_config(latent_channels)).eval()
        unet = UNet(tiny_unet_config(num_classes, latent_channels)).eval()
        with torch.no_grad():
            # Zero-initialised output convs (a training nicety) would make every UNet output 0 and hide
            # backend differences; small noise on every weight makes the networks non-trivial.
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
            # Spread the codebook (init is +-1/K) so different latents decode to visibly different tiles.
            vqgan.quantizer.embedding.weight.normal_(0.0, 1.0)
    return vqgan, unet


def tiny_bundle(
    tmp_path: str | Path,
    num_classes: int = 3,
    tile_size: int = 32,
    *,
    name: str = "bundle",
    seed: int = 0,
    prediction: str = "epsilon",
    latent_channels: int = 3,
    guide: bool = False,
    experts: tuple[int, ...] = (),
) -> Path:
    """Export a tiny bundle to ``tmp_path / name`` and return its folder (classes from `TISSUE_NAMES`).

    `guide` adds a guide UNet for autoguidance: the same tiny UNet from another seed. `experts` adds a
    noise-range expert from each of these timesteps on (the tiny UNet from seeds + 2, + 3, ...).
    """
    global _CACHE_ROOT
    key = (num_classes, tile_size, seed, prediction, latent_channels, guide, tuple(experts))
    if key not in _CACHE:
        if _CACHE_ROOT is None:
            _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="histosynth-tiny-bundles-"))
            atexit.register(shutil.rmtree, _CACHE_ROOT, True)
        _CACHE[key] = _export_tiny(_CACHE_ROOT / f"b{len(_CACHE)}", num_classes, tile_size, seed, prediction,
                                   latent_channels, guide, tuple(experts))
    return Path(shutil.copytree(_CACHE[key], Path(tmp_path) / name))


def _export_tiny(out: Path, num_classes: int, tile_size: int, seed: int, prediction: str,
                 latent_channels: int, guide: bool, experts: tuple[int, ...]) -> Path:
    vqgan, unet = tiny_networks(num_classes, seed, latent_channels)
    guide_unet = tiny_networks(num_classes, seed + 1, latent_channels)[1] if guide else None
    names = sorted(TISSUE_NAMES[i] if i < len(TISSUE_NAMES) else f"class{i:03d}" for i in range(num_classes))
    report = export_bundle(
        vqgan, unet, out,
        class_names=names,
        schedule_config=ScheduleConfig(prediction=prediction),  # type: ignore[arg-type]
        latent_scale=0.8,
        tile_size=tile_size,
        microns_per_pixel=0.5,
        provenance=Provenance(data="random weights (histosynth.bundle.testing)", steps={"vqgan": 0, "ldm": 0},
                              extra={"K": num_classes}),
        guide_unet=guide_unet,
        guide_facts={"step": 0, "samples_seen": 0} if guide else None,
        unet_experts=[(t_min, tiny_networks(num_classes, seed + 2 + k, latent_channels)[1])
                      for k, t_min in enumerate(experts)],
    )
    return report.path
