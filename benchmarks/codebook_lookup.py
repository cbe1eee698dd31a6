"""The VQ-GAN's nearest-code lookup: speed of its two formulations, and what bf16 autocast does to the choice.

    python benchmarks/codebook_lookup.py --vqgan CKPT [--vqgan CKPT ...] [--tiles DIR] [--n 256] [--json OUT]

For each VQ-GAN export, on `--n` real tiles (a seeded subset of `--tiles`, default the PCam training tiles):
- **wrong codes under bf16**: the share of latent vectors for which the (N, K, h, w) 1x1-convolution formulation of
  the distances, run under bf16 autocast (how training chose codes before round 4), picks another code than the
  exact fp32 nearest one (`histosynth.autoencoder.vqgan.nearest_codes`, what inference uses);
- **wrong codes with a bf16 encoder**: the share whose exact nearest code changes when the encoder runs under bf16
  autocast (decoder-only fine-tuning does this to save time) instead of fp32;
- **ms per batch of 8 tiles** of the convolution formulation (fp32; it is what the ONNX export traces) and of
  `nearest_codes` (fp32 blocks of 512 positions as matrix products), one thread, median of `--repeats`.
Prints one JSON object (with the machine); timings on a shared machine are noisy, read the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig, conv_nearest_codes, nearest_codes  # noqa: E402
from histosynth.configio import from_dict  # noqa: E402
from histosynth.evaluate.features import list_images, select_files  # noqa: E402
from histosynth.runtime.weights import load_checkpoint, load_state_dict  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(ckpt: Path, files: list[Path], repeats: int) -> dict:
    """Wrong-code share under bf16 and the two formulations' timings for one VQ-GAN export."""
    loaded = load_checkpoint(ckpt)
    config = from_dict(VQGANConfig, loaded.config, f"{ckpt}:config")
    model = VQGAN(config).eval()
    load_state_dict(model, loaded.state_dict, ckpt)
    tiles = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = torch.cat([model.encode(x[i:i + 32]) for i in range(0, len(x), 32)])
        codebook = model.quantizer.embedding.weight.float()
        exact = nearest_codes(latents, codebook)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = conv_nearest_codes(latents, codebook)
            latents_bf16 = torch.cat([model.encode(x[i:i + 32]) for i in range(0, len(x), 32)]).float()
        bf16_encoder = nearest_codes(latents_bf16, codebook)
        batch = latents[:8]
        conv_ms = _median_ms(lambda: conv_nearest_codes(batch, codebook), repeats)
        blocks_ms = _median_ms(lambda: nearest_codes(batch, codebook), repeats)
    return {"checkpoint": str(ckpt), "codebook": [config.codebook_size, config.codebook_dim], "tiles": len(files),
            "wrong_codes_under_bf16": float((bf16 != exact).float().mean()),
            "wrong_codes_with_bf16_encoder": float((bf16_encoder != exact).float().mean()),
            "codes_used": int(exact.unique().numel()),
            "conv_fp32_ms_per_8_tiles": round(conv_ms, 2), "nearest_codes_ms_per_8_tiles": round(blocks_ms, 2),
            "speedup": round(conv_ms / blocks_ms, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vqgan", type=Path, action="append", required=True, help="VQ-GAN export (repeatable)")
    ap.add_argument("--tiles", type=Path, default=ROOT.parent / "shared" / "data" / "pcam" / "train")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = select_files(list_images(args.tiles), args.n, args.seed)
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread",
           "rows": [measure(p, files, args.repeats) for p in args.vqgan]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
