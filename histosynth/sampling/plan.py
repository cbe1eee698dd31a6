"""The generation plan: which image goes where, with which noise, and which shard makes it.

Every image is identified by (class_id, index). Its seed, and so all of its noise, is a function of
(recipe seed, class_id, index) alone (one generator per image, as in EDM's generate.py), so an image does not
depend on its batch, its shard, or whether the run was resumed. The plan is computed lazily: memory does not
grow with the number of tiles requested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from histosynth.errors import InputError
from histosynth.sampling.recipe import IMAGE_SUFFIX, Recipe, SamplerSpec, resolve_counts, sampler_for


@dataclass(frozen=True)
class ClassPlan:
    """All images of one class."""

    class_id: int
    name: str
    count: int
    sampler: SamplerSpec
    n_train: int  # indices [0, n_train) go to train/ (or the top level when there is no split)


@dataclass(frozen=True)
class Item:
    """One image to make."""

    class_id: int
    name: str
    index: int
    seed: int
    relpath: str  # relative to the output folder, with '/' separators
    sampler: SamplerSpec


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), parsed from the CLI's `i/n`."""

    index: int = 0
    count: int = 1

    @staticmethod
    def parse(text: Optional[str]) -> "Shard":
        if text is None:
            return Shard()
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise InputError(f"--shard: {text!r} is not of the form i/n (e.g. 0/4)") from None
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"--shard {text}: need 0 <= i < n, n >= 1")
        return Shard(i, n)

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f"shard-{self.index}-of-{self.count}"


def image_seed(recipe_seed: int, class_id: int, index: int) -> int:
    """A 63-bit seed for one image, from numpy's SeedSequence (well mixed, no correlations between images)."""
    state = np.random.SeedSequence(entropy=recipe_seed, spawn_key=(class_id, index)).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class Plan:
    """The resolved recipe: per-class counts and samplers, the file layout, and the work of each shard."""

    def __init__(self, recipe: Recipe, class_names: list[str], bundle_hash: str, base_dir: Path = Path(".")) -> None:
        counts = resolve_counts(recipe, class_names, base_dir)
        self.recipe = recipe
        self.bundle_hash = bundle_hash
        self.suffix = IMAGE_SUFFIX[recipe.output.format]
        self.classes: list[ClassPlan] = []
        for name, count in counts.items():
            n_val = int(round(count * recipe.split.val_fraction)) if recipe.split else 0
            self.classes.append(ClassPlan(class_names.index(name), name, count, sampler_for(recipe, name), count - n_val))
        self.total = sum(c.count for c in self.classes)
        # Zero-padded so that files sort in index order; the width depends only on the plan.
        self.width = max(5, len(str(max(c.count for c in self.classes) - 1)))

    def relpath(self, c: ClassPlan, index: int) -> str:
        name = f"{index:0{self.width}d}.{self.suffix}"
        if self.recipe.split is None:
            return f"{c.name}/{name}"
        return f"{'train' if index < c.n_train else 'val'}/{c.name}/{name}"

    def item(self, c: ClassPlan, index: int) -> Item:
        return Item(c.class_id, c.name, index, image_seed(self.recipe.seed, c.class_id, index), self.relpath(c, index),
                    c.sampler)

    def shard_range(self, shard: Shard) -> tuple[int, int]:
        """Contiguous [start, stop) positions of the global order: keeps batches within one class."""
        return self.total * shard.index // shard.count, self.total * (shard.index + 1) // shard.count

    def shard_counts(self, shard: Shard = Shard()) -> dict[int, int]:
        """Images per class id in `shard`, from the range alone (constant time in the number of images)."""
        start, stop = self.shard_range(shard)
        counts: dict[int, int] = {}
        position = 0
        for c in self.classes:
            counts[c.class_id] = max(0, min(stop, position + c.count) - max(start, position))
            position += c.count
        return counts

    def items(self, shard: Shard = Shard()) -> Iterator[Item]:
        """The images of `shard`, in class-id then index order."""
        start, stop = self.shard_range(shard)
        position = 0
        for c in self.classes:
            lo, hi = max(start - position, 0), min(stop - position, c.count)
            for index in range(lo, hi):
                yield self.item(c, index)
            position += c.count

    def describe(self) -> dict:
        """Everything that decides the output files; its hash tells whether a folder holds this plan's set."""
        r = self.recipe
        return {
            "bundle_hash": self.bundle_hash,
            "seed": r.seed,
            "output": asdict(r.output),
            "split": asdict(r.split) if r.split else None,
            "classes": [
                {"class_id": c.class_id, "name": c.name, "count": c.count, "n_train": c.n_train,
                 "sampler": _sampler_facts(c.sampler)}
                for c in self.classes
            ],
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()


def _sampler_facts(spec: SamplerSpec) -> dict:
    """The sampler's fields for the fingerprint. Autoguidance and the two guidance intervals came later: each is
    left out when off, so that folders made before it existed still resume."""
    facts = asdict(spec)
    if facts.get("autoguidance") == 1.0:
        del facts["autoguidance"]
    for key in ("guidance_interval", "autoguidance_interval"):
        if facts.get(key) is None:
            facts.pop(key, None)
    return facts


class ImageNoise:
    """Per-image random streams for one batch: x_T and each stochastic step's noise come from the image's own
    CPU generator, so they are the same on any device and in any batch."""

    def __init__(self, items: list[Item], shape: tuple[int, ...], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(item.seed) for item in items]
        self.shape = shape
        self.device = device

    def draw(self) -> torch.Tensor:
        """The next (N, *shape) float32 draw, one row per image."""
        rows = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)
