"""What the clustering sees of each tile: feature kinds, one registry entry each.

| kind                    | features                                                                          |
|-------------------------|-----------------------------------------------------------------------------------|
| `latent_features`       | the fixed summary of the VQ-GAN latent (features.py): colour, contrast, texture, layout |
| `unet`                  | pooled activations of a trained diffusion UNet reading the latent noised to step `t` |
| `latent_features+unet`  | both, side by side; each block weighted as below                                  |

No pretrained network is needed: the UNet is the project's own latent diffusion model (`train ldm`/`cldm`,
or a bundle's `unet.safetensors`). A denoiser has to recognise tissue to remove noise, so its activations
separate tissue types that share a stain (DDAE, Xiang et al. 2023, found such features linearly separable
at small noise levels). The latent is scaled to diffusion space, noised to the training timestep `t` with
noise that depends only on (`seed`, row), and read with the null class; the output of the middle block and
of every decoder level is averaged over space, one block per tap (for `weights/pcam96`: 96 + 96 + 96 + 48
numbers). The scaler standardises every column and weights each block by 1/sqrt(its size), as for the
latent features, so no tap drowns the others.

`FEATURE_KINDS` is the list the CLI (`--features`), config validation (`cluster.features.kind`) and
docs/training.md are checked against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from histosynth.clusters.features import feature_blocks, latent_features
from histosynth.configio import from_dict, require
from histosynth.errors import InputError

Progress = Callable[[int, int], None]  # (rows done, rows in all)


@dataclass
class FeatureConfig:
    """Which features the clustering uses (`histosynth cluster --features ...`)."""

    kind: str = "latent_features"  # a name in FEATURE_KINDS
    unet: Optional[str] = None  # UNet checkpoint (`train ldm/cldm` output or a bundle's unet.safetensors); unet kinds
    t: int = 100  # training timestep the latents are noised to before the UNet reads them (0 = clean)
    seed: int = 0  # noise seed; a tile's noise depends on (seed, its row) only, not on the batch
    batch_size: int = 256  # latents per UNet forward pass
    device: str = "cpu"  # device of the UNet forward passes: auto | cpu | cuda | cuda:N

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.kind in FEATURE_KINDS, f"{path}.kind",
                f"unknown value {self.kind!r}; allowed: {', '.join(FEATURE_KINDS)}")
        require(self.t >= 0, f"{path}.t", f"must be >= 0, got {self.t}")
        require(self.batch_size >= 1, f"{path}.batch_size", "must be at least 1")
        if FEATURE_KINDS[self.kind].needs_unet:
            require(self.unet is not None, f"{path}.unet", f"kind {self.kind} needs a UNet checkpoint (--unet)")
        else:
            require(self.unet is None, f"{path}.unet", f"is only used by the unet kinds, not by {self.kind}")


@dataclass
class RawFeatures:
    """Unstandardised features of every row, their block sizes, and what `cluster.json` records about them."""

    features: torch.Tensor  # (R, D) float32
    blocks: list[int] | None  # block sizes in column order (None: one weight per column, for given features)
    info: dict[str, Any]  # cluster.json "features": kind, dim and the kind's own settings


@dataclass(frozen=True)
class FeatureKind:
    """A registry entry: the name users type, one line of help, and the function that computes the features."""

    name: str
    summary: str
    needs_unet: bool
    compute: Callable[[np.ndarray, FeatureConfig, Optional[Progress]], RawFeatures]


FEATURE_KINDS: dict[str, FeatureKind] = {}


def register(kind: FeatureKind) -> FeatureKind:
    """Add `kind` to `FEATURE_KINDS` (names are unique)."""
    if kind.name in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind.name!r} is already registered")
    FEATURE_KINDS[kind.name] = kind
    return kind


def load_feature_config(data: dict, path: str = "features") -> FeatureConfig:
    """`FeatureConfig` from plain data (YAML), with key-path errors."""
    return from_dict(FeatureConfig, data, path)


def compute_features(array: np.ndarray, config: FeatureConfig, progress: Progress | None = None) -> RawFeatures:
    """Raw features of every row of `array`: latents `(R, C, h, w)`, or ready-made features `(R, D)` used as is."""
    config.validate("features")
    if array.ndim == 2:
        if config.kind != "latent_features":
            raise InputError(f"--features {config.kind}: needs latents (N, C, h, w); --latents holds features "
                             f"{tuple(array.shape)}")
        features = torch.from_numpy(np.array(array, dtype=np.float32))
        return RawFeatures(features, None, {"kind": "given", "channels": None, "dim": int(features.shape[1])})
    return FEATURE_KINDS[config.kind].compute(array, config, progress)


def _batches(array: np.ndarray, batch: int) -> list[tuple[int, torch.Tensor]]:
    return [(i, torch.from_numpy(np.array(array[i : i + batch], dtype=np.float32)))
            for i in range(0, len(array), batch)]


def _latent(array: np.ndarray, config: FeatureConfig, progress: Progress | None) -> RawFeatures:
    parts = [latent_features(x) for _, x in _batches(array, 4096)]  # batched: caches are memory-mapped
    channels = int(array.shape[1])
    features = torch.cat(parts)
    return RawFeatures(features, [size for _, size in feature_blocks(channels) if size],
                       {"kind": "latent_features", "channels": channels, "dim": int(features.shape[1])})


register(FeatureKind("latent_features", "summary of the VQ-GAN latent: colour, contrast, texture, 4x4 layout",
                     False, _latent))


# --------------------------------------------------------------------------------------------------
# UNet activations


class UNetFeatures:
    """Pooled activations of a trained latent UNet at one noise level; see the module doc."""

    def __init__(self, path: str | Path, t: int, seed: int = 0, device: str = "cpu") -> None:
        from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig
        from histosynth.diffusion.unet import UNet, UNetConfig
        from histosynth.runtime.devices import resolve_device
        from histosynth.runtime.weights import load_checkpoint, load_state_dict

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"--unet: file not found: {self.path}")
        state, config, extra = load_checkpoint(self.path)
        if extra.get("kind", "unet") not in ("unet", "ldm", "cldm"):
            raise InputError(f"--unet: {self.path} is a {extra.get('kind')!r} checkpoint, not a diffusion UNet")
        # Training checkpoints record the latent scale and schedule; a bundle keeps them in its manifest.
        manifest_path = self.path.parent / "manifest.json"
        manifest: dict[str, Any] = {}
        if ("latent_scale" not in extra or "schedule" not in extra) and manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InputError(f"{manifest_path}: not valid JSON: {e}") from None
        scale = extra.get("latent_scale", manifest.get("latent_scale"))
        schedule = extra.get("schedule", manifest.get("schedule"))
        if not isinstance(scale, (int, float)) or schedule is None:
            raise InputError(f"--unet: {self.path} records no latent_scale and schedule (nor does a manifest.json "
                             "beside it); give a `train ldm`/`train cldm` checkpoint or a bundle's unet.safetensors")
        self.latent_scale = float(scale)
        self.schedule = NoiseSchedule(from_dict(ScheduleConfig, schedule, f"{self.path}: schedule"))
        if not 0 <= t < self.schedule.num_train_steps:
            raise InputError(f"--unet-t: {t} is not a training timestep; allowed: 0..{self.schedule.num_train_steps - 1}")
        self.t, self.seed = t, seed
        self.device = resolve_device(device)
        self.unet = UNet(from_dict(UNetConfig, config, f"{self.path}: config"))
        load_state_dict(self.unet, state, self.path)
        self.unet.to(self.device).eval()
        # Taps: the middle block, then the last stage of every decoder level (before its upsampling).
        self.taps = [("mid", self.unet.mid_res2)] + [(f"up{i}", stages[-1]) for i, stages in enumerate(self.unet.up)]
        self.widths = [0] * len(self.taps)

    def block_sizes(self) -> list[int]:
        """The width of every tap, in column order (known after the first call)."""
        return list(self.widths)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, first_row: int) -> torch.Tensor:
        """Features `(N, D)` of raw cached latents `(N, C, h, w)` that are rows `first_row...` of the cache."""
        n = len(latents)
        # One generator per row, seeded by (seed, row): a tile's noise does not depend on the batch it is in.
        shape = tuple(latents.shape[1:])
        noise = torch.from_numpy(np.stack([np.random.default_rng([self.seed, first_row + i]).standard_normal(
            shape, dtype=np.float32) for i in range(n)]))
        x0 = latents.to(self.device) * self.latent_scale
        t = torch.full((n,), self.t, dtype=torch.long, device=self.device)
        xt = self.schedule.add_noise(x0, noise.to(self.device), t)
        pooled: list[torch.Tensor] = []
        hooks = [module.register_forward_hook(lambda _m, _i, out: pooled.append(out.mean(dim=(2, 3))))
                 for _, module in self.taps]
        try:
            self.unet(xt, t, torch.full((n,), self.unet.null_class, dtype=torch.long, device=self.device))
        finally:
            for h in hooks:
                h.remove()
        self.widths = [int(p.shape[1]) for p in pooled]
        return torch.cat(pooled, dim=1).float().cpu()  # (N, sum of tap widths)


def _unet(array: np.ndarray, config: FeatureConfig, progress: Progress | None) -> RawFeatures:
    assert config.unet is not None  # FeatureConfig.validate
    extractor = UNetFeatures(config.unet, config.t, config.seed, config.device)
    parts = []
    for start, x in _batches(array, config.batch_size):
        parts.append(extractor(x, start))
        if progress:
            progress(start + len(x), len(array))
    features = torch.cat(parts)
    return RawFeatures(features, extractor.block_sizes(),
                       {"kind": "unet", "channels": int(array.shape[1]), "dim": int(features.shape[1]),
                        "unet": str(config.unet), "t": config.t, "seed": config.seed,
                        "taps": [name for name, _ in extractor.taps]})


register(FeatureKind("unet", "pooled activations of the trained diffusion UNet at noise step --unet-t", True, _unet))


def _both(array: np.ndarray, config: FeatureConfig, progress: Progress | None) -> RawFeatures:
    latent, unet = _latent(array, config, None), _unet(array, config, progress)
    assert latent.blocks is not None and unet.blocks is not None
    info = dict(unet.info, kind="latent_features+unet", dim=latent.info["dim"] + unet.info["dim"])
    return RawFeatures(torch.cat([latent.features, unet.features], dim=1), latent.blocks + unet.blocks, info)


register(FeatureKind("latent_features+unet", "both of the above, side by side", True, _both))
