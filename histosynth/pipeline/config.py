"""`pipeline.yaml`: every stage of `histosynth train pipeline` in one typed config.

Each section is the config of one stage (the same dataclass its own command reads) minus the paths the
pipeline wires between stages (tile folder, VQ-GAN checkpoint, latent cache, labels, init weights), which
the pipeline fills in. Giving one of those paths in a section is an error, so a run cannot silently train
on something other than what the previous stage produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

from histosynth.autoencoder.train import VQGANTrainConfig
from histosynth.clusters.select import ClusterSearchConfig
from histosynth.configio import from_dict, load_yaml, require
from histosynth.diffusion.train import LDMTrainConfig
from histosynth.errors import InputError
from histosynth.tiles.tiler import TileConfig

# Paths the pipeline sets itself, per section.
WIRED = {
    "vqgan": ("data",),
    "ldm": ("latents", "labels", "label_map", "init_from", "imc_head", "vqgan"),
    "cldm": ("latents", "labels", "label_map", "init_from", "imc_head", "vqgan"),
}


@dataclass
class DataConfig:
    """What to train on: a folder of tiles, or slides/images that the first stage cuts into tiles."""

    tiles: Optional[Path] = None  # folder of tiles (recursive) or an (N, H, W, 3) uint8 .npy
    slides: Optional[list[Path]] = None  # slide / image files or folders, tiled by stage 01 with `tile`
    tile: TileConfig = field(default_factory=TileConfig)  # tiling settings (slides only)
    labels: Optional[Path] = None  # partial annotation CSV (file,label): review suggestions / `auto` names
    description: str = ""  # free text recorded in the bundle's provenance

    def validate(self, path: str) -> None:
        """Exactly one source of tiles."""
        require((self.tiles is None) != (self.slides is None), f"{path}.tiles",
                "give either data.tiles (a tile folder or .npy) or data.slides (files to tile), not both or neither")
        if self.slides is not None:
            require(len(self.slides) > 0, f"{path}.slides", "needs at least one file or folder")


@dataclass
class EncodeConfig:
    """Stage `encode`: the frozen VQ-GAN's latents of every tile, cached once."""

    batch_size: int = 64  # tiles per encoder batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self, path: str) -> None:
        require(self.batch_size >= 1, f"{path}.batch_size", "must be at least 1")


@dataclass
class ReviewConfig:
    """Stage `review`: contact sheets + clusters.yaml, then the expert's edits applied.

    `edits`:
    - null (default): write the sheets and a clusters.yaml to edit, and stop the pipeline there;
    - a path to the edited clusters.yaml: apply it;
    - `auto`: accept the clusters as they are. With `data.labels`, each cluster is named by the majority
      label of its annotated tiles (mapped through `label_names`); clusters without annotated tiles keep
      `cluster_<id>`; empty clusters are excluded. Several clusters with the same majority label stay
      separate classes (`<name>_c<id>`) unless `merge_same_name` merges them into one class.
    """

    edits: Union[Literal["auto"], Path, None] = None
    label_names: dict[str, str] = field(default_factory=dict)  # annotation label -> class name, e.g. {"1": tumour}
    merge_same_name: bool = False  # auto: merge clusters whose majority label is the same
    n_centre: int = 8  # tiles nearest the cluster centre per contact sheet
    n_random: int = 8  # random tiles per contact sheet


@dataclass
class ExportConfig:
    """Stage `export`: the bundle `histosynth generate` reads."""

    microns_per_pixel: Optional[float] = None  # resolution of the tiles; None: from the checkpoints or 0.5
    tolerance: float = 1e-3  # max |ONNX Runtime - torch| allowed by the parity check


@dataclass
class PipelineConfig:
    """Every stage of `histosynth train pipeline`, in data-flow order."""

    data: DataConfig
    vqgan: dict[str, Any] = field(default_factory=dict)  # a VQGANTrainConfig without `data` (see vqgan_config)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ldm: Optional[LDMTrainConfig] = field(default_factory=LDMTrainConfig)  # null: no LDM, cLDM from scratch
    cluster: ClusterSearchConfig = field(default_factory=ClusterSearchConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    cldm: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    device: Optional[str] = None  # when set, overrides every stage's device

    def validate(self, path: str) -> None:
        """Check the wired paths are left to the pipeline and the VQ-GAN section is a valid config."""
        for key in WIRED["vqgan"]:
            require(key not in self.vqgan, f"{path}.vqgan.{key}", "is set by the pipeline (from data); remove it")
        self.vqgan_config(Path("tiles"))  # key-path errors now, not hours later
        for section in ("ldm", "cldm"):
            cfg = getattr(self, section)
            if cfg is None:
                continue
            for key in WIRED[section]:
                require(getattr(cfg, key) is None, f"{path}.{section}.{key}",
                        "is set by the pipeline from the earlier stages; remove it")
        require(self.cldm.model.num_classes == 0, f"{path}.cldm.model.num_classes",
                "is set from the reviewed label map; leave it out")

    def vqgan_config(self, tiles: Path) -> VQGANTrainConfig:
        """The VQ-GAN stage's config, training on `tiles`."""
        cfg = from_dict(VQGANTrainConfig, {**self.vqgan, "data": str(tiles)}, "pipeline.vqgan")
        return replace(cfg, device=self.device) if self.device else cfg

    def with_device(self, cfg: LDMTrainConfig) -> LDMTrainConfig:
        """`cfg` with the pipeline-wide device, if one is set."""
        return replace(cfg, device=self.device) if self.device else cfg


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read `pipeline.yaml`; relative paths in it are taken relative to the file's folder."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a mapping with a 'data' section")
    config = from_dict(PipelineConfig, data, "pipeline")
    return _relative_to(config, p.resolve().parent)


def _resolve(base: Path, value: Optional[Path]) -> Optional[Path]:
    return None if value is None else (value if value.is_absolute() else base / value)


def _relative_to(config: PipelineConfig, base: Path) -> PipelineConfig:
    data = replace(
        config.data,
        tiles=_resolve(base, config.data.tiles),
        slides=[_resolve(base, s) for s in config.data.slides] if config.data.slides is not None else None,
        labels=_resolve(base, config.data.labels),
    )
    edits = config.review.edits
    review = replace(config.review, edits=_resolve(base, edits) if isinstance(edits, Path) else edits)
    vqgan = dict(config.vqgan)
    if vqgan.get("val_data"):
        vqgan["val_data"] = str(_resolve(base, Path(vqgan["val_data"])))
    return replace(config, data=data, review=review, vqgan=vqgan)
