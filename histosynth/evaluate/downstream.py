"""Downstream utility: does adding synthetic tiles help a classifier trained on few labelled real tiles?

The protocol (issue 9): one small ResNet-style classifier (`SmallResNet`) trains at the tiles' own resolution
under one fixed schedule (`ClassifierConfig`: the same number of optimizer steps for every model, so arms
differ only in their data), for each seed, on

- ``real``: a stratified random subset of the labelled real pool, for each size in ``sizes``;
- ``real+synthetic``: the same subset plus ``ratio`` times as many synthetic tiles, for each of ``ratios``.
  Synthetic tiles are drawn in the real pool's label proportions, so an arm differs from ``real`` by its
  synthetic tiles and not by a shifted label prior;
- ``synthetic``: synthetic tiles alone, by default as many as the largest mixed arm adds.

Draws are nested (a seed's 100 real tiles are among its 300, its 1x synthetic tiles among its 4x), and the
arms of one seed share the real subset and the initial weights, so the gain from synthetic tiles is a paired
difference. Every model is scored on one fixed stratified test set: accuracy and ROC AUC (one-vs-rest for
more than two labels), reported with 95% Student-t intervals over seeds.

Synthetic tiles come from a `generate` output folder. A class map (model class name -> label) labels them;
without one, each class's ``label`` in the bundle manifest does, the bundle being the one the folder's
``classes.json`` records (or ``bundle=``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score
from torch import nn

from histosynth.configio import load_yaml, require
from histosynth.errors import InputError
from histosynth.evaluate.features import read_rgb

ARMS = ("real", "real+synthetic", "synthetic")
CONFIDENCE = 0.95
INTERVAL = "95% Student-t interval over seeds (mean +- t(0.975, n-1) * sd / sqrt(n))"
# A progress callback: models done, models in all, what is training now.
Progress = Callable[[int, int, str], None]


@dataclass
class ClassifierConfig:
    """The fixed classifier and schedule; change it only with a reason, since arms are compared under it.

    Every model takes `steps` optimizer steps whatever its training set size: equal compute per arm, and a
    run time that depends only on the number of models (measured in docs/evaluation.md).
    """

    width: int = 16  # channels after the stem, doubled at each of the 4 residual stages (16-32-64-128)
    steps: int = 400  # optimizer steps per model
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak; linear warm-up, then cosine decay to 0
    warmup_steps: int = 20
    weight_decay: float = 0.05  # AdamW's decoupled decay
    image_size: int | None = None  # None: the tiles' own size (the protocol); an int box-resizes them

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.image_size is None or self.image_size >= 16, f"{path}.image_size", "must be at least 16")
        for name in ("width", "steps", "batch_size"):
            require(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        require(0 <= self.warmup_steps, f"{path}.warmup_steps", "must be >= 0")
        require(self.lr > 0, f"{path}.lr", "must be positive")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")


# --- the network -----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN layers and a (projected when the shape changes) skip."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.skip(x) + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """ResNet's stem (3x3 stride-2 conv, max-pool: /4), four basic blocks (/8 in all), global average pool.

    About 0.3 M weights at width 16. On 96 px tiles the blocks run at 24, 12, 6 and 3 px; a stride-2 stem
    without the pool cost 3x the time per tile on 2 CPU cores (measured), for a classifier that averages
    over the tile anyway.
    """

    def __init__(self, num_labels: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        widths = [width * 2**i for i in range(4)]
        self.blocks = nn.Sequential(*(_Block(cin, cout, 1 if i == 0 else 2)
                                      for i, (cin, cout) in enumerate(zip([width] + widths[:-1], widths))))
        self.head = nn.Linear(widths[-1], num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_labels)`` of images ``(N, 3, H, W)`` in ``[-1, 1]``."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# --- inputs ----------------------------------------------------------------------------------------------------


def read_tiles(files: Sequence[Path], size: int | None = None) -> torch.Tensor:
    """Image files -> uint8 ``(N, 3, H, W)``; all of one size unless ``size`` box-resizes them."""
    if not files:
        return torch.zeros((0, 3, size or 1, size or 1), dtype=torch.uint8)
    first = read_rgb(files[0])
    h, w = (size, size) if size else first.shape[:2]
    out = np.empty((len(files), h, w, 3), dtype=np.uint8)
    for i, p in enumerate(files):
        pixels = first if i == 0 else read_rgb(p)
        if size and pixels.shape[:2] != (h, w):
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BOX))
        if pixels.shape[:2] != (h, w):
            raise InputError(f"{p}: {pixels.shape[1]}x{pixels.shape[0]} px, but {files[0]} is {w}x{h}; "
                             "the classifier trains at the tiles' own size, so every tile needs the same one")
        out[i] = pixels
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_tiles(files: Sequence[Path], size: int | None = None) -> torch.Tensor:
    """Image files -> float32 ``(N, 3, H, W)`` in ``[-1, 1]`` (see `read_tiles`)."""
    return _to_float(read_tiles(files, size))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def read_labels(folder: str | Path, labels_csv: str | Path) -> tuple[list[Path], np.ndarray]:
    """Files of ``folder`` listed in a ``file,label`` CSV (integer labels) and their labels."""
    folder, labels_csv = Path(folder), Path(labels_csv)
    if not labels_csv.is_file():
        raise InputError(f"{labels_csv}: labels file not found")
    with labels_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise InputError(f"{labels_csv}: needs columns 'file' and 'label', has {reader.fieldnames}")
        files, labels = [], []
        for row_no, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except ValueError:
                raise InputError(f"{labels_csv}:{row_no}: label {row['label']!r} is not an integer") from None
            path = folder / row["file"]
            if path.is_file():
                files.append(path)
                labels.append(label)
    if not files:
        raise InputError(f"{labels_csv}: none of its files exist in {folder}")
    return files, np.asarray(labels, dtype=np.int64)


def read_class_map(path: str | Path) -> dict[str, int]:
    """A YAML mapping of model class name -> integer label (classes left out are not used)."""
    data = load_yaml(path)
    if isinstance(data, dict) and "classes" in data and isinstance(data["classes"], dict):
        data = data["classes"]
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a mapping of class name -> label, e.g. 'tumour: 1'")
    out = {}
    for name, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"{path}.{name}: label must be an integer, got {label!r}")
        out[str(name)] = label
    return out


def _bundle_of(samples: Path, bundle: str | Path | None) -> tuple[Any, list[str]]:
    """The bundle that made ``samples``: ``bundle`` if given, else the one its ``classes.json`` records."""
    from histosynth.bundle.store import load_bundle  # evaluate may read any earlier stage

    record_path = samples / "classes.json"
    record: dict[str, Any] = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{record_path}: not valid JSON: {e}") from None
    notes: list[str] = []
    if bundle is None:
        recorded = record.get("bundle") if isinstance(record, dict) else None
        if not recorded:
            raise InputError(f"{samples}: no --class-map, and no classes.json recording the bundle that made the "
                             "tiles; give --bundle DIR or --class-map YAML (class name -> label)")
        p = Path(str(recorded)).expanduser()
        # `generate` records the path it was given: absolute from a recipe, else relative to where it ran.
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, samples / p]
        found = next((c for c in candidates if (c / "manifest.json").is_file()), None)
        if found is None:
            raise InputError(f"{record_path}: the bundle it records ({recorded}) is not found from here; "
                             "give --bundle DIR or --class-map YAML (class name -> label)")
        loaded = load_bundle(found, verify=False)
        if record.get("bundle_hash") and record["bundle_hash"] != loaded.manifest_sha256:
            raise InputError(f"{found}: its manifest changed since the tiles in {samples} were made (sha256 "
                             f"{loaded.manifest_sha256[:12]}, recorded {str(record['bundle_hash'])[:12]}); give "
                             "--bundle DIR to use it anyway, or --class-map YAML")
        return loaded, notes
    loaded = load_bundle(bundle, verify=False)
    if record.get("bundle_hash") and record["bundle_hash"] != loaded.manifest_sha256:
        notes.append(f"--bundle {bundle} is not the bundle that made {samples} (manifest sha256 differs); "
                     "its class labels were used as given")
    return loaded, notes


def manifest_class_labels(samples: str | Path, bundle: str | Path | None = None) -> tuple[dict[str, int], list[str], str]:
    """``{class name: label}`` from the bundle manifest's class ``label`` fields, notes, and the bundle path.

    Classes without a label are left out with a note; a bundle where no class has one is an `InputError`.
    """
    loaded, notes = _bundle_of(Path(samples), bundle)
    mapping: dict[str, int] = {}
    for i, entry in enumerate(loaded.manifest.classes):
        if entry.label is None:
            notes.append(f"class {entry.name} has no label in {loaded.path}/manifest.json: left out")
            continue
        try:
            mapping[entry.name] = int(entry.label)
        except ValueError:
            raise InputError(f"{loaded.path}/manifest.json: classes[{i}].label is {entry.label!r}; the labels CSV "
                             "has integer labels, so give --class-map YAML (class name -> integer label)") from None
    if not mapping:
        raise InputError(f"{loaded.path}: no class of this bundle records a label (manifest classes[].label); "
                         "give --class-map YAML (class name -> label), or export the bundle from a review with labels")
    return mapping, notes, str(loaded.path)


def synthetic_tiles(folder: str | Path, class_map: Mapping[str, int]) -> tuple[list[Path], np.ndarray, dict[str, int], list[str]]:
    """Generated tiles of the classes in ``class_map``, their labels, tiles per class, and notes.

    Reads the folder as `evaluate control` does (``manifest.csv``, else one sub-folder per class), so split
    layouts (``train/<class>/``) work; classes outside the map are left out with a note.
    """
    from histosynth.evaluate.control import generated_tiles

    files, names, _ = generated_tiles(folder)
    keep = [i for i, n in enumerate(names) if n in class_map]
    counts: dict[str, int] = {}
    for i in keep:
        counts[names[i]] = counts.get(names[i], 0) + 1
    notes = [f"class {n} of {folder} has no label in the class map: left out" for n in sorted(set(names) - set(class_map))]
    if not keep:
        raise InputError(f"{folder}: none of its classes ({', '.join(sorted(set(names)))}) has a label "
                         f"(labelled: {', '.join(class_map)})")
    return [files[i] for i in keep], np.asarray([class_map[names[i]] for i in keep], dtype=np.int64), counts, notes


# --- draws -----------------------------------------------------------------------------------------------------


def stratified_counts(proportions: np.ndarray, n: int) -> np.ndarray:
    """``n`` split over labels in ``proportions`` by largest remainder, each label at least 1 when ``n`` allows."""
    p = np.asarray(proportions, dtype=np.float64)
    p = p / p.sum()
    take = np.floor(p * n).astype(int)
    for i in np.argsort(-(p * n - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    if n >= len(p):  # a label with a tiny share still gets one tile, taken from the largest
        for i in np.flatnonzero((take == 0) & (p > 0)):
            take[np.argmax(take)] -= 1
            take[i] += 1
    return take


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted indices with the label proportions of ``labels`` (each present label at least once)."""
    if n > len(labels):
        raise InputError(f"--sizes: {n} is more than the {len(labels)} labelled real tiles")
    values, counts = np.unique(labels, return_counts=True)
    if n < len(values):
        raise InputError(f"--sizes: {n} tiles cannot hold all {len(values)} labels")
    take = stratified_counts(counts, n)
    picks = [rng.choice(np.flatnonzero(labels == v), size=k, replace=False) for v, k in zip(values, take)]
    return np.sort(np.concatenate(picks))


def _orders(labels: np.ndarray, values: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """A random order of the indices of each label value: prefixes of them make nested draws."""
    return [rng.permutation(np.flatnonzero(labels == v)) for v in values]


def _take(orders: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    return np.concatenate([o[:k] for o, k in zip(orders, counts)])


# --- training and scoring --------------------------------------------------------------------------------------


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_labels: int, config: ClassifierConfig, seed: int
) -> SmallResNet:
    """Train `SmallResNet` for ``config.steps`` steps on images ``x`` (uint8, or float in [-1, 1]) and label
    indices ``y``, each tile under a random flip / 90-degree turn."""
    from histosynth.imageops import random_dihedral

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init: the arms of one seed start from the same weights
    model = SmallResNet(num_labels, config.width).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(max(s + 1 - warmup, 0) / max(config.steps - warmup, 1), 1.0)))))
    batch = min(config.batch_size, len(x))
    per_epoch = len(x) // batch
    model.train()
    for step in range(config.steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=generator)
        idx = order[(step % per_epoch) * batch: (step % per_epoch + 1) * batch]
        # Tissue has no orientation: the dihedral group is a free, label-preserving augmentation.
        xb = _to_float(random_dihedral(x[idx], generator)).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


@torch.inference_mode()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities ``(N, num_labels)`` of images ``x`` (uint8, or float in [-1, 1])."""
    return torch.cat([F.softmax(model(_to_float(x[i: i + batch_size]).contiguous(memory_format=torch.channels_last)), dim=1)
                      for i in range(0, len(x), batch_size)]).numpy()


def score(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, ROC AUC) of probabilities against label indices; AUC is NaN if the test set has one label."""
    accuracy = float((probs.argmax(axis=1) == y).mean())
    if len(np.unique(y)) < 2:
        return accuracy, float("nan")
    if probs.shape[1] == 2:
        return accuracy, float(roc_auc_score(y, probs[:, 1]))
    return accuracy, float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{mean, std, ci95: [lo, hi], n, values}`` of per-seed values: a Student-t interval for the mean.

    NaN values (an AUC on a one-label test set) are left out; fewer than 2 values give no interval.
    """
    a = np.asarray(values, dtype=np.float64)
    finite = a[np.isfinite(a)]
    out: dict[str, Any] = {"mean": None, "std": None, "ci95": None, "n": int(len(finite)),
                           "values": [float(v) if math.isfinite(v) else None for v in a]}
    if len(finite):
        out["mean"] = float(finite.mean())
    if len(finite) >= 2:
        sd = float(finite.std(ddof=1))
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2, len(finite) - 1)) * sd / math.sqrt(len(finite))
        out["std"], out["ci95"] = sd, [out["mean"] - half, out["mean"] + half]
    return out


@dataclass
class ArmResult:
    """One arm at one real-subset size and synthetic ratio, over all seeds."""

    arm: str  # real, real+synthetic or synthetic
    n_real: int
    n_synthetic: int
    ratio: float  # synthetic tiles per real tile; 0 for the real and synthetic-only arms
    accuracy: list[float]
    auc: list[float]
    seconds: list[float] = field(default_factory=list)  # training + scoring time of each seed's model

    def to_json(self) -> dict[str, Any]:
        """``{arm, n_real, n_synthetic, ratio, accuracy, auc, seconds}``; scores as `interval` objects."""
        return {"arm": self.arm, "n_real": self.n_real, "n_synthetic": self.n_synthetic, "ratio": self.ratio,
                "accuracy": interval(self.accuracy), "auc": interval(self.auc),
                "seconds": [round(s, 3) for s in self.seconds]}


@dataclass
class DownstreamResult:
    """All arms, the label set and the settings; `to_json` gives the documented keys."""

    results: list[ArmResult]
    labels: list[int]
    n_test: int
    seeds: list[int]
    config: ClassifierConfig
    synthetic_counts: dict[str, int] = field(default_factory=dict)
    class_labels: dict[str, int] = field(default_factory=dict)
    label_source: str = ""
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def gains(self) -> list[dict[str, Any]]:
        """Per real size and ratio: (real+synthetic) - real, paired by seed, as `interval` objects."""
        real = {r.n_real: r for r in self.results if r.arm == "real"}
        out = []
        for r in self.results:
            base = real.get(r.n_real)
            if r.arm != "real+synthetic" or base is None:
                continue
            out.append({"n_real": r.n_real, "ratio": r.ratio, "n_synthetic": r.n_synthetic,
                        "accuracy": interval(np.subtract(r.accuracy, base.accuracy)),
                        "auc": interval(np.subtract(r.auc, base.auc))})
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "downstream"``)."""
        return {"metric": "downstream", "interval": INTERVAL, "labels": self.labels, "n_test": self.n_test,
                "seeds": self.seeds, "classifier": asdict(self.config), "synthetic_counts": dict(self.synthetic_counts),
                "class_labels": dict(self.class_labels), "label_source": self.label_source, "notes": list(self.notes),
                "results": [r.to_json() for r in self.results], "gains": self.gains(),
                "timing": dict(self.timing), "inputs": dict(self.inputs)}


def evaluate_downstream(
    real: str | Path,
    real_labels: str | Path,
    test: str | Path,
    test_labels: str | Path,
    *,
    sizes: Sequence[int] = (100, 300, 1000),
    ratios: Sequence[float] = (1, 4),
    synthetic: str | Path | None = None,
    class_map: str | Path | None = None,
    bundle: str | Path | None = None,
    seeds: int = 5,
    max_test: int | None = 1000,
    synthetic_only: int | None = None,
    config: ClassifierConfig | None = None,
    progress: Progress | None = None,
) -> DownstreamResult:
    """Train and score every arm for every seed (see the module docstring).

    ``synthetic_only`` is the size of the synthetic-only arm (default ``max(sizes) * max(ratios)``, 0: none).
    Without ``synthetic``, only the ``real`` arms run. ``progress(done, total, description)`` is called
    before each model and once at the end.
    """
    config = config or ClassifierConfig()
    config.validate("classifier")
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise InputError(f"--sizes: need positive subset sizes, got {sizes}")
    ratios = sorted(set(float(r) for r in ratios))
    if any(r <= 0 for r in ratios):
        raise InputError(f"--ratios: need positive synthetic-to-real ratios, got {ratios}")
    if synthetic is None and (class_map is not None or bundle is not None):
        raise InputError("--class-map and --bundle label synthetic tiles: give --synthetic DIR too")
    if synthetic_only is not None and synthetic_only < 0:
        raise InputError(f"--synthetic-only must be >= 0, got {synthetic_only}")
    notes: list[str] = []
    start = time.perf_counter()

    pool_files, pool_y = read_labels(real, real_labels)
    test_files, test_y = read_labels(test, test_labels)
    if max_test is not None and len(test_files) > max_test:
        keep = stratified_subset(test_y, max_test, np.random.default_rng(12345))
        test_files, test_y = [test_files[i] for i in keep], test_y[keep]
    real_values, real_counts = np.unique(pool_y, return_counts=True)
    if sizes[-1] > len(pool_y):
        raise InputError(f"--sizes: {sizes[-1]} is more than the {len(pool_y)} labelled real tiles in {real}")
    if sizes[0] < len(real_values):
        raise InputError(f"--sizes: {sizes[0]} tiles cannot hold all {len(real_values)} labels of {real_labels}")
    unseen = sorted(set(test_y.tolist()) - set(real_values.tolist()))
    if unseen:
        notes.append(f"test labels {unseen} never occur in the real training labels: no model can predict them")
    label_values = sorted(set(real_values.tolist()) | set(test_y.tolist()))
    index = {v: i for i, v in enumerate(label_values)}

    syn_files: list[Path] = []
    syn_y = np.zeros(0, dtype=np.int64)
    counts: dict[str, int] = {}
    mapping: dict[str, int] = {}
    label_source = ""
    if synthetic is not None:
        if class_map is not None:
            mapping, label_source = read_class_map(class_map), f"class map {class_map}"
        else:
            mapping, more, bundle_path = manifest_class_labels(synthetic, bundle)
            notes += more
            label_source = f"bundle manifest {bundle_path}"
        syn_files, syn_y, counts, more = synthetic_tiles(synthetic, mapping)
        notes += more
        extra = sorted(set(syn_y.tolist()) - set(real_values.tolist()))
        if extra:
            notes.append(f"synthetic labels {extra} never occur in the real labels: those tiles are not used")
    n_only = (int(max(sizes) * max(ratios)) if synthetic_only is None else synthetic_only) if synthetic is not None else 0

    # Tiles of each label every arm takes (largest remainder is not monotone in n for 3+ labels, so take the
    # maximum over arms, not the largest arm's counts). Synthetic tiles come in the real pool's label
    # proportions: check there are enough of each.
    proportions = real_counts / real_counts.sum()
    real_need = np.max([stratified_counts(proportions, n) for n in sizes], axis=0)
    syn_sizes = ([int(round(n * r)) for n in sizes for r in ratios] + ([n_only] if n_only else [])
                 if synthetic is not None else [])
    syn_need = np.max([stratified_counts(proportions, k) for k in syn_sizes], axis=0) if syn_sizes else None
    for what, need, have in (("real", real_need, real_counts),
                             ("synthetic", syn_need, np.array([(syn_y == v).sum() for v in real_values]))):
        short = [] if need is None else [f"label {v}: needs {k}, has {h}" for v, k, h in zip(real_values, need, have) if h < k]
        if short:
            raise InputError(f"{synthetic if what == 'synthetic' else real_labels}: too few {what} tiles for the largest "
                             f"arm (drawn in the real label proportions; {'; '.join(short)}); "
                             + ("generate more, or lower --sizes, --ratios or --synthetic-only" if what == "synthetic"
                                else "lower --sizes"))

    # One nested draw per seed; only the tiles some model uses are decoded.
    draws = []
    for seed in range(seeds):
        draws.append((_orders(pool_y, real_values, np.random.default_rng([seed, 1])),
                      _orders(syn_y, real_values, np.random.default_rng([seed, 2]))))
    real_used = np.unique(np.concatenate([_take(r, real_need) for r, _ in draws]))
    syn_used = (np.unique(np.concatenate([_take(s, syn_need) for _, s in draws])) if syn_need is not None
                else np.zeros(0, dtype=np.int64))
    total = seeds * (len(sizes) * (1 + (len(ratios) if synthetic is not None else 0)) + (1 if n_only else 0))
    if progress:
        progress(0, total, f"reading {len(real_used)} real, {len(test_files)} test and {len(syn_used)} synthetic tiles")
    real_row = {int(i): j for j, i in enumerate(real_used)}
    syn_row = {int(i): j for j, i in enumerate(syn_used)}
    real_x = read_tiles([pool_files[i] for i in real_used], config.image_size)
    test_x = read_tiles(test_files, config.image_size)
    syn_x = read_tiles([syn_files[i] for i in syn_used], config.image_size)
    shapes = {tuple(t.shape[1:]) for t in (real_x, test_x, syn_x) if len(t)}
    if len(shapes) > 1:
        raise InputError(f"real, test and synthetic tiles differ in size ({sorted(shapes)}); the classifier trains "
                         "at the tiles' own size, so they must match")
    test_idx = np.asarray([index[int(v)] for v in test_y])
    load_seconds = time.perf_counter() - start

    def label_idx(values: np.ndarray) -> torch.Tensor:
        return torch.tensor([index[int(v)] for v in values], dtype=torch.long)

    results: dict[tuple[str, int, float], ArmResult] = {}
    done = 0

    def fit(arm: str, n_real: int, ratio: float, seed: int, real_rows: np.ndarray, syn_rows: np.ndarray) -> None:
        nonlocal done
        if progress:
            progress(done, total, f"seed {seed}: {arm} ({n_real} real + {len(syn_rows)} synthetic)")
        t0 = time.perf_counter()
        parts = [real_x[[real_row[int(i)] for i in real_rows]]] if len(real_rows) else []
        parts += [syn_x[[syn_row[int(i)] for i in syn_rows]]] if len(syn_rows) else []
        x = torch.cat(parts)
        y = label_idx(np.concatenate([pool_y[real_rows], syn_y[syn_rows]]))
        model = train_classifier(x, y, len(label_values), config, seed)
        acc, auc = score(predict_proba(model, test_x), test_idx)
        r = results.setdefault((arm, n_real, ratio), ArmResult(arm, n_real, len(syn_rows), ratio, [], []))
        r.accuracy.append(acc)
        r.auc.append(auc)
        r.seconds.append(time.perf_counter() - t0)
        done += 1

    empty = np.zeros(0, dtype=np.int64)
    for seed, (real_orders, syn_orders) in enumerate(draws):
        for n in sizes:
            real_rows = _take(real_orders, stratified_counts(proportions, n))
            fit("real", n, 0.0, seed, real_rows, empty)
            if synthetic is not None:
                for ratio in ratios:
                    fit("real+synthetic", n, ratio, seed, real_rows,
                        _take(syn_orders, stratified_counts(proportions, int(round(n * ratio)))))
        if n_only:
            fit("synthetic", 0, 0.0, seed, empty, _take(syn_orders, stratified_counts(proportions, n_only)))
    if progress:
        progress(done, total, "done")
    elapsed = time.perf_counter() - start
    model_seconds = [s for r in results.values() for s in r.seconds]
    order = {arm: i for i, arm in enumerate(ARMS)}
    ordered = sorted(results.values(), key=lambda r: (r.arm == "synthetic", r.n_real, order[r.arm], r.ratio))
    return DownstreamResult(
        ordered, label_values, len(test_files), list(range(seeds)), config, counts, mapping, label_source, notes,
        {"real": str(real), "real_labels": str(real_labels), "test": str(test), "test_labels": str(test_labels),
         "synthetic": None if synthetic is None else str(synthetic),
         "class_map": None if class_map is None else str(class_map), "bundle": None if bundle is None else str(bundle)},
        {"seconds": round(elapsed, 1), "load_seconds": round(load_seconds, 1), "models": len(model_seconds),
         "seconds_per_model": round(float(np.mean(model_seconds)), 2) if model_seconds else None,
         "torch_threads": torch.get_num_threads()},
    )


# --- outputs ---------------------------------------------------------------------------------------------------


def _as_json(result: DownstreamResult | Mapping[str, Any]) -> Mapping[str, Any]:
    return result.to_json() if isinstance(result, DownstreamResult) else result


def _arm_name(r: Mapping[str, Any]) -> str:
    if r["arm"] == "real+synthetic":
        return f"real + {r.get('ratio', 0):g}x synthetic" if r.get("ratio") else "real + synthetic"
    return "synthetic only" if r["arm"] == "synthetic" else r["arm"]


def _half_width(s: Mapping[str, Any]) -> float:
    """Half the 95% interval (the error bar), or the std of results written before intervals existed."""
    if s.get("ci95"):
        return (s["ci95"][1] - s["ci95"][0]) / 2
    return s.get("std") or 0.0


def plot_downstream(result: DownstreamResult | Mapping[str, Any], path: str | Path) -> Path:
    """One PNG with two panels, test ROC AUC and accuracy against the number of labelled real tiles: a line per
    arm with 95% intervals as error bars (synthetic-only, which uses no real tile, as a flat line)."""
    from histosynth.evaluate.plots import line_plot
    from histosynth.io import write_bytes

    d = _as_json(result)
    sizes = sorted({r["n_real"] for r in d["results"] if r["arm"] != "synthetic"})
    nan = float("nan")
    panels = []
    for metric, title in (("auc", "ROC AUC"), ("accuracy", "accuracy")):
        series: dict[str, tuple[list[float], list[float], list[float]]] = {}
        for r in d["results"]:
            s = r[metric]
            y = s["mean"] if s["mean"] is not None else nan
            if r["arm"] == "synthetic":
                series[_arm_name(r)] = (list(sizes), [y] * len(sizes), [_half_width(s)] * len(sizes))
            else:
                xs, ys, es = series.setdefault(_arm_name(r), ([], [], []))
                xs.append(r["n_real"])
                ys.append(y)
                es.append(_half_width(s))
        target = Path(path)
        tmp = target.with_name(f".{target.stem}-{metric}.tmp.png")
        try:
            line_plot(series, tmp, title=f"test {title}, mean and 95% CI over {len(d['seeds'])} seeds",
                      xlabel="labelled real tiles", ylabel=title, log_x=len(sizes) > 2)
            with Image.open(tmp) as im:
                panels.append(im.convert("RGB"))
        finally:
            tmp.unlink(missing_ok=True)
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def _fmt_ci(s: Mapping[str, Any], scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    if s.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{s['mean'] * scale:{sign}.{digits}f}"
    if s.get("ci95"):
        lo, hi = (v * scale for v in s["ci95"])
        text += f" [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
    elif s.get("std") is not None:
        text += f" +- {s['std'] * scale:.{digits}f}"
    return text


def downstream_markdown(result: DownstreamResult | Mapping[str, Any], plot: str | None = None,
                        heading: str = "## Downstream classifier utility") -> list[str]:
    """Markdown lines: the protocol in one sentence, the table of arms, the paired gains and notes."""
    d = _as_json(result)
    cfg = d.get("classifier", {})
    out = [heading, ""]
    if "steps" in cfg:
        out += [f"A small ResNet trained {cfg['steps']} steps (batch {cfg['batch_size']}) per model at the tiles' own "
                f"size, {len(d['seeds'])} seeds, scored on {d['n_test']} test tiles. Brackets: "
                f"{d.get('interval', INTERVAL)}. Synthetic labels from {d.get('label_source') or '-'}.", ""]
    out += ["| arm | real | synthetic | ROC AUC | accuracy |", "|---|---|---|---|---|"]
    out += [f"| {_arm_name(r)} | {r['n_real']} | {r['n_synthetic']} | {_fmt_ci(r['auc'])} | {_fmt_ci(r['accuracy'])} |"
            for r in d["results"]]
    out.append("")
    if d.get("gains"):
        out += ["Gain from adding synthetic tiles (real + synthetic minus real, paired by seed; points = x100):", "",
                "| real | synthetic added | ROC AUC gain (points) | accuracy gain (points) |", "|---|---|---|---|"]
        out += [f"| {g['n_real']} | {g['n_synthetic']} ({g['ratio']:g}x) | {_fmt_ci(g['auc'], 100, 1, True)} | "
                f"{_fmt_ci(g['accuracy'], 100, 1, True)} |" for g in d["gains"]]
        out.append("")
    if plot:
        out += [f"![downstream ROC AUC and accuracy]({plot})", ""]
    out += [f"> note: {n}" for n in d.get("notes", [])]
    timing = d.get("timing") or {}
    if timing.get("seconds") is not None:
        out += ["", f"{timing.get('models')} models in {timing['seconds']:.0f} s ({timing.get('seconds_per_model')} s "
                f"per model; torch threads: {timing.get('torch_threads')})."]
    return out + [""]
