"""Latent diffusion training: the unconditional LDM and the cluster-conditioned cLDM (Rumman et al. 2025).

One loop serves both (`train_ldm`, `train_cldm`). It reads the memory-mapped latent cache written by the
VQ-GAN's encode step, so a step costs one UNet forward/backward and no image decoding:

    x0 = latents * latent_scale            (diffusion space, unit variance)
    x_t = alpha_t x0 + sigma_t eps         (NoiseSchedule.add_noise, t ~ U{0..T-1})
    loss = w(t) * ||UNet(x_t, t, y) - target||^2,  target = eps or v (NoiseSchedule.target)

`w(t)` is 1 (plain MSE) or the min-SNR-gamma weight of Hang et al. (2023), which speeds up convergence
by not letting the easy low-noise timesteps dominate. The condition `y` is:

- `train_ldm`: the null class everywhere (an unconditional model);
- `train_cldm`: each tile's final label from `review apply`, replaced by the null class with probability
  `label_dropout` so the one model also learns the unconditional score (classifier-free guidance);
- `train_cldm` with `joint_imc`: the argmax of the information-maximization clustering head on the
  tile's latent features, the head being trained at the same time with its IM loss added (the paper's
  joint training); the head's clusters map to classes through the label map's `clusters` table.

Resumable (rank-0 checkpoints with optimizer, EMA and RNG states), runs unchanged under `torchrun`
(DistributedDataParallel, each rank a disjoint share of the latent indices), logs JSONL, shows a progress
bar, and writes sample grids (a few DDIM steps of the EMA model, decoded by the VQ-GAN when given).
The shipped weights are the EMA weights, in `unet.safetensors` with the facts `histosynth export` reads.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import yaml
import torch
import torch.nn.functional as F
from torch import nn

from histosynth.configio import from_dict, require, to_dict
from histosynth.diffusion.samplers import sample as run_sampler
from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError, RunError
from histosynth.imageops import encode_image, random_dihedral, tile_grid, to_uint8
from histosynth.imageops import random_dihedral as dihedral_augment  # noqa: F401 (the former name, still imported)
from histosynth.io import write_bytes, write_text
from histosynth.labels import read_label_map
from histosynth.runtime import dist
from histosynth.runtime.checkpointing import (
    TrainState,
    latest_checkpoint,
    load_resume_checkpoint,
    save_resume_checkpoint,
)
from histosynth.runtime.ema import EMA, ema_as_module
from histosynth.runtime.seeding import seed_everything
from histosynth.runtime.tracking import MetricsLogger, TrainProgress
from histosynth.runtime.weights import load_checkpoint, save_checkpoint

UNET_FILE = "unet.safetensors"  # the EMA weights `histosynth export` reads
CHECKPOINT_DIR = "checkpoints"  # resume checkpoints
LOG_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


@dataclass
class LDMTrainConfig:
    """Settings of one latent diffusion training run (LDM or cLDM); loaded from YAML with configio."""

    latents: Optional[Path] = None  # latent cache folder from `train encode` (the pipeline fills it in)
    model: UNetConfig = field(default_factory=UNetConfig)  # num_classes is set from the labels for a cLDM
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the paper: linear, T=1000, eps
    labels: Optional[Path] = None  # per-tile labels CSV from `review apply` (cLDM); tiles not in it are left out
    label_map: Optional[Path] = None  # label map from `review apply`: class names; cluster -> class for joint_imc
    init_from: Optional[Path] = None  # cLDM fine-tuning: an LDM unet.safetensors; matching weights are copied
    joint_imc: bool = False  # train the IMC head jointly and condition on its argmax (paper); False = fixed labels
    imc_head: Optional[Path] = None  # the chosen IMC head (`cluster` output); required with joint_imc
    imc_weight: float = 0.1  # weight of the IM loss added to the diffusion loss (joint_imc)
    imc_mu: float = 4.0  # weight of the marginal entropy in the IM loss (as clusters.imc.IMCConfig: 2.0 merged blobs)
    imc_lr: float = 1e-4  # learning rate of the head (small: it starts from the chosen, already trained head)
    batch_size: int = 32  # per process
    lr: float = 2e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear learning-rate warm-up; avoids early blow-ups of a fresh UNet
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    steps: int = 10_000  # optimizer steps in total (a resumed run continues up to this)
    ema_decay: float = 0.999  # EMA of the weights; the EMA model is what is shipped
    loss: Literal["min_snr", "mse"] = "min_snr"  # min-SNR-gamma weighting (Hang et al. 2023) or plain MSE
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting
    label_dropout: float = 0.1  # P(label -> null class) for classifier-free guidance (cLDM only)
    augment: bool = False  # random flips / 90-degree turns of the latents themselves: cheap, but a conv encoder is
    # only roughly equivariant, so turned latents are slightly off the encoder's distribution; the exact
    # alternative is a cache encoded with `train encode --dihedral` (8 encoder-made views per tile)
    autocast: Literal["none", "bf16"] = "none"  # bf16 autocast of the UNet forward (CPU AMX/AVX512-BF16, CUDA);
    # weights, optimizer and loss stay fp32. ~1.5x the steps/s of fp32 on an AMX CPU (benchmarks/train_speed.py)
    seed: int = 0
    log_every: int = 25  # steps between JSONL log records
    checkpoint_every: int = 500  # steps between resume checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest resume checkpoints kept
    sample_every: int = 0  # steps between sample grids; 0 = only at the end
    sample_count: int = 16  # images in a sample grid
    sample_steps: int = 10  # DDIM steps of a sample grid (cheap preview, not final quality)
    check_samples: int = 64  # after training, this many tiles are generated and compared with training tiles
    # (diffusion.verdict: colour/contrast/flat statistics and a feature distance); 0 = no check; needs vqgan
    vqgan: Optional[Path] = None  # VQ-GAN checkpoint to decode sample grids; None = latents shown as RGB
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    time_limit_s: Optional[float] = None  # stop (checkpoint, export) after this many seconds, wherever `steps`
    # stands: a lent GPU or a session ends on time; rerun the same command to continue
    data: str = ""  # free-text description of the training data, recorded in the checkpoint (provenance)

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.batch_size >= 1, f"{path}.batch_size", "must be at least 1")
        require(self.lr > 0, f"{path}.lr", "must be positive")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.steps >= 1, f"{path}.steps", "must be at least 1")
        require(0 <= self.ema_decay < 1, f"{path}.ema_decay", "must be in [0, 1)")
        require(self.min_snr_gamma > 0, f"{path}.min_snr_gamma", "must be positive")
        require(0 <= self.label_dropout < 1, f"{path}.label_dropout", "must be in [0, 1)")
        require(self.imc_weight >= 0, f"{path}.imc_weight", "must be >= 0")
        require(self.imc_lr > 0, f"{path}.imc_lr", "must be positive")
        require(self.autocast in ("none", "bf16"), f"{path}.autocast", f"must be 'none' or 'bf16', got {self.autocast!r}")
        require(self.seed >= 0, f"{path}.seed", "must be >= 0")
        require(self.log_every >= 1, f"{path}.log_every", "must be at least 1")
        require(self.checkpoint_every >= 1, f"{path}.checkpoint_every", "must be at least 1")
        require(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints", "must be at least 1")
        require(self.sample_every >= 0, f"{path}.sample_every", "must be >= 0 (0 = only at the end)")
        require(self.sample_count >= 0, f"{path}.sample_count", "must be >= 0 (0 = no sample grids)")
        require(self.sample_steps >= 1, f"{path}.sample_steps", "must be at least 1")
        require(self.check_samples >= 0, f"{path}.check_samples", "must be >= 0 (0 = no check)")
        require(self.time_limit_s is None or self.time_limit_s > 0, f"{path}.time_limit_s", "must be > 0 or null")
        if self.joint_imc:
            require(self.labels is None, f"{path}.labels",
                    "must be null with joint_imc (the labels come from the IMC head)")


def load_ldm_config(data: Any, path: str = "ldm") -> LDMTrainConfig:
    """`LDMTrainConfig` from plain data (YAML), with key-path errors."""
    return from_dict(LDMTrainConfig, data, path)


# --------------------------------------------------------------------------------------------------
# Data: the latent cache and per-tile labels


@dataclass
class LatentData:
    """The training latents (memory-mapped) and, per latent, its tile key and class id (-1 = not used)."""

    latents: np.ndarray  # (N, C, h, w) float16, memory-mapped
    keys: list[str]  # tile of each row (index.csv `path`; several rows when the cache holds dihedral views)
    latent_scale: float
    meta: dict[str, Any]  # latents.json (tile size, source data, ...)


def open_latents(path: Path) -> LatentData:
    """Open the latent cache at `path` (see `histosynth.autoencoder.latents.LatentCache`)."""
    from histosynth.autoencoder.latents import LatentCache

    cache = LatentCache.open(path)
    return LatentData(latents=cache.latents, keys=list(cache.paths), latent_scale=float(cache.latent_scale),
                      meta=dict(cache.meta))


def read_labels(path: Path, keys: Sequence[str]) -> np.ndarray:
    """Class id of every cache row from a per-tile labels CSV (`tile`, `class_id`); -1 for unlisted tiles.

    Tiles that review excluded (background, artefacts) are absent from the CSV or have an empty or
    negative `class_id`; they are not trained on. A listed tile that is not in the cache is an error,
    since it means the labels belong to another dataset.
    """
    if not Path(path).is_file():
        raise InputError(f"labels: file not found: {path}")
    rows_of: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        rows_of.setdefault(k, []).append(i)
    ids = np.full(len(keys), -1, dtype=np.int64)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for needed in ("tile", "class_id"):
            if needed not in columns:
                raise InputError(f"{path}: needs columns 'tile' and 'class_id'; has {', '.join(columns) or 'none'}")
        for line, row in enumerate(reader, start=2):
            tile, value = row["tile"], (row["class_id"] or "").strip()
            if tile not in rows_of:
                raise InputError(f"{path}:{line}: tile {tile!r} is not in the latent cache")
            if value == "":
                continue
            try:
                class_id = int(value)
            except ValueError:
                raise InputError(f"{path}:{line}: class_id {value!r} is not an integer") from None
            ids[rows_of[tile]] = class_id if class_id >= 0 else -1
    if (ids >= 0).sum() == 0:
        raise InputError(f"{path}: no tile of the latent cache has a class; nothing to train on")
    return ids


class _Rows(torch.utils.data.Dataset):
    """The cache rows a run trains on; the sampler shards and shuffles positions in this list."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


# --------------------------------------------------------------------------------------------------
# The loss


def snr_weights(schedule: NoiseSchedule, t: torch.Tensor, loss: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights (N,): 1 for plain MSE, min-SNR-gamma (Hang et al. 2023, eq. 10) otherwise.

    With SNR(t) = alpha-bar / (1 - alpha-bar), the weight is min(SNR, gamma) / SNR for eps targets and
    min(SNR, gamma) / (SNR + 1) for v targets (the v loss is already (SNR + 1) times the eps loss).
    """
    if loss == "mse":
        return torch.ones(t.shape[0], dtype=torch.float32)
    abar = schedule.alphas_cumprod[t.cpu()]  # float64
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    w = clipped / snr if schedule.config.prediction == "epsilon" else clipped / (snr + 1)
    return w.float()


class DiffusionObjective(nn.Module):
    """The trained modules and the per-sample loss in one module, so DDP syncs every gradient (UNet and head).

    `forward(x0, latents, noise, t, class_ids, label_dropout)` returns ``(loss, logs)``. With an IMC head,
    the class ids come from the head's argmax (mapped through `cluster_to_class`) and its IM loss is added;
    then each id becomes the null class with probability `label_dropout` (the UNet's label embedder).
    """

    def __init__(self, unet: UNet, schedule: NoiseSchedule, config: LDMTrainConfig,
                 head: Optional[nn.Module] = None, cluster_to_class: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.unet = unet
        self.head = head
        self.schedule = schedule
        self.config = config
        if cluster_to_class is not None:
            self.register_buffer("cluster_to_class", cluster_to_class, persistent=False)
        else:
            self.cluster_to_class = None

    def forward(self, x0: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                class_ids: torch.Tensor, label_dropout: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logs: dict[str, torch.Tensor] = {}
        keep = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)
        imc_loss = None
        if self.head is not None:
            from histosynth.clusters.imc import im_loss

            logits = self.head.logits_from_latents(latents)  # (N, K), raw (unscaled) latents as in `cluster`
            clusters = logits.argmax(dim=1)
            class_ids = self.cluster_to_class[clusters] if self.cluster_to_class is not None else clusters
            keep = (class_ids >= 0).to(x0.dtype)  # excluded clusters do not train the UNet
            class_ids = class_ids.clamp(min=0)
            imc_loss, cond_h, marg_h = im_loss(logits, self.config.imc_mu)
            logs.update(imc_loss=imc_loss.detach(), imc_cond_entropy=cond_h.detach(),
                        imc_marginal_entropy=marg_h.detach())
        if label_dropout > 0:
            class_ids = self.unet.class_embedder.drop(class_ids, label_dropout)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.target(x0, noise, t)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.config.autocast == "bf16"):
            output = self.unet(x_t, t, class_ids)
        per_sample = (output.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (N,)
        w = snr_weights(self.schedule, t, self.config.loss, self.config.min_snr_gamma).to(x0.device)
        loss = (w * per_sample * keep).sum() / keep.sum().clamp(min=1.0)
        logs["mse"] = (per_sample * keep).sum().detach() / keep.sum().clamp(min=1.0)
        logs["diffusion_loss"] = loss.detach()
        if imc_loss is not None:
            loss = loss + self.config.imc_weight * imc_loss
        return loss, logs


# --------------------------------------------------------------------------------------------------
# Fine-tuning from an LDM


def copy_matching_weights(unet: UNet, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor of `state` whose name and shape match into `unet`; returns what was copied/skipped.

    The class embedding of an LDM (1 row: the null class) differs in shape from a cLDM's (K+1 rows); its
    null row is copied to the cLDM's null row, so the unconditional model becomes the cLDM's null class
    and the K new class rows start from it too (fine-tuning starts from the LDM's unconditional output).
    """
    own = unet.state_dict()
    copied, skipped = [], []
    new = {}
    for key, value in own.items():
        src = state.get(key)
        if src is not None and src.shape == value.shape:
            new[key] = src.to(value.dtype)
            copied.append(key)
        elif (src is not None and "class_embed" in key and src.ndim == 2 and value.ndim == 2
              and src.shape[1] == value.shape[1]):
            rows = value.clone()
            rows[:] = src[-1].to(value.dtype)  # the source's null row, the last one
            new[key] = rows
            copied.append(f"{key} (null row)")
        else:
            new[key] = value
            skipped.append(key)
    unet.load_state_dict(new, strict=True)
    return {"copied": copied, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# Sample grids


def _load_decoder(path: Path, device: torch.device) -> nn.Module:
    from histosynth.autoencoder.train import load_vqgan

    return load_vqgan(path, device).latent_decoder().eval()


@torch.no_grad()
def write_sample_grid(unet: UNet, schedule: NoiseSchedule, latent_shape: tuple[int, ...], latent_scale: float,
                      class_ids: torch.Tensor, path: Path, *, steps: int, seed: int,
                      decoder: Optional[nn.Module] = None) -> Path:
    """Sample `class_ids` with a few DDIM steps of `unet`, decode (or show latents as RGB) and save a PNG."""
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)  # own stream: sampling never shifts training RNG
    noise = torch.randn((len(class_ids), *latent_shape), generator=generator).to(device)
    latents = run_sampler(lambda x, t, y: unet(x, t, y), schedule, noise, class_ids.to(device),
                          sampler="ddim", steps=steps)
    unet.train(was_training)
    if decoder is not None:
        images = decoder(latents / latent_scale).clamp(-1, 1)
    else:
        # No VQ-GAN: show the first three latent channels, each stretched to its own 1%..99% range.
        x = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1].repeat(1, 3, 1, 1)
        lo = x.flatten(2).quantile(0.01, dim=2)[..., None, None]
        hi = x.flatten(2).quantile(0.99, dim=2)[..., None, None]
        images = ((x - lo) / (hi - lo).clamp(min=1e-6) * 2 - 1).clamp(-1, 1)
    columns = max(1, int(math.ceil(math.sqrt(len(images)))))
    return write_bytes(path, encode_image(tile_grid(to_uint8(images), columns), "png"))


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    unet: Path  # EMA weights for `histosynth export`
    steps: int  # optimizer steps done in total
    final_loss: float  # mean diffusion loss over the last logging window (nan if none this run)
    resumed_from: Optional[int]  # the step a resumed run started from
    model: Optional[nn.Module] = None  # the EMA UNet (on every rank; only rank 0 writes it to `unet`)
    verdict: Optional[dict[str, Any]] = None  # diffusion.verdict's check of a small sample (rank 0, with a vqgan)


def train_ldm(config: LDMTrainConfig, run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Train the unconditional LDM: every tile's condition is the null class (`model.num_classes` = 0)."""
    if config.labels is not None or config.joint_imc or config.init_from is not None:
        raise InputError("ldm: labels, joint_imc and init_from belong to `train cldm`; remove them")
    if config.model.num_classes != 0:
        raise InputError(f"ldm.model.num_classes: must be 0 for the unconditional LDM, got {config.model.num_classes}")
    return _train(config, Path(run_dir), kind="ldm", progress=progress)


def train_cldm(config: LDMTrainConfig, run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Train (or, with `init_from`, fine-tune an LDM into) the class-conditional LDM.

    The number of classes comes from the label map (or, without one, from the largest class id in the
    labels CSV, or the IMC head's K with `joint_imc`); `model.num_classes` may be left at 0, and if it is
    set it must agree.
    """
    if config.labels is None and not config.joint_imc:
        raise InputError("cldm.labels: required (the per-tile labels CSV from `review apply`), or set joint_imc")
    if config.joint_imc and config.imc_head is None:
        raise InputError("cldm.imc_head: required with joint_imc (imc_head.safetensors of `histosynth cluster`)")
    return _train(config, Path(run_dir), kind="cldm", progress=progress)


def _class_count(config: LDMTrainConfig, labels: Optional[np.ndarray], head_k: Optional[int]) -> tuple[int, list[str]]:
    names: list[str] = []
    if config.label_map is not None:
        names = read_label_map(config.label_map).names
    if names:
        n = len(names)
    elif labels is not None:
        n = int(labels.max()) + 1
    else:
        n = int(head_k or 0)
    if labels is not None and labels.max() >= n:
        raise InputError(f"{config.labels}: class_id {int(labels.max())} is outside the label map's 0..{n - 1}")
    if config.model.num_classes not in (0, n):
        raise InputError(f"cldm.model.num_classes: {config.model.num_classes} does not match the {n} classes of "
                         "the labels; leave it at 0 to take it from them")
    return n, names


def _cluster_map(config: LDMTrainConfig, k: int, names: list[str]) -> Optional[torch.Tensor]:
    """cluster id -> class id (-1 = excluded) from the label map's `clusters` table, for joint IMC."""
    if config.label_map is None:
        return None
    label_map = read_label_map(config.label_map)  # checks that the table names classes
    if not label_map.cluster_to_class:
        raise InputError(f"{config.label_map}: joint_imc needs a 'clusters' table (cluster id -> class name)")
    out = torch.full((k,), -1, dtype=torch.long)
    for c, classes in label_map.cluster_classes().items():
        if not 0 <= c < k:
            raise InputError(f"{config.label_map}: clusters: cluster {c} is outside the head's 0..{k - 1}")
        if len(classes) > 1:
            # The head gives one cluster per tile, so it cannot say which part of a split cluster a tile is.
            raise InputError(f"{config.label_map}: clusters.{c}: the cluster is split into "
                             f"{', '.join(label_map.names[i] for i in classes)}; joint IMC cannot follow a split: "
                             "train on the per-tile labels instead (labels: <label map>_tiles.csv, joint_imc: false)")
        if classes:
            out[c] = names.index(label_map.names[classes[0]])
    return out


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _train(config: LDMTrainConfig, run_dir: Path, kind: Literal["ldm", "cldm"], progress: bool) -> TrainResult:
    if config.latents is None:
        raise InputError(f"{kind}.latents: required (the latent cache folder written by `train encode`)")
    info = dist.init_distributed(config.device)
    try:
        return _run(config, run_dir, kind, progress, info)
    finally:
        dist.cleanup()


def _run(config: LDMTrainConfig, run_dir: Path, kind: Literal["ldm", "cldm"], progress: bool,
         info: dist.DistInfo) -> TrainResult:
    device = info.device
    data = open_latents(config.latents)
    n_rows, *latent_shape = data.latents.shape
    if latent_shape[0] != config.model.in_channels:
        raise InputError(f"{kind}.model.in_channels: {config.model.in_channels} does not match the latent cache's "
                         f"{latent_shape[0]} channels")

    # ---- conditions
    labels = read_labels(config.labels, data.keys) if config.labels is not None else None
    head = None
    head_k = None
    if config.joint_imc:
        from histosynth.clusters.imc import IMCHead

        head = IMCHead.load(config.imc_head)
        head_k = head.k
    model_config = config.model
    names: list[str] = []
    cluster_to_class = None
    if kind == "cldm":
        num_classes, names = _class_count(config, labels, head_k)
        model_config = replace(config.model, num_classes=num_classes)
        if head is not None:
            cluster_to_class = _cluster_map(config, head.k, names)
            if cluster_to_class is None and head.k != num_classes:
                raise InputError(f"cldm.label_map: the head has {head.k} clusters but there are {num_classes} "
                                 "classes; give the label map with its 'clusters' table")
    rows = np.flatnonzero(labels >= 0) if labels is not None else np.arange(n_rows)
    class_of_row = labels if labels is not None else np.full(n_rows, model_config.num_classes, dtype=np.int64)

    # ---- model, objective, optimizer
    seed_everything(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    unet = UNet(model_config).to(device)
    init_report = None
    prior_samples = 0
    if config.init_from is not None:
        state, _, init_extra = load_checkpoint(config.init_from)
        init_report = copy_matching_weights(unet, state)
        # Training samples seen across rounds (each round fine-tunes the last): the model card's compute ledger.
        prior_samples = int(init_extra.get("samples_seen", 0))
        if not init_report["copied"]:
            raise InputError(f"{kind}.init_from: {config.init_from} shares no weights with this UNet")
    schedule = NoiseSchedule(config.schedule)
    objective = DiffusionObjective(unet, schedule, config, head, cluster_to_class).to(device)
    groups = [{"params": list(unet.parameters()), "lr": config.lr}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": config.imc_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    ema = EMA(unet, config.ema_decay)
    modules: dict[str, nn.Module] = {"unet": unet, "ema": ema_as_module(ema)}
    if head is not None:
        modules["imc_head"] = head

    # ---- data order: each rank a disjoint shuffled share of the rows, resumable mid-epoch
    dataset = _Rows(rows)
    sampler = dist.make_sampler(dataset, info, shuffle=True, seed=config.seed, drop_last=True)
    per_rank = len(sampler)
    batch = min(config.batch_size, per_rank)
    batches_per_epoch = per_rank // batch

    # ---- resume
    ckpt_dir = run_dir / CHECKPOINT_DIR
    state = TrainState()
    resumed_from = None
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        loaded = load_resume_checkpoint(latest, modules, {"adamw": optimizer})
        state = loaded.state
        resumed_from = state.step
        if loaded.world_size != info.world_size:
            seed_everything(config.seed, info.rank, offset=state.step)
    else:
        seed_everything(config.seed, info.rank)
    model = dist.wrap_ddp(objective, info)

    meta = {"config": to_dict(config), "kind": kind, "num_classes": model_config.num_classes}
    logger = MetricsLogger(run_dir / LOG_FILE, resume_step=resumed_from)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", yaml.safe_dump(meta, sort_keys=False))
        if init_report is not None and resumed_from is None:
            logger.log(0, {"init_copied": len(init_report["copied"]), "init_skipped": len(init_report["skipped"])},
                       split="init")

    decoder = _load_decoder(config.vqgan, device) if (config.vqgan is not None and info.is_main) else None
    grid_classes = _grid_classes(model_config.num_classes, config.sample_count)

    def sample_grid(step: int) -> None:
        if info.is_main and config.sample_count > 0:
            write_sample_grid(ema.averaged(unet), schedule, tuple(latent_shape), data.latent_scale, grid_classes,
                              run_dir / SAMPLES_DIR / f"step-{step:08d}.png", steps=config.sample_steps,
                              seed=config.seed, decoder=decoder)

    def checkpoint() -> None:
        save_resume_checkpoint(ckpt_dir, state, modules, {"adamw": optimizer}, meta=meta,
                               keep=config.keep_checkpoints)

    scale = data.latent_scale
    window: list[float] = []
    last_loss = float("nan")
    model.train()
    order: list[int] = []
    order_epoch = -1
    trained = False
    started = time.perf_counter()
    with TrainProgress(config.steps, state.step, description=f"train {kind}", enabled=progress,
                       log_file=run_dir / "train.log" if info.is_main else None) as bar:
        while state.step < config.steps:
            if order_epoch != state.epoch:  # the epoch's order is a pure function of (seed, epoch)
                sampler.set_epoch(state.epoch)
                order, order_epoch = list(iter(sampler)), state.epoch
            position_batch = state.epoch_position // batch
            idx = np.asarray(order[position_batch * batch:(position_batch + 1) * batch])
            cache_rows = np.sort(rows[idx])  # sorted reads are sequential in the memory map
            latents = torch.from_numpy(np.asarray(data.latents[cache_rows], dtype=np.float32)).to(device)
            class_ids = torch.from_numpy(class_of_row[cache_rows]).to(device)
            if config.augment:
                latents = random_dihedral(latents.cpu()).to(device)
            x0 = latents * scale
            noise = torch.randn(x0.shape).to(device)
            t = torch.randint(0, schedule.num_train_steps, (x0.shape[0],)).to(device)

            factor = _lr_factor(state.step, config.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss, logs = model(x0, latents, noise, t, class_ids, config.label_dropout if kind == "cldm" else 0.0)
            if not torch.isfinite(loss):
                raise RunError(f"{kind}: loss is {float(loss)} at step {state.step}; lower lr or check the latents")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
                         if config.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            ema.update(unet)

            state.step += 1
            trained = True
            state.epoch_position += batch
            if state.epoch_position // batch >= batches_per_epoch:
                state.epoch += 1
                state.epoch_position = 0
            window.append(float(logs["diffusion_loss"]))
            if state.step % config.log_every == 0 or state.step == config.steps:
                reduced = {k: float(dist.all_reduce_mean(v.double())) for k, v in logs.items()}
                last_loss = float(np.mean(window))
                logger.log(state.step, {"loss": float(loss.detach()), **reduced,
                                        "loss_window": last_loss, "lr": config.lr * factor,
                                        "grad_norm": float(grad_norm), "epoch": state.epoch})
                window.clear()
            bar.update(state.step, loss=float(logs["diffusion_loss"]))
            if state.step % config.checkpoint_every == 0 and state.step < config.steps:
                checkpoint()
            if config.time_limit_s is not None and bool(dist.all_reduce_mean(torch.tensor(
                    float(time.perf_counter() - started > config.time_limit_s)))):
                break  # the final checkpoint and export below still run
            if config.sample_every and state.step % config.sample_every == 0 and state.step < config.steps:
                sample_grid(state.step)
    out = run_dir / UNET_FILE
    shipped = ema.averaged(unet).eval()
    if trained:
        checkpoint()
    if trained or not out.exists():
        sample_grid(state.step)
    if info.is_main:
        extra = {
            "kind": kind,
            "step": state.step,
            "samples_seen": prior_samples + state.step * batch * info.world_size,
            "latent_scale": scale,
            "schedule": to_dict(config.schedule),
            "data": config.data or str((data.meta.get("source") or {}).get("data", config.latents)),
            "class_names": names,
            "label_dropout": config.label_dropout if kind == "cldm" else 1.0,
            "joint_imc": config.joint_imc,
        }
        tile = data.meta.get("tile_size")
        if isinstance(tile, list) and len(tile) == 2 and tile[0] == tile[1]:
            tile = tile[0]  # the cache records (h, w); tiles are square
        if isinstance(tile, int):
            extra["tile_size"] = tile
        if "microns_per_pixel" in data.meta:
            extra["microns_per_pixel"] = data.meta["microns_per_pixel"]
        save_checkpoint(shipped, out, to_dict(model_config), extra)
        if head is not None:
            head.save(run_dir / "imc_head.safetensors")
    verdict = None
    if info.is_main and decoder is not None and config.check_samples > 0:
        verdict = _check(shipped, schedule, decoder, tuple(latent_shape), scale, model_config.num_classes,
                         [data.keys[i] for i in rows], config, run_dir, logger, state.step)
    dist.barrier()
    return TrainResult(unet=out, steps=state.step, final_loss=last_loss, resumed_from=resumed_from, model=shipped,
                       verdict=verdict)


def _check(unet: nn.Module, schedule: NoiseSchedule, decoder: nn.Module, latent_shape: tuple[int, ...],
           latent_scale: float, num_classes: int, tile_paths: list[str], config: LDMTrainConfig, run_dir: Path,
           logger: MetricsLogger, step: int) -> dict[str, Any]:
    """Run `diffusion.verdict.check_samples` on the EMA model; write verdict.json and log it."""
    from histosynth.diffusion.verdict import check_samples, verdict_record
    from histosynth.io import write_json

    existing = [p for p in tile_paths if Path(p).is_file()]
    if not existing:
        record = {"level": "unchecked", "message": "no training tile file is readable: samples not checked",
                  "step": step}
    else:
        class_ids = _grid_classes(num_classes, config.check_samples)
        verdict = check_samples(unet, schedule, decoder, latent_shape, latent_scale, class_ids, existing,
                                seed=config.seed)
        record = verdict_record(verdict, step=step, samples=config.check_samples)
    write_json(run_dir / "verdict.json", record)
    logger.log(step, {"level": record["level"], "message": record["message"]}, split="verdict")
    return record


def _grid_classes(num_classes: int, count: int) -> torch.Tensor:
    """Class ids of a sample grid: the classes in turn (conditional) or the null class (unconditional)."""
    if num_classes == 0:
        return torch.zeros(count, dtype=torch.long)
    return torch.arange(count, dtype=torch.long) % num_classes
