"""The label map's one owner (histosynth.labels), partial-label CSVs, and class labels in the bundle manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from histosynth.bundle.export import export_from_checkpoints
from histosynth.bundle.manifest import ClassEntry, manifest_from_dict, read_manifest
from histosynth.bundle.store import load_bundle
from histosynth.bundle.testing import tiny_networks
from histosynth.configio import to_dict
from histosynth.errors import InputError
from histosynth.labels import LabelClass, LabelMap, read_label_map, read_tile_labels, write_label_map
from histosynth.runtime.weights import save_checkpoint


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    lm = LabelMap(
        classes=[LabelClass(0, "stroma_normal", [1], 3, label="0", label_name="normal"),
                 LabelClass(1, "stroma_tumour", [1], 2, label="1", label_name="tumour"),
                 LabelClass(2, "tumour", [0, 2], 4, label="1", subcluster=None)],
        cluster_to_class={0: 2, 1: [0, 1], 2: 2, 3: None},
        tile_labels=[("a.png", 0), ("b.png", 1)],
        excluded_tiles=1,
    )
    tiles_csv = write_label_map(lm, tmp_path / "lm.yaml", {"source": {"edits": "e.yaml"}})
    data = yaml.safe_load((tmp_path / "lm.yaml").read_text())
    assert data["clusters"] == {0: "tumour", 1: ["stroma_normal", "stroma_tumour"], 2: "tumour", 3: None}
    assert data["classes"][2] == {"id": 2, "name": "tumour", "clusters": [0, 2], "tiles": 4, "label": "1"}
    assert tiles_csv.read_text().splitlines() == ["tile,class_id,class_name", "a.png,0,stroma_normal",
                                                  "b.png,1,stroma_tumour"]
    back = read_label_map(tmp_path / "lm.yaml")
    assert back.classes == lm.classes and back.cluster_to_class == lm.cluster_to_class
    assert back.cluster_classes() == {0: [2], 1: [0, 1], 2: [2], 3: []}
    assert back.excluded_tiles == 1 and back.extra["source"] == {"edits": "e.yaml"}
    assert not list(tmp_path.glob("*.tmp"))


def test_unlabelled_classes_write_no_label_keys(tmp_path: Path) -> None:
    write_label_map(LabelMap([LabelClass(0, "a", [0], 1)], {0: 0}, [("t", 0)]), tmp_path / "lm.yaml")
    assert yaml.safe_load((tmp_path / "lm.yaml").read_text())["classes"] == [
        {"id": 0, "name": "a", "clusters": [0], "tiles": 1}]


@pytest.mark.parametrize("data, message", [
    ({"classes": [{"id": 0, "name": "a"}], "clusters": {0: "b"}}, r"clusters\.0: 'b' is not a class"),
    ({"classes": [{"id": 0, "name": "a"}], "clusters": {"x": "a"}}, r"clusters: key 'x' is not a cluster id"),
    ({"classes": [{"id": 0, "name": "a"}], "clusters": {0: 3}}, r"clusters\.0: expected a class name"),
    ({"classes": [{"id": 0, "name": "a", "label_name": "tumour"}]}, r"classes\[0\]\.label_name: needs a label"),
    ({"classes": [{"id": 0, "name": " a"}]}, r"classes\[0\]\.name: ' a' is not a usable class name"),
    ({"classes": [{"id": 0, "name": "a", "label": True}]}, r"classes\[0\]\.label"),
    ({"clusters": {0: "a"}}, "needs a top-level 'classes'"),
])
def test_read_label_map_errors(tmp_path: Path, data: dict, message: str) -> None:
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=message):
        read_label_map(tmp_path / "lm.yaml")


def test_read_label_map_hand_written(tmp_path: Path) -> None:
    # An unquoted label value is the string it reads as; unknown per-class keys stay in provenance.
    (tmp_path / "lm.yaml").write_text("classes:\n- {id: 1, name: tumour, label: 1, colour: red}\n"
                                      "- {id: 0, name: normal, label: 0}\n")
    lm = read_label_map(tmp_path / "lm.yaml")
    assert [(c.id, c.name, c.label) for c in lm.classes] == [(0, "normal", "0"), (1, "tumour", "1")]
    assert lm.cluster_to_class == {} and lm.extra["classes"][0]["colour"] == "red"


def test_tile_labels_match_key_path_suffix_or_file_name(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("file,label,grade\nx.png,1,high\nslide2/y.png,0,\nz.png,,low\nslide9/y.png,1,\n")
    labels = read_tile_labels(tmp_path / "l.csv")
    assert labels.of("x.png") == "1" and labels.of("/data/tiles/slide1/x.png") == "1"
    assert labels.of("/data/tiles/slide2/y.png") == "0" and labels.of("/data/tiles/slide3/y.png") is None
    assert labels.of("z.png") is None  # an empty value is no label
    assert labels.distinct() == ["0", "1"]
    assert read_tile_labels(tmp_path / "l.csv", column="grade").of("a/z.png") == "low"
    with pytest.raises(InputError, match=r"no label column 'grde'; its columns: file, label, grade"):
        read_tile_labels(tmp_path / "l.csv", column="grde")
    (tmp_path / "twice.csv").write_text("file,label\nx.png,1\nx.png,0\n")
    with pytest.raises(InputError, match=r"twice.csv:3: 'x.png' has two labels"):
        read_tile_labels(tmp_path / "twice.csv")


# ---------------------------------------------------------------------------------------------- the bundle


def test_export_copies_class_labels_into_the_manifest(tmp_path: Path) -> None:
    vqgan, unet = tiny_networks(2)
    vq = save_checkpoint(vqgan, tmp_path / "vqgan.safetensors", to_dict(vqgan.config),
                         {"kind": "vqgan", "tile_size": 16})
    un = save_checkpoint(unet, tmp_path / "unet.safetensors", to_dict(unet.config),
                         {"kind": "unet", "latent_scale": 1.0})
    lm = LabelMap([LabelClass(0, "lymph_normal", [0], 5, "0", "normal"), LabelClass(1, "lymph_tumour", [0], 4, "1")],
                  {0: [0, 1]})
    write_label_map(lm, tmp_path / "lm.yaml")
    manifest = load_bundle(export_from_checkpoints(vq, un, tmp_path / "lm.yaml", tmp_path / "b").path).manifest
    assert [(c.name, c.label, c.label_name) for c in manifest.classes] == [
        ("lymph_normal", "0", "normal"), ("lymph_tumour", "1", None)]
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["classes"] == [{"id": 0, "name": "lymph_normal", "label": "0", "label_name": "normal"},
                              {"id": 1, "name": "lymph_tumour", "label": "1"}]

    # Unlabelled classes are written as older histosynth versions read them: no label keys at all.
    plain = manifest.replace(classes=[ClassEntry(0, "a"), ClassEntry(1, "b")])
    assert json.loads(plain.to_json())["classes"] == [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]
    (tmp_path / "plain.json").write_text(plain.to_json())
    assert [c.label for c in read_manifest(tmp_path / "plain.json").classes] == [None, None]


def test_manifest_class_labels_old_and_bad() -> None:
    shipped = json.loads((Path(__file__).resolve().parents[1] / "weights" / "pcam96" / "manifest.json").read_text())
    # The shipped bundle (round 2) is label-aware: each class stands for PCam's tumour flag.
    assert [(c.label, c.label_name) for c in manifest_from_dict(shipped).classes] == \
        [("0", "normal"), ("1", "tumour"), ("0", "normal"), ("1", "tumour")]
    # A bundle written before labels existed (round 1 had none) still loads.
    old = json.loads(json.dumps(shipped))
    for c in old["classes"]:
        c.pop("label", None)
        c.pop("label_name", None)
    assert [c.label for c in manifest_from_dict(old).classes] == [None] * 4
    old["classes"][0]["label_name"] = "tumour"
    with pytest.raises(InputError, match=r"manifest\.classes\[0\]\.label_name: needs a label"):
        manifest_from_dict(old)


# ---------------------------------------------------------------------------------------------- the readers


def _split_map(tmp_path: Path) -> Path:
    lm = LabelMap([LabelClass(0, "a_0", [0], 2, "0"), LabelClass(1, "a_1", [0], 2, "1"), LabelClass(2, "b", [1], 3)],
                  {0: [0, 1], 1: 2, 2: None})
    write_label_map(lm, tmp_path / "lm.yaml")
    return tmp_path / "lm.yaml"


def test_joint_imc_cluster_table_refuses_a_split(tmp_path: Path) -> None:
    from histosynth.diffusion.data import cluster_to_class

    path = _split_map(tmp_path)
    with pytest.raises(InputError, match=r"clusters\.0: the cluster is split into a_0, a_1; joint IMC cannot"):
        cluster_to_class(path, 3, ["a_0", "a_1", "b"])
    write_label_map(LabelMap([LabelClass(0, "a", [0, 2]), LabelClass(1, "b", [1])], {0: 0, 1: 1, 2: 0, 3: None}),
                    path)
    table = cluster_to_class(path, 4, ["a", "b"])
    assert table.tolist() == [0, 1, 0, -1]


def test_control_cluster_map_excluded_and_split(tmp_path: Path) -> None:
    from histosynth.evaluate.control import read_cluster_map

    assert read_cluster_map(_split_map(tmp_path)) == {0: "a_0 | a_1", 1: "b"}  # 2 excluded: unmapped
    (tmp_path / "bare.yaml").write_text("clusters: {0: stroma, 1: null, 2: fat}\n")
    assert read_cluster_map(tmp_path / "bare.yaml") == {0: "stroma", 2: "fat"}
    (tmp_path / "none.yaml").write_text("classes: [{id: 0, name: a}]\n")
    with pytest.raises(InputError, match="no 'clusters' table"):
        read_cluster_map(tmp_path / "none.yaml")


# ---------------------------------------------------------------------------------------------- docs/labels.md

LABELS_DOC = Path(__file__).resolve().parents[1] / "docs" / "labels.md"


def _doc_lines() -> list[str]:
    from test_docs_commands import doc_commands

    return doc_commands(LABELS_DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("line", _doc_lines())
def test_labels_doc_commands_exist(line: str) -> None:
    from test_docs_commands import resolve

    command, rest = resolve(line.split()[1:])
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    used = {w.split("=")[0] for w in rest if w.startswith("-")}
    assert used <= known, f"`{line}`: unknown options {sorted(used - known)}"


def test_labels_doc_yaml_examples_load(tmp_path: Path) -> None:
    # Every clusters.yaml fragment of the page is valid input for `review apply`.
    import re

    from histosynth.review.edits import load_edits

    blocks = re.findall(r"```yaml\n(.*?)```", LABELS_DOC.read_text(encoding="utf-8"), re.S)
    edits = [b for b in blocks if b.startswith(("clusters:", "splits:"))]
    assert len(edits) == 3
    for block in edits:
        text = block if block.startswith("clusters:") else "clusters: {0: {name: a}}\n" + block
        (tmp_path / "c.yaml").write_text(text)
        load_edits(tmp_path / "c.yaml")
    (tmp_path / "lm.yaml").write_text(next(b for b in blocks if b.startswith("classes:")))
    assert read_label_map(tmp_path / "lm.yaml").cluster_classes()[1] == [0, 1]


def test_control_counts_a_split_class_in_its_cluster(tmp_path: Path, monkeypatch) -> None:
    """The cluster head checks the tissue part of a label split: a_0 landing in cluster 0 ("a_0 | a_1") is right."""
    import numpy as np

    import histosynth.autoencoder.train as ae_train
    import histosynth.clusters.imc as imc
    from histosynth.evaluate import control

    names = ["a_0"] * 3 + ["a_1"] * 2 + ["b"] * 2
    monkeypatch.setattr(control, "generated_tiles",
                        lambda folder, max_per_class=None: ([Path(f"{i}.png") for i in range(7)], names,
                                                            {"a_0": 0, "a_1": 1, "b": 2}))
    monkeypatch.setattr(ae_train, "load_vqgan", lambda path, device=None: None)

    class Head:
        k = 3

        def to(self, dev):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(imc.IMCHead, "load", classmethod(lambda cls, path: Head()))
    monkeypatch.setattr(control, "cluster_assignments",
                        lambda *a, **k: np.array([0, 0, 1, 0, 0, 1, 0]))
    result = control.evaluate_control("x", vqgan="v", head="h", labels=_split_map(tmp_path))
    per = result.per_class()
    assert per["a_0"]["expected"] == "a_0 | a_1" and per["a_0"]["correct"] == 2
    assert per["a_1"]["correct"] == 2 and per["b"]["correct"] == 1
