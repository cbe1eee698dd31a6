"""One training round on a lent GPU (issue 8.6): resume both networks from the committed checkpoints, stop on time.

    python configs/gpu/round.py OUT [--minutes 9] [--data DIR] [--device cuda] [--vqgan decoder|all|skip]
        [--vqgan-init CKPT] [--vqgan-config YAML] [--unet-init CKPT|none]

What it does, each stage with its own share of the time (`time_limit_s`: a stage stops, checkpoints and exports
wherever its step count stands):

1. **VQ-GAN** from `--vqgan-init` (default `weights/pcam96/training/vqgan.safetensors`, the shipped round-4
   VQ-GAN after its GAN phase; its reconstruction-phase export is `weights/pcam96/next/vqgan-v2.safetensors`), with
   the losses and schedule of `--vqgan-config` (default `configs/pcam96/vqgan-v2-decoder.yaml`, the GAN phase;
   `configs/pcam96/vqgan-v2.yaml` continues the reconstruction phase), GPU sizes and the checkpoint's own
   architecture: `--vqgan decoder` sharpens the decoder
   only (the latent space, hence the shipped UNet, stays valid); `--vqgan all` trains encoder and decoder on, which
   moves the latent space: the cLDM then re-adapts below.
2. **Encode** the tiles with it (a fresh latent cache).
3. **cLDM** from `--unet-init` (default the shipped `weights/pcam96/unet.safetensors`; weights whose shapes differ,
   e.g. the input and output convolutions when the VQ-GAN has another number of latent channels, start fresh;
   `none`: all fresh) on the reviewed classes of
   `weights/pcam96/training/label_map.yaml` (per-tile classes from its `label_map_tiles.csv`, matched by file name,
   so a subset of the tiles works), bf16, GPU batch size.
4. Copies the small EMA exports (fp16) and logs to `OUT/`: at most 8 files, as the device tool returns them.
   `histosynth export` then makes the bundle here, on the CPU.

Data: `../shared/data/pcam/train` when it is there; the device machine has no `../shared`, and at most 64 MiB of
the working tree travels, so `configs/gpu/pack.py DIR` first copies a seeded subset of the training tiles into an
ignored folder of the checkout that is passed with `carry` and `--data`. Run it on the CPU with `--device cpu
--minutes 1` to check it end to end (it then trains a few steps).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runs from a bare copy of the checkout (no pip install on the device machine)

from histosynth.autoencoder.latents import encode_tiles  # noqa: E402
from histosynth.autoencoder.train import load_train_config, train_vqgan  # noqa: E402
from histosynth.autoencoder.vqgan import VQGANConfig  # noqa: E402
from histosynth.configio import from_dict, load  # noqa: E402
from histosynth.diffusion.train import LDMTrainConfig, train_cldm  # noqa: E402
from histosynth.runtime.weights import read_checkpoint_metadata  # noqa: E402

SHIPPED = ROOT / "weights" / "pcam96"
TRAINING = SHIPPED / "training"


def _labels_for(cache_dir: Path, out_csv: Path) -> int:
    """Per-tile classes of the committed review, for the tiles of `cache_dir`, matched by file name."""
    by_name = {}
    with open(TRAINING / "label_map_tiles.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_name[Path(row["tile"]).name] = (row["class_id"], row["class_name"])
    n = 0
    with open(cache_dir / "index.csv", newline="", encoding="utf-8") as f, \
            open(out_csv, "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["tile", "class_id", "class_name"])
        seen = set()
        for row in csv.DictReader(f):
            if row["path"] in seen:
                continue
            seen.add(row["path"])
            hit = by_name.get(Path(row["path"]).name)
            if hit is not None:
                w.writerow([row["path"], *hit])
                n += 1
    return n


def _vqgan_config(path: Path) -> VQGANConfig:
    """The architecture stored beside a VQ-GAN export."""
    return from_dict(VQGANConfig, read_checkpoint_metadata(path)[0], f"{path}:config")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for checkpoints, logs and the exports")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget for the whole round")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pcam" / "train")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vqgan", choices=["decoder", "all", "skip"], default="decoder")
    ap.add_argument("--vqgan-share", type=float, default=0.4, help="share of the time for the VQ-GAN")
    ap.add_argument("--vqgan-init", type=Path, default=TRAINING / "vqgan.safetensors",
                    help="VQ-GAN export to continue (its architecture is used)")
    ap.add_argument("--vqgan-config", type=Path, default=ROOT / "configs" / "pcam96" / "vqgan-v2-decoder.yaml",
                    help="training config whose losses and schedule the VQ-GAN stage uses")
    ap.add_argument("--unet-init", default=str(SHIPPED / "unet.safetensors"),
                    help="UNet export to continue (shape-matching weights are copied), or 'none'")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"--data: {args.data} is not a folder (on the device machine run configs/gpu/pack.py first and "
                 "carry its folder)")
    for path in (args.vqgan_init, args.vqgan_config, None if args.unet_init == "none" else Path(args.unet_init)):
        if path is not None and not path.is_file():
            sys.exit(f"{path}: no such file")
    start = time.monotonic()
    budget = args.minutes * 60
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")

    vqgan_path = args.vqgan_init
    if args.vqgan != "skip":
        cfg = load_train_config(args.vqgan_config)
        # The architecture is the checkpoint's (round 3 grew the decoder, round 4 widened it), not the config's.
        cfg = replace(cfg, model=_vqgan_config(vqgan_path), data=args.data, val_data=None, val_fraction=0.02,
                      train_parts=args.vqgan, init_from=vqgan_path, device=args.device, threads=0,
                      batch_size=256 if gpu else 8, crop_size=None if gpu else 48,
                      num_workers=8 if gpu else 0, steps=10**6, val_every=500, sample_every=500, ckpt_every=250,
                      time_limit_s=max(budget * args.vqgan_share, 10.0))
        cfg.validate("vqgan_config")
        result = train_vqgan(cfg, out / "vqgan", show_progress=False)
        vqgan_path = result.export_path
        print(f"vqgan: step {result.step}, {result.tiles_per_second:.0f} tiles/s, val {result.val_metrics}",
              flush=True)

    cache = out / "latents"
    if cache.exists():
        shutil.rmtree(cache)  # made with another VQ-GAN in an earlier try
    encode_tiles(vqgan_path, args.data, cache, batch_size=512 if gpu else 64, device=args.device,
                 show_progress=False)
    labels = out / "label_map_tiles.csv"
    n = _labels_for(cache, labels)
    print(f"encoded; {n} tiles have a reviewed class", flush=True)

    cfg = load(LDMTrainConfig, ROOT / "configs" / "pcam96" / "cldm-labels.yaml", root="cldm")
    left = budget - (time.monotonic() - start) - 60  # a minute for the sample check and the copies
    channels = _vqgan_config(vqgan_path).latent_channels
    cfg = replace(cfg, latents=cache, labels=labels, label_map=TRAINING / "label_map.yaml",
                  model=replace(cfg.model, in_channels=channels, out_channels=channels),
                  init_from=None if args.unet_init == "none" else Path(args.unet_init), vqgan=vqgan_path,
                  device=args.device,
                  batch_size=512 if gpu else 32, lr=4e-4 if gpu else cfg.lr, steps=10**6, checkpoint_every=1000,
                  keep_checkpoints=2, time_limit_s=max(left, 10.0))
    cfg.validate("cldm")
    result = train_cldm(cfg, out / "cldm", progress=False)
    print(f"cldm: step {result.steps}, loss {result.final_loss:.4g}, check: {(result.verdict or {}).get('level')}",
          flush=True)

    keep = out / "keep"
    keep.mkdir(exist_ok=True)
    for src, name in ((vqgan_path, "vqgan.safetensors"), (result.unet, "unet.safetensors"),
                      (out / "cldm" / "metrics.jsonl", "cldm-metrics.jsonl"),
                      (out / "vqgan" / "metrics.jsonl", "vqgan-metrics.jsonl"),
                      (out / "cldm" / "verdict.json", "verdict.json")):
        if Path(src).is_file():
            shutil.copyfile(src, keep / name)
    print(f"done in {(time.monotonic() - start) / 60:.1f} min; keep: {sorted(p.name for p in keep.iterdir())}")


if __name__ == "__main__":
    main()
