"""`evaluate memorization`: planted copies in real PCam tiles are found, clean tiles are not, and the parts
(search, SSIM, alpha-precision / beta-recall) agree with independent references."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.errors import InputError
from histosynth.evaluate.memorization import (
    PERTURBATIONS,
    MemorizationConfig,
    alpha_precision_beta_recall,
    contact_sheet,
    evaluate_memorization,
    nearest,
    perturb_tile,
    ssim_pairs,
    tile_features,
    training_tiles,
)
from histosynth.metrics.ssim import ssim

runner = CliRunner()


def _grey_std(path: Path) -> float:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return float((rgb @ [0.299, 0.587, 0.114]).std())


@pytest.fixture(scope="module")
def planted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """600 training tiles; 200 generated tiles = 190 unseen real tiles + 10 planted copies (5 %); 300 reference tiles.

    Copies come from training tiles with tissue (grey std >= 10): near-flat tiles are out of the audit by design.
    """
    root = tmp_path_factory.mktemp("memorization")
    rng = np.random.default_rng(7)
    train_all = sorted((shared_data / "pcam" / "train").glob("*.jpg"))
    valid = sorted((shared_data / "pcam" / "valid").glob("*.jpg"))
    train = [train_all[i] for i in np.sort(rng.choice(len(train_all), 600, replace=False))]
    for folder in ("train", "generated/class_a", "reference"):
        (root / folder).mkdir(parents=True)
    for p in train:
        shutil.copy(p, root / "train" / p.name)
    picks = rng.permutation(len(valid))
    clean = [valid[i] for i in picks[:190]]
    for p in clean:
        Image.open(p).convert("RGB").save(root / "generated" / "class_a" / f"{p.stem}.png")
    for p in (valid[i] for i in picks[190:490]):
        shutil.copy(p, root / "reference" / p.name)
    sources = [p for p in (train[i] for i in rng.permutation(len(train))) if _grey_std(p) >= 10][:10]
    copies = {}
    for j, src in enumerate(sources):
        kind = PERTURBATIONS[j % len(PERTURBATIONS)]
        tile = perturb_tile(np.asarray(Image.open(src).convert("RGB")), kind, rng)
        name = root / "generated" / "class_a" / f"copy{j}-{kind}.png"
        Image.fromarray(tile).save(name)
        copies[str(name)] = str(root / "train" / src.name)
    result = evaluate_memorization(root / "train", root / "generated", root / "reference")
    return {"root": root, "copies": copies, "clean": len(clean), "result": result}


# --- the audit on planted copies --------------------------------------------------------------------


def test_planted_copies_are_found_and_clean_tiles_are_not(planted: dict) -> None:
    result = planted["result"]
    flagged = {m.file: m for m in result.flagged}
    found = [f for f in planted["copies"] if f in flagged]
    assert len(found) / len(planted["copies"]) >= 0.95, f"recall {len(found)}/{len(planted['copies'])}"
    for f in found:  # each copy is matched to the tile it was made from
        assert flagged[f].nearest == planted["copies"][f]
    false_alarms = [f for f in flagged if f not in planted["copies"]]
    assert len(false_alarms) <= 0.01 * planted["clean"], f"false alarms: {false_alarms}"
    assert result.n == 200 and result.fraction_flagged == pytest.approx(len(flagged) / 200)
    # Exact copies are at distance 0 and unauthentic: authenticity cannot exceed the clean share.
    assert result.authenticity <= planted["clean"] / result.n
    assert result.threshold > max(flagged[f].distance for f in found)


def test_copies_are_the_closest_pairs_and_views_are_named(planted: dict) -> None:
    closest = planted["result"].closest
    assert {m.file for m in closest[: len(planted["copies"])]} == set(planted["copies"])
    assert [m.distance for m in closest] == sorted(m.distance for m in closest)
    exact = [m for m in closest if m.file.endswith("-exact.png")]
    assert exact and all(m.view == "identity" and m.distance < 1e-3 and m.ssim > 0.999 for m in exact)


def test_held_out_reference_and_json(planted: dict) -> None:
    root = planted["root"]
    result = evaluate_memorization(root / "train", root / "generated", None, MemorizationConfig(reference_fraction=0.2))
    d = result.to_json()
    for key in ("metric", "n", "flagged", "fraction_flagged", "threshold", "ssim_threshold", "alpha_precision",
                "beta_recall", "authenticity", "closest", "n_reference", "reference_source"):
        assert key in d
    assert d["reference_source"] == "held-out" and d["n_reference"] <= 120
    assert set(planted["copies"]) <= {m["file"] for m in d["flagged"]}
    json.dumps(d, allow_nan=False)  # every number is finite: the CLI writes it as it is


# --- parts against independent references -----------------------------------------------------------


def test_ssim_pairs_equals_the_project_ssim() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 3, 40, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(6, 3, 40, 32, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(ssim_pairs(a, b), ssim(a, b, reduction="none"), atol=1e-5, rtol=0)


def _box_grey(tile: np.ndarray, size: int) -> np.ndarray:
    grey = tile.astype(np.float64) @ [0.299, 0.587, 0.114]
    f = tile.shape[0] // size
    return grey.reshape(size, f, size, f).mean(axis=(1, 3))


def test_feature_distance_is_correlation_of_downsampled_grey(pcam_tiles: list[Path]) -> None:
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in pcam_tiles[:2]]
    features, stds = tile_features(tiles, 16)
    a, b = (_box_grey(t, 16).ravel() for t in tiles)
    r = np.corrcoef(a, b)[0, 1]
    assert float((features[0] - features[1]).norm()) == pytest.approx(np.sqrt(2 * (1 - r)), abs=1e-4)
    assert float(stds[0]) == pytest.approx((tiles[0].astype(np.float64) @ [0.299, 0.587, 0.114]).std(), rel=1e-4)


def test_nearest_is_the_brute_force_minimum_over_the_eight_views() -> None:
    rng = np.random.default_rng(1)
    size = 5
    base = rng.normal(size=(30, size * size)).astype(np.float32)
    queries = rng.normal(size=(7, size * size)).astype(np.float32)
    drop = np.zeros(30, dtype=bool)
    drop[[3, 11]] = True
    found = nearest(torch.from_numpy(queries), torch.from_numpy(base), size, k=2, drop=torch.from_numpy(drop), chunk=3)
    for qi, q in enumerate(queries):
        views = [np.rot90(q.reshape(size, size), t) for t in range(4)]
        views += [v[:, ::-1] for v in views]
        d = np.array([[np.linalg.norm(v.ravel() - b) for b in base] for v in views]).min(axis=0)
        d[drop] = np.inf
        want = np.argsort(d)[:2]
        assert found.index[qi].tolist() == want.tolist()
        np.testing.assert_allclose(found.distance[qi].numpy(), d[want], rtol=1e-4)
    itself = nearest(torch.from_numpy(base), torch.from_numpy(base), size, 1, exclude_self=torch.arange(30))
    assert (itself.index[:, 0] != torch.arange(30)).all()


def test_alpha_precision_and_beta_recall_known_answers() -> None:
    rng = np.random.default_rng(2)
    real = torch.from_numpy(rng.normal(size=(400, 16)).astype(np.float32))
    same_p, same_r, curves = alpha_precision_beta_recall(real, real.clone(), 4)
    assert same_p > 0.95 and same_r > 0.95
    assert curves["alpha_precision"][0] <= 0.01 and curves["alpha_precision"][-1] == 1.0
    far_p, far_r, _ = alpha_precision_beta_recall(real, real + 100.0, 4)
    # No generated tile inside any real alpha-ball: the curve is 0 and the score 1 - 2 * mean(alpha) = 0.
    assert far_p == pytest.approx(0.0, abs=1e-9) and far_r == pytest.approx(0.0, abs=1e-9)


def test_perturbations_change_what_they_should(pcam_tiles: list[Path]) -> None:
    tile = np.asarray(Image.open(pcam_tiles[0]).convert("RGB"))
    rng = np.random.default_rng(3)
    assert np.array_equal(perturb_tile(tile, "exact", rng), tile)
    turned = perturb_tile(tile, "dihedral", rng)
    assert not np.array_equal(turned, tile) and sorted(turned.ravel()) == sorted(tile.ravel())
    assert perturb_tile(tile, "jpeg", rng).shape == tile.shape
    assert np.abs(perturb_tile(tile, "jitter", rng).astype(int).mean(axis=(0, 1)) - tile.mean(axis=(0, 1))).max() > 0.5
    with pytest.raises(InputError, match="allowed: exact, dihedral, jpeg, jitter"):
        perturb_tile(tile, "blur", rng)


def test_latent_cache_index_lists_each_tile_once(pcam_tiles: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    array = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pcam_tiles[:2]])
    np.save(tmp_path / "tiles.npy", array)
    listed = [str(pcam_tiles[0]), str(pcam_tiles[1]), f"{tmp_path / 'tiles.npy'}[1]"]
    with (cache / "index.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "transform"])
        for i, name in enumerate(listed * 8):  # a dihedral cache lists every tile 8 times
            w.writerow([i, name, "identity"])
    names, kind = training_tiles(cache)
    assert kind == "latent cache" and names == listed
    from histosynth.evaluate.memorization import read_tile

    assert np.array_equal(read_tile(names[2]), array[1])
    with (cache / "index.csv").open("a", newline="") as f:
        csv.writer(f).writerow([99, str(tmp_path / "gone.png"), "identity"])
    with pytest.raises(InputError, match="1 of 4 listed tiles are missing"):
        training_tiles(cache)


def test_contact_sheet_draws_every_pair(planted: dict, tmp_path: Path) -> None:
    pairs = planted["result"].closest[:6]
    path = contact_sheet(pairs, tmp_path / "sheet.png", columns=4)
    with Image.open(path) as im:
        side = 96
        assert im.size == (4 * (2 * side + 18), 2 * (side + 12 + 14))


def test_report_has_a_memorization_section(planted: dict, tmp_path: Path) -> None:
    from histosynth.evaluate.report import build_report

    results = tmp_path / "mem.json"
    results.write_text(json.dumps(planted["result"].to_json()))
    report = build_report(tmp_path / "report", results=[results]).read_text()
    assert "## Memorization" in report and "memorization-0.png" in report
    assert (tmp_path / "report" / "memorization-0.png").is_file()


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_writes_json_and_contact_sheet(planted: dict, tmp_path: Path) -> None:
    root = planted["root"]
    small = tmp_path / "train"
    small.mkdir()
    for p in sorted((root / "train").iterdir())[:120]:
        shutil.copy(p, small / p.name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", "memorization", "--train", str(small), "--generated",
                                 str(root / "generated"), "--reference-fraction", "0.25", "--pairs", "8",
                                 "--json", str(out / "mem.json"), "--png", str(out / "pairs.png")])
    assert result.exit_code == 0, result.output
    d = json.loads((out / "mem.json").read_text())
    assert d["metric"] == "memorization" and d["n"] == 200 and len(d["closest"]) == 8
    for key in ("n", "flagged", "fraction_flagged", "threshold", "alpha_precision", "beta_recall", "authenticity"):
        assert key in d
    assert all({"file", "nearest", "distance", "ssim"} <= set(m) for m in d["flagged"])
    assert (out / "pairs.png").is_file()


@pytest.mark.parametrize("which", ["--train", "--generated", "--reference"])
def test_cli_missing_folder_is_exit_2(planted: dict, tmp_path: Path, which: str) -> None:
    root = planted["root"]
    args = {"--train": str(root / "train"), "--generated": str(root / "generated"),
            "--reference": str(root / "reference")}
    args[which] = str(tmp_path / "nowhere")
    result = runner.invoke(app, ["evaluate", "memorization", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2
    assert which in result.output and "not found" in result.output


def test_cli_output_under_a_file_is_exit_2(planted: dict, tmp_path: Path) -> None:
    root = planted["root"]
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = runner.invoke(app, ["evaluate", "memorization", "--train", str(root / "train"), "--generated",
                                 str(root / "generated"), "--png", str(blocker / "pairs.png")])
    assert result.exit_code == 2 and "--png" in result.output
