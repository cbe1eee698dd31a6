"""`histosynth cluster` and `histosynth review` end to end on real PCam tiles; review edits -> label map."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.errors import InputError
from histosynth.labels import read_label_map
from histosynth.review.edits import ClusterEdit, ClusterSplit, ReviewEdits, TileMove, apply_review, load_edits
from histosynth.review.sheets import suggest_names

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(pcam_tiles: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent-cache stand-in: each tile's RGB averaged down to 8x8 (N, 3, 8, 8) + index.csv of file names."""
    folder = tmp_path_factory.mktemp("cache")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
              for p in pcam_tiles]
    latents = np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0
    np.save(folder / "latents.npy", latents)
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile"])
        w.writerows([[p.name] for p in pcam_tiles])
    return folder


@pytest.fixture(scope="module")
def clustered(cache: Path, pcam_tiles: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clusters")
    result = runner.invoke(app, ["cluster", "--latents", str(cache), "--tiles", str(pcam_tiles[0].parent),
                                 "--out", str(out), "--k-min", "2", "--k-max", "4", "--seeds", "0",
                                 "--steps", "100", "--max-points", "200"])
    assert result.exit_code == 0, result.output
    return out


def test_cluster_outputs(clustered: Path, pcam_tiles: list[Path]) -> None:
    meta = json.loads((clustered / "cluster.json").read_text())
    assert 2 <= meta["k"] <= 4 and meta["method"] == "imc" and "majority vote" in meta["rule"]
    assert meta["features"] == {"kind": "latent_features", "channels": 3, "dim": 60}
    with open(clustered / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tile"] for r in rows] == [p.name for p in pcam_tiles]
    assert all(0 <= int(r["cluster"]) < meta["k"] and 0 < float(r["probability"]) <= 1 for r in rows)
    assert sum(meta["sizes"].values()) == 48
    with open(clustered / "validity.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["method"], int(r["k"])) for r in table) == [(m, k) for m in ("imc", "kmeans") for k in (2, 3, 4)]
    validity = json.loads((clustered / "validity.json").read_text())
    assert validity["choice"]["k"] == meta["k"] and set(validity["choice"]["votes"]) >= {"dunn", "hartigan"}
    with Image.open(clustered / "validity.png") as im:
        assert im.size[0] > 800 and im.size[1] > 400
        # Not blank: the panels hold drawn lines in the method colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert (clustered / "imc_head.safetensors").is_file() and (clustered / "imc_head.json").is_file()


def test_cluster_bad_input_exit_codes(cache: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["cluster", "--latents", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--latents" in r.output
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(tmp_path / "o"), "--method", "gmm"])
    assert r.exit_code == 2 and "allowed: imc, kmeans" in r.output
    (tmp_path / "short.csv").write_text("tile\na.png\n")
    r = runner.invoke(app, ["cluster", "--latents", str(cache / "latents.npy"), "--index", str(tmp_path / "short.csv"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "1 tiles but 48 rows" in r.output
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(tmp_path / "o"), "--k-max", "60"])
    assert r.exit_code == 2 and "k_max" in r.output


def test_review_sheets_with_labels(clustered: Path, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "review"
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(clustered), "--out", str(out),
                            "--labels", str(shared_data / "pcam" / "train_labels.csv"), "--n-centre", "4",
                            "--n-random", "4"])
    assert r.exit_code == 0, r.output
    k = json.loads((clustered / "cluster.json").read_text())["k"]
    for c in range(k):
        with Image.open(out / f"cluster_{c}.png") as im:
            assert im.size[1] > 96  # header + at least one row of tiles
    page = (out / "review.html").read_text()
    assert page.count("data:image/png;base64,") == k and "label " in page and "<img" in page
    edits = load_edits(out / "clusters.yaml")  # the template is valid input for `review apply`
    assert sorted(edits.clusters) == list(range(k)) and edits.merges == [] and edits.moves == []
    suggestions = json.loads((out / "suggestions.json").read_text())
    assert sum(s["annotated"] for s in suggestions.values()) == 48  # every PCam tile has a label
    assert "unreadable" not in r.output
    # A rerun never overwrites the expert's edits: the fresh template goes beside them.
    (out / "clusters.yaml").write_text((out / "clusters.yaml").read_text() + "# edited\n")
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(clustered), "--out", str(out),
                            "--n-centre", "2", "--n-random", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "clusters.yaml").read_text().endswith("# edited\n")
    assert load_edits(out / "clusters.template.yaml").clusters.keys() == edits.clusters.keys()


def test_review_sheets_without_tiles_folder_fails(clustered: Path, tmp_path: Path) -> None:
    meta = json.loads((clustered / "cluster.json").read_text())
    other = tmp_path / "c"
    other.mkdir()
    meta["source"]["tiles"] = None
    (other / "cluster.json").write_text(json.dumps(meta))
    (other / "assignments.csv").write_text((clustered / "assignments.csv").read_text())
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(other), "--out", str(tmp_path / "r"),
                            "--tiles", str(tmp_path)])
    assert r.exit_code == 2 and "none of the tiles could be read" in r.output
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "cluster.json" in r.output


def test_review_apply_cli(clustered: Path, tmp_path: Path) -> None:
    k = json.loads((clustered / "cluster.json").read_text())["k"]
    edits = {"clusters": {c: {"name": f"tissue_{c}", "exclude": False} for c in range(k)},
             "merges": [[0, 1]], "moves": []}
    edits["clusters"][1]["name"] = "tissue_0"
    (tmp_path / "clusters.yaml").write_text(yaml.safe_dump(edits))
    out = tmp_path / "label_map.yaml"
    r = runner.invoke(app, ["review", "apply", str(tmp_path / "clusters.yaml"), "--clusters", str(clustered),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    assert [c["name"] for c in data["classes"]] == ["tissue_0"] + [f"tissue_{c}" for c in range(2, k)]
    assert data["clusters"][0] == data["clusters"][1] == "tissue_0"
    with open(tmp_path / "label_map_tiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48 and {int(r["class_id"]) for r in rows} == set(range(k - 1))
    # The bundle exporter reads this file as a label map.
    assert [c.name for c in read_label_map(out).classes] == [c["name"] for c in data["classes"]]
    # An unknown cluster id is exit code 2 naming the key.
    edits["clusters"][9] = {"name": "x"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(edits))
    r = runner.invoke(app, ["review", "apply", str(tmp_path / "bad.yaml"), "--clusters", str(clustered),
                            "--out", str(out)])
    assert r.exit_code == 2 and "clusters.9: unknown cluster id" in r.output


# ------------------------------------------------------------------------------------------------
# apply_review on a small hand-made clustering: 4 clusters, tiles a..h

ROWS = [{"tile": t, "cluster": c} for t, c in
        [("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 2), ("f", 2), ("g", 3), ("h", 3)]]


def _edits(**changes) -> ReviewEdits:
    clusters = {c: ClusterEdit(f"cluster_{c}") for c in range(4)}
    clusters.update(changes.pop("clusters", {}))
    return ReviewEdits(clusters=clusters, **changes)


def test_apply_review_conflicting_merge_names() -> None:
    edits = _edits(clusters={1: ClusterEdit("stroma"), 3: ClusterEdit("tumour")}, merges=[[3, 1]])
    with pytest.raises(InputError, match=r"merges\[0\].*conflicting names"):
        apply_review(ROWS, edits, 4)


def test_apply_review_valid_result() -> None:
    edits = _edits(clusters={1: ClusterEdit("stroma"), 2: ClusterEdit("junk", exclude=True)},
                   merges=[[3, 1]], moves=[TileMove("a", 3), TileMove("e", 0)])
    lm = apply_review(ROWS, edits, 4)
    # {0} -> class 0 "cluster_0" (b + moved e); {1, 3} -> class 1 "stroma" (c d g h + moved a); 2 excluded (f).
    assert [(c.id, c.name, c.clusters, c.tiles) for c in lm.classes] == [
        (0, "cluster_0", [0], 2), (1, "stroma", [1, 3], 5)]
    assert lm.cluster_to_class == {0: 0, 1: 1, 2: None, 3: 1}
    assert dict(lm.tile_labels) == {"a": 1, "b": 0, "c": 1, "d": 1, "e": 0, "g": 1, "h": 1}
    assert lm.excluded_tiles == 1


@pytest.mark.parametrize("changes,message", [
    ({"clusters": {7: ClusterEdit("x")}}, r"clusters\.7: unknown cluster id"),
    ({"merges": [[0, 1], [1, 2]]}, r"merges\[1\]: cluster 1 is already in merges\[0\]"),
    ({"merges": [[0, 9]]}, r"merges\[0\]: unknown cluster id 9"),
    ({"merges": [[0]]}, r"merges\[0\]: needs at least two"),
    ({"clusters": {0: ClusterEdit("bg", exclude=True)}, "merges": [[0, 1]]}, r"merges\[0\].*exclude all"),
    ({"clusters": {2: ClusterEdit("x", exclude=True)}, "moves": [TileMove("a", 2)]}, r"moves\[0\]\.to: cluster 2 is excluded"),
    ({"moves": [TileMove("zz", 1)]}, r"moves\[0\]\.tile: 'zz' is not in"),
    ({"moves": [TileMove("a", 1), TileMove("a", 2)]}, r"moves\[1\]\.tile: 'a' is already moved"),
    ({"moves": [TileMove("a", 5)]}, r"moves\[0\]\.to: unknown cluster id 5"),
    ({"clusters": {1: ClusterEdit("tumour"), 3: ClusterEdit("tumour")}}, r"clusters\.3\.name: 'tumour' is also"),
    ({"clusters": {c: ClusterEdit("x", exclude=True) for c in range(4)}}, r"every cluster is excluded"),
    ({"clusters": {1: ClusterEdit("a/b")}}, r"clusters\.1\.name"),
    ({"moves": [TileMove("c", 0), TileMove("d", 0)]}, r"clusters\.1: class 'cluster_1' has no tiles"),
])
def test_apply_review_errors(changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        apply_review(ROWS, _edits(**changes), 4)


def test_apply_review_missing_cluster_entry() -> None:
    edits = _edits()
    del edits.clusters[2]
    with pytest.raises(InputError, match=r"clusters\.2: missing"):
        apply_review(ROWS, edits, 4)


def test_load_edits_key_paths(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("clusters: {0: {name: a, exlude: true}}\n")
    with pytest.raises(InputError, match=r"clusters.yaml.clusters.0: unknown key 'exlude'"):
        load_edits(tmp_path / "e.yaml")
    (tmp_path / "e.yaml").write_text("clusters: {0: {name: a}}\nmoves: [{tile: x, to: two}]\n")
    with pytest.raises(InputError, match=r"moves\[0\]\.to: expected an integer"):
        load_edits(tmp_path / "e.yaml")


def test_suggest_names_majority_vote() -> None:
    rows = [{"tile": f"dir/t{i}.jpg", "cluster": 0 if i < 5 else 1} for i in range(8)]
    # Cluster 0: t0..t3 annotated 1, 1, 1, 0 (t4 unannotated) -> "label 1: 3/4 (75%)"; cluster 1: t5 -> 0.
    labels = {"t0.jpg": "1", "t1.jpg": "1", "t2.jpg": "1", "t3.jpg": "0", "dir/t5.jpg": "0"}
    s = suggest_names(rows, labels)
    assert str(s[0]) == "label 1: 3/4 (75%)" and s[0].counts == {"0": 1, "1": 3}
    assert str(s[1]) == "label 0: 1/1 (100%)"


def test_cluster_dihedral_cache_uses_views(cache: Path, tmp_path: Path) -> None:
    # The `train encode --dihedral` layout (docs/training.md): index,path,transform; rows tile-major.
    latents = np.load(cache / "latents.npy")
    with open(cache / "index.csv") as f:
        names = [r["tile"] for r in csv.DictReader(f)]
    both = np.stack([latents, latents[:, :, :, ::-1]], axis=1).reshape(-1, *latents.shape[1:])
    folder = tmp_path / "dihedral"
    folder.mkdir()
    np.save(folder / "latents.npy", both.astype(np.float16))
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "transform"])
        for i, name in enumerate(names):
            w.writerow([2 * i, name, "identity"])
            w.writerow([2 * i + 1, name, "flip"])
    out = tmp_path / "out"
    r = runner.invoke(app, ["cluster", "--latents", str(folder), "--out", str(out), "--k-min", "2", "--k-max", "3",
                            "--seeds", "0", "--steps", "50", "--no-kmeans-baseline"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "cluster.json").read_text())
    assert meta["source"]["views"] == 1 and meta["num_tiles"] == 48
    with open(out / "assignments.csv") as f:
        assert [row["tile"] for row in csv.DictReader(f)] == names
    # A tile missing one of its views is refused.
    with open(folder / "index.csv", "a", newline="") as f:
        csv.writer(f).writerow([96, "extra.jpg", "identity"])
    np.save(folder / "latents.npy", np.concatenate([both, both[:1]]).astype(np.float16))
    r = runner.invoke(app, ["cluster", "--latents", str(folder), "--out", str(out)])
    assert r.exit_code == 2 and "'extra.jpg' has views" in r.output


# ------------------------------------------------------------------------------------------------
# Splits: by a label column of a CSV, and into k-means sub-clusters


def _labels_csv(tmp_path: Path, rows: str = "a,1\nb,0\nc,0\nd,1\ng,1\nh,\n") -> Path:
    (tmp_path / "labels.csv").write_text("file,label\n" + rows)
    return tmp_path / "labels.csv"


def test_split_by_label(tmp_path: Path) -> None:
    _labels_csv(tmp_path)
    edits = _edits(clusters={1: ClusterEdit("stroma"), 2: ClusterEdit("junk", exclude=True)}, merges=[[1, 3]],
                   splits=[ClusterSplit(3, "label", labels="labels.csv", names={1: "tumour", 0: "normal"})])
    lm = apply_review(ROWS, edits, 4, base=tmp_path)
    # {1, 3} = c d g h -> stroma_normal (c), stroma_tumour (d g); h has no label and is excluded, as is 2.
    assert [(c.id, c.name, c.clusters, c.tiles, c.label, c.label_name) for c in lm.classes] == [
        (0, "cluster_0", [0], 2, None, None), (1, "stroma_normal", [1, 3], 1, "0", "normal"),
        (2, "stroma_tumour", [1, 3], 2, "1", "tumour")]
    assert lm.cluster_to_class == {0: 0, 1: [1, 2], 2: None, 3: [1, 2]}
    assert dict(lm.tile_labels) == {"a": 0, "b": 0, "c": 1, "d": 2, "g": 2} and lm.excluded_tiles == 3

    # keep: the unlabelled rest is a class of its own; default part names are the raw values.
    keep = _edits(clusters={3: ClusterEdit("tumour", label="1")},
                  splits=[ClusterSplit(3, "label", labels=str(tmp_path / "labels.csv"), unlabelled="keep",
                                       class_names={"1": "tumour_confirmed"})])
    lm = apply_review(ROWS, keep, 4)
    assert [(c.name, c.tiles, c.label) for c in lm.classes][-2:] == [("tumour_confirmed", 1, "1"),
                                                                     ("tumour_unlabelled", 1, "1")]
    assert lm.excluded_tiles == 0


def test_split_by_kmeans_is_deterministic_and_ordered_by_size(tmp_path: Path) -> None:
    rows = [{"tile": f"t{i}", "cluster": 0 if i < 9 else 1} for i in range(12)]
    centres = {0: (0.0, 0.0), 1: (10.0, 0.0), 2: (0.0, 10.0)}
    blob = [2, 2, 0, 1, 0, 1, 0, 0, 1]  # blob 0: 4 tiles, blob 1: 3, blob 2: 2
    rng = np.random.default_rng(0)
    x = {f"t{i}": np.array(centres[b]) + rng.normal(0, 0.1, 2) for i, b in enumerate(blob)}
    calls: list[list[str]] = []

    def features(tiles):
        calls.append(list(tiles))
        return np.stack([x[t] for t in tiles])

    edits = ReviewEdits(clusters={0: ClusterEdit("tumour", label="1", label_name="tumour"), 1: ClusterEdit("rest")},
                        splits=[ClusterSplit(0, "kmeans", n=3, seed=3, names={2: "small"})])
    lm = apply_review(rows, edits, 2, features=features)
    assert calls == [[f"t{i}" for i in range(9)]]  # only the split class's tiles are read
    assert [(c.name, c.tiles, c.subcluster, c.label) for c in lm.classes] == [
        ("rest", 3, None, None), ("tumour_0", 4, 0, "1"), ("tumour_1", 3, 1, "1"), ("tumour_small", 2, 2, "1")]
    parts = {t: c for t, c in lm.tile_labels}
    assert {t for t in parts if parts[t] == 1} == {f"t{i}" for i, b in enumerate(blob) if b == 0}
    assert {t for t in parts if parts[t] == 3} == {"t0", "t1"}
    assert apply_review(rows, edits, 2, features=features).tile_labels == lm.tile_labels


@pytest.mark.parametrize("changes,message", [
    ({"splits": [ClusterSplit(9, "label", labels="labels.csv")]}, r"splits\[0\]\.cluster: unknown cluster id 9"),
    ({"clusters": {2: ClusterEdit("x", exclude=True)}, "splits": [ClusterSplit(2, "kmeans", n=2)]},
     r"splits\[0\]\.cluster: cluster 2 is excluded"),
    ({"merges": [[1, 3]], "splits": [ClusterSplit(1, "kmeans", n=2), ClusterSplit(3, "label", labels="labels.csv")]},
     r"splits\[1\]\.cluster: the class of cluster 3 \(merged with \[1, 3\]\) is already split by splits\[0\]"),
    ({"splits": [ClusterSplit(0, "label", labels="nope.csv")]}, r"splits\[0\]\.labels: file not found: .*nope.csv"),
    ({"splits": [ClusterSplit(0, "label", labels="labels.csv", column="grade")]},
     r"splits\[0\]\.labels: .* has no label column 'grade'; its columns: file, label"),
    ({"splits": [ClusterSplit(0, "label", labels="labels.csv", names={"2": "x"})]},
     r"splits\[0\]\.names\.2: '2' is not a value of column 'label'.*values: 0, 1"),
    ({"splits": [ClusterSplit(2, "label", labels="labels.csv")]},
     r"splits\[0\]: none of the 2 tiles of class 'cluster_2' has a label"),
    ({"clusters": {3: ClusterEdit("cluster_0_1")}, "splits": [ClusterSplit(0, "label", labels="labels.csv")]},
     r"splits\[0\]: class name 'cluster_0_1' is also made by clusters\.3"),
    ({"splits": [ClusterSplit(0, "kmeans", n=3)]}, r"splits\[0\]\.n: 3 sub-clusters of class 'cluster_0', which has 2"),
    ({"splits": [ClusterSplit(0, "kmeans", n=2, names={"5": "x"})]}, r"splits\[0\]\.names\.5: not a sub-cluster"),
    ({"splits": [ClusterSplit(0, "kmeans", n=2)]}, r"splits\[0\]: by: kmeans needs the tiles' latent features"),
    ({"clusters": {1: ClusterEdit("s", label="0"), 3: ClusterEdit("cluster_3", label="1")}, "merges": [[1, 3]]},
     r"merges\[0\]: merged clusters \[1, 3\] have conflicting labels"),
])
def test_split_errors(tmp_path: Path, changes: dict, message: str) -> None:
    _labels_csv(tmp_path)
    with pytest.raises(InputError, match=message):
        apply_review(ROWS, _edits(**changes), 4, base=tmp_path)


@pytest.mark.parametrize("text,message", [
    ("splits: [{cluster: 0, by: label}]", r"splits\[0\]\.labels: required with by: label"),
    ("splits: [{cluster: 0, by: kmeans, n: 1}]", r"splits\[0\]\.n: by: kmeans needs n >= 2"),
    ("splits: [{cluster: 0, by: kmeans, n: 2, labels: x.csv}]", r"splits\[0\]\.labels: belongs to by: label"),
    ("splits: [{cluster: 0, by: label, labels: x.csv, n: 2}]", r"splits\[0\]\.n: belongs to by: kmeans"),
    ("splits: [{cluster: 0, by: gmm}]", r"splits\[0\]\.by: unknown value 'gmm'; allowed: label, kmeans"),
    ("clusters: {0: {name: a, label_name: tumour}}", r"clusters\.0\.label_name: needs a label"),
])
def test_load_edits_split_keys(tmp_path: Path, text: str, message: str) -> None:
    base = "clusters: {0: {name: a}}\n" if not text.startswith("clusters") else ""
    (tmp_path / "e.yaml").write_text(base + text + "\n")
    with pytest.raises(InputError, match=message):
        load_edits(tmp_path / "e.yaml")


def test_load_edits_reads_unquoted_label_values(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("clusters: {0: {name: a, label: 1}}\n"
                                     "splits: [{cluster: 0, by: label, labels: l.csv, names: {0: normal, 1: tumour}}]\n")
    edits = load_edits(tmp_path / "e.yaml")
    assert edits.clusters[0].label == "1" and edits.splits[0].names == {"0": "normal", "1": "tumour"}


def test_review_apply_cli_splits_on_pcam(clustered: Path, shared_data: Path, cache: Path, tmp_path: Path) -> None:
    meta = json.loads((clustered / "cluster.json").read_text())
    k, sizes = meta["k"], {int(c): n for c, n in meta["sizes"].items()}
    big = max(sizes, key=lambda c: sizes[c])  # k-means on the largest cluster, PCam's tumour label on another
    other = next(c for c in range(k) if c != big and sizes[c] > 0)
    edits = {"clusters": {c: {"name": f"tissue_{c}"} for c in range(k)},
             "splits": [{"cluster": other, "by": "label", "labels": str(shared_data / "pcam" / "train_labels.csv"),
                         "names": {0: "normal", 1: "tumour"}},
                        {"cluster": big, "by": "kmeans", "n": 2}]}
    (tmp_path / "clusters.yaml").write_text(yaml.safe_dump(edits))
    out = tmp_path / "label_map.yaml"
    args = ["review", "apply", str(tmp_path / "clusters.yaml"), "--clusters", str(clustered), "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    lm = read_label_map(out)
    by_name = {c.name: c for c in lm.classes}
    with open(shared_data / "pcam" / "train_labels.csv") as f:
        truth = {row["file"]: row["label"] for row in csv.DictReader(f)}
    with open(tmp_path / "label_map_tiles.csv") as f:
        tiles = list(csv.DictReader(f))
    assert len(tiles) == 48  # every PCam tile has a label: nothing excluded
    for row in tiles:
        c = by_name[row["class_name"]]
        if c.label is not None:  # a label class holds exactly the tiles with that PCam label
            assert c.name.startswith(f"tissue_{other}_") and truth[row["tile"]] == c.label
    parts = sorted((c.subcluster, c.tiles) for c in lm.classes if c.subcluster is not None)
    assert [p for p, _ in parts] == [0, 1] and parts[0][1] >= parts[1][1] and sum(n for _, n in parts) == sizes[big]
    assert any(c.label is not None for c in lm.classes)
    assert {c.label_name for c in lm.classes if c.label} <= {"normal", "tumour"}
    assert sorted(lm.names) == lm.names and "tumour" in r.output and "part" in r.output
    assert len(lm.cluster_classes()[big]) == 2
    first = (tmp_path / "label_map_tiles.csv").read_text()
    assert runner.invoke(app, args + ["--latents", str(cache)]).exit_code == 0  # the same cache, named
    assert (tmp_path / "label_map_tiles.csv").read_text() == first  # seeded: the same parts
    bad = runner.invoke(app, args + ["--latents", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "--latents" in bad.output


def test_clusters_inherit_the_label_groups_of_cluster_within_labels() -> None:
    groups = {0: "1", 1: "0", 2: "1", 3: "0"}  # cluster.json cluster_groups of a --within-labels run
    edits = _edits(clusters={0: ClusterEdit("tumour"), 1: ClusterEdit("normal"), 3: ClusterEdit("cluster_3", label="x")},
                   merges=[[0, 2], [1, 3]])
    lm = apply_review(ROWS, edits, 4, cluster_labels=groups)
    # [0, 2]: both in group "1"; [1, 3]: an explicit label wins over the groups.
    assert [(c.name, c.label) for c in lm.classes] == [("normal", "x"), ("tumour", "1")]
    across = apply_review(ROWS, _edits(merges=[[0, 1]]), 4, cluster_labels=groups)
    assert [(c.name, c.label) for c in across.classes] == [("cluster_0", None), ("cluster_2", "1"), ("cluster_3", "0")]
