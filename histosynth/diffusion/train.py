"""Latent diffusion training: the unconditional LDM and the cluster-conditioned cLDM (Rumman et al. 2025).

One loop serves both (`train_ldm`, `train_cldm`); its data is `diffusion.data` (the memory-mapped latent
cache, per-tile labels, the batch stream) and its loss `diffusion.objective` (noise, targets, min-SNR
weights, joint IMC). The condition `y` of a tile is:

- `train_ldm`: the null class everywhere (an unconditional model);
- `train_cldm`: each tile's final label from `review apply`, replaced by the null class with probability
  `label_dropout` so the one model also learns the unconditional score (classifier-free guidance);
- `train_cldm` with `joint_imc`: the argmax of the information-maximization clustering head on the
  tile's latent features, the head being trained at the same time with its IM loss added (the paper's
  joint training); the head's clusters map to classes through the label map's `clusters` table.

Resumable (rank-0 checkpoints with optimizer, EMA and RNG states; a resumed run equals an uninterrupted
one), runs unchanged under `torchrun` (DistributedDataParallel, each rank a disjoint share of the latent
rows), logs JSONL and train.log, shows a progress bar, and writes sample grids (a few DDIM steps of the EMA
model, decoded by the VQ-GAN when given). The shipped weights are the EMA weights, in `unet.safetensors`
with the facts `histosynth export` reads; with a VQ-GAN, a few generated tiles are checked against
training tiles at the end (`verdict.json`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import yaml
from torch import nn

from histosynth.configio import from_dict, require, to_dict
from histosynth.diffusion.data import (
    LatentData,
    class_count,
    cluster_to_class,
    latent_loader,
    open_latents,
    read_labels,
)
from histosynth.diffusion.experts import range_with_partner
from histosynth.diffusion.grow import deepen, grown_from
from histosynth.diffusion.objective import DiffusionObjective, copy_matching_weights
from histosynth.diffusion.samplers import sample as run_sampler
from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError, RunError
from histosynth.imageops import encode_image, random_dihedral, tile_grid, to_uint8
from histosynth.io import write_bytes, write_json, write_text
from histosynth.runtime import dist
from histosynth.runtime.devices import torch_threads
from histosynth.runtime.batches import resumable_batches
from histosynth.runtime.checkpointing import (
    SampleCount,
    TrainState,
    latest_checkpoint,
    load_resume_checkpoint,
    save_resume_checkpoint,
)
from histosynth.runtime.ema import EMA, ema_as_module
from histosynth.runtime.schedule import LRDecay
from histosynth.runtime.schedule import lr_factor as schedule_factor
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
    lr_decay: LRDecay = "none"  # after warm-up, decay lr to min_lr at `steps`: a
    # cool-down at the end of a long constant-lr training settles the weights the EMA averages (round 7)
    min_lr: float = 0.0  # the learning rate `lr_decay` reaches at `steps`
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    steps: int = 10_000  # optimizer steps in total (a resumed run continues up to this)
    ema_decay: float = 0.999  # EMA of the weights; the EMA model is what is shipped
    ema_warmup: bool = True  # warm the decay up from 0.9 (a run from scratch). False: the average starts at
    # init_from's weights (already an EMA) at the full decay, so a continuation blends into them instead of
    # replacing them within a few hundred steps by an average over its own noisy last steps
    loss: Literal["min_snr", "mse"] = "min_snr"  # min-SNR-gamma weighting (Hang et al. 2023) or plain MSE
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting
    t_min: int = 0  # train on timesteps t_min <= t < t_max only: a noise-range expert (eDiff-I, Balaji et al.
    t_max: Optional[int] = None  # 2022) that a sampler switches to in its range; None = T (every timestep)
    label_dropout: float = 0.1  # P(label -> null class) for classifier-free guidance (cLDM only)
    augment: bool = False  # random flips / 90-degree turns of the latents themselves: cheap, but only right for an
    # encoder that commutes with them; pcam96's does not (turned latents share 2% of the codes of the turned
    # tiles' latents: benchmarks/latent_equivariance.py). The exact alternative is a cache encoded with
    # `train encode --dihedral` (8 encoder-made views per tile)
    autocast: Literal["none", "bf16"] = "none"  # bf16 autocast of the UNet forward (CPU AMX/AVX512-BF16, CUDA);
    # weights, optimizer and loss stay fp32. ~1.5x the steps/s of fp32 on an AMX CPU (benchmarks/train_speed.py)
    compile: bool = False  # torch.compile the training step's forward (UNet + loss): 1.20x the bf16 UNet's
    # latents/s on this project's 2-core CPU after about a minute of compilation (docs/benchmarks.md), so it pays
    # for runs of hours; checkpoints are unchanged (the UNet itself is not wrapped), but inductor's kernels round
    # differently, so a compiled run does not reproduce an eager one bit for bit
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
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default (one per core). Set 1 when two trainings
    # share a small machine: their threads otherwise spin on each other's cores (runtime.devices.torch_threads)
    time_limit_s: Optional[float] = None  # stop (checkpoint, export) after this many seconds, wherever `steps`
    # stands: a lent GPU or a session ends on time; rerun the same command to continue
    data: str = ""  # free-text description of the training data, recorded in the checkpoint (provenance)

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.batch_size >= 1, f"{path}.batch_size", "must be at least 1")
        require(self.lr > 0, f"{path}.lr", "must be positive")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        require(0 <= self.min_lr <= self.lr, f"{path}.min_lr", f"must be in [0, lr = {self.lr}]")
        require(self.lr_decay == "none" or self.steps > self.warmup_steps, f"{path}.steps",
                f"must exceed warmup_steps ({self.warmup_steps}) when lr_decay is {self.lr_decay!r}")
        require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.steps >= 1, f"{path}.steps", "must be at least 1")
        require(0 <= self.ema_decay < 1, f"{path}.ema_decay", "must be in [0, 1)")
        require(self.ema_warmup or self.init_from is not None, f"{path}.ema_warmup",
                "false needs init_from (an average that starts at random weights at the full decay stays near them)")
        require(self.min_snr_gamma > 0, f"{path}.min_snr_gamma", "must be positive")
        top, t_max = self.schedule.num_train_steps, _t_max(self)
        require(1 <= t_max <= top, f"{path}.t_max", f"must be in 1..{top} (schedule.num_train_steps) or null")
        require(0 <= self.t_min < t_max, f"{path}.t_min", f"must be in 0..{t_max - 1} (below t_max = {t_max})")
        require(self.t_min == 0 and t_max == top or self.init_from is not None, f"{path}.t_min",
                "a timestep range (an expert) needs init_from: the full-range network it specialises, which also "
                "covers the other timesteps in its sample check")
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
        require(self.threads >= 0, f"{path}.threads", f"must be >= 0 (0 = torch's default), got {self.threads}")
        if self.joint_imc:
            require(self.labels is None, f"{path}.labels",
                    "must be null with joint_imc (the labels come from the IMC head)")


def _t_max(config: LDMTrainConfig) -> int:
    """The end (exclusive) of the timesteps a run trains on."""
    return config.schedule.num_train_steps if config.t_max is None else config.t_max


def load_ldm_config(data: Any, path: str = "ldm") -> LDMTrainConfig:
    """`LDMTrainConfig` from plain data (YAML), with key-path errors."""
    return from_dict(LDMTrainConfig, data, path)


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


def _train(config: LDMTrainConfig, run_dir: Path, kind: Literal["ldm", "cldm"], progress: bool) -> TrainResult:
    if config.latents is None:
        raise InputError(f"{kind}.latents: required (the latent cache folder written by `train encode`)")
    info = dist.init_distributed(config.device)
    try:
        with torch_threads(config.threads):  # restores the caller's setting (tests, the pipeline)
            return _run(config, run_dir, kind, progress, info)
    finally:
        dist.cleanup()


# --------------------------------------------------------------------------------------------------
# Setup


@dataclass
class _Run:
    """One diffusion run: its data, networks, optimizer and state (built by `_setup`)."""

    config: LDMTrainConfig
    kind: Literal["ldm", "cldm"]
    info: dist.DistInfo
    run_dir: Path
    data: LatentData
    rows: np.ndarray  # cache rows trained on (tiles with a class)
    model_config: UNetConfig  # num_classes resolved from the labels
    class_names: list[str]
    unet: UNet
    head: Optional[nn.Module]  # the IMC head trained jointly (joint_imc)
    schedule: NoiseSchedule
    objective: DiffusionObjective  # UNet (+ head) and loss; `model` is it inside DDP
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    modules: dict[str, nn.Module]  # what a resume checkpoint holds
    loader: torch.utils.data.DataLoader
    sampler: dist.ResumableSampler
    batch: int  # per-rank batch size
    state: TrainState
    resumed_from: Optional[int]
    count: SampleCount  # training samples seen, over the rounds `init_from` continues and this run
    logger: MetricsLogger
    meta: dict[str, Any]  # the config as written beside the checkpoints
    decoder: Optional[nn.Module]  # the VQ-GAN decoder for sample grids and the check (rank 0)
    grid_classes: torch.Tensor  # class ids of the sample grids
    partner: Optional[nn.Module] = None  # an expert's frozen init_from network: it samples the other timesteps

    def sampling_model(self, averaged: Optional[nn.Module] = None) -> nn.Module:
        """The EMA model (`averaged` where already built) as a sampler sees it: an expert runs its timesteps, its
        partner the rest."""
        averaged = self.ema.averaged(self.unet) if averaged is None else averaged
        if self.partner is None:
            return averaged
        return range_with_partner(averaged, self.partner, self.config.t_min, _t_max(self.config),
                                  self.schedule.num_train_steps)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.data.latents.shape[1:])

    @property
    def label_dropout(self) -> float:
        return self.config.label_dropout if self.kind == "cldm" else 0.0

    def checkpoint(self) -> None:
        """A resume checkpoint of the current step (rank 0 writes it)."""
        self.count.record(self.meta, self.state.step, self.batch, self.info.world_size)
        save_resume_checkpoint(self.run_dir / CHECKPOINT_DIR, self.state, self.modules, {"adamw": self.optimizer},
                               meta=self.meta, keep=self.config.keep_checkpoints)

    def sample_grid(self, step: int) -> None:
        """A grid of the EMA model's samples, classes in turn (rank 0)."""
        if self.info.is_main and self.config.sample_count > 0:
            write_sample_grid(self.sampling_model(), self.schedule, self.latent_shape, self.data.latent_scale,
                              self.grid_classes, self.run_dir / SAMPLES_DIR / f"step-{step:08d}.png",
                              steps=self.config.sample_steps, seed=self.config.seed, decoder=self.decoder)


def _setup(config: LDMTrainConfig, run_dir: Path, kind: Literal["ldm", "cldm"], info: dist.DistInfo) -> _Run:
    """Open the data, build the networks and the optimizer, and resume from the newest checkpoint if any.

    The order matters for reproducibility: weights are initialised from `config.seed` (the same on every
    rank), then the RNG is restored from the checkpoint or seeded for this rank; nothing after draws from it
    before the first step.
    """
    device = info.device
    data = open_latents(config.latents)
    n_rows, *latent_shape = data.latents.shape
    if latent_shape[0] != config.model.in_channels:
        raise InputError(f"{kind}.model.in_channels: {config.model.in_channels} does not match the latent cache's "
                         f"{latent_shape[0]} channels")

    # ---- conditions
    labels = read_labels(config.labels, data.keys) if config.labels is not None else None
    head = None
    if config.joint_imc:
        from histosynth.clusters.imc import IMCHead

        head = IMCHead.load(config.imc_head)
    model_config = config.model
    names: list[str] = []
    cluster_map = None
    if kind == "cldm":
        num_classes, names = class_count(config.label_map, labels, head.k if head is not None else None,
                                         config.model.num_classes, config.labels)
        model_config = replace(config.model, num_classes=num_classes)
        if head is not None:
            cluster_map = cluster_to_class(config.label_map, head.k, names)
            if cluster_map is None and head.k != num_classes:
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
        state, init_config, init_extra = load_checkpoint(config.init_from)
        source = grown_from(init_config, model_config)
        if source is not None:
            # A deeper UNet grown from a trained one: same function at step 0, more capacity (diffusion.grow).
            unet.load_state_dict(deepen(state, source, model_config))
            init_report = {"copied": list(state), "skipped": [], "grown": model_config.num_res_blocks
                           - source.num_res_blocks}
        else:
            init_report = copy_matching_weights(unet, state)
        # Training samples seen across rounds (each round fine-tunes the last): the model card's compute ledger.
        prior_samples = int(init_extra.get("samples_seen", 0))
        if not init_report["copied"]:
            raise InputError(f"{kind}.init_from: {config.init_from} shares no weights with this UNet")
    partner = None
    if _t_max(config) - config.t_min < config.schedule.num_train_steps:
        partner = copy.deepcopy(unet).eval().requires_grad_(False)  # init_from's function, frozen
    schedule = NoiseSchedule(config.schedule)
    objective = DiffusionObjective(unet, schedule, loss=config.loss, min_snr_gamma=config.min_snr_gamma,
                                   autocast=config.autocast, head=head, cluster_to_class=cluster_map,
                                   imc_mu=config.imc_mu, imc_weight=config.imc_weight).to(device)
    groups = [{"params": list(unet.parameters()), "lr": config.lr}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": config.imc_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    ema = EMA(unet, config.ema_decay, warmup=config.ema_warmup)
    modules: dict[str, nn.Module] = {"unet": unet, "ema": ema_as_module(ema)}
    if head is not None:
        modules["imc_head"] = head

    # ---- data order: each rank a disjoint shuffled share of the rows, resumable mid-epoch
    loader, sampler, batch = latent_loader(data, rows, class_of_row, config.batch_size, info, config.seed)

    # ---- resume
    state = TrainState()
    resumed_from = None
    count = SampleCount(prior_samples)
    latest = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if latest is not None:
        loaded = load_resume_checkpoint(latest, modules, {"adamw": optimizer})
        state = loaded.state
        resumed_from = state.step
        # The count this run started from, as recorded when it started: init_from may since have been overwritten
        # by a later round's export (older checkpoints did not record it; init_from's count is then used).
        prior_samples = int(loaded.meta.get("prior_samples", prior_samples))
        count = SampleCount.resumed(loaded.meta, prior_samples)
        if loaded.world_size != info.world_size:
            seed_everything(config.seed, info.rank, offset=state.step)
    else:
        seed_everything(config.seed, info.rank)
    model = dist.wrap_ddp(objective, info)
    if config.compile:
        # The DDP wrapper is compiled, not the UNet: dynamo then splits the graph at DDP's gradient buckets, and
        # state dicts, the EMA and the exports keep their plain keys (no `_orig_mod.` prefix).
        model = torch.compile(model)

    meta = {"config": to_dict(config), "kind": kind, "num_classes": model_config.num_classes,
            "prior_samples": prior_samples}
    logger = MetricsLogger(run_dir / LOG_FILE, resume_step=resumed_from)
    if info.is_main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(meta, sort_keys=False))
        if init_report is not None and resumed_from is None:
            logger.log(0, {"init_copied": len(init_report["copied"]), "init_skipped": len(init_report["skipped"]),
                           "init_grown_blocks": init_report.get("grown", 0)}, split="init")
    decoder = _load_decoder(config.vqgan, device) if (config.vqgan is not None and info.is_main) else None
    return _Run(config=config, kind=kind, info=info, run_dir=run_dir, data=data, rows=rows,
                model_config=model_config, class_names=names, unet=unet, head=head, schedule=schedule,
                objective=objective, model=model, optimizer=optimizer, ema=ema, modules=modules, loader=loader,
                sampler=sampler, batch=batch, state=state, resumed_from=resumed_from, count=count,
                logger=logger, meta=meta, decoder=decoder,
                grid_classes=_grid_classes(model_config.num_classes, config.sample_count), partner=partner)


# --------------------------------------------------------------------------------------------------
# The loop


def lr_factor(step: int, config: LDMTrainConfig) -> float:
    """Multiplier of `config.lr` at optimizer step `step`: linear warm-up, then constant or decaying to min_lr."""
    return schedule_factor(step, config.warmup_steps, config.warmup_steps, config.steps, config.lr_decay,
                           config.min_lr / config.lr)


def _train_step(run: _Run, latents: torch.Tensor, class_ids: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, float]:
    """One optimizer step on a batch; returns the loss, the objective's logs, the gradient norm and the lr."""
    config, device = run.config, run.info.device
    latents, class_ids = latents.to(device), class_ids.to(device)
    if config.augment:
        latents = random_dihedral(latents.cpu()).to(device)
    # The draws in this order (views, noise, timesteps, then label dropout in the objective): a resumed run
    # restores the RNG and replays them.
    x0 = latents * run.data.latent_scale
    noise = torch.randn(x0.shape).to(device)
    t = torch.randint(config.t_min, _t_max(config), (x0.shape[0],)).to(device)

    factor = lr_factor(run.state.step, config)
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    loss, logs = run.model(x0, latents, noise, t, class_ids, run.label_dropout)
    if not torch.isfinite(loss):
        raise RunError(f"{run.kind}: loss is {float(loss)} at step {run.state.step}; lower lr or check the latents")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.objective.parameters(), config.grad_clip)
                 if config.grad_clip > 0 else torch.tensor(0.0))
    run.optimizer.step()
    run.ema.update(run.unet)
    return loss, logs, grad_norm, config.lr * factor


def _run(config: LDMTrainConfig, run_dir: Path, kind: Literal["ldm", "cldm"], progress: bool,
         info: dist.DistInfo) -> TrainResult:
    run = _setup(config, run_dir, kind, info)
    state = run.state
    window: list[float] = []  # diffusion losses since the last log record
    last_loss = float("nan")
    trained = False
    started = time.perf_counter()
    run.model.train()
    stream = resumable_batches(run.loader, run.sampler, state.epoch, state.epoch_position)
    with TrainProgress(config.steps, state.step, description=f"train {kind}", enabled=progress,
                       log_file=run_dir / "train.log" if info.is_main else None) as bar:
        while state.step < config.steps:
            epoch, position, (latents, class_ids) = next(stream)
            loss, logs, grad_norm, lr = _train_step(run, latents, class_ids)
            state.step += 1
            state.epoch, state.epoch_position = epoch, position
            trained = True

            window.append(float(logs["diffusion_loss"]))
            if state.step % config.log_every == 0 or state.step == config.steps:
                reduced = {k: float(dist.all_reduce_mean(v.double())) for k, v in logs.items()}
                last_loss = float(np.mean(window))
                run.logger.log(state.step, {"loss": float(loss.detach()), **reduced, "loss_window": last_loss,
                                            "lr": lr, "grad_norm": float(grad_norm), "epoch": state.epoch})
                window.clear()
            bar.update(state.step, loss=float(logs["diffusion_loss"]))

            if state.step % config.checkpoint_every == 0 and state.step < config.steps:
                run.checkpoint()
            if config.time_limit_s is not None and dist.any_rank(time.perf_counter() - started > config.time_limit_s):
                break  # the final checkpoint and export below still run
            if config.sample_every and state.step % config.sample_every == 0 and state.step < config.steps:
                run.sample_grid(state.step)
    return _finish(run, trained, last_loss)


def _finish(run: _Run, trained: bool, last_loss: float) -> TrainResult:
    """The last checkpoint and sample grid, the export (EMA weights) and the sample check."""
    config, info, state = run.config, run.info, run.state
    out = run.run_dir / UNET_FILE
    shipped = run.ema.averaged(run.unet).eval()
    if trained:
        run.checkpoint()
    if trained or not out.exists():
        run.sample_grid(state.step)
    if info.is_main:
        save_checkpoint(shipped, out, to_dict(run.model_config), _export_facts(run))
        if run.head is not None:
            run.head.save(run.run_dir / "imc_head.safetensors")
    verdict = None
    if info.is_main and run.decoder is not None and config.check_samples > 0:
        verdict = _check(run.sampling_model(shipped), run.schedule, run.decoder, run.latent_shape,
                         run.data.latent_scale,
                         run.model_config.num_classes, [run.data.keys[i] for i in run.rows], config, run.run_dir,
                         run.logger, state.step)
    dist.barrier()
    return TrainResult(unet=out, steps=state.step, final_loss=last_loss, resumed_from=run.resumed_from,
                       model=shipped, verdict=verdict)


def _export_facts(run: _Run) -> dict[str, Any]:
    """The `extra` of unet.safetensors: what `histosynth export` and the model card read."""
    config, data = run.config, run.data
    extra: dict[str, Any] = {
        "kind": run.kind,
        "step": run.state.step,
        "samples_seen": run.count.at(run.state.step, run.batch, run.info.world_size),
        "latent_scale": data.latent_scale,
        "schedule": to_dict(config.schedule),
        "data": config.data or str((data.meta.get("source") or {}).get("data", config.latents)),
        "class_names": run.class_names,
        "label_dropout": config.label_dropout if run.kind == "cldm" else 1.0,
        "joint_imc": config.joint_imc,
    }
    if run.partner is not None:  # an expert: `histosynth export --unet-expert` reads its range from here
        extra["t_range"] = [config.t_min, _t_max(config)]
    tile = data.meta.get("tile_size")
    if isinstance(tile, list) and len(tile) == 2 and tile[0] == tile[1]:
        tile = tile[0]  # the cache records (h, w); tiles are square
    if isinstance(tile, int):
        extra["tile_size"] = tile
    if "microns_per_pixel" in data.meta:
        extra["microns_per_pixel"] = data.meta["microns_per_pixel"]
    return extra


# --------------------------------------------------------------------------------------------------
# Sample grids and the check of the shipped model


def _load_decoder(path: Path, device: torch.device) -> nn.Module:
    from histosynth.autoencoder.train import load_vqgan

    # Building the VQ-GAN draws its random initial weights from the global RNG; fork it, so the training
    # stream right after a resume is the one the checkpoint saved (else a resumed run with `vqgan` set
    # diverges from an uninterrupted one).
    with torch.random.fork_rng(devices=[]):
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


def _check(unet: nn.Module, schedule: NoiseSchedule, decoder: nn.Module, latent_shape: tuple[int, ...],
           latent_scale: float, num_classes: int, tile_paths: list[str], config: LDMTrainConfig, run_dir: Path,
           logger: MetricsLogger, step: int) -> dict[str, Any]:
    """Run `diffusion.verdict.check_samples` on the EMA model; write verdict.json and log it."""
    from histosynth.diffusion.verdict import check_samples, verdict_record

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
