"""Does a freshly trained diffusion model make tissue? A cheap check run after every diffusion training stage.

A short run can finish, report "done" and still make speckle noise for every class (issue 8: a lab's colon run
did exactly that). After training, `check_samples` draws a small sample with a few DDIM steps of the EMA model,
decodes it with the VQ-GAN and compares it with training tiles through `metrics.tilestats.sample_verdict`
(colour, contrast, flat-tile statistics and a network-free feature distance). The verdict is printed, written to
``verdict.json`` in the run folder and logged; ``noise`` is a loud warning, not an error, so a lab can still
inspect what it got.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from histosynth.diffusion.samplers import sample as run_sampler
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.imageops import to_uint8
from histosynth.metrics.tilestats import Verdict, sample_verdict

CHECK_SAMPLES = 64  # generated tiles: enough for the statistics, ~10 s on a CPU with the shipped sizes
CHECK_REFERENCE = 256  # training tiles they are compared with
CHECK_STEPS = 20  # DDIM steps


def _read_tiles(paths: Sequence[str], size: int) -> np.ndarray:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out.append(np.asarray(im))
    return np.stack(out)


@torch.no_grad()
def check_samples(unet: nn.Module, schedule: NoiseSchedule, decoder: nn.Module, latent_shape: Sequence[int],
                  latent_scale: float, class_ids: torch.Tensor, tile_paths: Sequence[str], *,
                  reference: int = CHECK_REFERENCE, steps: int = CHECK_STEPS, seed: int = 0) -> Verdict:
    """Generate ``len(class_ids)`` tiles, decode them, and compare them with up to `reference` training tiles
    (an evenly spaced choice of `tile_paths`, which may be image files of any size)."""
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(class_ids), *latent_shape), generator=generator).to(device)
    latents = run_sampler(lambda x, t, y: unet(x, t, y), schedule, noise, class_ids.to(device), sampler="ddim",
                          steps=steps)
    unet.train(was_training)
    images = decoder(latents / latent_scale).clamp(-1, 1)
    generated = to_uint8(images)
    pick = np.linspace(0, len(tile_paths) - 1, num=min(reference, len(tile_paths))).round().astype(int)
    training = _read_tiles([tile_paths[i] for i in np.unique(pick)], generated.shape[1])
    return sample_verdict(generated, training)


def verdict_record(verdict: Verdict, **extra: Any) -> dict[str, Any]:
    """The JSON object written to ``verdict.json`` (and logged)."""
    d = asdict(verdict)
    d["message"] = verdict.message()
    d.update(extra)
    return d
