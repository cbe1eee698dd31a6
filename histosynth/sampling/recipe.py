"""Recipes: YAML files that say which tiles to make, loaded into typed dataclasses.

A recipe names a bundle, how many tiles of each class to make (explicit counts, balanced, proportions,
or a top-up of minority classes), the sampler with optional per-class overrides, the seed, the batch size, the
output format and an optional train/val split. `resolve_counts` checks class names against the bundle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

from histosynth.configio import OneOf, from_dict, load_yaml, require
from histosynth.diffusion.samplers import SAMPLERS
from histosynth.errors import InputError

MAX_STEPS = 1000  # the training schedule's T; checked against the bundle again when it is known
IMAGE_SUFFIX = {"png": "png", "jpeg": "jpg", "tiff": "tif"}


SamplerName = Annotated[str, OneOf(SAMPLERS)]  # checked against the registry when a recipe is loaded


@dataclass(frozen=True)
class SamplerSpec:
    """How each image is sampled."""

    name: SamplerName = "dpmpp2m"  # sampler (registry: diffusion/samplers.py); dpmpp2m at 20 steps is fast
    steps: int = 20  # denoiser steps, 1..T (each row costs one more evaluation per guidance kind != 1)
    eta: float = 0.0  # stochasticity 0..1, used by ddim; ddpm always uses 1, dpmpp2m ignores it
    guidance: float = 1.0  # classifier-free guidance scale w, 0..30; 1 = the plain conditional model (the paper)
    # Autoguidance scale w, 1..30: guide by the bundle's weaker UNet (Karras et al. 2024); 1 = off. Only for
    # bundles that ship one (`histosynth info` says). With `guidance` too, the two guidance terms add.
    autoguidance: float = 1.0
    # [low, high]: classifier-free guidance only at noise levels sigma/alpha in (low, high] (Kynkaanniemi et al.
    # 2024); null = at every step. Guidance at the highest noise levels narrows the samples for little label gain.
    guidance_interval: Optional[tuple[float, float]] = None
    # [low, high]: autoguidance only at noise levels in (low, high]; null = at every step. Elsewhere the main UNet
    # runs alone, so steps outside the interval cost no guide evaluation.
    autoguidance_interval: Optional[tuple[float, float]] = None

    def validate(self, path: str) -> None:
        require(1 <= self.steps <= MAX_STEPS, f"{path}.steps", f"{self.steps} is out of range; allowed: 1..{MAX_STEPS}")
        require(0.0 <= self.eta <= 1.0, f"{path}.eta", f"{self.eta} is out of range; allowed: 0..1")
        require(0.0 <= self.guidance <= 30.0, f"{path}.guidance", f"{self.guidance} is out of range; allowed: 0..30")
        require(1.0 <= self.autoguidance <= 30.0, f"{path}.autoguidance",
                f"{self.autoguidance} is out of range; allowed: 1..30 (1 = off)")
        for key in ("guidance_interval", "autoguidance_interval"):
            interval = getattr(self, key)
            if interval is not None:
                low, high = interval
                require(math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high, f"{path}.{key}",
                        f"{list(interval)} is not [low, high] with 0 <= low < high (noise levels sigma/alpha, "
                        "e.g. [0.5, 10]); null = every step")


def interval_text(interval: Optional[Sequence[float]]) -> str:
    """A guidance or autoguidance interval as manifests, tables and benchmark names show it: "0.5-10", or "" for
    every step."""
    return "" if interval is None else f"{interval[0]:g}-{interval[1]:g}"


@dataclass(frozen=True)
class SamplerOverride:
    """Per-class changes to the recipe's sampler; unset fields keep the recipe's value."""

    name: Optional[SamplerName] = None  # this class's sampler (default: the recipe's)
    steps: Optional[int] = None  # this class's steps
    eta: Optional[float] = None  # this class's eta
    guidance: Optional[float] = None  # this class's guidance scale
    autoguidance: Optional[float] = None  # this class's autoguidance scale
    guidance_interval: Optional[tuple[float, float]] = None  # this class's guidance interval
    autoguidance_interval: Optional[tuple[float, float]] = None  # this class's autoguidance interval

    def apply(self, base: SamplerSpec, path: str) -> SamplerSpec:
        spec = SamplerSpec(
            name=self.name or base.name,
            steps=base.steps if self.steps is None else self.steps,
            eta=base.eta if self.eta is None else self.eta,
            guidance=base.guidance if self.guidance is None else self.guidance,
            autoguidance=base.autoguidance if self.autoguidance is None else self.autoguidance,
            guidance_interval=base.guidance_interval if self.guidance_interval is None else self.guidance_interval,
            autoguidance_interval=(base.autoguidance_interval if self.autoguidance_interval is None
                                   else self.autoguidance_interval),
        )
        spec.validate(path)
        return spec


@dataclass(frozen=True)
class Balanced:
    """The same number of tiles for every class: give `per_class`, or a `total` split as evenly as possible."""

    per_class: Optional[int] = None  # tiles of each class
    total: Optional[int] = None  # tiles in all, split as evenly as possible (earlier classes get the remainder)

    def validate(self, path: str) -> None:
        require((self.per_class is None) != (self.total is None), path, "give exactly one of per_class, total")
        for key in ("per_class", "total"):
            value = getattr(self, key)
            require(value is None or value > 0, f"{path}.{key}", f"must be a positive count, got {value}")


@dataclass(frozen=True)
class Proportions:
    """A `total` shared between classes by relative `weights` (need not sum to 1)."""

    total: int  # tiles in all; largest-remainder rounding makes the counts sum exactly to it
    weights: dict[str, float]  # {class_name: relative weight}; classes left out get none

    def validate(self, path: str) -> None:
        require(self.total > 0, f"{path}.total", f"must be a positive count, got {self.total}")
        require(bool(self.weights), f"{path}.weights", "give at least one class weight")
        for name, w in self.weights.items():
            require(w >= 0 and math.isfinite(w), f"{path}.weights.{name}", f"must be a non-negative number, got {w}")
        require(sum(self.weights.values()) > 0, f"{path}.weights", "at least one weight must be positive")


@dataclass(frozen=True)
class TopUp:
    """Bring minority classes up to `target` tiles, given how many real tiles each class already `have`s.

    `have_from` counts the files in an ImageFolder-style directory (`<dir>/<class_name>/*`) instead of, or on
    top of, the explicit `have` counts. Classes already at or above target get nothing.
    """

    target: int  # tiles each class should reach
    have: dict[str, int] = field(default_factory=dict)  # {class_name: real tiles already there}
    have_from: Optional[str] = None  # count them in <dir>/<class_name>/* instead (relative to the recipe file)

    def validate(self, path: str) -> None:
        require(self.target > 0, f"{path}.target", f"must be a positive count, got {self.target}")
        for name, n in self.have.items():
            require(n >= 0, f"{path}.have.{name}", f"must be a non-negative count, got {n}")


@dataclass(frozen=True)
class OutputSpec:
    """File format of the tiles."""

    format: Literal["png", "jpeg", "tiff"] = "png"  # image format; TIFF carries the bundle's resolution in its tags
    quality: int = 95  # JPEG quality 1..100 (JPEG only)

    def validate(self, path: str) -> None:
        require(1 <= self.quality <= 100, f"{path}.quality", f"{self.quality} is out of range; allowed: 1..100")


@dataclass(frozen=True)
class SplitSpec:
    """Optional train/val split: the last `val_fraction` of each class's indices go to `val/`."""

    val_fraction: float = 0.1  # the last round(n * f) indices of each class go to val/, the rest to train/

    def validate(self, path: str) -> None:
        require(0.0 < self.val_fraction < 1.0, f"{path}.val_fraction",
                f"{self.val_fraction} is out of range; allowed: 0 < val_fraction < 1")


@dataclass(frozen=True)
class Recipe:
    """A generation job. Exactly one of counts, balanced, proportions, top_up says how many tiles to make."""

    bundle: str  # a bundle folder; a relative path is relative to the recipe file
    seed: int = 0  # with (class, index) this fixes every image's noise
    batch_size: int = 16  # images per denoiser call; does not change any image
    counts: Optional[dict[str, int]] = None  # {class_name: count}: exactly these tiles
    balanced: Optional[Balanced] = None  # the same number for every class
    proportions: Optional[Proportions] = None  # a total shared by relative weights
    top_up: Optional[TopUp] = None  # bring every class up to a target, given the real tiles there are
    classes: Optional[list[str]] = None  # restrict balanced/top_up to these classes (default: all)
    sampler: SamplerSpec = SamplerSpec()  # how every image is sampled
    overrides: dict[str, SamplerOverride] = field(default_factory=dict)  # {class_name: sampler changes}
    output: OutputSpec = OutputSpec()  # file format of the tiles
    split: Optional[SplitSpec] = None  # optional train/val split (DIR/train/<class>/..., DIR/val/<class>/...)

    def validate(self, path: str) -> None:
        given = [k for k in ("counts", "balanced", "proportions", "top_up") if getattr(self, k) is not None]
        require(len(given) == 1, path,
                f"give exactly one of counts, balanced, proportions, top_up (got {', '.join(given) or 'none'})")
        require(self.seed >= 0, f"{path}.seed", f"must be a non-negative integer, got {self.seed}")
        require(1 <= self.batch_size <= 4096, f"{path}.batch_size", f"{self.batch_size} is out of range; allowed: 1..4096")
        for name, n in (self.counts or {}).items():
            require(n > 0, f"{path}.counts.{name}", f"must be a positive count, got {n}")
        for name, override in self.overrides.items():
            override.apply(self.sampler, f"{path}.overrides.{name}")


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Load and check a recipe file; returns it with the bundle path resolved against the recipe's folder."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise InputError(f"{p}: a recipe is a YAML mapping with at least `bundle:` and a count")
    recipe = from_dict(Recipe, data, "recipe")
    bundle = Path(recipe.bundle).expanduser()
    if not bundle.is_absolute():
        bundle = (p.parent / bundle).resolve()
    return recipe, bundle


def _check_names(names: list[str] | dict, valid: list[str], path: str) -> None:
    for name in names:
        if name not in valid:
            raise InputError(f"{path}.{name}: no class {name!r} in the bundle; valid names: {', '.join(valid)}")


def _count_folder(root: Path, names: list[str], path: str) -> dict[str, int]:
    if not root.is_dir():
        raise InputError(f"{path}: {root} is not a folder")
    return {n: sum(1 for f in (root / n).iterdir() if f.is_file()) if (root / n).is_dir() else 0 for n in names}


def _split_evenly(total: int, names: list[str], weights: list[float]) -> dict[str, int]:
    """Largest-remainder apportionment: counts sum exactly to total; ties go to the earlier class."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(names, counts))


def resolve_counts(recipe: Recipe, class_names: list[str], base_dir: Path = Path(".")) -> dict[str, int]:
    """The number of tiles per class name, in the bundle's class order; zero-count classes are dropped."""
    valid = list(class_names)
    _check_names(recipe.overrides, valid, "recipe.overrides")
    chosen = valid
    if recipe.classes is not None:
        _check_names(recipe.classes, valid, "recipe.classes")
        require(len(recipe.classes) > 0, "recipe.classes", "list at least one class")
        chosen = [n for n in valid if n in recipe.classes]
    if recipe.counts is not None:
        _check_names(recipe.counts, valid, "recipe.counts")
        counts = dict(recipe.counts)
    elif recipe.balanced is not None:
        b = recipe.balanced
        counts = {n: b.per_class for n in chosen} if b.per_class else _split_evenly(b.total, chosen, [1.0] * len(chosen))
    elif recipe.proportions is not None:
        _check_names(recipe.proportions.weights, valid, "recipe.proportions.weights")
        names = [n for n in valid if n in recipe.proportions.weights]
        counts = _split_evenly(recipe.proportions.total, names, [recipe.proportions.weights[n] for n in names])
    else:
        top = recipe.top_up
        assert top is not None
        _check_names(top.have, valid, "recipe.top_up.have")
        have = {n: 0 for n in chosen}
        if top.have_from is not None:
            root = Path(top.have_from).expanduser()
            root = root if root.is_absolute() else base_dir / root
            have.update(_count_folder(root, chosen, "recipe.top_up.have_from"))
        have.update({n: c for n, c in top.have.items() if n in have})
        counts = {n: max(top.target - have[n], 0) for n in chosen}
    ordered = {n: counts[n] for n in valid if counts.get(n, 0) > 0}
    if not ordered:
        raise InputError("recipe: asks for no tiles at all (every class count is zero)")
    return ordered


def sampler_for(recipe: Recipe, class_name: str) -> SamplerSpec:
    """The sampler settings of one class: the recipe's, with that class's override applied."""
    override = recipe.overrides.get(class_name)
    return override.apply(recipe.sampler, f"recipe.overrides.{class_name}") if override else recipe.sampler
