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
from histosynth.review.edits import ClusterEdit, ReviewEdits, TileMove, apply_review, load_edits
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
    from histosynth.bundle.export import read_label_map

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
