"""Training throughput on this machine: tiles/s of VQ-GAN and UNet training steps under the options that matter on
a CPU (fp32 vs bf16 autocast, channels_last, torch.compile, random crops, decoder-only fine-tuning), and threads vs
processes. Prints one JSON object (and a Markdown table with --markdown).

    python benchmarks/train_speed.py                     # every VQ-GAN and UNet setting, 1 thread, in one run
    python benchmarks/train_speed.py --compile           # also torch.compile (minutes of compilation per setting)
    python benchmarks/train_speed.py --parallel          # also 1 process x 2 threads vs 2 processes x 1 thread

Each setting runs `--warmup` untimed steps, then `--steps` timed ones; the median step time is reported. The networks
are the shipped model's architectures (configs/pcam96) and round 4's VQ-GAN (configs/pcam96/vqgan-v2.yaml), with
random weights: speed does not depend on the weights.
A step is what the training loops do: forward, loss, backward, optimizer step (and for the VQ-GAN, from `disc_start`,
the discriminator's step too). Timings on a shared machine are noisy: read the ratios to the first (baseline) row,
which is the configuration that trained the stage-1 weights (96-px tiles, fp32, batch 8 per process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from histosynth.autoencoder.losses import DiscriminatorConfig, VQGANLoss, VQGANLossConfig
from histosynth.autoencoder.train import Autocast, random_crop_pair
from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig

# The shipped model's architectures (configs/pcam96/vqgan.yaml, ldm.yaml).
VQGAN_CONFIG = VQGANConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=3,
                           codebook_size=1024, codebook_dim=3, norm_groups=8, usage_decay=0.95)
# Round 4's VQ-GAN (configs/pcam96/vqgan-v2.yaml): wider, 4 latent channels, 8,192 codes.
VQGAN_V2_CONFIG = VQGANConfig(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                              codebook_size=8192, codebook_dim=4, norm_groups=8, usage_decay=0.95)
DISC_CONFIG = DiscriminatorConfig(base_channels=32, num_layers=3, norm="group", norm_groups=32)
UNET_CONFIG = UNetConfig(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                         num_heads=4, norm_groups=16, num_classes=4)


@dataclass(frozen=True)
class VQSetting:
    name: str
    batch: int = 8
    crop: int | None = None  # px; None: whole 96-px tiles
    bf16: bool = False
    channels_last: bool = False
    decoder_only: bool = False  # encoder + codebook frozen (no encoder backward)
    gan: bool = True  # discriminator step + GAN/feature-matching terms
    compile: bool = False
    round4: bool = False  # round 4's architecture (VQGAN_V2_CONFIG) instead of the shipped one


@dataclass(frozen=True)
class UNetSetting:
    name: str
    batch: int = 32
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def _median_time(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vqgan_step(setting: VQSetting, tile: int = 96) -> Callable[[], None]:
    """One VQ-GAN training step as `autoencoder.train` runs it under `setting`."""
    torch.manual_seed(0)
    arch = VQGAN_V2_CONFIG if setting.round4 else VQGAN_CONFIG
    model = VQGAN(arch).train()
    disc = DISC_CONFIG.build(3).train()
    loss_fn = VQGANLoss(VQGANLossConfig(ms_ssim_weight=0.5, lecam_weight=0.1 if setting.gan else 0.0,
                                        discriminator=DISC_CONFIG))
    if setting.decoder_only:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    disc.to(memory_format=fmt)
    net: torch.nn.Module = model.decoder if setting.decoder_only else model
    if setting.compile:
        net = torch.compile(net)
    run = Autocast(net, setting.bf16, "cpu")
    run_disc = Autocast(disc, setting.bf16, "cpu")
    opt_g = torch.optim.Adam(model.decoder.parameters() if setting.decoder_only else model.parameters(), lr=1e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
    images_full = torch.rand(setting.batch, 3, tile, tile) * 2 - 1
    f = arch.downsample_factor

    def step() -> None:
        images = images_full
        if setting.decoder_only:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
                latents = model.encode(images.contiguous(memory_format=fmt))
            quant = model.quantize(latents.float())
            codes = quant.quantized.detach()
            if setting.crop:
                codes, images = random_crop_pair(codes, images, setting.crop, f)
            recon = run(codes.contiguous(memory_format=fmt))
        else:
            if setting.crop:
                _, images = random_crop_pair(images[:, :, ::f, ::f], images, setting.crop, f)
            recon, quant = run(images.contiguous(memory_format=fmt))
        disc.requires_grad_(False)
        g_loss, _ = loss_fn.generator_loss(images, recon, quant, run_disc if setting.gan else None,
                                           model.decoder_last_layer)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        disc.requires_grad_(True)
        if setting.gan:
            d_loss, _ = loss_fn.discriminator_loss(images, recon, run_disc)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

    return step


def unet_step(setting: UNetSetting) -> Callable[[], None]:
    """One latent-diffusion training step (eps loss at random t) under `setting`."""
    torch.manual_seed(0)
    unet = UNet(UNET_CONFIG).train()
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    unet.to(memory_format=fmt)
    net = torch.compile(unet) if setting.compile else unet
    schedule = NoiseSchedule(ScheduleConfig())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x0 = torch.randn(setting.batch, 3, 24, 24)
    y = torch.randint(0, UNET_CONFIG.num_classes, (setting.batch,))

    def step() -> None:
        noise = torch.randn_like(x0)
        t = torch.randint(0, schedule.num_train_steps, (setting.batch,))
        x_t = schedule.add_noise(x0, noise, t).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
            out = net(x_t, t, y)
        loss = (out.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


VQ_SETTINGS = [
    VQSetting("stage 1 (96 px, fp32, b8, no GAN)", gan=False),
    VQSetting("96 px fp32 b8 + GAN"),
    VQSetting("96 px bf16 b8 + GAN", bf16=True),
    VQSetting("96 px bf16 channels_last b8 + GAN", bf16=True, channels_last=True),
    VQSetting("48 px crops fp32 b32 + GAN", batch=32, crop=48),
    VQSetting("48 px crops bf16 channels_last b32 + GAN", batch=32, crop=48, bf16=True, channels_last=True),
    VQSetting("decoder-only 48 px crops bf16 channels_last b32 + GAN (shipped)", batch=32, crop=48, bf16=True,
              channels_last=True, decoder_only=True),
    VQSetting("96 px bf16 channels_last b8, no GAN", bf16=True, channels_last=True, gan=False),
    VQSetting("round 4 architecture: 96 px bf16 channels_last b8, no GAN (round 4)", bf16=True, channels_last=True,
              gan=False, round4=True),
    VQSetting("round 4 architecture: decoder-only 96 px bf16 channels_last b8 + GAN (its next phase)", bf16=True,
              channels_last=True, decoder_only=True, round4=True),
    VQSetting("round 4 architecture: 96 px bf16 b8, no GAN (NCHW)", bf16=True, gan=False, round4=True),
    VQSetting("round 4 architecture: decoder-only 96 px bf16 b8 + GAN (NCHW)", bf16=True, decoder_only=True,
              round4=True),
]
UNET_SETTINGS = [
    UNetSetting("fp32 (stage 2/4 config)"),
    UNetSetting("fp32 channels_last", channels_last=True),
    UNetSetting("bf16 (shipped)", bf16=True),
    UNetSetting("bf16 channels_last", bf16=True, channels_last=True),
]


def run_settings(compile_too: bool, warmup: int, steps: int, only: str | None) -> list[dict]:
    rows = []
    vq = VQ_SETTINGS + ([VQSetting("round 4 architecture: 96 px bf16 channels_last b8, no GAN, compiled",
                                   bf16=True, channels_last=True, gan=False, round4=True, compile=True)]
                        if compile_too else [])
    un = UNET_SETTINGS + ([UNetSetting("bf16 compiled", bf16=True, compile=True)] if compile_too else [])
    if only in (None, "vqgan"):
        for s in vq:
            sec = _median_time(vqgan_step(s), warmup, steps)
            tiles = s.batch / sec
            rows.append({"network": "vqgan", "setting": s.name, "batch": s.batch, "crop": s.crop,
                         "step_s": round(sec, 4), "tiles_per_s": round(tiles, 2)})
            print(f"vqgan  {s.name:70s} {tiles:8.2f} tiles/s", file=sys.stderr, flush=True)
    if only in (None, "unet"):
        for s in un:
            sec = _median_time(unet_step(s), warmup, steps)
            tiles = s.batch / sec
            rows.append({"network": "unet", "setting": s.name, "batch": s.batch, "step_s": round(sec, 4),
                         "tiles_per_s": round(tiles, 2)})
            print(f"unet   {s.name:70s} {tiles:8.2f} tiles/s", file=sys.stderr, flush=True)
    for net in ("vqgan", "unet"):
        base = next((r["tiles_per_s"] for r in rows if r["network"] == net), None)
        for r in rows:
            if r["network"] == net and base:
                r["vs_baseline"] = round(r["tiles_per_s"] / base, 2)
    return rows


def parallel(warmup: int, steps: int) -> dict:
    """Aggregate UNet bf16 tiles/s: one process with 2 threads vs two concurrent processes with 1 thread each."""
    cmd = [sys.executable, __file__, "--only", "unet-bf16", "--warmup", str(warmup), "--steps", str(steps)]
    env1 = {**os.environ, "OMP_NUM_THREADS": "2"}
    one = json.loads(subprocess.run(cmd + ["--threads", "2"], env=env1, capture_output=True, text=True,
                                    check=True).stdout)["rows"][0]["tiles_per_s"]
    env2 = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd + ["--threads", "1"], env=env2, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = sum(json.loads(p.communicate()[0])["rows"][0]["tiles_per_s"] for p in procs)
    return {"one_process_two_threads": one, "two_processes_one_thread": round(two, 2),
            "ratio": round(two / one, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the training configs use 1)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--parallel", action="store_true", help="also 1 process x 2 threads vs 2 processes x 1 thread")
    ap.add_argument("--only", choices=["vqgan", "unet", "unet-bf16"], default=None)
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "unet-bf16":
        sec = _median_time(unet_step(UNetSetting("bf16", bf16=True)), args.warmup, args.steps)
        print(json.dumps({"rows": [{"tiles_per_s": 32 / sec}]}))
        return
    out = {"machine": machine(), "threads": args.threads, "rows": run_settings(args.compile, args.warmup,
                                                                               args.steps, args.only)}
    if args.parallel:
        out["threads_vs_processes"] = parallel(args.warmup, args.steps)
    print(json.dumps(out, indent=2))
    if args.markdown:
        print("| network | setting | tiles/s | x baseline |\n|---|---|---|---|", file=sys.stderr)
        for r in out["rows"]:
            print(f"| {r['network']} | {r['setting']} | {r['tiles_per_s']} | {r.get('vs_baseline', '')} |",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
