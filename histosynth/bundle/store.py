"""Loading a bundle folder: verify every file against the manifest, then build torch modules on demand.

Bundles may come from strangers. Nothing here unpickles: weights are safetensors and the networks are
rebuilt from the typed configs stored in the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from histosynth.bundle.manifest import (
    DECODER_ONNX,
    DECODER_WEIGHTS,
    GUIDE_UNET_ONNX,
    GUIDE_UNET_WEIGHTS,
    MANIFEST_NAME,
    UNET_ONNX,
    UNET_WEIGHTS,
    Manifest,
    expert_files,
    read_manifest,
)
from histosynth.errors import InputError

SHORT_HASH_LEN = 12


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so big weights never sit in memory twice."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """The state of one bundle file against its manifest entry."""

    name: str
    status: Literal["ok", "missing", "altered"]  # altered covers truncated: any byte change alters the hash
    expected: str
    actual: str | None  # None when the file is missing

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def check_files(bundle_dir: str | Path, manifest: Manifest) -> list[FileCheck]:
    """Hash each file listed in the manifest; one `FileCheck` per file, in manifest order."""
    root = Path(bundle_dir)
    checks = []
    for name, expected in manifest.files.items():
        path = root / name
        if not path.is_file():
            checks.append(FileCheck(name, "missing", expected, None))
            continue
        actual = sha256_file(path)
        checks.append(FileCheck(name, "ok" if actual == expected else "altered", expected, actual))
    return checks


@dataclass(frozen=True)
class Bundle:
    """A loaded (and, by default, verified) bundle: its folder, manifest and the manifest's hash."""

    path: Path
    manifest: Manifest
    manifest_sha256: str  # sha256 of manifest.json's bytes; it pins every file hash in turn

    @property
    def hash(self) -> str:
        """Short form of the manifest's sha256, recorded with every generated image."""
        return self.manifest_sha256[:SHORT_HASH_LEN]

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def null_id(self) -> int:
        return self.manifest.null_id

    def file(self, name: str) -> Path:
        """Path of one of the bundle's files (``unet.onnx``, ``decoder.safetensors``, ...)."""
        return self.path / name

    @property
    def unet_onnx(self) -> Path:
        return self.file(UNET_ONNX)

    @property
    def decoder_onnx(self) -> Path:
        return self.file(DECODER_ONNX)

    @property
    def has_guide(self) -> bool:
        """Whether the bundle ships a guide network (`autoguidance` in recipes)."""
        return self.manifest.has_guide

    @property
    def guide_unet_onnx(self) -> Path:
        return self.file(GUIDE_UNET_ONNX)

    @property
    def unet_experts(self) -> list[int]:
        """First timestep of each noise-range expert ([] for a bundle with one UNet)."""
        return list(self.manifest.unet_experts)

    def expert_onnx(self, t_min: int) -> Path:
        """The ONNX graph of the expert that runs from timestep `t_min` on."""
        return self.file(expert_files(t_min)[0])

    def class_id(self, name: str) -> int:
        """The id of class `name`; an `InputError` listing the valid names otherwise."""
        for entry in self.manifest.classes:
            if entry.name == name:
                return entry.id
        raise InputError(f"class {name!r} is not in bundle {self.path}; valid names: {', '.join(self.class_names)}")

    def build_unet(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The torch UNet from the manifest's config and ``unet.safetensors``, in eval mode."""
        from histosynth.bundle.modules import build_unet_module

        return build_unet_module(self.manifest.unet, self.file(UNET_WEIGHTS)).to(device=device, dtype=dtype).eval()

    def build_unet_experts(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> list[tuple[int, torch.nn.Module]]:
        """(t_min, torch UNet) of each noise-range expert, in eval mode; [] for a bundle with one UNet."""
        from histosynth.bundle.modules import build_unet_module

        return [(t_min, build_unet_module(self.manifest.unet, self.file(expert_files(t_min)[1]))
                 .to(device=device, dtype=dtype).eval()) for t_min in self.manifest.unet_experts]

    def build_guide_unet(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The torch guide UNet from ``guide_unet.safetensors``; an `InputError` when the bundle has none."""
        from histosynth.bundle.modules import build_unet_module

        if not self.has_guide:
            raise InputError(f"bundle {self.path}: ships no guide network (autoguidance needs one)")
        module = build_unet_module(self.manifest.guide_unet, self.file(GUIDE_UNET_WEIGHTS))
        return module.to(device=device, dtype=dtype).eval()

    def build_decoder(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The `LatentDecoder` (diffusion-space latents -> images in [-1, 1]) from ``decoder.safetensors``."""
        from histosynth.bundle.modules import build_decoder_module

        module = build_decoder_module(self.manifest.vqgan, self.manifest.latent_scale, self.file(DECODER_WEIGHTS))
        return module.to(device=device, dtype=dtype).eval()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle folder; with `verify`, every listed file must match its sha256.

    A missing, truncated or altered file is an `InputError` naming each bad file.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"bundle {root}: not found")
    if not root.is_dir():
        raise InputError(f"bundle {root}: not a folder (a bundle is a folder holding {MANIFEST_NAME})")
    manifest = read_manifest(root / MANIFEST_NAME)
    if verify:
        bad = [c for c in check_files(root, manifest) if not c.ok]
        if bad:
            detail = "; ".join(
                f"{c.name} is missing" if c.status == "missing"
                else f"{c.name} does not match its sha256 (altered or truncated)"
                for c in bad
            )
            raise InputError(f"bundle {root}: {detail}")
    return Bundle(root, manifest, sha256_file(root / MANIFEST_NAME))


@dataclass(frozen=True)
class BundleReport:
    """A bundle's manifest and the check of every file, without raising on damage (for `histosynth info`)."""

    path: Path
    manifest: Manifest
    hash: str  # short manifest hash, as `Bundle.hash`
    files: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.files)


def inspect_bundle(path: str | Path) -> BundleReport:
    """Read the manifest and check each file; damaged files are reported, not raised (the manifest must parse)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"bundle {root}: not a folder (a bundle is a folder holding {MANIFEST_NAME})")
    manifest = read_manifest(root / MANIFEST_NAME)
    return BundleReport(root, manifest, sha256_file(root / MANIFEST_NAME)[:SHORT_HASH_LEN], check_files(root, manifest))
