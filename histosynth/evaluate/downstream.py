"""Downstream utility: does adding synthetic tiles help a classifier trained on few labelled real tiles?

One small CNN with a fixed architecture and schedule (`ClassifierConfig`) is trained, for several seeds, on

- ``real``: stratified random subsets of the labelled real pool of increasing size;
- ``real+synthetic``: the same subsets plus synthetic tiles, each labelled through a class map
  (model class name -> label, e.g. ``{tumour: 1, stroma: 0}``; classes not in the map are left out);
- ``synthetic``: the synthetic tiles alone.

Each model is scored on one fixed labelled test set: accuracy and ROC AUC (one-vs-rest for more than two
labels), reported as mean +- std over seeds. Tiles are box-downsampled (default 32 px) and held in memory,
so small subsets train in seconds on a CPU.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from histosynth.configio import load_yaml, require
from histosynth.errors import InputError
from histosynth.evaluate.features import list_images, read_rgb

ARMS = ("real", "real+synthetic", "synthetic")


@dataclass
class ClassifierConfig:
    """The fixed classifier and schedule; change it only with a reason, since arms are compared under it."""

    image_size: int = 32  # tiles are box-downsampled to this many pixels per side
    width: int = 16  # channels of the first conv layer (doubled at each of the 3 stages)
    epochs: int = 15  # passes over the training set
    min_steps: int = 150  # at least this many optimizer steps, so tiny subsets still train
    batch_size: int = 64
    lr: float = 2e-3  # Adam
    weight_decay: float = 1e-4

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.image_size >= 8, f"{path}.image_size", "must be at least 8")
        for name in ("width", "epochs", "batch_size"):
            require(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        require(self.lr > 0, f"{path}.lr", "must be positive")


class SmallCNN(nn.Module):
    """Three conv stages (conv-BN-ReLU-pool), global average pool, linear: a few tens of thousands of weights."""

    def __init__(self, num_labels: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_labels)`` of images ``(N, 3, s, s)`` in ``[-1, 1]``."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_tiles(files: Sequence[Path], size: int) -> torch.Tensor:
    """Image files -> float32 ``(N, 3, size, size)`` in ``[-1, 1]`` (box filter: averages, no aliasing)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(files):
        im = Image.fromarray(read_rgb(p))
        out[i] = np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BOX))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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


def synthetic_tiles(folder: str | Path, class_map: dict[str, int]) -> tuple[list[Path], np.ndarray, dict[str, int]]:
    """Generated tiles ``folder/<class_name>/*`` whose class is in ``class_map``, their labels, and counts."""
    root = Path(folder)
    files, labels, counts = [], [], {}
    for path in list_images(root):
        class_name = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
        if class_name in class_map:
            files.append(path)
            labels.append(class_map[class_name])
            counts[class_name] = counts.get(class_name, 0) + 1
    if not files:
        raise InputError(
            f"{root}: no generated tiles in the class folders named by the class map ({', '.join(class_map)})"
        )
    return files, np.asarray(labels, dtype=np.int64), counts


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices with the label proportions of ``labels`` (each present label at least once)."""
    if n > len(labels):
        raise InputError(f"--sizes: {n} is more than the {len(labels)} labelled real tiles")
    values, counts = np.unique(labels, return_counts=True)
    if n < len(values):
        raise InputError(f"--sizes: {n} tiles cannot hold all {len(values)} labels")
    take = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    while take.sum() < n:  # hand out the rounding remainder to the largest classes
        take[np.argmax(counts - take)] += 1
    while take.sum() > n:
        take[np.argmax(take)] -= 1
    picks = [rng.choice(np.flatnonzero(labels == v), size=k, replace=False) for v, k in zip(values, take)]
    return np.sort(np.concatenate(picks))


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_labels: int, config: ClassifierConfig, seed: int
) -> SmallCNN:
    """Train `SmallCNN` on images ``x`` and label indices ``y`` with random flips and 90-degree turns."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init
    model = SmallCNN(num_labels, config.width)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch)
    steps = max(config.epochs * steps_per_epoch, config.min_steps)
    model.train()
    for step in range(steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=generator)
        idx = order[(step % steps_per_epoch) * batch : (step % steps_per_epoch + 1) * batch]
        xb = x[idx]
        # Tissue has no orientation: the dihedral group is a free, label-preserving augmentation.
        xb = torch.rot90(xb, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
        if torch.rand(1, generator=generator) < 0.5:
            xb = xb.flip(3)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``(N, num_labels)``."""
    return torch.cat([F.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]).numpy()


def score(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, ROC AUC) of probabilities against label indices; AUC is NaN if the test set has one label."""
    accuracy = float((probs.argmax(axis=1) == y).mean())
    if len(np.unique(y)) < 2:
        return accuracy, float("nan")
    if probs.shape[1] == 2:
        return accuracy, float(roc_auc_score(y, probs[:, 1]))
    return accuracy, float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


@dataclass
class ArmResult:
    """One arm at one real-subset size, over all seeds."""

    arm: str
    n_real: int
    n_synthetic: int
    accuracy: list[float]
    auc: list[float]

    def to_json(self) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, Any]:
            a = np.asarray(v, dtype=np.float64)
            return {"mean": float(np.nanmean(a)) if np.isfinite(a).any() else None,
                    "std": float(np.nanstd(a)) if np.isfinite(a).any() else None,
                    "values": [None if not np.isfinite(x) else float(x) for x in a]}

        return {"arm": self.arm, "n_real": self.n_real, "n_synthetic": self.n_synthetic,
                "accuracy": stats(self.accuracy), "auc": stats(self.auc)}


@dataclass
class DownstreamResult:
    """All arms, the label set and the settings; `to_json` gives the documented keys."""

    results: list[ArmResult]
    labels: list[int]
    n_test: int
    seeds: list[int]
    config: ClassifierConfig
    synthetic_counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "downstream"``)."""
        return {"metric": "downstream", "labels": self.labels, "n_test": self.n_test, "seeds": self.seeds,
                "classifier": asdict(self.config), "synthetic_counts": dict(self.synthetic_counts),
                "results": [r.to_json() for r in self.results], "inputs": dict(self.inputs)}


def evaluate_downstream(
    real: str | Path,
    real_labels: str | Path,
    test: str | Path,
    test_labels: str | Path,
    *,
    sizes: Sequence[int],
    synthetic: str | Path | None = None,
    class_map: str | Path | None = None,
    seeds: int = 3,
    max_synthetic: int | None = None,
    max_test: int | None = 1000,
    config: ClassifierConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """Train and score every arm for every seed; see the module docstring."""
    config = config or ClassifierConfig()
    config.validate("classifier")
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise InputError(f"--sizes: need positive subset sizes, got {sizes}")
    if (synthetic is None) != (class_map is None):
        raise InputError("--synthetic and --class-map go together (the map labels the synthetic classes)")

    pool_files, pool_labels = read_labels(real, real_labels)
    test_files, test_y = read_labels(test, test_labels)
    if max_test is not None and len(test_files) > max_test:
        keep = stratified_subset(test_y, max_test, np.random.default_rng(12345))
        test_files, test_y = [test_files[i] for i in keep], test_y[keep]
    syn_files: list[Path] = []
    syn_y = np.zeros(0, dtype=np.int64)
    counts: dict[str, int] = {}
    if synthetic is not None and class_map is not None:
        syn_files, syn_y, counts = synthetic_tiles(synthetic, read_class_map(class_map))
        if max_synthetic is not None and len(syn_files) > max_synthetic:
            keep = stratified_subset(syn_y, max_synthetic, np.random.default_rng(54321))
            syn_files, syn_y = [syn_files[i] for i in keep], syn_y[keep]
    label_values = sorted(set(pool_labels.tolist()) | set(test_y.tolist()) | set(syn_y.tolist()))
    index = {v: i for i, v in enumerate(label_values)}
    to_index = lambda a: torch.tensor([index[int(v)] for v in a], dtype=torch.long)  # noqa: E731

    # Only the tiles some arm can use are decoded: the union of every seed's subsets, plus test and synthetic.
    subsets = {(seed, n): stratified_subset(pool_labels, n, np.random.default_rng([seed, n])) for seed in range(seeds) for n in sizes}
    used = np.unique(np.concatenate(list(subsets.values())))
    position = {int(i): j for j, i in enumerate(used)}
    if progress:
        progress(f"loading {len(used)} real, {len(test_files)} test and {len(syn_files)} synthetic tiles")
    pool_x = load_tiles([pool_files[i] for i in used], config.image_size)
    test_x = load_tiles(test_files, config.image_size)
    test_idx = to_index(test_y).numpy()
    syn_x = load_tiles(syn_files, config.image_size) if syn_files else None

    results: list[ArmResult] = []

    def run(arm: str, n_real: int, make: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        accs, aucs = [], []
        n_syn = 0
        for seed in range(seeds):
            x, y = make(seed)
            n_syn = len(x) - (n_real if arm != "synthetic" else 0)
            if progress:
                progress(f"{arm}: {n_real} real + {n_syn} synthetic, seed {seed}")
            model = train_classifier(x, y, len(label_values), config, seed)
            acc, auc = score(predict_proba(model, test_x), test_idx)
            accs.append(acc)
            aucs.append(auc)
        results.append(ArmResult(arm, n_real, n_syn, accs, aucs))

    for n in sizes:
        def real_only(seed: int, n: int = n) -> tuple[torch.Tensor, torch.Tensor]:
            rows = [position[int(i)] for i in subsets[(seed, n)]]
            return pool_x[rows], to_index(pool_labels[subsets[(seed, n)]])

        run("real", n, real_only)
        if syn_x is not None:
            def mixed(seed: int, n: int = n) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = real_only(seed, n)
                return torch.cat([x, syn_x]), torch.cat([y, to_index(syn_y)])

            run("real+synthetic", n, mixed)
    if syn_x is not None:
        run("synthetic", 0, lambda seed: (syn_x, to_index(syn_y)))
    return DownstreamResult(
        results, label_values, len(test_files), list(range(seeds)), config, counts,
        {"real": str(real), "real_labels": str(real_labels), "test": str(test), "test_labels": str(test_labels),
         "synthetic": None if synthetic is None else str(synthetic), "class_map": None if class_map is None else str(class_map)},
    )


def plot_downstream(result: DownstreamResult, path: str | Path, metric: str = "accuracy") -> Path:
    """Line plot of ``metric`` (accuracy or auc) against the real subset size, one line per arm."""
    from histosynth.evaluate.plots import line_plot

    sizes = sorted({r.n_real for r in result.results if r.arm != "synthetic"})
    series = {}
    for arm in ARMS:
        rows = [r.to_json() for r in result.results if r.arm == arm]
        if not rows:
            continue
        if arm == "synthetic":  # independent of the real subset size: a flat reference line
            m, s = rows[0][metric]["mean"], rows[0][metric]["std"]
            series[arm] = (sizes, [m if m is not None else float("nan")] * len(sizes), [s or 0.0] * len(sizes))
        else:
            series[arm] = ([r["n_real"] for r in rows],
                           [r[metric]["mean"] if r[metric]["mean"] is not None else float("nan") for r in rows],
                           [r[metric]["std"] or 0.0 for r in rows])
    return line_plot(series, path, title=f"test {metric} (mean +- std over {len(result.seeds)} seeds)",
                     xlabel="labelled real tiles", ylabel=metric, log_x=len(sizes) > 2)
