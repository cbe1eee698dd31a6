"""`evaluate control`'s classifier assigner scores itself on held-out real tiles, and says when it bounds a class."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.errors import InputError
from histosynth.evaluate import control, downstream
from histosynth.evaluate.control import (ControlResult, evaluate_control_classifier, holdout_accuracy, holdout_split,
                                         real_holdout_line, wilson_interval)
from histosynth.evaluate.downstream import ClassifierConfig, stratified_subset
from histosynth.evaluate.report import build_report

TINY = ClassifierConfig(width=4, steps=2, batch_size=8, warmup_steps=1, image_size=32)


def test_holdout_split_is_disjoint_stratified_seeded_and_capped():
    labels = np.array([0] * 300 + [1] * 100)
    train, held = holdout_split(labels, 40, 100, seed=3)
    assert len(held) == 40 and len(train) == 100 and not set(train) & set(held)
    assert np.bincount(labels[held]).tolist() == [30, 10] and np.bincount(labels[train]).tolist() == [75, 25]
    again = holdout_split(labels, 40, 100, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(labels, 40, 100, seed=4)[1], held)
    # Off: exactly the training draw of before the holdout existed.
    train0, held0 = holdout_split(labels, 0, 100, seed=3)
    assert len(held0) == 0 and np.array_equal(train0, stratified_subset(labels, 100, np.random.default_rng(3)))
    # The holdout takes at most half the pool; the classifier trains on the rest when train_size asks for more.
    train, held = holdout_split(labels, 1000, 2000, seed=0)
    assert len(held) == 200 and len(train) == 200 and not set(train) & set(held)
    with pytest.raises(InputError, match="--real-holdout: 1 tiles .* cannot hold all 2 labels"):
        holdout_split(labels, 1, None, seed=0)
    with pytest.raises(InputError, match="negative"):
        holdout_split(labels, -1, None, seed=0)


def test_holdout_accuracy_counts_per_label():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    predicted = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    d = holdout_accuracy(predicted, truth, [0, 1], requested=10)
    assert (d["n"], d["correct"], d["accuracy"]) == (10, 7, 0.7) and d["ci95"] == list(wilson_interval(7, 10))
    assert d["per_label"]["label 0"] == {"n": 4, "correct": 3, "accuracy": 0.75, "ci95": list(wilson_interval(3, 4))}
    assert d["per_label"]["label 1"]["correct"] == 4 and d["per_label"]["label 1"]["n"] == 6


def _judged(tumour_hits: int, normal_hits: int, judge_tumour: int, judge_normal: int, held: int = 500,
            requested: int = 500) -> ControlResult:
    """100 generated tiles per class, and a judge scored on `held` real tiles per label."""
    confusion = np.array([[tumour_hits, 100 - tumour_hits], [100 - normal_hits, normal_hits]])  # columns: label 1, label 0
    truth = np.array([1] * held + [0] * held)
    predicted = np.array([1] * judge_tumour + [0] * (held - judge_tumour) + [0] * judge_normal + [1] * (held - judge_normal))
    return ControlResult("classifier", ["tumour", "normal"], ["label 1", "label 0"], confusion,
                         {"tumour": "label 1", "normal": "label 0"},
                         real_holdout=holdout_accuracy(predicted, truth, [0, 1], requested))


def test_warning_when_a_class_is_within_the_judges_error():
    # Judge: 85% on real tumour (0.82-0.88), 98% on real normal. Generated tumour 86/100 sits inside the
    # judge's tumour error; generated normal 60/100 is far below the judge: the generator's miss, no warning.
    result = _judged(86, 60, judge_tumour=425, judge_normal=490)
    (warning,) = result.warnings()
    assert warning.startswith("tumour: accuracy 0.86 (") and "held-out real 'label 1' tiles (0.85" in warning
    assert "n=500" in warning and "bound" in warning
    d = result.to_json()
    assert d["warnings"] == [warning] and d["real_holdout"]["per_label"]["label 0"]["accuracy"] == 0.98
    # Both classes well below their judge: no warning.
    assert _judged(60, 60, judge_tumour=490, judge_normal=490).warnings() == []
    # Both inside: two warnings.
    assert len(_judged(97, 98, judge_tumour=490, judge_normal=490).warnings()) == 2
    # No holdout measured: nothing to compare with, and the JSON says null.
    off = ControlResult("classifier", ["tumour"], ["label 1", "label 0"], np.array([[86, 14]]), {"tumour": "label 1"})
    assert off.warnings() == [] and off.to_json()["real_holdout"] is None
    assert "real_holdout" not in ControlResult("clusters", ["a"], ["a"], np.array([[60]]), {"a": "a"}).to_json()


def test_warning_when_the_holdout_is_cut_short():
    short = _judged(60, 60, judge_tumour=50, judge_normal=50, held=50, requested=1000)
    assert short.warnings() == ["real holdout: 100 tiles, not the 1000 asked for (it takes at most half of the "
                                "labelled real pool, so the classifier keeps the rest to train on)"]


def _real_pool(shared_data: Path, tmp_path: Path, per_label: int) -> Path:
    """A labels CSV of `per_label` PCam training tiles of each label (the file is sorted by label)."""
    rows = list(csv.DictReader((shared_data / "pcam" / "train_labels.csv").open()))
    path = tmp_path / "real.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows((r["file"], r["label"]) for r in rows[:per_label] + rows[-per_label:])
    return path


def _generated(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A generate-like folder (real valid tiles standing in) and its class map."""
    gen = tmp_path / "gen"
    for name, tiles in (("normal", sorted((shared_data / "pcam" / "valid").glob("*.jpg"))[:4]),
                        ("tumour", sorted((shared_data / "pcam" / "valid").glob("*.jpg"))[4:8])):
        (gen / name).mkdir(parents=True)
        for t in tiles:
            shutil.copy(t, gen / name / t.name)
    (tmp_path / "map.yaml").write_text("tumour: 1\nnormal: 0\n")
    return gen, tmp_path / "map.yaml"


def test_classifier_assigner_scores_itself_on_disjoint_real_tiles(shared_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    labels = _real_pool(shared_data, tmp_path, per_label=12)
    gen, class_map = _generated(shared_data, tmp_path)
    loaded: list[list[Path]] = []
    real_load = downstream.load_tiles
    monkeypatch.setattr(downstream, "load_tiles", lambda files, size=None: loaded.append(list(files)) or real_load(files, size))
    result = evaluate_control_classifier(gen, real=shared_data / "pcam" / "train", real_labels=labels,
                                         class_map=class_map, train_size=8, real_holdout=10, config=TINY)
    train_files, held_files, generated_files = (set(f) for f in loaded)
    assert len(train_files) == 8 and len(held_files) == 10 and len(generated_files) == 8
    assert not train_files & held_files and not held_files & generated_files
    d = result.to_json()
    judge = d["real_holdout"]
    assert judge["n"] == 10 and judge["requested"] == 10
    assert {k: v["n"] for k, v in judge["per_label"].items()} == {"label 0": 5, "label 1": 5}
    assert judge["correct"] == sum(v["correct"] for v in judge["per_label"].values())
    assert judge["ci95"] == list(wilson_interval(judge["correct"], 10))
    assert d["inputs"]["real_holdout"] == 10 and d["inputs"]["train_size"] == 8
    assert json.loads(json.dumps(d)) == d
    assert real_holdout_line(d).startswith("Classifier on 10 held-out real tiles: accuracy ")

    loaded.clear()
    off = evaluate_control_classifier(gen, real=shared_data / "pcam" / "train", real_labels=labels,
                                      class_map=class_map, train_size=8, real_holdout=0, config=TINY).to_json()
    assert off["real_holdout"] is None and off["inputs"]["real_holdout"] == 0 and len(loaded) == 2


def test_cli_prints_the_holdout_and_report_renders_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    judged = _judged(86, 60, judge_tumour=425, judge_normal=490)
    seen = {}

    def fake(samples, **kwargs):
        seen.update(kwargs)
        return judged

    monkeypatch.setattr(control, "evaluate_control_classifier", fake)
    out = tmp_path / "c.json"
    args = ["evaluate", "control", "--samples", str(tmp_path), "--real", "r", "--real-labels", "l", "--class-map", "m"]
    res = CliRunner().invoke(app, [*args, "--json", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Classifier on 1000 held-out real tiles: accuracy 0.915" in text and "label 1 0.850" in text
    assert "warning: tumour: accuracy 0.86" in text and seen["real_holdout"] == 1000
    assert CliRunner().invoke(app, [*args, "--real-holdout", "0"]).exit_code == 0 and seen["real_holdout"] == 0
    lone = CliRunner().invoke(app, ["evaluate", "control", "--samples", str(tmp_path), "--vqgan", "v", "--head", "h",
                                    "--real-holdout", "5"])
    assert lone.exit_code == 2 and "--real-holdout" in lone.output

    both = {"metric": "control", "assigners": [json.loads(out.read_text())]}
    (tmp_path / "both.json").write_text(json.dumps(both))
    report = build_report(tmp_path / "report", results=[out, tmp_path / "both.json"]).read_text()
    assert report.count("Classifier on 1000 held-out real tiles") == 2 and "- warning: tumour: accuracy 0.86" in report
    assert (tmp_path / "report" / "confusion-0.png").is_file() and (tmp_path / "report" / "confusion-1-classifier.png").is_file()
