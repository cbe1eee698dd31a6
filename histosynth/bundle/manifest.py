"""`manifest.json`: everything a sampler needs to know about a bundle besides the weights themselves.

The manifest is a typed dataclass loaded with `histosynth.configio.from_dict`, so a hand-edited or foreign
manifest fails with the key path at fault (``manifest.classes[2].name: expected a string``). It is written
last by the exporter: a folder without a manifest is not a bundle.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from histosynth.configio import from_dict, require, to_dict
from histosynth.diffusion.schedule import ScheduleConfig
from histosynth.errors import InputError
from histosynth.io import write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The four files every bundle of this format version holds besides the manifest.
UNET_ONNX = "unet.onnx"
DECODER_ONNX = "decoder.onnx"
UNET_WEIGHTS = "unet.safetensors"
DECODER_WEIGHTS = "decoder.safetensors"
REQUIRED_FILES = (UNET_ONNX, DECODER_ONNX, UNET_WEIGHTS, DECODER_WEIGHTS)
# An optional weaker UNet for autoguidance (added within format version 1): both files, or neither.
GUIDE_UNET_ONNX = "guide_unet.onnx"
GUIDE_UNET_WEIGHTS = "guide_unet.safetensors"
GUIDE_FILES = (GUIDE_UNET_ONNX, GUIDE_UNET_WEIGHTS)
# Optional noise-range experts (added within format version 1): a UNet per range of noisier timesteps, named by
# the first timestep it runs; `unet.*` runs the timesteps below the first (diffusion.experts).
_EXPERT_PREFIX = "unet_t"


def expert_files(t_min: int) -> tuple[str, str]:
    """The ONNX graph and weights file of the expert that runs from timestep `t_min` on."""
    return f"{_EXPERT_PREFIX}{t_min}.onnx", f"{_EXPERT_PREFIX}{t_min}.safetensors"


# Names of the ONNX graphs' inputs and outputs (part of the format: the ONNX backend binds by name).
UNET_INPUTS = ("x", "t", "class_ids")  # float32 (N,C,h,w), float32 (N,) train timesteps, int64 (N,)
UNET_OUTPUT = "model_output"  # float32 (N,C,h,w): epsilon or v
DECODER_INPUT = "latents"  # float32 (N,C,h,w), diffusion space (scaled by latent_scale)
DECODER_OUTPUT = "images"  # float32 (N,3,H,W) in [-1, 1]

# Class names become folder names in `generate`'s output, so they must be safe path components.
_FORBIDDEN_IN_NAMES = set('/\\:*?"<>|') | {chr(c) for c in range(32)}
# Class-entry keys written only when set (added within format version 1).
_OPTIONAL_CLASS_KEYS = ("label", "label_name")


@dataclass(frozen=True)
class ClassEntry:
    """One class the UNet is conditioned on: its embedding row and a human name (e.g. ``tumour``)."""

    id: int  # row of the UNet class embedding, 0..num_classes-1
    name: str  # unique; used as the output folder name by `generate`
    # The lab's label this class stands for (from the label map, see docs/labels.md): the raw value of the
    # label column as a string (e.g. "1") and its name (e.g. "tumour"). Absent in older bundles, and left
    # out of manifest.json when unset, so unlabelled bundles stay readable by older histosynth versions.
    label: Optional[str] = None
    label_name: Optional[str] = None

    def validate(self, path: str) -> None:
        require(self.id >= 0, f"{path}.id", f"must be >= 0, got {self.id}")
        require(self.label is None or self.label != "", f"{path}.label", "must be a non-empty string or absent")
        require(self.label_name is None or self.label is not None, f"{path}.label_name",
                "needs a label (the raw value it names)")
        require(self.name.strip() == self.name and self.name != "", f"{path}.name",
                "must be non-empty without leading/trailing spaces")
        require(self.name not in (".", "..") and not (set(self.name) & _FORBIDDEN_IN_NAMES), f"{path}.name",
                f"{self.name!r} cannot be a folder name (no / \\ : * ? \" < > | or control characters)")


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from; free-form facts (K, the cluster validity table) go in `extra`."""

    data: str = ""  # the training data (a path, a data set name and split)
    steps: dict[str, int] = field(default_factory=dict)  # training steps per stage, e.g. {"vqgan": .., "ldm": ..}
    date: str = ""  # ISO 8601 date-time of the export
    extra: dict[str, Any] = field(default_factory=dict)  # anything else: {"K": 6, "validity": {...}}


@dataclass(frozen=True)
class Manifest:
    """The parsed `manifest.json` of a bundle (format version 1)."""

    format_version: int  # refuses bundles newer than FORMAT_VERSION
    tile_size: int  # output tiles are tile_size x tile_size pixels
    microns_per_pixel: float  # physical resolution of the training tiles (written into TIFF tags)
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent, H = tile_size / f
    latent_scale: float  # diffusion runs on latents * latent_scale (1 / std of the training latents)
    schedule: ScheduleConfig  # the training noise schedule, prediction type included
    classes: list[ClassEntry]  # ids 0..n-1, in id order
    null_id: int  # the "no class" embedding row for classifier-free guidance (= number of classes)
    files: dict[str, str]  # file name -> sha256 hex of every file of the bundle except the manifest
    provenance: Provenance = field(default_factory=Provenance)
    unet: dict[str, Any] = field(default_factory=dict)  # UNetConfig as a dict (rebuilds the torch UNet)
    vqgan: dict[str, Any] = field(default_factory=dict)  # VQGANConfig as a dict (rebuilds the decoder)
    created_with: str = ""  # histosynth version that wrote the bundle
    # UNetConfig of the autoguidance guide network, {} when the bundle has none. Left out of manifest.json when
    # empty, so bundles without a guide keep their bytes (and hashes) and stay readable by older versions.
    guide_unet: dict[str, Any] = field(default_factory=dict)
    # First timestep of each noise-range expert, ascending ([] for one UNet). Expert k runs t in
    # [unet_experts[k], unet_experts[k + 1]) with the UNet's config (`unet`); `unet.*` runs t < unet_experts[0].
    # Left out of manifest.json when empty, like `guide_unet`.
    unet_experts: list[int] = field(default_factory=list)

    def validate(self, path: str) -> None:
        require(1 <= self.format_version <= FORMAT_VERSION, f"{path}.format_version",
                f"this histosynth reads format versions 1..{FORMAT_VERSION}")
        require(self.tile_size > 0, f"{path}.tile_size", f"must be > 0, got {self.tile_size}")
        require(self.microns_per_pixel > 0, f"{path}.microns_per_pixel", "must be > 0")
        require(all(s > 0 for s in self.latent_shape), f"{path}.latent_shape", "all sizes must be > 0")
        require(self.latent_shape[1] == self.latent_shape[2], f"{path}.latent_shape", "latents must be square")
        require(self.tile_size % self.latent_shape[1] == 0, f"{path}.latent_shape",
                f"latent size {self.latent_shape[1]} does not divide tile_size {self.tile_size}")
        require(self.latent_scale > 0, f"{path}.latent_scale", "must be > 0")
        ids = [c.id for c in self.classes]
        require(ids == list(range(len(ids))), f"{path}.classes",
                f"class ids must be 0..{len(ids) - 1} in order, got {ids}")
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, f"{path}.classes", f"duplicate class names: {', '.join(dupes)}")
        # `generate` writes one folder per class name; torchvision's ImageFolder numbers folders in sorted
        # order, so ids in name order make its indices equal the bundle's class ids.
        require(names == sorted(names), f"{path}.classes",
                f"class ids must follow the sorted order of names (got {', '.join(names)}); "
                "`histosynth review apply` numbers classes this way")
        require(self.null_id == len(self.classes), f"{path}.null_id",
                f"must equal the number of classes ({len(self.classes)}), got {self.null_id}")
        missing = [f for f in REQUIRED_FILES if f not in self.files]
        require(not missing, f"{path}.files", f"missing entries for {', '.join(missing)}")
        guide_files = [f for f in GUIDE_FILES if f in self.files]
        if self.guide_unet:
            lacking = sorted(set(GUIDE_FILES) - set(guide_files))
            require(not lacking, f"{path}.files", f"guide_unet is set but the files list lacks {', '.join(lacking)}")
            for key in ("in_channels", "num_classes"):
                require(self.guide_unet.get(key) == self.unet.get(key), f"{path}.guide_unet.{key}",
                        f"{self.guide_unet.get(key)} differs from the UNet's {self.unet.get(key)}; the guide must "
                        "see the same latents and classes")
        else:
            require(not guide_files, f"{path}.guide_unet", f"missing, but the files list has {', '.join(guide_files)}")
        top = self.schedule.num_train_steps
        last = 0
        for k, t_min in enumerate(self.unet_experts):
            require(last < t_min < top, f"{path}.unet_experts[{k}]",
                    f"{t_min}: expert ranges start at ascending timesteps in 1..{top - 1}")
            last = t_min
            lacking = [f for f in expert_files(t_min) if f not in self.files]
            require(not lacking, f"{path}.files", f"unet_experts has {t_min} but the files list lacks {', '.join(lacking)}")
        stray = sorted(f for f in self.files if f.startswith(_EXPERT_PREFIX)
                       and f not in {name for t in self.unet_experts for name in expert_files(t)})
        require(not stray, f"{path}.unet_experts", f"lacks the expert of {', '.join(stray)} in the files list")
        for name, digest in self.files.items():
            require(Path(name).name == name and name not in (".", "..", MANIFEST_NAME), f"{path}.files",
                    f"{name!r} must be a plain file name inside the bundle")
            require(len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest), f"{path}.files.{name}",
                    "must be a lowercase sha256 hex digest")

    @property
    def prediction(self) -> Literal["epsilon", "v"]:
        """What the UNet predicts (kept inside `schedule`, where training reads it)."""
        return self.schedule.prediction

    @property
    def class_names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    @property
    def has_guide(self) -> bool:
        """Whether the bundle ships a guide network for autoguidance."""
        return bool(self.guide_unet)

    @property
    def expert_ranges(self) -> list[tuple[int, int]]:
        """[t_min, t_max) of `unet.*` and then of each expert, covering every training timestep."""
        starts = [0, *self.unet_experts]
        return list(zip(starts, [*self.unet_experts, self.schedule.num_train_steps]))

    def to_json(self) -> str:
        """The manifest as pretty, key-sorted JSON text (stable bytes, so its hash is stable)."""
        data = to_dict(self)
        data["classes"] = [{k: v for k, v in c.items() if v is not None or k not in _OPTIONAL_CLASS_KEYS}
                           for c in data["classes"]]
        for optional in ("guide_unet", "unet_experts"):
            if not data[optional]:
                del data[optional]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "Manifest":
        """A copy with some fields changed (the exporter fills `files` last)."""
        return dataclasses.replace(self, **changes)


def manifest_from_dict(data: Any, path: str = "manifest") -> Manifest:
    """Parse manifest data, refusing future format versions before looking at keys they may have added."""
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InputError(
            f"{path}.format_version: bundle format {version} is newer than this histosynth reads "
            f"(up to {FORMAT_VERSION}); upgrade histosynth"
        )
    return from_dict(Manifest, data, path)


def read_manifest(path: str | Path) -> Manifest:
    """Read `manifest.json` (or the one inside a bundle folder), naming the file in every error."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise InputError(f"{p}: manifest not found (a bundle folder holds {MANIFEST_NAME})")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON: {e}") from None
    try:
        return manifest_from_dict(data, "manifest")
    except InputError as e:
        raise InputError(f"{p}: {e}") from None


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write `manifest` as JSON to `path` (a file, or a folder to hold `manifest.json`)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    return write_text(p, manifest.to_json())
