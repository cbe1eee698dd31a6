"""The downstream protocol: the classifier learns what its tiles show, correctly and wrongly labelled synthetic
tiles move the score in opposite directions, intervals and paired gains are what the docs say, draws are
stratified and nested, and synthetic classes take their labels from the bundle manifest."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from histosynth.bundle.manifest import ClassEntry, read_manifest, write_manifest
from histosynth.bundle.testing import tiny_bundle
from histosynth.errors import InputError
from histosynth.evaluate.downstream import (
    ClassifierConfig,
    _orders,
    _take,
    evaluate_downstream,
    interval,
    manifest_class_labels,
    stratified_counts,
)

# Tiny schedule at half resolution: a model trains in well under a second on one core.
TINY = ClassifierConfig(steps=30, batch_size=32, warmup_steps=5, image_size=48)
TINT = 0.06  # strength of the planted tint: learnable, but not reliably from 8 tiles in 30 steps


def _tint(pixels: np.ndarray) -> np.ndarray:
    """A faint hematoxylin-like tint (less red and green, more blue): the planted label-1 feature."""
    out = pixels.astype(np.float32) * np.array([1 - TINT, 1 - TINT, 1.0]) + np.array([0.0, 0.0, 255 * TINT])
    return np.clip(out, 0, 255).astype(np.uint8)


def _write_labels(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def planted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A planted task on 200 real PCam tiles, every other one tinted (label 1): ``real/`` (80 tiles, real.csv),
    ``test/`` (60, test.csv) and a generated-style ``syn/{planted,plain}/`` (60), plus right and swapped maps."""
    root = tmp_path_factory.mktemp("planted")
    files = sorted((shared_data / "pcam" / "train").glob("*.jpg"))[:400:2]
    rows: dict[str, list[tuple[str, int]]] = {"real": [], "test": []}
    for i, f in enumerate(files):
        label = i % 2
        pixels = np.asarray(Image.open(f).convert("RGB"))
        pixels = _tint(pixels) if label else pixels
        part = "real" if i < 80 else "test" if i < 140 else "syn"
        folder = root / part / ("planted" if label else "plain") if part == "syn" else root / part
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        if part != "syn":
            rows[part].append((f"{i:03d}.png", label))
    for part, part_rows in rows.items():
        _write_labels(root / f"{part}.csv", part_rows)
    (root / "right.yaml").write_text("planted: 1\nplain: 0\n")
    (root / "swapped.yaml").write_text("planted: 0\nplain: 1\n")
    return root


def test_synthetic_labels_move_the_score_the_right_way(planted: Path) -> None:
    runs = {name: evaluate_downstream(planted / "real", planted / "real.csv", planted / "test", planted / "test.csv",
                                      sizes=[8], ratios=[4], synthetic=planted / "syn", class_map=planted / f"{name}.yaml",
                                      seeds=3, config=TINY)
            for name in ("right", "swapped")}

    def auc(name: str, arm: str) -> float:
        return float(np.mean(next(r for r in runs[name].results if r.arm == arm).auc))

    real = auc("right", "real")
    # The real arm does not depend on the synthetic tiles: same subsets, weights and batches.
    assert next(r for r in runs["swapped"].results if r.arm == "real").auc == \
        next(r for r in runs["right"].results if r.arm == "real").auc
    # Chance is 0.5. Synthetic tiles alone teach the tint, or its opposite under swapped labels.
    assert auc("right", "synthetic") > 0.75 and auc("swapped", "synthetic") < 0.35, runs
    # 8 real tiles learn it only partly; 32 correctly labelled synthetic tiles help, swapped ones hurt.
    assert real < 0.85, real
    gain = runs["right"].gains()[0]
    assert gain["n_real"] == 8 and gain["n_synthetic"] == 32 and gain["auc"]["mean"] > 0.04, gain
    assert auc("swapped", "real+synthetic") < real - 0.15, (real, runs["swapped"].gains())
    d = runs["right"].to_json()
    assert d["label_source"].startswith("class map") and d["class_labels"] == {"planted": 1, "plain": 0}
    assert d["synthetic_counts"] == {"planted": 30, "plain": 30}
    # Synthetic tiles come in the real pool's label proportions (half and half here): 16 + 16 of 30 + 30.
    assert {(r["arm"], r["n_real"], r["n_synthetic"]) for r in d["results"]} == {
        ("real", 8, 0), ("real+synthetic", 8, 32), ("synthetic", 0, 32)}


def test_interval_is_a_student_t_interval_over_seeds() -> None:
    values = [0.80, 0.82, 0.79, 0.85, 0.81]
    out = interval(values)
    half = 2.7764451051977987 * statistics.stdev(values) / math.sqrt(5)  # t(0.975, 4), from tables
    assert out["mean"] == pytest.approx(0.814) and out["std"] == pytest.approx(statistics.stdev(values))
    assert out["ci95"] == pytest.approx([0.814 - half, 0.814 + half]) and out["n"] == 5
    two = interval([0.6, float("nan"), 0.8])  # a NaN AUC (one-label test set) is left out
    assert two["n"] == 2 and two["values"] == [0.6, None, 0.8]
    assert two["ci95"] == pytest.approx([0.7 - 12.706204736174698 * 0.1, 0.7 + 12.706204736174698 * 0.1])
    one = interval([0.7])
    assert one["mean"] == 0.7 and one["std"] is None and one["ci95"] is None


def test_draws_are_stratified_and_nested() -> None:
    assert stratified_counts(np.array([10000, 9171]), 100).tolist() == [52, 48]
    assert stratified_counts(np.array([990, 10]), 50).tolist() == [49, 1]  # a rare label still gets a tile
    assert stratified_counts(np.array([1, 1, 1]), 2).sum() == 2
    for n in (3, 7, 100, 999):
        assert stratified_counts(np.array([5, 3, 2]), n).sum() == n
    labels = np.repeat([0, 1], [60, 40])
    orders = _orders(labels, [0, 1], np.random.default_rng(0))
    small, large = (_take(orders, stratified_counts(np.array([60, 40]), n)) for n in (10, 50))
    assert set(small) < set(large) and len(set(large)) == 50
    assert (labels[small] == 1).sum() == 4 and (labels[large] == 1).sum() == 20


def test_labels_come_from_the_bundle_manifest(shared_data: Path, tmp_path: Path) -> None:
    from histosynth.sampling.runner import GenerateOptions, generate

    bundle = tiny_bundle(tmp_path, num_classes=3, tile_size=32)
    manifest = read_manifest(bundle)
    assert manifest.class_names == ["lymphocytes", "stroma", "tumour"]
    labels = {"stroma": ("0", "normal"), "tumour": ("1", "tumour")}
    write_manifest(manifest.replace(classes=[ClassEntry(c.id, c.name, *labels.get(c.name, (None, None)))
                                             for c in manifest.classes]), bundle)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"bundle": str(bundle), "seed": 0, "batch_size": 8, "balanced": {"per_class": 6},
                                      "sampler": {"name": "ddim", "steps": 2}}))
    gen = tmp_path / "gen"
    generate(recipe, gen, GenerateOptions(backend="torch"))

    mapping, notes, path = manifest_class_labels(gen)
    assert mapping == {"stroma": 0, "tumour": 1} and Path(path) == bundle
    assert any("lymphocytes" in n and "no label" in n for n in notes), notes

    # The whole protocol on 32 px real tiles (the tiny bundle's size), labels from the manifest.
    real = tmp_path / "real32"
    real.mkdir()
    rows = list(csv.DictReader((shared_data / "pcam" / "train_labels.csv").open()))
    rows = rows[:12] + rows[-12:]  # the file is sorted by label: 12 of each
    for r in rows:
        Image.open(shared_data / "pcam" / "train" / r["file"]).convert("RGB").resize((32, 32), Image.Resampling.BOX) \
            .save(real / r["file"].replace(".jpg", ".png"))
    _write_labels(tmp_path / "real.csv", [(r["file"].replace(".jpg", ".png"), int(r["label"])) for r in rows])
    result = evaluate_downstream(real, tmp_path / "real.csv", real, tmp_path / "real.csv", sizes=[4], ratios=[1],
                                 synthetic=gen, seeds=1, config=dataclasses.replace(TINY, steps=2, image_size=None))
    d = result.to_json()
    assert d["class_labels"] == {"stroma": 0, "tumour": 1} and d["label_source"].startswith("bundle manifest")
    assert d["synthetic_counts"] == {"stroma": 6, "tumour": 6}
    assert any("lymphocytes" in n for n in d["notes"])
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # JSON-clean without help (one seed: no NaN)

    # Tiles of another size than the real ones are refused with both sizes named.
    with pytest.raises(InputError, match="differ in size"):
        evaluate_downstream(shared_data / "pcam" / "train", _pcam_subset(shared_data, tmp_path), real,
                            tmp_path / "real.csv", sizes=[4], ratios=[1], synthetic=gen, seeds=1,
                            config=dataclasses.replace(TINY, steps=2, image_size=None))

    # A manifest changed after generation no longer vouches for the tiles, unless named with --bundle.
    changed = read_manifest(bundle)
    write_manifest(changed.replace(classes=[dataclasses.replace(c, label_name=None) if c.label else c
                                            for c in changed.classes]), bundle)
    with pytest.raises(InputError, match="changed since the tiles"):
        manifest_class_labels(gen)
    mapping, notes, _ = manifest_class_labels(gen, bundle)
    assert mapping == {"stroma": 0, "tumour": 1} and any("not the bundle that made" in n for n in notes)

    # Nothing labelled, a label that is no integer, or no record of the bundle: clear errors.
    write_manifest(changed.replace(classes=[ClassEntry(c.id, c.name) for c in changed.classes]), bundle)
    with pytest.raises(InputError, match="no class of this bundle records a label"):
        manifest_class_labels(gen, bundle)
    write_manifest(changed.replace(classes=[ClassEntry(c.id, c.name, "tumour") for c in changed.classes]), bundle)
    with pytest.raises(InputError, match="--class-map"):
        manifest_class_labels(gen, bundle)
    (gen / "classes.json").unlink()
    with pytest.raises(InputError, match="--class-map"):
        manifest_class_labels(gen)


def _pcam_subset(shared_data: Path, tmp_path: Path) -> Path:
    """A labels CSV of 8 real 96 px PCam training tiles, 4 of each label."""
    rows = list(csv.DictReader((shared_data / "pcam" / "train_labels.csv").open()))
    path = tmp_path / "pcam.csv"
    _write_labels(path, [(r["file"], int(r["label"])) for r in rows[:4] + rows[-4:]])
    return path


def test_benchmark_script_writes_json_markdown_and_plot(shared_data: Path, planted: Path, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_downstream",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "downstream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "map.yaml").write_text("planted: 1\nplain: 0\n")  # stand-in labels: only the mechanics count here
    summary = module.main(["--synthetic", str(planted / "syn"), "--class-map", str(tmp_path / "map.yaml"),
                           "--data", str(shared_data), "--out", str(tmp_path / "out"), "--sizes", "4", "--ratios", "1",
                           "--seeds", "1", "--max-test", "20", "--steps", "2", "--threads", "1"])
    assert summary["models"] == 3 and summary["machine"]["torch_threads"] == 1
    assert [(g["n_real"], g["ratio"]) for g in summary["auc_gains"]] == [(4, 1.0)]
    d = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert d["n_test"] == 20 and d["inputs"]["test"].endswith("valid")
    assert (tmp_path / "out" / "downstream.png").is_file()
    assert "![downstream ROC AUC and accuracy](downstream.png)" in (tmp_path / "out" / "downstream.md").read_text()


def test_three_label_draws_where_a_smaller_subset_needs_more_of_a_label(planted: Path, tmp_path: Path) -> None:
    """Largest-remainder counts are not monotone in n for 3+ labels (label 0 of a 1:3:3 pool gets 2 of 10
    tiles but 1 of 11); every arm's tiles must still be loaded and drawn."""
    counts = np.array([10, 30, 30])
    assert stratified_counts(counts, 10)[0] == 2 and stratified_counts(counts, 11)[0] == 1
    files = sorted(p.name for p in (planted / "real").iterdir())[:70]
    _write_labels(tmp_path / "three.csv", [(f, 0 if i < 10 else 1 if i < 40 else 2) for i, f in enumerate(files)])
    result = evaluate_downstream(planted / "real", tmp_path / "three.csv", planted / "real", tmp_path / "three.csv",
                                 sizes=[10, 11], seeds=1, config=dataclasses.replace(TINY, steps=1))
    assert [(r.arm, r.n_real) for r in result.results] == [("real", 10), ("real", 11)] and result.labels == [0, 1, 2]
