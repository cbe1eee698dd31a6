"""One training round on a lent GPU (issue 8.6): resume the networks from the committed checkpoints, stop on time.

    python configs/gpu/round.py WORK [--keep DIR] [--minutes 9] [--data DIR | --latents-pack DIR] [--device cuda]
        [--vqgan decoder|all|skip] [--vqgan-init CKPT] [--vqgan-config YAML] [--vqgan-disc-init CKPT|auto|none]
        [--unet-init CKPT|none]
        [--cldm-config YAML ...]

What it does, each stage with its own share of the time (`time_limit_s`: a stage stops, checkpoints and exports
wherever its step count stands):

1. **VQ-GAN** from `--vqgan-init` (default `weights/pcam96/training/vqgan.safetensors`, the shipped round-4
   VQ-GAN after its GAN phase; its reconstruction-phase export is `weights/pcam96/next/vqgan-v2.safetensors`), with
   the losses and schedule of `--vqgan-config` (default `configs/pcam96/vqgan-v2-decoder.yaml`, the GAN phase;
   `configs/pcam96/vqgan-v2.yaml` continues the reconstruction phase), GPU sizes and the checkpoint's own
   architecture: `--vqgan decoder` sharpens the decoder only (the latent space, hence the shipped UNet, stays
   valid); `--vqgan all` trains encoder and decoder on, which moves the latent space: the cLDM then re-adapts below.
   The decoder's GAN phase goes on with the committed discriminator (`--vqgan-disc-init`, default
   `weights/pcam96/training/discriminator.safetensors` when there is one) and never takes reconstruction-only steps
   while a discriminator warms up (`warmup_freezes_autoencoder`: round 5 measured what those undo).
2. **Encode** the tiles with it (a fresh latent cache).
3. **cLDM**, one run per `--cldm-config` (default `configs/pcam96/cldm-v2.yaml`, the shipped UNet continued); with
   several they train side by side, one process each, on the one GPU (a small UNet leaves most of an H100/H200
   idle, so two or three runs cost little more than one). Each takes its architecture and `init_from` from its
   config (`--unet-init` overrides the first one's: weights whose shapes differ start fresh; `none`: all fresh),
   trains on the reviewed classes of `weights/pcam96/training/label_map.yaml` (per-tile classes from its
   `label_map_tiles.csv`, matched by file name, so a subset of the tiles works), bf16, GPU batch size.
4. Copies the small EMA exports (and the VQ-GAN's discriminator.safetensors) and one archive of the logs and
   sample grids to `--keep` (default WORK/keep): at most 8 files, as the device tool returns them. `histosynth
   export` then makes the bundle here, on the CPU.

Data: the device machine has no `../shared`, and at most 64 MiB of the working tree travels. Either
`configs/gpu/pack.py DIR` copies a seeded subset of the training tiles (a few thousand) into an ignored folder that
is passed with `carry` and `--data`, or `configs/gpu/pack.py DIR --latents CACHE` packs a whole latent cache in
8 bits (44 MB for the 19,171 PCam tiles) for `--latents-pack DIR`: the VQ-GAN and encode stages are then skipped
and the cLDM runs see every tile. Run it on the CPU with `--device cpu --minutes 2` to check it end to end (it
then trains a few steps).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import shutil
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runs from a bare copy of the checkout (no pip install on the device machine)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from histosynth.autoencoder.latents import encode_tiles  # noqa: E402
from histosynth.autoencoder.train import DISC_EXPORT_NAME, load_train_config, train_vqgan  # noqa: E402
from histosynth.autoencoder.vqgan import VQGANConfig  # noqa: E402
from histosynth.configio import from_dict, load  # noqa: E402
from histosynth.diffusion.train import LDMTrainConfig, train_cldm  # noqa: E402
from histosynth.runtime.weights import load_checkpoint, read_checkpoint_metadata, save_export  # noqa: E402
from pack import unpack_latents  # noqa: E402

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


def _cldm_stage(name: str, config_path: Path, cache: Path, labels: Path, vqgan: Path, init: str | None,
                device: str, deadline: float, work: Path) -> None:
    """One cLDM run (its own process), stopped at wall-clock time `deadline`; failures are printed, not raised."""
    import torch

    try:
        gpu = device.startswith("cuda")
        if gpu:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cfg = load(LDMTrainConfig, config_path, root="cldm")
        channels = _vqgan_config(vqgan).latent_channels
        init_from = cfg.init_from if init is None else (None if init == "none" else Path(init))
        if init_from is not None and not Path(init_from).is_absolute():
            init_from = ROOT / init_from
        cfg = replace(cfg, latents=cache, labels=labels, label_map=TRAINING / "label_map.yaml",
                      model=replace(cfg.model, in_channels=channels, out_channels=channels), init_from=init_from,
                      vqgan=vqgan, device=device, threads=4 if gpu else 1,
                      batch_size=512 if gpu else 8, lr=4e-4 if gpu else cfg.lr, steps=10**7,
                      checkpoint_every=2000 if gpu else 20, keep_checkpoints=1, log_every=50 if gpu else 5,
                      check_samples=0, time_limit_s=max(deadline - time.time(), 10.0))
        cfg.validate(name)
        result = train_cldm(cfg, work / name, progress=False)
        print(f"{name}: step {result.steps}, samples {result.steps * cfg.batch_size}, loss {result.final_loss:.4g}",
              flush=True)
    except BaseException:  # noqa: BLE001 - the other runs go on; the log says what broke
        print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)


def _keep(keep: Path, work: Path, names: list[str], vqgan_path: Path, vqgan_trained: bool) -> None:
    """The exports and one archive of logs and the newest sample grids: at most 8 files for the device tool."""
    keep.mkdir(parents=True, exist_ok=True)
    if vqgan_trained and vqgan_path.is_file():
        shutil.copyfile(vqgan_path, keep / "vqgan.safetensors")
        if (vqgan_path.parent / DISC_EXPORT_NAME).is_file():  # the next round's GAN phase goes on with it
            shutil.copyfile(vqgan_path.parent / DISC_EXPORT_NAME, keep / DISC_EXPORT_NAME)
    for name in names:
        export = work / name / "unet.safetensors"
        if export.is_file():
            # fp16 (a 7 M UNet is 29 MB in fp32; the device tool returns files of at most 16 MiB)
            state, config, extra = load_checkpoint(export)
            save_export(state, keep / f"{name}-unet.safetensors", config, extra, dtype="float16")
    with tarfile.open(keep / "logs.tar.gz", "w:gz") as tar:
        for run in [*names, "vqgan"]:
            d = work / run
            for f in ("metrics.jsonl", "train.log", "config.yaml", "verdict.json"):
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"{run}/{f}")
            grids = sorted((d / "samples").glob("*.png")) if (d / "samples").is_dir() else []
            for g in grids[-2:]:
                tar.add(g, arcname=f"{run}/{g.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="folder for checkpoints, logs and the exports")
    ap.add_argument("--keep", type=Path, default=None, help="where the files to bring back go (default WORK/keep)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget for the whole round")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pcam" / "train")
    ap.add_argument("--latents-pack", type=Path, default=None,
                    help="a latent cache packed by configs/gpu/pack.py --latents (skips the VQ-GAN and encoding)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vqgan", choices=["decoder", "all", "skip"], default="decoder")
    ap.add_argument("--vqgan-share", type=float, default=0.4, help="share of the time for the VQ-GAN")
    ap.add_argument("--vqgan-init", type=Path, default=TRAINING / "vqgan.safetensors",
                    help="VQ-GAN export to continue (its architecture is used)")
    ap.add_argument("--vqgan-config", type=Path, default=ROOT / "configs" / "pcam96" / "vqgan-v2-decoder.yaml",
                    help="training config whose losses and schedule the VQ-GAN stage uses")
    ap.add_argument("--vqgan-disc-init", default="auto",
                    help="discriminator.safetensors the decoder's GAN phase goes on with ('auto': the committed "
                         "weights/pcam96/training/discriminator.safetensors if there is one; 'none': a new one)")
    ap.add_argument("--cldm-config", type=Path, action="append", default=None,
                    help="a cLDM training config (repeat to train several side by side); default cldm-v2.yaml")
    ap.add_argument("--unet-init", default=None,
                    help="UNet export the first cLDM continues instead of its config's init_from, or 'none'")
    args = ap.parse_args()
    configs = args.cldm_config or [ROOT / "configs" / "pcam96" / "cldm-v2.yaml"]
    names = [c.stem for c in configs]
    if len(set(names)) != len(names):
        sys.exit(f"--cldm-config: two configs share a name: {names}")
    if args.latents_pack is not None:
        args.vqgan = "skip"
        if not (args.latents_pack / "quant.json").is_file():
            sys.exit(f"--latents-pack: {args.latents_pack} is not a pack of configs/gpu/pack.py --latents")
    elif not args.data.is_dir():
        sys.exit(f"--data: {args.data} is not a folder (on the device machine run configs/gpu/pack.py first and "
                 "carry its folder)")
    unet_init = None if args.unet_init in (None, "none") else Path(args.unet_init)
    disc_init = {"auto": TRAINING / DISC_EXPORT_NAME, "none": None}.get(args.vqgan_disc_init,
                                                                        Path(args.vqgan_disc_init))
    if args.vqgan_disc_init == "auto" and not disc_init.is_file():
        disc_init = None
    for path in (args.vqgan_init, args.vqgan_config, unet_init, disc_init, *configs):
        if path is not None and not path.is_file():
            sys.exit(f"{path}: no such file")
    start = time.monotonic()
    deadline = time.time() + args.minutes * 60
    budget = args.minutes * 60
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or work / "keep"
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
        if args.vqgan == "decoder":
            # Going on from a GAN-phase export: reconstruction-only warm-up steps would undo its sharpening within
            # a few hundred steps (round 5), so only the discriminator steps until it has caught up. With the
            # committed discriminator that is just long enough for its new Adam moments; without, the config's.
            cfg = replace(cfg, warmup_freezes_autoencoder=True, disc_start=0)
            if disc_init is not None:
                cfg = replace(cfg, disc_init_from=disc_init, disc_warmup=50 if gpu else 2, gan_ramp=0)
        cfg.validate("vqgan_config")
        result = train_vqgan(cfg, work / "vqgan", show_progress=False)
        vqgan_path = result.export_path
        print(f"vqgan: step {result.step}, {result.tiles_per_second:.0f} tiles/s, val {result.val_metrics}",
              flush=True)

    cache = work / "latents"
    if cache.exists():
        shutil.rmtree(cache)  # made with another VQ-GAN in an earlier try
    if args.latents_pack is not None:
        unpack_latents(args.latents_pack, cache)
    else:
        encode_tiles(vqgan_path, args.data, cache, batch_size=512 if gpu else 64, device=args.device,
                     show_progress=False)
    labels = work / "label_map_tiles.csv"
    n = _labels_for(cache, labels)
    print(f"latents ready after {time.monotonic() - start:.0f} s; {n} tiles have a reviewed class", flush=True)

    deadline -= 75  # the export, the sample grid and the copies after training
    inits = [args.unet_init] + [None] * (len(configs) - 1)
    stage_args = [(name, cfg_path, cache, labels, vqgan_path, init, args.device, deadline, work)
                  for name, cfg_path, init in zip(names, configs, inits)]
    if len(configs) == 1:
        _cldm_stage(*stage_args[0])
    else:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        procs = [ctx.Process(target=_cldm_stage, args=a, name=a[0]) for a in stage_args]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    _keep(keep, work, names, vqgan_path, args.vqgan != "skip")
    print(f"done in {(time.monotonic() - start) / 60:.1f} min; keep: {sorted(p.name for p in keep.iterdir())}")


if __name__ == "__main__":
    main()
