"""How far are turned latents from the encoder's own latents of turned tiles? (issue 8, round 14)

The diffusion trainer's `augment: true` turns and flips the cached latents of each batch instead of encoding the
turned tiles (`train encode --dihedral`, 8x the encoding time). That is exact only if the encoder commutes with
the 8 flips and quarter turns of the square, which a convolutional encoder with padded borders and learned
kernels does only roughly. This measures, for the first `--n` tiles of a folder (sorted by name) and each of the
7 non-identity views g:

    rel_rms     RMS(E(g x) - g E(x)) / std(E(x)): the error in units of the latents' own spread
    codes_same  the share of latent positions whose nearest code (the quantizer's lookup) is the same
    t_equal     the smallest diffusion step t whose noise (sigma_t / alpha_t in the scaled latents the UNet sees)
                exceeds the error: from that step on, the UNet cannot tell the two apart
    decode_rms  RMS(D(g E(x)) - g x) in [-1, 1] pixels: what the decoder makes of a turned latent, against the
                turned tile; decode_rms_direct is the same for D(E(g x)) (the reconstruction error of the tile)

Prints one JSON object (`--json` also writes it). One thread is enough (128 tiles take about a minute).

    OMP_NUM_THREADS=1 python benchmarks/latent_equivariance.py --vqgan weights/pcam96/training/vqgan.safetensors \\
        --data ../shared/data/pcam/train --n 128 --json weights/pcam96/eval/round14/latent_equivariance.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.autoencoder.train import load_vqgan  # noqa: E402
from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from histosynth.imageops import DIHEDRAL, apply_dihedral, dihedral_name  # noqa: E402
from histosynth.tiles.dataset import open_tiles  # noqa: E402


def equivariance(encode: Any, lookup: Any, decode: Any, tiles: torch.Tensor, latent_scale: float,
                 schedule: NoiseSchedule) -> list[dict[str, Any]]:
    """Per non-identity view: rel_rms, codes_same and t_equal (see the module docstring)."""
    with torch.no_grad():
        base = encode(tiles)
        spread = float(base.std())
        base_codes = lookup(base)
        noise = torch.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)  # sigma/alpha per step
        rows = []
        for k, flip in DIHEDRAL[1:]:
            turned = apply_dihedral(base, k, flip)
            direct = encode(apply_dihedral(tiles, k, flip))
            rms = float((direct - turned).pow(2).mean().sqrt())
            same = float((lookup(direct) == apply_dihedral(base_codes, k, flip)).float().mean())
            target = apply_dihedral(tiles, k, flip)
            decode_rms = float((decode(turned) - target).pow(2).mean().sqrt())
            decode_rms_direct = float((decode(direct) - target).pow(2).mean().sqrt())
            above = torch.nonzero(noise > rms * latent_scale)
            rows.append({"view": dihedral_name(k, flip), "rel_rms": rms / spread, "rms": rms, "codes_same": same,
                         "decode_rms": decode_rms, "decode_rms_direct": decode_rms_direct,
                         "t_equal": int(above[0]) if len(above) else None})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vqgan", type=Path, default=ROOT / "weights/pcam96/training/vqgan.safetensors")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/pcam/train")
    ap.add_argument("--n", type=int, default=256, help="tiles (the first n by name)")
    ap.add_argument("--latent-scale", type=float, default=0.6286898256435279,
                    help="the factor the diffusion model's latents are scaled by (the bundle's manifest)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1, got {args.n}")
    model = load_vqgan(args.vqgan)
    dataset = open_tiles(args.data, 96)
    n = min(args.n, len(dataset))
    tiles = torch.stack([dataset[i] for i in range(n)])

    def lookup(latents: torch.Tensor) -> torch.Tensor:
        return model.quantizer.lookup(latents)[1]

    schedule = NoiseSchedule(ScheduleConfig())  # the shipped schedule: linear 1e-4..0.02, T = 1000
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return model.decode(latents).clamp(-1, 1)

    rows = equivariance(model.encode, lookup, decode, tiles, args.latent_scale, schedule)
    out = {"benchmark": "latent_equivariance", "vqgan": str(args.vqgan), "data": str(args.data), "n": n,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()},
           "views": rows,
           "mean": {"rel_rms": float(np.mean([r["rel_rms"] for r in rows])),
                    "codes_same": float(np.mean([r["codes_same"] for r in rows])),
                    "decode_rms": float(np.mean([r["decode_rms"] for r in rows])),
                    "decode_rms_direct": float(np.mean([r["decode_rms_direct"] for r in rows]))}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
