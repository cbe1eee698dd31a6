"""A bank of generated latents: the bundle's sampler stopped before the decoder.

The decoder learns on the encoder's latents, but in use it decodes the diffusion model's, which sit a little off
the encoder's manifold. A decoder GAN phase can also show the discriminator decodings of generated latents
(`VQGANTrainConfig.adapt_latents`) so that the decoder learns to render those as tissue too. The bank is sampled
once, like the latent cache, and stored the same way: ``latents.npy`` float16 (N, C, h, w) in the VQ-GAN's
latent space (pre-quantization, *not* scaled by ``latent_scale``), with ``bank.json`` saying how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from histosynth.autoencoder.latents import BANK_LATENTS
from histosynth.bundle.store import load_bundle
from histosynth.diffusion.samplers import classifier_free_guidance, get_sampler, sample
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.errors import InputError
from histosynth.io import check_writable, write_json

BANK_META = "bank.json"


@dataclass(frozen=True)
class BankSpec:
    """How a bank is sampled: classes in turn (0, 1, ..., K-1, 0, ...), one noise stream from `seed`."""

    count: int = 4000
    seed: int = 0
    sampler: str = "dpmpp2m"
    steps: int = 20
    guidance: float = 1.0
    batch_size: int = 50


def sample_latent_bank(bundle_path: str | Path, out: str | Path, spec: BankSpec = BankSpec(),
                       device: str = "cpu", overwrite: bool = False,
                       on_progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Sample `spec.count` latents with the bundle's UNet into ``out/latents.npy`` (+ ``bank.json``); returns it.

    The file is written once, complete, at the end (a killed run leaves no bank); `on_progress(done, total)`
    reports each batch.
    """
    out = Path(out)
    if spec.count < 1 or spec.steps < 1 or spec.batch_size < 1:
        raise InputError(f"latent bank: count, steps and batch_size must be >= 1, got {spec.count}, {spec.steps}, "
                         f"{spec.batch_size}")
    try:
        get_sampler(spec.sampler)
    except ValueError as err:
        raise InputError(f"latent bank: {err}") from None
    if (out / BANK_LATENTS).exists() and not overwrite:
        raise InputError(f"{out / BANK_LATENTS} exists; pass --overwrite to replace it or choose another --out")
    check_writable(out)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    dev = torch.device(device)
    unet = bundle.build_unet(dev)
    schedule = NoiseSchedule(manifest.schedule)
    classes = len(manifest.classes)
    stochastic = get_sampler(spec.sampler).stochastic(0.0)
    generator = torch.Generator().manual_seed(spec.seed)
    shape = tuple(manifest.latent_shape)
    bank = np.empty((spec.count, *shape), dtype=np.float16)

    @torch.inference_mode()
    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dev), t.to(dev), y.to(dev)).to(x.device)

    for start in range(0, spec.count, spec.batch_size):
        n = min(spec.batch_size, spec.count - start)
        class_ids = torch.arange(start, start + n) % classes
        guided = classifier_free_guidance(denoise, torch.full((n,), spec.guidance), manifest.null_id)
        noise = torch.randn((n, *shape), generator=generator)
        latents = sample(guided, schedule, noise, class_ids, sampler=spec.sampler, steps=spec.steps,
                         randn=(lambda i: torch.randn((n, *shape), generator=generator)) if stochastic else None)
        bank[start:start + n] = (latents / manifest.latent_scale).numpy().astype(np.float16)
        if on_progress is not None:
            on_progress(start + n, spec.count)

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (BANK_LATENTS + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, bank)
    tmp.replace(out / BANK_LATENTS)
    write_json(out / BANK_META, {"bundle": str(bundle_path), "bundle_hash": bundle.hash,
                                 "classes": [c.name for c in manifest.classes], "shape": list(bank.shape),
                                 "space": "vqgan pre-quantization (diffusion latents / latent_scale)",
                                 "latent_scale": manifest.latent_scale, **asdict(spec)})
    return out / BANK_LATENTS
