"""Crops vs whole tiles for VQ-GAN training (issue 8): does training on random 48-px crops of the 96-px tiles
reconstruct whole 96-px tiles as well as training on whole tiles, per sample and per unit of compute?

Three arms start from the same seeded random init of the shipped architecture (`train_speed.VQGAN_CONFIG`), with
the same seed and the same tile order, and train for the same number of steps through the VQ-GAN trainer's own
step (`histosynth.autoencoder.train`: dihedral augmentation, `random_crop_pair`, bf16 autocast, channels_last, the
codebook's data-dependent init and dead-code resets, Adam with the lr and betas of configs/pcam96/vqgan.yaml),
without the GAN (L1 + MS-SSIM + codebook terms, with that config's weights):

    crops       48-px random crops, batch 32: the adopted setting
    whole       whole 96-px tiles, batch 32: the same number of samples (4x the pixels per step)
    whole-b8    whole 96-px tiles, batch 8: the same pixels per step (about the same compute)

Validation: `--val-tiles` tiles of the training folder held out by the seed (no arm trains on them; not
pcam/valid, on which nothing may be tuned), whole 96-px tiles, histosynth's own metrics (L1, PSNR, SSIM,
MS-SSIM, codebook use), at step 0 and after every quarter of the run. Wall and CPU time count training steps
only (data loading included, validation not); with one thread, CPU time is the arm's compute even on a shared
machine. Prints one JSON object (and Markdown tables with --markdown).

    OMP_NUM_THREADS=1 python benchmarks/crop_check.py --out weights/pcam96/eval/crop_check.json --markdown
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from histosynth.autoencoder.train import (  # noqa: E402
    VQGANTrainConfig,
    _codebook_upkeep,
    _setup,
    _train_step,
    evaluate_reconstruction,
    load_train_config,
)
from histosynth.autoencoder.vqgan import VQGANConfig  # noqa: E402
from histosynth.errors import InputError, RunError  # noqa: E402
from histosynth.io import write_json  # noqa: E402
from histosynth.runtime import dist  # noqa: E402
from histosynth.runtime.batches import resumable_batches  # noqa: E402
from histosynth.runtime.tracking import TrainProgress  # noqa: E402
from histosynth.tiles.dataset import open_tiles  # noqa: E402
from train_speed import VQGAN_CONFIG, machine  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "pcam96" / "vqgan.yaml"  # loss weights, lr, betas, codebook upkeep, augmentation
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pcam" / "train"
# A tiny network for the test (--tiny): the same code paths at a fraction of the cost.
TINY_CONFIG = VQGANConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=3,
                          codebook_size=32, codebook_dim=3, norm_groups=4)
METRICS = ("l1", "psnr", "ssim", "ms_ssim", "perplexity", "codebook_usage")


@dataclass(frozen=True)
class Arm:
    """One training setting of the comparison."""

    name: str
    description: str
    batch: int
    crop: int | None  # px; None: whole tiles


def make_arms(tile: int, crop: int, batch: int) -> list[Arm]:
    """Crops at `batch`; whole tiles at `batch` (equal samples); whole tiles at equal pixels per step."""
    pixels = batch * crop * crop
    if pixels % (tile * tile):
        raise InputError(f"--batch {batch} x {crop}^2 px is not a whole number of {tile}-px tiles; "
                         f"use a batch that is a multiple of {tile * tile // math.gcd(tile * tile, crop * crop)}")
    equal = pixels // (tile * tile)
    return [
        Arm("crops", f"{crop}-px random crops, batch {batch} (adopted)", batch, crop),
        Arm("whole", f"whole {tile}-px tiles, batch {batch} (equal samples)", batch, None),
        Arm(f"whole-b{equal}", f"whole {tile}-px tiles, batch {equal} (equal pixels per step)", equal, None),
    ]


def eval_steps(steps: int, points: int = 4) -> list[int]:
    """Step 0 and the end of every 1/`points` of the run."""
    return sorted({0, *(round(steps * k / points) for k in range(1, points + 1))})


def arm_config(base: VQGANTrainConfig, arm: Arm, *, data: Path, n_tiles: int, val_tiles: int, steps: int,
               model: VQGANConfig, seed: int) -> VQGANTrainConfig:
    """`base` (configs/pcam96/vqgan.yaml) set up for `arm`: its batch and crop, no GAN, bf16 + channels_last."""
    config = replace(
        base, data=data, val_data=None, val_fraction=val_tiles / n_tiles, val_max_tiles=val_tiles, model=model,
        batch_size=arm.batch, crop_size=arm.crop, steps=steps,
        disc_start=steps,  # the discriminator never starts: L1 + MS-SSIM + codebook terms only
        autocast="bf16", channels_last=True,  # as the shipped configs train
        ema_decay=0.0, num_workers=0,  # tiles decode in this process: its time is the arm's cost
        seed=seed, device="cpu", threads=0)
    config.validate("crop_check")
    return config


def _checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the weights: equal across arms at step 0 shows they start from the same init."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def _val_fingerprint(val_set: Any) -> str:
    """sha1 of the held-out tiles' file names (all arms must validate on the same tiles)."""
    files = val_set.dataset.files
    names = "\n".join(files[i].name for i in val_set.indices)
    return hashlib.sha1(names.encode()).hexdigest()


def run_arm(config: VQGANTrainConfig, arm: Arm, points: list[int], show_progress: bool) -> dict[str, Any]:
    """Train one arm and validate it at `points`; the curve, the wall time and the fingerprints."""
    info = dist.init_distributed(config.device)
    with tempfile.TemporaryDirectory(prefix="crop_check_") as tmp:
        run = _setup(config, Path(tmp), info, resume=False, show_progress=False)
        init_checksum = _checksum(run.model)
        curve: list[dict[str, float]] = []
        eval_seconds = eval_cpu_seconds = 0.0

        def validate() -> None:
            nonlocal eval_seconds, eval_cpu_seconds
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = evaluate_reconstruction(run.model, run.val_set, run.device, batch_size=32)
            eval_seconds += time.perf_counter() - t0
            eval_cpu_seconds += time.process_time() - c0
            step = run.state.step
            curve.append({"step": step, "samples": step * arm.batch, **{k: metrics[k] for k in METRICS}})

        if 0 in points:
            validate()
        train_seconds = train_cpu_seconds = 0.0
        stream = resumable_batches(run.loader, run.sampler, 0, 0)
        with TrainProgress(config.steps, 0, f"{arm.name:>8s}", enabled=show_progress) as bar:
            while run.state.step < config.steps:
                # The body of `autoencoder.train._train` without its logging and checkpoints.
                t0, c0 = time.perf_counter(), time.process_time()
                epoch, position, images = next(stream)
                logs, images = _train_step(run, images)
                run.state.step += 1
                run.state.epoch, run.state.epoch_position = epoch, position
                _codebook_upkeep(run, images, logs)
                train_seconds += time.perf_counter() - t0
                train_cpu_seconds += time.process_time() - c0
                bar.update(run.state.step, loss=float(logs["loss"]), l1=float(logs["l1"]))
                if run.state.step in points:
                    validate()
        return {
            **asdict(arm), "steps": config.steps, "samples": config.steps * arm.batch,
            "pixels_per_step": arm.batch * (arm.crop or config.tile_size) ** 2,
            "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(train_cpu_seconds, 2),  # this process's CPU time: less noisy on a busy box
            "seconds_per_step": round(train_seconds / config.steps, 3),
            "samples_per_s": round(config.steps * arm.batch / max(train_seconds, 1e-9), 3),
            "eval_seconds": round(eval_seconds, 2), "eval_cpu_seconds": round(eval_cpu_seconds, 2), "curve": curve,
            "init_checksum": init_checksum, "val_tiles_sha1": _val_fingerprint(run.val_set),
            "train_tiles": len(run.train_set), "val_tiles": len(run.val_set),
        }


def compare(arms: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Final metrics of the crops arm minus each whole-tile arm's (positive L1 = crops worse; positive PSNR,
    SSIM, MS-SSIM = crops better), and the ratio of training times."""
    crops, others = arms[0], arms[1:]
    out = {}
    for other in others:
        a, b = crops["curve"][-1], other["curve"][-1]
        out[f"crops_minus_{other['name']}"] = {
            **{k: a[k] - b[k] for k in ("l1", "psnr", "ssim", "ms_ssim")},
            "train_seconds_ratio": crops["train_seconds"] / max(other["train_seconds"], 1e-9),
            "train_cpu_seconds_ratio": crops["train_cpu_seconds"] / max(other["train_cpu_seconds"], 1e-9)}
    return out


def run_check(*, data: Path, steps: int, val_tiles: int, seed: int, model: VQGANConfig, crop: int, batch: int,
              show_progress: bool = True) -> dict[str, Any]:
    """The three arms on `data`; the JSON-ready result."""
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if val_tiles < 1:
        raise InputError(f"--val-tiles must be at least 1, got {val_tiles}")
    cpu_started = time.process_time()
    base = load_train_config(BASE_CONFIG)
    tiles = open_tiles(data, base.tile_size, base.size_policy, show_progress=show_progress)
    n = len(tiles)
    if val_tiles >= n:
        raise InputError(f"--val-tiles {val_tiles}: {data} has only {n} tiles; hold out fewer")
    if crop % model.downsample_factor or not 0 < crop < base.tile_size:
        raise InputError(f"--crop {crop}: must be a multiple of {model.downsample_factor} below the "
                         f"{base.tile_size}-px tile size")
    arms = make_arms(base.tile_size, crop, batch)
    points = eval_steps(steps)
    results = []
    for arm in arms:
        config = arm_config(base, arm, data=data, n_tiles=n, val_tiles=val_tiles, steps=steps, model=model,
                            seed=seed)
        results.append(run_arm(config, arm, points, show_progress))
        final = results[-1]["curve"][-1]
        print(f"{arm.name}: {results[-1]['train_seconds']:.0f} s, step {final['step']}: L1 {final['l1']:.4f} "
              f"PSNR {final['psnr']:.2f} SSIM {final['ssim']:.4f} MS-SSIM {final['ms_ssim']:.4f}",
              file=sys.stderr, flush=True)
    if len({r["val_tiles_sha1"] for r in results}) != 1 or len({r["init_checksum"] for r in results}) != 1:
        raise RunError("the arms did not share their held-out tiles and initial weights; the check is void")
    return {
        "machine": machine(), "threads": torch.get_num_threads(), "data": str(data), "tiles": n,
        "val_tiles": val_tiles, "steps": steps, "seed": seed, "eval_steps": points,
        "base_config": str(BASE_CONFIG.relative_to(ROOT)), "model": asdict(model),
        "model_is_shipped": model == base.model,  # train_speed.VQGAN_CONFIG is the base config's architecture
        "loss": {k: getattr(base.loss, k) for k in ("l1_weight", "ms_ssim_weight", "codebook_weight",
                                                    "commitment_weight")},
        "lr": base.lr, "betas": list(base.betas), "autocast": "bf16", "channels_last": True, "gan": False,
        "arms": results, "comparison": compare(results),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),  # the whole check, data scans included
    }


def markdown(result: dict[str, Any]) -> str:
    """A summary table (final validation) and the curves."""
    lines = ["| arm | batch | samples | px/step | train CPU s | train wall s | L1 | PSNR | SSIM | MS-SSIM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["arms"]:
        f = r["curve"][-1]
        lines.append(f"| {r['description']} | {r['batch']} | {r['samples']} | {r['pixels_per_step']} | "
                     f"{r['train_cpu_seconds']:.0f} | {r['train_seconds']:.0f} | {f['l1']:.4f} | {f['psnr']:.2f} | "
                     f"{f['ssim']:.4f} | {f['ms_ssim']:.4f} |")
    lines += ["", "| arm | step | samples | L1 | PSNR | SSIM | MS-SSIM |", "|---|---|---|---|---|---|---|"]
    for r in result["arms"]:
        for p in r["curve"]:
            lines.append(f"| {r['name']} | {p['step']} | {p['samples']} | {p['l1']:.4f} | {p['psnr']:.2f} | "
                         f"{p['ssim']:.4f} | {p['ms_ssim']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of 96-px training tiles")
    parser.add_argument("--steps", type=int, default=128,
                        help="optimizer steps per arm (128: about 13 CPU-minutes in all on one Sapphire Rapids core)")
    parser.add_argument("--val-tiles", type=int, default=256, help="held-out tiles of --data, validated at 96 px")
    parser.add_argument("--batch", type=int, default=32, help="batch of the crops arm and of the equal-samples arm")
    parser.add_argument("--crop", type=int, default=48, help="crop size of the crops arm (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="a tiny network instead of the shipped one (tests)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables to stderr")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = run_check(data=args.data, steps=args.steps, val_tiles=args.val_tiles, seed=args.seed,
                           model=TINY_CONFIG if args.tiny else VQGAN_CONFIG, crop=args.crop, batch=args.batch,
                           show_progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if args.markdown:
        print(markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
