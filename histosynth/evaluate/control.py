"""Controllability: do tiles generated for class c come back as class c?

Each generated tile (``DIR/<class_name>/*`` with ``DIR/manifest.csv`` from `histosynth generate`) is
re-encoded with the VQ-GAN encoder and assigned a cluster by the model's own IMC head (the cluster
assigner trained on the real latents). Clusters are mapped to class names through the label map's
``clusters: {cluster_id: class_name}`` entry (``review apply`` writes it); without one, cluster ``i`` is
the class whose ``class_id`` is ``i`` (the unreviewed case: one class per cluster). Per-class accuracy is
the share of a class's tiles assigned back to it; the confusion matrix has one row per generated class
and one column per assigned class (plus ``unmapped`` for clusters that name no class).

Optionally a classifier trained on labelled real tiles (the downstream `SmallCNN`) gives a second,
independent assignment into labels, with a class map (class name -> label) saying which label each class
should get. The classifier is a judge with errors of its own, so it is also scored on held-out real tiles
(``real_holdout``, drawn from the same labelled pool, disjoint from its training subset): a generated class
whose accuracy is within the judge's real accuracy for its label is bounded by the judge, and says so in a
warning. The paper's figure: 73 of 100 tiles of one cluster assigned back to it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from histosynth.configio import load_yaml
from histosynth.errors import InputError
from histosynth.evaluate.features import IMAGE_SUFFIXES, read_rgb
from histosynth.evaluate.recon import images_to_tensor
from histosynth.labels import parse_cluster_table, read_label_map

if TYPE_CHECKING:
    from histosynth.evaluate.downstream import ClassifierConfig

UNMAPPED = "unmapped"
# Below this many tiles a class's accuracy has a 95% interval wider than about +-0.14 (at accuracy 0.5), too
# wide to compare models; the result then carries a warning with the interval.
MIN_TILES_PER_CLASS = 50
# Held-out real tiles the classifier assigner is scored on by default: at 90% accuracy, about +-0.02 overall.
REAL_HOLDOUT = 1000


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `hits / n` (sound at small n and at 0 or n hits)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def generated_tiles(folder: str | Path, max_per_class: int | None = None) -> tuple[list[Path], list[str], dict[str, int]]:
    """Files, their class names, and ``{class_name: class_id}`` of a `generate` output folder.

    Reads ``manifest.csv`` when present (its ``path``, ``class_name``, ``class_id`` columns); otherwise every
    sub-folder is a class, numbered in sorted order.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of generated tiles")
    files: list[Path] = []
    names: list[str] = []
    ids: dict[str, int] = {}
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"path", "class_name", "class_id"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise InputError(f"{manifest}: needs columns {sorted(need)}, has {reader.fieldnames}")
            for row in reader:
                files.append(root / row["path"])
                names.append(row["class_name"])
                ids[row["class_name"]] = int(row["class_id"])
    else:
        for i, sub in enumerate(sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))):
            for p in sorted(sub.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(p)
                    names.append(sub.name)
            ids[sub.name] = i
    if not files:
        raise InputError(f"{root}: no generated tiles (expected DIR/<class_name>/*.png and manifest.csv)")
    if max_per_class is not None:
        seen: dict[str, int] = {}
        keep = []
        for i, n in enumerate(names):
            seen[n] = seen.get(n, 0) + 1
            if seen[n] <= max_per_class:
                keep.append(i)
        files, names = [files[i] for i in keep], [names[i] for i in keep]
    return files, names, ids


def read_cluster_map(path: str | Path) -> dict[int, str]:
    """``{cluster_id: class_name}`` from a label map's ``clusters`` table (or a bare ``clusters:`` mapping).

    An excluded cluster (null) maps to no class, so its tiles count as ``unmapped``. A cluster the expert
    split maps to the column ``"a | b"``: the head cannot tell the parts apart, so a tile generated for
    ``a`` that lands there counts as correct for the head's part of the condition (the tissue cluster);
    the classifier assigner checks the label part of a label split.
    """
    data = load_yaml(path)
    if isinstance(data, dict) and "classes" in data:
        lm = read_label_map(path)  # a full label map: its table is checked against the classes
        if not lm.cluster_to_class:
            raise InputError(f"{path}: no 'clusters' table (cluster id -> class name); `review apply` writes one")
        table = {c: [lm.names[i] for i in ids] for c, ids in lm.cluster_classes().items()}
    else:
        bare = data["clusters"] if isinstance(data, dict) and "clusters" in data else data
        table = {c: [] if t is None else [t] if isinstance(t, str) else t
                 for c, t in parse_cluster_table(bare, f"{path}: clusters").items()}
    out = {c: " | ".join(names) for c, names in table.items() if names}
    if not out:
        raise InputError(f"{path}: clusters: every cluster is excluded; nothing to map tiles to")
    return out


@dataclass
class ControlResult:
    """Per-class accuracy and the confusion matrix of one assigner."""

    assigner: str
    rows: list[str]  # generated classes
    columns: list[str]  # assigned classes (or labels)
    confusion: np.ndarray  # (rows, columns) counts
    expected: dict[str, str]  # generated class -> the column it should land in
    inputs: dict[str, Any] = field(default_factory=dict)
    # The classifier's own accuracy on held-out real tiles (see `holdout_accuracy`); None: not measured.
    real_holdout: dict[str, Any] | None = None

    def per_class(self) -> dict[str, dict[str, Any]]:
        """Per generated class: n, correct, accuracy, its 95% Wilson interval `ci95`, and the expected column."""
        out = {}
        for i, name in enumerate(self.rows):
            total = int(self.confusion[i].sum())
            target = self.expected.get(name)
            hits = int(self.confusion[i, self.columns.index(target)]) if target in self.columns else 0
            out[name] = {"n": total, "correct": hits, "accuracy": hits / total if total else None,
                         "ci95": list(wilson_interval(hits, total)) if total else None, "expected": target}
        return out

    def warnings(self) -> list[str]:
        """What makes the accuracy hard to trust: classes with few tiles, and everything landing in one column."""
        out = []
        for name, v in self.per_class().items():
            if v["n"] < MIN_TILES_PER_CLASS:
                lo, hi = v["ci95"] or (0.0, 1.0)
                out.append(f"{name}: accuracy from only {v['n']} tiles (95% interval {lo:.2f}-{hi:.2f}); "
                           f"use at least {MIN_TILES_PER_CLASS} tiles per class to compare models")
        used = [c for j, c in enumerate(self.columns) if self.confusion[:, j].sum() > 0]
        if len(used) == 1 and len({t for t in self.expected.values() if t is not None}) > 1:
            total = int(self.confusion.sum())
            out.append(f"all {total} tiles were assigned to {used[0]!r}: the assignments collapsed into one class, "
                       "so the accuracy says nothing about telling the classes apart (check the assigner and the "
                       "generated tiles)")
        return out + self._judge_warnings()

    def _judge_warnings(self) -> list[str]:
        """Classes whose accuracy the judge's own error on real tiles could explain, and a short held-out set."""
        judge = self.real_holdout
        if not judge:
            return []
        out = []
        if judge["n"] < judge["requested"]:
            out.append(f"real holdout: {judge['n']} tiles, not the {judge['requested']} asked for (it takes at most "
                       "half of the labelled real pool, so the classifier keeps the rest to train on)")
        for name, v in self.per_class().items():
            label = judge["per_label"].get(v["expected"])
            if not v["n"] or not label or not label["n"]:
                continue
            lo, hi = v["ci95"]
            j_lo, j_hi = label["ci95"]
            if lo <= j_hi and j_lo <= hi:  # the two 95% intervals overlap
                out.append(f"{name}: accuracy {v['accuracy']:.2f} ({lo:.2f}-{hi:.2f}) is within the classifier's own "
                           f"accuracy on held-out real {v['expected']!r} tiles ({label['accuracy']:.2f}, "
                           f"{j_lo:.2f}-{j_hi:.2f}, n={label['n']}): the judge's errors bound this number, so it "
                           "cannot tell the generator's misses from the classifier's")
        return out

    def accuracy(self) -> float | None:
        per = self.per_class()
        total = sum(v["n"] for v in per.values())
        return sum(v["correct"] for v in per.values()) / total if total else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "control"``)."""
        out = {"metric": "control", "assigner": self.assigner, "accuracy": self.accuracy(),
               "per_class": self.per_class(), "rows": self.rows, "columns": self.columns,
               "confusion": self.confusion.astype(int).tolist(), "inputs": dict(self.inputs),
               "warnings": self.warnings()}
        if self.assigner == "classifier":
            out["real_holdout"] = self.real_holdout  # null when --real-holdout 0
        return out


def real_holdout_line(d: dict[str, Any]) -> str | None:
    """One sentence on the classifier's held-out real accuracy of a control result's JSON, or None without one."""
    judge = d.get("real_holdout")
    if not judge:
        return None
    labels = "; ".join(f"{k} {v['accuracy']:.3f} ({v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}, n={v['n']})"
                       for k, v in judge["per_label"].items() if v["n"])
    lo, hi = judge["ci95"]
    return (f"Classifier on {judge['n']} held-out real tiles: accuracy {judge['accuracy']:.3f} (95% {lo:.3f}-{hi:.3f}); "
            f"{labels}. Generated-tile accuracy is bounded by these.")


def holdout_split(labels: np.ndarray, holdout: int, train_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted ``(train, holdout)`` indices of a labelled pool, both stratified by label and seeded.

    The holdout is drawn first and takes at most half of the pool; the training subset is ``train_size``
    of the rest (all of it when None or when fewer remain). ``holdout=0`` draws exactly the training
    subset of before, so results without a holdout do not change.
    """
    from histosynth.evaluate.downstream import stratified_subset

    if holdout < 0:
        raise InputError(f"--real-holdout: {holdout} is negative; give a tile count, or 0 to turn it off")
    rng = np.random.default_rng(seed)
    n_hold = min(holdout, len(labels) // 2)
    n_values = len(np.unique(labels))
    if holdout and n_hold < n_values:
        raise InputError(f"--real-holdout: {n_hold} tiles (at most half of the {len(labels)} labelled real tiles) "
                         f"cannot hold all {n_values} labels; give at least {n_values} and a pool of at least "
                         f"{2 * n_values}, or 0 to turn the holdout off")
    held = stratified_subset(labels, n_hold, rng) if n_hold else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), held)
    if train_size is not None and train_size < len(rest):
        rest = rest[stratified_subset(labels[rest], train_size, rng)]
    return rest, held


def holdout_accuracy(predicted: np.ndarray, truth: np.ndarray, values: list[int], requested: int) -> dict[str, Any]:
    """The ``real_holdout`` record: n, correct, accuracy and Wilson ``ci95``, overall and per ``label v``."""

    def record(hits: int, n: int) -> dict[str, Any]:
        return {"n": n, "correct": hits, "accuracy": hits / n if n else None,
                "ci95": list(wilson_interval(hits, n)) if n else None}

    right = predicted == truth
    out = record(int(right.sum()), len(truth))
    out["per_label"] = {f"label {v}": record(int(right[truth == v].sum()), int((truth == v).sum())) for v in values}
    out["requested"] = requested
    return out


def _confusion(true: list[str], pred: list[str], rows: list[str], columns: list[str]) -> np.ndarray:
    matrix = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for t, p in zip(true, pred):
        matrix[rows.index(t), columns.index(p)] += 1
    return matrix


@torch.inference_mode()
def cluster_assignments(files: list[Path], vqgan: torch.nn.Module, head: torch.nn.Module, device: torch.device,
                        batch_size: int = 64, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Cluster id of each tile: IMC head logits of the VQ-GAN encoder's latents, argmax."""
    out = []
    for start in range(0, len(files), batch_size):
        x = images_to_tensor(np.stack([read_rgb(p) for p in files[start : start + batch_size]])).to(device)
        out.append(head.logits_from_latents(vqgan.encode(x)).argmax(dim=1).cpu().numpy())
        if progress:
            progress(min(start + batch_size, len(files)), len(files))
    return np.concatenate(out)


def evaluate_control(
    samples: str | Path,
    *,
    vqgan: str | Path,
    head: str | Path,
    labels: str | Path | None = None,
    device: str = "cpu",
    max_per_class: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> ControlResult:
    """Assign generated tiles back with the cluster head; see the module docstring."""
    from histosynth.autoencoder.train import load_vqgan
    from histosynth.clusters.imc import IMCHead
    from histosynth.runtime.devices import resolve_device

    dev = resolve_device(device)
    files, names, ids = generated_tiles(samples, max_per_class)
    model = load_vqgan(vqgan, dev)
    imc = IMCHead.load(head).to(dev).eval()
    if labels is not None:
        cluster_to_class = read_cluster_map(labels)
    else:
        cluster_to_class = {cid: name for name, cid in ids.items()}
    clusters = cluster_assignments(files, model, imc, dev, batch_size, progress)
    predicted = [cluster_to_class.get(int(c), UNMAPPED) for c in clusters]
    rows = sorted(set(names), key=lambda n: (ids.get(n, 0), n))
    columns = list(dict.fromkeys([*rows, *sorted(set(cluster_to_class.values()) - set(rows))]))
    if UNMAPPED in predicted:
        columns.append(UNMAPPED)
    # A class of a split cluster is expected in its cluster's column ("a | b"), the most the head can check.
    expected = {r: next((col for col in cluster_to_class.values() if r in col.split(" | ")), r) for r in rows}
    result = ControlResult("clusters", rows, columns, _confusion(names, predicted, rows, columns), expected)
    result.inputs = {"samples": str(samples), "vqgan": str(vqgan), "head": str(head), "labels": None if labels is None else str(labels),
                     "k": int(imc.k), "cluster_to_class": {str(k): v for k, v in sorted(cluster_to_class.items())}}
    return result


def evaluate_control_classifier(
    samples: str | Path,
    *,
    real: str | Path,
    real_labels: str | Path,
    class_map: str | Path,
    train_size: int | None = 2000,
    real_holdout: int = REAL_HOLDOUT,
    max_per_class: int | None = None,
    seed: int = 0,
    config: ClassifierConfig | None = None,
) -> ControlResult:
    """Second assigner: the downstream `SmallCNN` trained on labelled real tiles, with a class -> label map.

    ``real_holdout`` real tiles (stratified, seeded, disjoint from the ``train_size`` it trains on; 0: none)
    measure the classifier's own accuracy; ``config`` is its `ClassifierConfig` (default: the protocol's).
    """
    from histosynth.evaluate.downstream import (ClassifierConfig, load_tiles, predict_proba, read_class_map,
                                                read_labels, train_classifier)

    files, names, _ = generated_tiles(samples, max_per_class)
    mapping = read_class_map(class_map)
    all_files, all_y = read_labels(real, real_labels)
    train, held = holdout_split(all_y, real_holdout, train_size, seed)
    pool_files, pool_y = [all_files[i] for i in train], all_y[train]
    values = sorted(set(all_y.tolist()))
    config = config or ClassifierConfig()
    index = {v: i for i, v in enumerate(values)}
    model = train_classifier(load_tiles(pool_files, config.image_size),
                             torch.tensor([index[int(v)] for v in pool_y]), len(values), config, seed)
    judge = None
    if len(held):
        held_idx = predict_proba(model, load_tiles([all_files[i] for i in held], config.image_size)).argmax(axis=1)
        judge = holdout_accuracy(np.asarray(values)[held_idx], all_y[held], values, real_holdout)
    predicted_idx = predict_proba(model, load_tiles(files, config.image_size)).argmax(axis=1)
    predicted = [f"label {values[i]}" for i in predicted_idx]
    rows = sorted(set(names))
    columns = [f"label {v}" for v in values]
    expected = {r: f"label {mapping[r]}" for r in rows if r in mapping}
    result = ControlResult("classifier", rows, columns, _confusion(names, predicted, rows, columns), expected,
                           real_holdout=judge)
    result.inputs = {"samples": str(samples), "real": str(real), "real_labels": str(real_labels),
                     "class_map": str(class_map), "train_size": len(pool_files), "real_holdout": len(held),
                     "seed": seed}
    return result
