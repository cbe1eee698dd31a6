"""Pack training data into an ignored folder of the checkout, for the GPU round (the device sees only the checkout).

    python configs/gpu/pack.py gpu-pack [--max-mib 30]              # a seeded subset of the training tiles
    python configs/gpu/pack.py gpu-pack --latents runs/pcam96/latents-v2   # a whole latent cache, 8 bits

The device machine sees only the working tree (at most 64 MiB in all), not `../shared`. The folder must be ignored
by git (`/gpu-pack/` is in .gitignore) and named in the device call's `carry`:

    run(command="python3 configs/gpu/round.py /tmp/round --keep $OUT --data gpu-pack ...", carry=["gpu-pack"])
    run(command="python3 configs/gpu/round.py /tmp/round --keep $OUT --latents-pack gpu-pack ...", carry=["gpu-pack"])

Tiles: taken in a seeded random order until `--max-mib` is reached (the classes of the committed review stay in
proportion by the random order itself); at ~7 KB a tile only a few thousand fit. Latents: all 19,171 latents of
a cache fit once quantised per channel to 8 bits over their min..max (float16 is 88 MB, 8 bits 44 MB); the
rounding error is printed (about 1% of each channel's std, far below the diffusion noise of all but the last
sampling steps). `configs/gpu/round.py --latents-pack` turns it back into a float16 cache and trains the cLDM on it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PACKED = "latents-u8.npy"
QUANT = "quant.json"


def pack_tiles(source: Path, out: Path, max_mib: float, seed: int) -> None:
    """Copy tiles of `source` in a seeded random order until `max_mib` is reached."""
    files = sorted(source.glob("*.jpg"))
    if not files:
        raise SystemExit(f"--source: no .jpg tiles in {source}")
    random.Random(seed).shuffle(files)
    out.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_mib * 2**20:
            break
        shutil.copyfile(p, out / p.name)
        total += size
        n += 1
    print(f"{n} tiles, {total / 2**20:.1f} MiB in {out}")


def pack_latents(cache: Path, out: Path) -> None:
    """Write the cache's latents as uint8 (per-channel min..max), with its index.csv and latents.json."""
    latents = np.load(cache / "latents.npy", mmap_mode="r", allow_pickle=False)
    n, c = latents.shape[:2]
    lo = np.empty(c, np.float32)
    hi = np.empty(c, np.float32)
    for ch in range(c):
        v = np.asarray(latents[:, ch], np.float32)
        lo[ch], hi[ch] = v.min(), v.max()
    step = np.maximum(hi - lo, 1e-6) / 255.0
    out.mkdir(parents=True, exist_ok=True)
    packed = np.lib.format.open_memmap(out / PACKED, mode="w+", dtype=np.uint8, shape=latents.shape)
    err2 = np.zeros(c)
    for start in range(0, n, 2048):
        x = np.asarray(latents[start:start + 2048], np.float32)
        q = np.rint((x - lo[None, :, None, None]) / step[None, :, None, None]).clip(0, 255).astype(np.uint8)
        packed[start:start + 2048] = q
        back = q * step[None, :, None, None] + lo[None, :, None, None]
        err2 += ((back - x) ** 2).sum(axis=(0, 2, 3))
    packed.flush()
    rms = np.sqrt(err2 / (n * latents.shape[2] * latents.shape[3]))
    meta = json.loads((cache / "latents.json").read_text(encoding="utf-8"))
    std = np.asarray(meta["channel_std"])
    (out / QUANT).write_text(json.dumps({"lo": lo.tolist(), "step": step.tolist(), "rms_error": rms.tolist()},
                                        indent=1), encoding="utf-8")
    for name in ("latents.json", "index.csv"):
        shutil.copyfile(cache / name, out / name)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"{n} latents, {size:.1f} MiB in {out}; rounding error (rms / channel std): "
          + ", ".join(f"{e:.2%}" for e in rms / std))


def unpack_latents(pack: Path, out: Path) -> Path:
    """The float16 latent cache of a pack (`histosynth.autoencoder.latents.LatentCache` reads it)."""
    q = np.load(pack / PACKED, allow_pickle=False)
    quant = json.loads((pack / QUANT).read_text(encoding="utf-8"))
    lo = np.asarray(quant["lo"], np.float32)[None, :, None, None]
    step = np.asarray(quant["step"], np.float32)[None, :, None, None]
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", (q * step + lo).astype(np.float16))
    for name in ("latents.json", "index.csv"):
        shutil.copyfile(pack / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "pcam" / "train")
    ap.add_argument("--max-mib", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latents", type=Path, default=None, help="a latent cache folder to pack instead of tiles")
    args = ap.parse_args()
    if args.latents is not None:
        if not (args.latents / "latents.npy").is_file():
            raise SystemExit(f"--latents: {args.latents} is not a latent cache (no latents.npy)")
        pack_latents(args.latents, args.out)
    else:
        pack_tiles(args.source, args.out, args.max_mib, args.seed)


if __name__ == "__main__":
    main()
