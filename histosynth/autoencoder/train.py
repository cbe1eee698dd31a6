"""`histosynth train vqgan`: the first stage, a VQ-GAN (f=4) trained on unlabeled tiles.

One loop for one process and for ``torchrun --nproc_per_node N`` (DDP on the autoencoder and on the
discriminator; rank 0 alone writes files). A run folder holds::

    config.yaml                  the resolved config of the run
    metrics.jsonl                train losses, codebook usage/perplexity, throughput; validation metrics
    checkpoints/step-*.safetensors   resume checkpoints (fp32 weights, optimizers, RNG states), newest kept
    samples/step-*.png           originals (top row) over reconstructions (bottom row) of fixed held-out tiles
    vqgan.safetensors            the export checkpoint (weights only; `histosynth export` and `train encode` read it)

Run again with the same folder to resume from its newest checkpoint; the result is the same as an
uninterrupted run with the same seed (the data order is a function of seed and epoch, and every RNG state
is restored).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Subset

from histosynth.autoencoder.latents import load_latent_bank
from histosynth.autoencoder.losses import ANCHOR_POOL, VQGANLoss, VQGANLossConfig, colour_anchor_loss
from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig, grow_decoder
from histosynth.configio import load, require, to_dict
from histosynth.errors import InputError, RunError
from histosynth.imageops import dihedral_views, encode_image, tile_grid, to_uint8
from histosynth.io import write_bytes, write_text
from histosynth.metrics.ssim import ms_ssim, ms_ssim_scales, psnr, ssim
from histosynth.runtime import dist
from histosynth.runtime.devices import torch_threads
from histosynth.runtime.schedule import LRDecay, lr_factor
from histosynth.runtime.checkpointing import (
    SampleCount,
    TrainState,
    latest_checkpoint,
    load_resume_checkpoint,
    read_resume_header,
    save_resume_checkpoint,
)
from histosynth.runtime.batches import resumable_batches
from histosynth.runtime.ema import EMA, ema_as_module
from histosynth.runtime.seeding import seed_everything
from histosynth.runtime.tracking import MetricsLogger, TrainProgress
from histosynth.runtime.weights import load_checkpoint, load_state_dict, read_checkpoint_metadata, save_export
from histosynth.tiles.dataset import SizePolicy, open_tiles

EXPORT_NAME = "vqgan.safetensors"
DISC_EXPORT_NAME = "discriminator.safetensors"  # a GAN phase's discriminator, for the next round to go on from


@dataclass(frozen=True)
class VQGANTrainConfig:
    """Everything `train_vqgan` needs; loaded from YAML (`load_train_config`). Paths are relative to the cwd."""

    data: Path  # folder of tiles (recursive) or an (N, H, W, 3) uint8 .npy
    tile_size: int = 96  # tiles are served at this size (a multiple of f=4)
    size_policy: SizePolicy = "error"  # tiles of another size: error | crop | resize (see tiles.dataset)
    val_data: Path | None = None  # held-out tiles; None: hold out val_fraction of `data`
    val_fraction: float = 0.02  # share of `data` held out when val_data is None (chosen by seed)
    val_max_tiles: int = 256  # validation uses at most this many held-out tiles (the first ones)
    model: VQGANConfig = VQGANConfig()
    loss: VQGANLossConfig = VQGANLossConfig()
    batch_size: int = 16  # per process
    lr: float = 2e-4  # Adam, autoencoder
    disc_lr: float | None = None  # Adam, discriminator; None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)  # taming's Adam betas for both networks
    grad_clip: float | None = None  # clip the autoencoder's gradient norm; None: no clipping
    lr_warmup: int = 0  # both learning rates rise linearly over the run's first lr_warmup steps: a round that
    # continues committed weights (init_from, disc_init_from) starts its Adam state afresh
    lr_decay: LRDecay = "none"  # from step lr_decay_start, decay both learning rates to min_lr's share at `steps`:
    # a cool-down at the end of a GAN phase that a later round resumes (constant lr until then)
    lr_decay_start: int = 0  # the step the decay starts at (e.g. the step a resumed run stands at)
    min_lr: float = 0.0  # the autoencoder's lr at `steps`; the discriminator's falls in the same proportion
    steps: int = 20000  # optimizer steps in total (a resumed run continues up to this)
    disc_start: int = 5000  # step at which the discriminator starts to train
    disc_warmup: int = 0  # the discriminator trains alone this many steps before the GAN terms reach the
    # autoencoder: a random discriminator's gradients are noise that undoes reconstruction progress
    gan_ramp: int = 0  # then the GAN and feature-matching terms ramp linearly from 0 to full over this many steps
    warmup_freezes_autoencoder: bool = False  # during disc_warmup the autoencoder does not step at all. For a GAN
    # phase continued from a sharpened export with a new discriminator: reconstruction-only steps there undo the
    # sharpening within a few hundred steps (measured, round 5), so the new discriminator meets the export as it is
    augment: bool = True  # random flips / 90-degree rotations of each tile (histology has no orientation)
    crop_size: int | None = None  # train on random crops of this many px (a multiple of f); None: whole tiles.
    # The networks are fully convolutional, so 48-px crops of 96-px tiles train the same weights at about a
    # quarter of the cost per tile (benchmarks/train_speed.py); validation always runs on whole tiles.
    train_parts: Literal["all", "decoder"] = "all"  # "decoder": encoder and codebook frozen (the latent
    # space, hence every diffusion model trained on it, stays valid), only the decoder and discriminator learn
    init_from: Path | None = None  # start from this VQ-GAN export checkpoint (required with train_parts: decoder)
    adapt_latents: Path | None = None  # a latent bank (`histosynth train latent-bank`) of *generated* latents:
    # from disc_start, each step also decodes batch_size of them (no reconstruction target); the discriminator
    # sees them as fakes and the decoder learns to render the diffusion model's latents as tissue. Decoder only
    adapt_weight: float = 1.0  # their GAN term, as a share of the reconstructions' (same adaptive weight)
    adapt_anchor: float = 0.0  # L1 weight between 8-px averages of their decodings and those of the init_from
    # decoder (frozen): the GAN term may sharpen generated tiles but not recolour them (round 9 without it: eosin
    # optical density -7% on reconstructions, -11% on generated tiles). Costs one more no-grad decoder forward
    disc_init_from: Path | None = None  # start the discriminator (and its LeCam anchors) from a run's
    # discriminator.safetensors: a GAN phase goes on in a later round from small committed files instead of a
    # new discriminator. Its Adam state starts afresh: pair it with a short frozen warm-up (see above)
    autocast: Literal["none", "bf16"] = "none"  # bf16 autocast of the forward passes (CPU AMX/AVX512-BF16, CUDA)
    channels_last: bool = False  # NHWC memory layout (pays with bf16 on CPUs with AMX)
    dead_code_every: int = 200  # every M steps re-initialise unused codes from current encoder outputs; 0: never
    dead_code_threshold: float = 0.01  # a code is dead when its usage EMA is below this share of uniform use
    codebook_init_step: int = 20  # at this step every code is re-initialised from encoder outputs; -1: never
    ema_decay: float = 0.0  # EMA of the autoencoder's weights for validation/export; 0: no EMA
    log_every: int = 50  # steps between train-metric records (averaged over the window and the ranks)
    val_every: int = 1000  # steps between validations (and at the end)
    sample_every: int = 1000  # steps between sample grids (and at the end)
    sample_count: int = 8  # tiles per sample grid
    ckpt_every: int = 1000  # steps between resume checkpoints (and at the end)
    keep_checkpoints: int = 3  # newest resume checkpoints kept
    export_dtype: Literal["float16", "float32"] = "float16"  # dtype of vqgan.safetensors
    seed: int = 0  # python/numpy/torch seeds (+ rank offset), data order, validation split
    num_workers: int = 0  # DataLoader worker processes per rank
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    time_limit_s: float | None = None  # stop (validate, checkpoint, export) after this many seconds of training,
    # wherever `steps` stands: a lent GPU or a session ends on time; rerun to continue

    def validate(self, path: str) -> None:
        """Cross-field checks (called by configio)."""
        f = self.model.downsample_factor
        require(self.time_limit_s is None or self.time_limit_s > 0, f"{path}.time_limit_s", "must be > 0 or null")
        require(self.tile_size > 0 and self.tile_size % f == 0, f"{path}.tile_size",
                f"must be a positive multiple of the downsampling factor {f}, got {self.tile_size}")
        require(ms_ssim_scales(self.tile_size, self.tile_size) >= 1 or self.loss.ms_ssim_weight == 0,
                f"{path}.loss.ms_ssim_weight", f"tiles of {self.tile_size} px are too small for MS-SSIM; set 0")
        require(0.0 <= self.val_fraction < 1.0, f"{path}.val_fraction", "must be in [0, 1)")
        require(self.val_data is not None or self.val_fraction > 0, f"{path}.val_fraction",
                "must be > 0 when val_data is not given")
        require(self.val_max_tiles >= 1, f"{path}.val_max_tiles", "must be at least 1")
        require(self.batch_size >= 1, f"{path}.batch_size", "must be at least 1")
        require(self.lr > 0, f"{path}.lr", "must be > 0")
        require(self.disc_lr is None or self.disc_lr > 0, f"{path}.disc_lr", "must be > 0")
        require(all(0 <= b < 1 for b in self.betas), f"{path}.betas", "must be in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, f"{path}.grad_clip", "must be > 0")
        require(self.lr_warmup >= 0, f"{path}.lr_warmup", "must be >= 0")
        require(self.lr_decay_start >= 0, f"{path}.lr_decay_start", "must be >= 0")
        require(0 <= self.min_lr <= self.lr, f"{path}.min_lr", f"must be in [0, lr = {self.lr}]")
        require(self.lr_decay == "none" or self.steps > self.lr_decay_start, f"{path}.steps",
                f"must exceed lr_decay_start ({self.lr_decay_start}) when lr_decay is {self.lr_decay!r}")
        require(self.steps >= 1, f"{path}.steps", "must be at least 1")
        require(self.disc_start >= 0, f"{path}.disc_start", "must be >= 0")
        require(self.crop_size is None or (0 < self.crop_size <= self.tile_size and self.crop_size % f == 0),
                f"{path}.crop_size", f"must be a multiple of {f} in [{f}, tile_size={self.tile_size}], "
                f"or null for whole tiles; got {self.crop_size}")
        require(self.crop_size is None or self.loss.ms_ssim_weight == 0
                or ms_ssim_scales(self.crop_size, self.crop_size) >= 1, f"{path}.loss.ms_ssim_weight",
                f"crops of {self.crop_size} px are too small for MS-SSIM; set 0 or use larger crops")
        require(self.train_parts in ("all", "decoder"), f"{path}.train_parts",
                f"must be 'all' or 'decoder', got {self.train_parts!r}")
        require(self.train_parts == "all" or self.init_from is not None, f"{path}.init_from",
                "required with train_parts: decoder (the frozen encoder and codebook come from it)")
        require(self.autocast in ("none", "bf16"), f"{path}.autocast",
                f"must be 'none' or 'bf16', got {self.autocast!r}")
        require(self.adapt_latents is None or self.train_parts == "decoder", f"{path}.adapt_latents",
                "needs train_parts: decoder (generated latents live in the frozen encoder's latent space)")
        require(self.adapt_weight >= 0, f"{path}.adapt_weight", "must be >= 0")
        require(self.adapt_anchor >= 0, f"{path}.adapt_anchor", "must be >= 0")
        require(self.adapt_anchor == 0 or self.adapt_latents is not None, f"{path}.adapt_anchor",
                "anchors the decodings of adapt_latents; set adapt_latents or leave adapt_anchor at 0")
        require(self.adapt_anchor == 0 or self.tile_size % ANCHOR_POOL == 0
                and (self.crop_size is None or self.crop_size % ANCHOR_POOL == 0), f"{path}.adapt_anchor",
                f"needs tile_size and crop_size that are multiples of {ANCHOR_POOL} px (its averaging window)")
        require(self.disc_warmup >= 0, f"{path}.disc_warmup", "must be >= 0")
        require(self.gan_ramp >= 0, f"{path}.gan_ramp", "must be >= 0")
        require(self.dead_code_every >= 0, f"{path}.dead_code_every", "must be >= 0")
        require(self.dead_code_threshold >= 0, f"{path}.dead_code_threshold", "must be >= 0")
        require(0.0 <= self.ema_decay < 1.0, f"{path}.ema_decay", "must be in [0, 1)")
        for name in ("log_every", "val_every", "sample_every", "ckpt_every", "keep_checkpoints", "sample_count"):
            require(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        require(self.seed >= 0, f"{path}.seed", "must be >= 0")
        require(self.num_workers >= 0, f"{path}.num_workers", "must be >= 0")
        require(self.threads >= 0, f"{path}.threads", "must be >= 0")


def load_train_config(path: str | Path, **overrides: Any) -> VQGANTrainConfig:
    """Read a `VQGANTrainConfig` from YAML; `overrides` (e.g. ``steps=``, ``seed=``) replace fields when not None."""
    config = load(VQGANTrainConfig, path, root="vqgan_config")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        config = replace(config, **changes)
        config.validate("vqgan_config")
    return config


@dataclass
class VQGANTrainResult:
    """What a finished `train_vqgan` reports."""

    run_dir: Path
    export_path: Path
    step: int
    resumed_from: int | None  # step of the checkpoint the run resumed from
    val_metrics: dict[str, float]
    train_tiles: int
    val_tiles: int
    seconds: float
    tiles_per_second: float  # training throughput of this run (all ranks together)
    model: VQGAN  # the trained autoencoder (fp32, this rank's replica; identical on every rank)


# --------------------------------------------------------------------------------------------------
# Data


def _datasets(config: VQGANTrainConfig, show_progress: bool) -> tuple[Dataset, Dataset, list[str]]:
    """Training and validation sets (and the reports' summaries)."""
    train = open_tiles(config.data, config.tile_size, config.size_policy, show_progress=show_progress) \
        if Path(config.data).is_dir() else open_tiles(config.data, config.tile_size, config.size_policy)
    reports = [train.report.summary()]
    if config.val_data is not None:
        val_full = open_tiles(config.val_data, config.tile_size, config.size_policy)
        reports.append(val_full.report.summary())
        val: Dataset = Subset(val_full, list(range(min(len(val_full), config.val_max_tiles))))
        return train, val, reports
    n = len(train)
    n_val = max(1, round(n * config.val_fraction))
    if n - n_val < 1:
        raise InputError(f"vqgan_config.val_fraction: holding out {n_val} of {n} tiles leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    val_idx = sorted(order[:n_val])[: config.val_max_tiles]
    train_idx = sorted(order[n_val:])
    return Subset(train, train_idx), Subset(train, val_idx), reports


def random_dihedral_batch(images: torch.Tensor) -> torch.Tensor:
    """Each tile of `images (N, C, H, W)` under its own random flip/90-degree rotation (global torch RNG,
    so resumed runs replay it).

    It draws the turns, then the flips (not `imageops.random_dihedral`'s one draw per tile): the same random
    stream as the runs already made, so a config still trains the same weights.
    """
    turns = torch.randint(0, 4, (images.shape[0],))
    flips = torch.randint(0, 2, (images.shape[0],)).bool()
    return dihedral_views(images, turns, flips)


def random_crop_pair(codes: torch.Tensor, images: torch.Tensor, crop: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random window of each latent map `codes (N, C, h, w)` and of its image `(N, 3, h*f, w*f)`.

    `crop` is in image pixels (a multiple of f); offsets are on the latent grid, so the crop of the image is
    exactly what the cropped latents decode to (global torch RNG: resumed runs replay it).
    """
    n, _, h, w = codes.shape
    c = crop // f
    ys = torch.randint(0, h - c + 1, (n,)).tolist()
    xs = torch.randint(0, w - c + 1, (n,)).tolist()
    code_crops = torch.stack([codes[i, :, y:y + c, x:x + c] for i, (y, x) in enumerate(zip(ys, xs))])
    image_crops = torch.stack([images[i, :, y * f:(y + c) * f, x * f:(x + c) * f]
                               for i, (y, x) in enumerate(zip(ys, xs))])
    return code_crops, image_crops


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (QuantizerOutput) takes fields
        return type(value)(*(_to_float(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    return value


class Autocast(torch.nn.Module):
    """Runs `module` under bf16 autocast and hands float32 outputs back, so losses and metrics stay fp32."""

    def __init__(self, module: torch.nn.Module, enabled: bool, device_type: str) -> None:
        super().__init__()
        self.module, self.enabled, self.device_type = module, enabled, device_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            out = self.module(*args, **kwargs)
        return _to_float(out) if self.enabled else out


# --------------------------------------------------------------------------------------------------
# Validation and samples


@torch.no_grad()
def evaluate_reconstruction(model: VQGAN, dataset: Dataset, device: torch.device,
                            batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR, SSIM, MS-SSIM (dB / [0,1]) and L1 of reconstructions, plus codebook use over `dataset`."""
    was_training = model.training
    model.eval()
    sums = {"psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0, "l1": 0.0}
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64)
    n = 0
    # A private generator: a DataLoader without one draws from the global RNG, shifting the training stream.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for images in loader:
        images = images.to(device)
        latents = model.encode(images)
        quant = model.quantize(latents)
        recon = model.decoder(quant.quantized).clamp(-1, 1)
        sums["psnr"] += float(psnr(recon, images, reduction="none").clamp(max=100.0).sum())
        sums["ssim"] += float(ssim(recon, images, reduction="none").sum())
        if ms_ssim_scales(*images.shape[-2:]) >= 1:
            sums["ms_ssim"] += float(ms_ssim(recon, images, reduction="none").sum())
        sums["l1"] += float((recon - images).abs().mean(dim=(1, 2, 3)).sum())
        counts += torch.bincount(quant.indices.flatten().cpu(), minlength=counts.numel()).double()
        n += images.shape[0]
    model.train(was_training)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    probs = counts / counts.sum().clamp_min(1)
    out["perplexity"] = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
    out["codebook_usage"] = float((counts > 0).double().mean())
    return out


def save_sample_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """PNG with originals in the top row and their reconstructions below (1-px white gaps)."""
    pixels = np.concatenate([to_uint8(originals), to_uint8(reconstructions)])
    return write_bytes(path, encode_image(tile_grid(pixels, len(originals), gap=1), "png"))


# --------------------------------------------------------------------------------------------------
# Loading a trained autoencoder


def load_vqgan(path: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """A VQ-GAN in eval mode (fp32) from an export checkpoint, or from a run folder's `vqgan.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_NAME
    state, config, extra = load_checkpoint(path)
    if extra.get("kind", "vqgan") != "vqgan":
        raise InputError(f"{path}: is a {extra.get('kind')!r} checkpoint, not a VQ-GAN")
    model = VQGAN.from_config_dict(config, path=f"{path}:config")
    load_state_dict(model, state, path)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# The training loop


def _reset_adam_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero Adam's moments for re-initialised codebook rows, so stale momentum does not drag them back."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0.0


def _reset_dead_codes(model: VQGAN, images: torch.Tensor, config: VQGANTrainConfig, step: int,
                      optimizer: torch.optim.Optimizer) -> int:
    """Re-initialise dead codes from this batch's encoder outputs on rank 0; broadcast to every rank."""
    quantizer = model.quantizer
    dead = (quantizer.usage_ema < config.dead_code_threshold).to(torch.uint8)
    dist.broadcast_(dead)  # rank 0's verdict
    count = 0
    if dist.is_main() and bool(dead.any()):
        with torch.no_grad():
            latents = model.encode(images)
        # A generator seeded by (seed, step) keeps the global RNG stream untouched by this side-task.
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        count = quantizer.reset_dead_codes(latents, config.dead_code_threshold, generator=gen)
    dist.broadcast_(quantizer.embedding.weight.data)
    dist.broadcast_(quantizer.usage_ema)
    rows = dead.bool().nonzero().flatten().to(quantizer.embedding.weight.device)
    if rows.numel():
        _reset_adam_rows(optimizer, quantizer.embedding.weight, rows)
    return int(dist.all_reduce_sum(torch.tensor(count, dtype=torch.float64)).item())


def _check_resume_compatible(path: Path, config: VQGANTrainConfig) -> None:
    saved = read_resume_header(path).get("meta", {}).get("config", {})
    if saved.get("model") != to_dict(config.model):
        raise InputError(f"{path}: was trained with another model config; use a new --run-dir or the same model")
    if saved.get("loss", {}).get("discriminator") != to_dict(config.loss.discriminator):
        raise InputError(f"{path}: was trained with another discriminator config; use a new --run-dir")


def train_vqgan(config: VQGANTrainConfig, run_dir: str | Path, *, resume: bool = True,
                show_progress: bool = True) -> VQGANTrainResult:
    """Train (or resume training) a VQ-GAN on `config.data`, writing the run folder `run_dir`.

    `resume=True` continues from the newest checkpoint in ``run_dir/checkpoints`` (if any). With
    `resume=False` a folder that already has checkpoints is refused rather than overwritten.
    """
    run_dir = Path(run_dir)
    info = dist.init_distributed(config.device)
    try:
        with torch_threads(config.threads):  # restores the caller's setting (tests, the pipeline)
            return _train(config, run_dir, info, resume, show_progress)
    finally:
        dist.cleanup()


# --------------------------------------------------------------------------------------------------
# Setup


class _Decoded(NamedTuple):
    """What one training forward produced (`_Run.forward`)."""

    recon: torch.Tensor  # reconstructions of `images`
    quant: Any  # the quantizer's output for them
    images: torch.Tensor  # the targets, cropped like `recon`
    adapt_fakes: torch.Tensor | None = None  # decodings of generated latents (config.adapt_latents)
    anchors: torch.Tensor | None = None  # the same latents through the frozen anchor decoder (config.adapt_anchor)


@dataclass
class _Run:
    """One VQ-GAN run: its data, networks, optimizers and state (built by `_setup`)."""

    config: VQGANTrainConfig
    info: dist.DistInfo
    run_dir: Path
    train_set: Dataset
    val_set: Dataset
    loader: DataLoader
    sampler: dist.ResumableSampler
    model: VQGAN  # the autoencoder (fp32); `net` is what the step calls
    disc: torch.nn.Module
    net: Autocast  # the trained part (whole model, or the decoder alone) in DDP, under autocast
    ddp_disc: Autocast  # the discriminator in DDP (its own step)
    plain_disc: Autocast  # the discriminator outside DDP (it only passes gradients to the reconstructions)
    loss_fn: VQGANLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA | None
    modules: dict[str, torch.nn.Module]  # what a resume checkpoint holds
    state: TrainState
    resumed_from: int | None
    count: SampleCount  # tiles seen in all, by trained step (see SampleCount)
    logger: MetricsLogger
    sample_images: torch.Tensor  # fixed held-out tiles of the sample grids
    meta: dict[str, Any]  # what a resume checkpoint records about the run
    adapt_bank: torch.Tensor | None = None  # generated latents (N, C, h, w) float16, CPU (config.adapt_latents)
    anchor_decoder: torch.nn.Module | None = None  # init_from's decoder, frozen (config.adapt_anchor)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def decoder_only(self) -> bool:
        return self.config.train_parts == "decoder"

    @property
    def export_path(self) -> Path:
        return self.run_dir / EXPORT_NAME

    @property
    def codebook_init_step(self) -> int:
        # A fine-tuned codebook is already data-initialised; a frozen one must not be touched at all.
        return -1 if self.config.init_from is not None else self.config.codebook_init_step

    @property
    def dead_code_every(self) -> int:
        return 0 if self.decoder_only else self.config.dead_code_every

    @property
    def trained_steps(self) -> int:
        """Steps in which the autoencoder stepped: a frozen discriminator warm-up trains only the discriminator."""
        c, step = self.config, self.state.step
        frozen = min(max(step - c.disc_start, 0), c.disc_warmup) if c.warmup_freezes_autoencoder else 0
        return step - frozen

    def eval_model(self) -> VQGAN:
        """The model validation, samples and the export use: the EMA weights when configured."""
        return self.ema.averaged(self.model) if self.ema is not None else self.model

    def bank_codes(self, n: int) -> torch.Tensor:
        """`n` generated latents drawn from the bank (global RNG: a resumed run replays it), each under a random
        flip/rotation when `augment` is on, quantized by the frozen codebook and cropped like the tiles."""
        config, f = self.config, self.config.model.downsample_factor
        assert self.adapt_bank is not None
        latents = self.adapt_bank[torch.randint(0, len(self.adapt_bank), (n,))].to(self.device).float()
        if config.augment:
            latents = random_dihedral_batch(latents)
        with torch.no_grad():
            codes, _ = self.model.quantizer.lookup(latents)
        if config.crop_size is not None and config.crop_size // f < codes.shape[-1]:
            dummy = torch.empty(n, 1, codes.shape[-2] * f, codes.shape[-1] * f, device=codes.device)
            codes, _ = random_crop_pair(codes, dummy, config.crop_size, f)
        return codes

    def forward(self, images: torch.Tensor, adapt: int = 0) -> _Decoded:
        """Reconstructions of `images` and decodings of `adapt` generated latents, on crops when configured.

        Both decodings share one decoder call (one DDP forward); the anchor decoder's run without gradients."""
        config, model = self.config, self.model
        f = config.model.downsample_factor
        crop = config.crop_size is not None and config.crop_size < images.shape[-1]
        if self.decoder_only:
            with torch.no_grad():
                # The frozen encoder only picks codes: bf16 moves a few latents across a code boundary, which
                # the decoder sees as harmless noise, and costs a third of the fp32 forward (train_speed.py).
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.autocast == "bf16"):
                    latents = model.encode(images.contiguous(memory_format=torch.channels_last)
                                           if config.channels_last else images)
                quant = model.quantize(latents.float())
            codes = quant.quantized.detach()
            if crop:
                codes, images = random_crop_pair(codes, images, config.crop_size, f)
            n = codes.shape[0]
            bank = self.bank_codes(adapt) if adapt else None
            if bank is not None:
                codes = torch.cat([codes, bank], dim=0)
            if config.channels_last:
                codes = codes.contiguous(memory_format=torch.channels_last)
            out = self.net(codes)
            anchors = None
            if bank is not None and self.anchor_decoder is not None:
                with torch.no_grad():
                    anchors = self.anchor_decoder(codes[n:])
            return _Decoded(out[:n], quant, images, out[n:] if bank is not None else None, anchors)
        if crop:
            _, images = random_crop_pair(images[:, :, ::f, ::f], images, config.crop_size, f)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        recon, quant = self.net(images)
        return _Decoded(recon, quant, images)

    def validate(self) -> dict[str, float]:
        """Reconstruction metrics of the held-out tiles (rank 0 computes and logs them)."""
        metrics: dict[str, float] = {}
        if self.info.is_main:
            metrics = evaluate_reconstruction(self.eval_model(), self.val_set, self.device,
                                              batch_size=self.config.batch_size)
            self.logger.log(self.state.step, metrics, split="val")
        dist.barrier()
        return metrics

    def samples(self) -> None:
        """The sample grid of this step (rank 0)."""
        if self.info.is_main:
            m = self.eval_model()
            m.eval()
            with torch.no_grad():
                recon = m.decode(m.encode(self.sample_images.to(self.device)))
            m.train()
            save_sample_grid(self.sample_images, recon, self.run_dir / "samples" / f"step-{self.state.step:08d}.png")
        dist.barrier()

    @property
    def samples_seen(self) -> int:
        """Tiles the autoencoder has trained on, over every round (frozen warm-up steps do not count)."""
        return self.count.at(self.trained_steps, self.config.batch_size, self.info.world_size)

    def export(self, val_metrics: dict[str, float] | None = None) -> None:
        """vqgan.safetensors: the (EMA) weights with the facts `export` and the model card read (rank 0)."""
        config = self.config
        extra = {"kind": "vqgan", "tile_size": config.tile_size, "data": str(config.data), "step": self.state.step,
                 "samples_seen": self.samples_seen,
                 **({"val": val_metrics} if val_metrics else {})}
        save_export(self.eval_model(), self.export_path, to_dict(config.model), extra, dtype=config.export_dtype)
        if self.state.step > config.disc_start:  # the discriminator has trained: keep it for the next round
            lecam = self.loss_fn.lecam.state_dict() if self.loss_fn.lecam is not None else None
            save_discriminator(self.run_dir / DISC_EXPORT_NAME, self.disc.state_dict(), lecam, config,
                               self.state.step)

    def checkpoint(self, val_metrics: dict[str, float] | None) -> None:
        """A resume checkpoint and the export of this step."""
        self.count.record(self.meta, self.trained_steps, self.config.batch_size, self.info.world_size)
        save_resume_checkpoint(self.run_dir / "checkpoints", self.state, self.modules,
                               {"vqgan": self.opt_g, "discriminator": self.opt_d},
                               extra_tensors={"usage_ema": self.model.quantizer.usage_ema}, meta=self.meta,
                               keep=self.config.keep_checkpoints)
        self.export(val_metrics)


def _disc_config(config: VQGANTrainConfig) -> dict[str, Any]:
    """What a discriminator export records, and what one must match to be loaded."""
    return {"discriminator": to_dict(config.loss.discriminator), "in_channels": config.model.in_channels}


def save_discriminator(path: str | Path, disc: Mapping[str, torch.Tensor], lecam: Mapping[str, torch.Tensor] | None,
                       config: VQGANTrainConfig, step: int) -> None:
    """Write a discriminator export (weights and LeCam anchors, `config.export_dtype`) that `load_discriminator`
    reads; from a run's networks, or from the tensors of a resume checkpoint."""
    state = {f"discriminator.{k}": v for k, v in disc.items()}
    state.update({f"lecam.{k}": v for k, v in (lecam or {}).items()})
    save_export(state, path, _disc_config(config), {"kind": "discriminator", "step": step}, dtype=config.export_dtype)


def load_discriminator(path: str | Path, disc: torch.nn.Module, lecam: torch.nn.Module | None,
                       config: VQGANTrainConfig) -> int:
    """Load a run's discriminator.safetensors (and LeCam anchors, when both have them) into `disc` / `lecam`;
    returns the step it was saved at. Another discriminator config is an `InputError` naming both."""
    state, saved, extra = load_checkpoint(path)
    if extra.get("kind") != "discriminator":
        raise InputError(f"vqgan_config.disc_init_from: {path} is a {extra.get('kind')!r} checkpoint, not a "
                         f"discriminator (a run folder's {DISC_EXPORT_NAME})")
    if saved != _disc_config(config):
        raise InputError(f"vqgan_config.disc_init_from: {path} holds a discriminator of another config "
                         f"({saved}); vqgan_config.loss.discriminator must match it ({_disc_config(config)})")
    load_state_dict(disc, {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("discriminator.")},
                    path)
    anchors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("lecam.")}
    if lecam is not None and anchors:
        load_state_dict(lecam, anchors, path)
    return int(extra.get("step", 0))


def _setup(config: VQGANTrainConfig, run_dir: Path, info: dist.DistInfo, resume: bool,
           show_progress: bool) -> _Run:
    """Open the data, build the networks and optimizers, and resume from the newest checkpoint if any.

    The order matters for reproducibility: everything that draws random numbers (the split, initial weights)
    runs after seeding and before the RNG states are restored from a checkpoint.
    """
    device = info.device
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None and not resume:
        raise InputError(f"{run_dir}: already holds checkpoints ({latest.name}); pass --resume to continue "
                         "or choose a new --run-dir")
    if latest is not None:
        _check_resume_compatible(latest, config)

    seed_everything(config.seed, info.rank)
    train_set, val_set, reports = _datasets(config, show_progress and info.is_main)
    sampler = dist.make_sampler(train_set, info, shuffle=True, seed=config.seed)
    if sampler.num_samples < config.batch_size:
        raise InputError(
            f"vqgan_config.batch_size: {config.batch_size} is larger than the {sampler.num_samples} training "
            f"tiles each of the {info.world_size} process(es) gets"
        )
    # A private generator: DataLoader otherwise draws worker seeds from the global RNG at each epoch,
    # which would shift the RNG stream of a resumed run against an uninterrupted one.
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed),
                        persistent_workers=config.num_workers > 0)

    # ---- networks, loss, optimizers
    model = VQGAN(config.model).to(device)
    prior_samples = 0
    if config.init_from is not None:
        prior_samples = int(read_checkpoint_metadata(config.init_from)[1].get("samples_seen", 0) or 0)
        init = load_vqgan(config.init_from)
        if to_dict(init.config) == to_dict(config.model):
            model.load_state_dict(init.state_dict())
        elif replace(init.config, decoder_res_blocks=None) == replace(config.model, decoder_res_blocks=None):
            # A deeper decoder grown from a trained one: added blocks start as the identity (see grow_decoder).
            grow_decoder(model, init)
        else:
            raise InputError(f"vqgan_config.init_from: {config.init_from} has another model config than "
                             "vqgan_config.model; copy its model section (only decoder_res_blocks may grow)")
    decoder_only = config.train_parts == "decoder"
    if decoder_only:
        # Encoder and codebook frozen: the latents every diffusion model was trained on stay what they are.
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    disc = config.loss.discriminator.build(config.model.in_channels).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    loss_fn = VQGANLoss(config.loss).to(device)
    if config.disc_init_from is not None:
        load_discriminator(config.disc_init_from, disc, loss_fn.lecam, config)
    trainable = model.decoder.parameters() if decoder_only else model.parameters()
    opt_g = torch.optim.Adam(trainable, lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.disc_lr or config.lr, betas=config.betas)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    modules: dict[str, torch.nn.Module] = {"vqgan": model, "discriminator": disc}
    if ema is not None:
        modules["ema"] = ema_as_module(ema)
    if loss_fn.lecam is not None:
        modules["lecam"] = loss_fn.lecam

    # ---- resume
    state = TrainState()
    resumed_from = None
    count = SampleCount(prior_samples)
    if latest is not None:
        ckpt = load_resume_checkpoint(latest, modules, {"vqgan": opt_g, "discriminator": opt_d})
        state = ckpt.state
        resumed_from = state.step
        # The count this run started from, as recorded when it started: init_from may since have been overwritten
        # by a later round's export (older checkpoints did not record it; init_from's count is then used).
        prior_samples = int(ckpt.meta.get("prior_samples", prior_samples))
        count = SampleCount.resumed(ckpt.meta, prior_samples)
        if "usage_ema" in ckpt.extra_tensors:
            model.quantizer.usage_ema.copy_(ckpt.extra_tensors["usage_ema"].to(device))
        if ckpt.world_size != info.world_size:
            # Another process count: each rank's share of an epoch changed, so start a fresh epoch and
            # re-seed from the step rather than replaying RNG states that belong to other ranks.
            seed_everything(config.seed, info.rank, offset=state.step)
            state.epoch, state.epoch_position = state.epoch + 1, 0

    bf16 = config.autocast == "bf16"
    net = Autocast(dist.wrap_ddp(model.decoder if decoder_only else model, info), bf16, device.type)
    ddp_disc = Autocast(dist.wrap_ddp(disc, info), bf16, device.type)
    plain_disc = Autocast(disc, bf16, device.type)

    if info.is_main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=resumed_from)
    if resumed_from is None:
        logger.log(0, {"train_tiles": len(train_set), "val_tiles": len(val_set), "world_size": info.world_size,
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "data": "\n".join(reports)}, split="info")
    sample_images = torch.stack([val_set[i] for i in range(min(config.sample_count, len(val_set)))])
    adapt_bank = _adapt_bank(config) if config.adapt_latents is not None else None
    anchor_decoder = None
    if config.adapt_anchor > 0:
        # From the init_from file, not the model: a resumed run keeps the anchor it started with.
        frozen = load_vqgan(config.init_from).decoder.to(device).eval().requires_grad_(False)
        if config.channels_last:
            frozen.to(memory_format=torch.channels_last)
        anchor_decoder = Autocast(frozen, bf16, device.type)
    meta = {"config": to_dict(config), "train_tiles": len(train_set), "val_tiles": len(val_set),
            "prior_samples": prior_samples}
    return _Run(config=config, info=info, run_dir=run_dir, train_set=train_set, val_set=val_set, loader=loader,
                sampler=sampler, model=model, disc=disc, net=net, ddp_disc=ddp_disc, plain_disc=plain_disc,
                loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, ema=ema, modules=modules, state=state,
                resumed_from=resumed_from, count=count, logger=logger,
                sample_images=sample_images, meta=meta, adapt_bank=adapt_bank, anchor_decoder=anchor_decoder)


def _adapt_bank(config: VQGANTrainConfig) -> torch.Tensor:
    """The generated latents of `config.adapt_latents`, checked against the model's latent shape."""
    bank = load_latent_bank(config.adapt_latents)
    c, f = config.model.latent_channels, config.model.downsample_factor
    if bank.shape[1] != c or bank.shape[2] * f != config.tile_size or bank.shape[3] * f != config.tile_size:
        raise InputError(f"vqgan_config.adapt_latents: {config.adapt_latents} holds latents of shape "
                         f"{tuple(bank.shape[1:])}; this model's {config.tile_size}-px tiles have "
                         f"({c}, {config.tile_size // f}, {config.tile_size // f})")
    return torch.from_numpy(np.array(bank))  # read into memory (the bank is a read-only memory map)


# --------------------------------------------------------------------------------------------------
# The loop


def _train_step(run: _Run, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One step of the autoencoder, then of the discriminator; returns the logs and the (cropped) targets."""
    config, step = run.config, run.state.step
    images = images.to(run.device, non_blocking=True)
    if config.augment:
        images = random_dihedral_batch(images)

    # Autoencoder step (discriminator frozen; it only passes gradients to the reconstructions).
    disc_on = step >= config.disc_start
    gan_step = step - config.disc_start - config.disc_warmup  # steps since the GAN terms began
    gan_scale = min(1.0, (gan_step + 1) / config.gan_ramp) if config.gan_ramp else 1.0
    gan_on = gan_step >= 0
    frozen = config.warmup_freezes_autoencoder and disc_on and not gan_on  # only the discriminator learns
    # Set from the step every time (not kept in the optimizers' state): a resumed run follows the config.
    factor = lr_factor(step, config.lr_warmup, config.lr_decay_start, config.steps, config.lr_decay,
                       config.min_lr / config.lr)
    for opt, base in ((run.opt_g, config.lr), (run.opt_d, config.disc_lr or config.lr)):
        for group in opt.param_groups:
            group["lr"] = base * factor
    run.disc.requires_grad_(False)
    adapt = images.shape[0] if run.adapt_bank is not None and disc_on else 0
    with torch.no_grad() if frozen else contextlib.nullcontext():
        recon, quant, images, adapt_fakes, anchors = run.forward(images, adapt)
        g_loss, logs = run.loss_fn.generator_loss(images, recon, quant, run.plain_disc if gan_on else None,
                                                  run.model.decoder_last_layer, gan_scale=gan_scale,
                                                  adapt_fakes=adapt_fakes, adapt_weight=config.adapt_weight)
        if adapt_fakes is not None and anchors is not None:
            anchor = colour_anchor_loss(adapt_fakes, anchors)
            g_loss = g_loss + config.adapt_anchor * anchor
            logs["adapt_anchor"] = anchor.detach()
    if gan_on:
        logs["gan_scale"] = torch.tensor(gan_scale)
    if not torch.isfinite(g_loss):
        raise RunError(f"step {step}: the autoencoder loss is {g_loss.item()}; lower lr or check data")
    if not frozen:
        run.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        if config.grad_clip is not None:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip).detach()
        run.opt_g.step()
    run.disc.requires_grad_(True)

    # Discriminator step (hinge loss, optional LeCam), from disc_start.
    if disc_on:
        d_loss, d_logs = run.loss_fn.discriminator_loss(images, recon, run.ddp_disc, adapt_fakes)
        run.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        run.opt_d.step()
        logs.update(d_logs)
    if run.ema is not None and not frozen:
        run.ema.update(run.model)
    logs["perplexity"] = quant.perplexity.detach()
    logs["batch_usage"] = quant.usage.detach()
    return logs, images


def _codebook_upkeep(run: _Run, images: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
    """At the step just finished: initialise the codebook from data, or revive dead codes."""
    step = run.state.step
    if step == run.codebook_init_step:
        # Data-dependent codebook init: the default +-1/K codes lie far from the encoder's outputs, so
        # only a handful get picked (measured: perplexity ~5 of 1024 codes after 250 steps without it).
        run.model.quantizer.usage_ema.zero_()
    elif not (run.dead_code_every and step % run.dead_code_every == 0):
        return
    logs["dead_codes_reset"] = torch.tensor(float(_reset_dead_codes(run.model, images, run.config, step, run.opt_g)))


class _Window:
    """Train logs summed over the steps since the last record."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[float, int]] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + float(v), count + 1)
        self.steps += 1

    def record(self, run: _Run, epoch: int) -> dict[str, float]:
        """The record of the window: each term averaged over the steps that had it (GAN terms start
        mid-window), then over ranks; codebook use, throughput, epoch and lr."""
        elapsed = time.perf_counter() - self.started
        means = {k: float(dist.all_reduce_mean(t / c)) for k, (t, c) in sorted(self.sums.items())}
        if "dead_codes_reset" in means:  # a count, not a rate: the sum over the window
            means["dead_codes_reset"] = self.sums["dead_codes_reset"][0]
        means["codebook_usage"] = float((run.model.quantizer.usage_ema >= run.config.dead_code_threshold)
                                        .float().mean())
        means["tiles_per_s"] = self.steps * run.config.batch_size * run.info.world_size / max(elapsed, 1e-9)
        means["epoch"] = epoch
        means["lr"] = run.opt_g.param_groups[0]["lr"]
        means["disc_lr"] = run.opt_d.param_groups[0]["lr"]
        return means


def _train(config: VQGANTrainConfig, run_dir: Path, info: dist.DistInfo, resume: bool,
           show_progress: bool) -> VQGANTrainResult:
    run = _setup(config, run_dir, info, resume, show_progress)
    state = run.state
    window = _Window()
    started = time.perf_counter()
    start_step = state.step
    val_metrics: dict[str, float] = {}
    stream = resumable_batches(run.loader, run.sampler, state.epoch, state.epoch_position)
    with TrainProgress(config.steps, state.step, "train vqgan", enabled=show_progress,
                       log_file=run_dir / "train.log" if info.is_main else None) as bar:
        while state.step < config.steps:
            epoch, position, images = next(stream)
            logs, images = _train_step(run, images)
            state.step += 1
            state.epoch, state.epoch_position = epoch, position
            _codebook_upkeep(run, images, logs)

            window.add(logs)
            if state.step % config.log_every == 0 or state.step == config.steps:
                means = window.record(run, epoch)
                run.logger.log(state.step, means)
                bar.update(state.step, loss=means["loss"], l1=means["l1"], ppl=means["perplexity"])
                window = _Window()
            else:
                bar.update(state.step)

            out_of_time = (config.time_limit_s is not None
                           and dist.any_rank(time.perf_counter() - started > config.time_limit_s))
            last = state.step == config.steps or out_of_time
            if state.step % config.val_every == 0 or last:
                val_metrics = run.validate()
            if state.step % config.sample_every == 0 or last:
                run.samples()
            if state.step % config.ckpt_every == 0 or last:
                run.checkpoint(val_metrics if state.step % config.val_every == 0 or last else None)
            if out_of_time:
                break

    if run.resumed_from is not None and run.resumed_from >= config.steps and not run.export_path.exists():
        run.export()  # nothing left to train, but the export must exist (rank 0 writes it)
    seconds = time.perf_counter() - started
    return VQGANTrainResult(
        run_dir=run_dir,
        export_path=run.export_path,
        step=state.step,
        resumed_from=run.resumed_from,
        val_metrics=val_metrics,
        train_tiles=len(run.train_set),
        val_tiles=len(run.val_set),
        seconds=seconds,
        tiles_per_second=(state.step - start_step) * config.batch_size * info.world_size / max(seconds, 1e-9),
        model=run.model,
    )
