"""Feature kinds (UNet activations), `cluster --within-labels` with review on its output, and the registries' docs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.clusters.feature_kinds import FEATURE_KINDS, FeatureConfig, UNetFeatures, compute_features
from histosynth.clusters.imc import IMCHead
from histosynth.clusters.methods import METHODS
from histosynth.configio import to_dict
from histosynth.diffusion.schedule import ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError
from histosynth.runtime.weights import save_checkpoint

runner = CliRunner()
TINY = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  norm_groups=8, num_classes=2)
DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised UNet saved as `train cldm` would: latent_scale and schedule in `extra`."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet") / "unet.safetensors"
    save_checkpoint(UNet(TINY), path, to_dict(TINY),
                    {"kind": "cldm", "latent_scale": 0.5, "schedule": to_dict(ScheduleConfig())})
    return path


@pytest.fixture(scope="module")
def cache(pcam_tiles: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent-cache stand-in: each real tile's RGB averaged down to 8x8 (N, 3, 8, 8) + index.csv of names."""
    folder = tmp_path_factory.mktemp("cache")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
              for p in pcam_tiles]
    np.save(folder / "latents.npy", np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0)
    with open(folder / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([["tile"], *([p.name] for p in pcam_tiles)])
    return folder


def test_unet_features_are_pooled_taps_deterministic_per_row(unet_ckpt: Path) -> None:
    latents = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    extractor = UNetFeatures(unet_ckpt, t=100, seed=0)
    f = extractor(latents, 0)
    # Taps: the middle block (32 wide), decoder level 1 (32) and level 0 (16).
    assert f.shape == (7, 80) and extractor.block_sizes() == [32, 32, 16]
    # A row's features depend on (seed, row) only: the same rows in other batches give the same numbers.
    assert torch.allclose(torch.cat([extractor(latents[:3], 0), extractor(latents[3:], 3)]), f, atol=1e-5)
    assert not torch.allclose(extractor(latents[3:], 0), f[3:])  # other rows, other noise
    # The noise level matters, and a different seed changes the noise.
    assert not torch.allclose(UNetFeatures(unet_ckpt, t=900)(latents, 0), f)
    assert not torch.allclose(UNetFeatures(unet_ckpt, t=100, seed=1)(latents, 0), f)
    # The middle-block columns are the spatial mean of the middle block's output, computed by hand.
    unet = extractor.unet
    noise = torch.stack([torch.from_numpy(np.random.default_rng([0, i]).standard_normal((3, 8, 8), dtype=np.float32))
                         for i in range(7)])
    t = torch.full((7,), 100)
    xt = extractor.schedule.add_noise(latents * 0.5, noise, t)
    captured = []
    hook = unet.mid_res2.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        unet(xt, t, torch.full((7,), 2))
    hook.remove()
    assert torch.allclose(f[:, :32], captured[0].mean(dim=(2, 3)), atol=1e-5)


def test_unet_features_checkpoint_errors(unet_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--unet-t: 1000 is not a training timestep; allowed: 0..999"):
        UNetFeatures(unet_ckpt, t=1000)
    with pytest.raises(InputError, match="file not found"):
        UNetFeatures(tmp_path / "none.safetensors", t=10)
    bare = tmp_path / "bundle" / "unet.safetensors"
    save_checkpoint(UNet(TINY), bare, to_dict(TINY), {"kind": "unet"})
    with pytest.raises(InputError, match="records no latent_scale"):
        UNetFeatures(bare, t=10)
    # A bundle keeps the latent scale and schedule in manifest.json beside the UNet.
    (bare.parent / "manifest.json").write_text(json.dumps({"latent_scale": 0.5, "schedule": to_dict(ScheduleConfig())}))
    assert UNetFeatures(bare, t=10).latent_scale == 0.5
    vq = tmp_path / "vq.safetensors"
    save_checkpoint(UNet(TINY), vq, to_dict(TINY), {"kind": "vqgan"})
    with pytest.raises(InputError, match="not a diffusion UNet"):
        UNetFeatures(vq, t=10)
    with pytest.raises(InputError, match="features.unet: kind unet needs a UNet checkpoint"):
        compute_features(np.zeros((4, 3, 8, 8), np.float32), FeatureConfig(kind="unet"))
    with pytest.raises(InputError, match="needs latents"):
        compute_features(np.zeros((4, 5), np.float32), FeatureConfig(kind="unet", unet=str(unet_ckpt)))
    with pytest.raises(InputError, match="allowed: latent_features, unet, latent_features\\+unet"):
        FeatureConfig(kind="pixels").validate("features")


def test_combined_features_keep_both_blocks(unet_ckpt: Path) -> None:
    latents = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    both = compute_features(latents, FeatureConfig(kind="latent_features+unet", unet=str(unet_ckpt)))
    alone = compute_features(latents, FeatureConfig())
    assert both.features.shape == (5, 60 + 80) and both.blocks == alone.blocks + [32, 32, 16]
    assert torch.equal(both.features[:, :60], alone.features)
    assert both.info["kind"] == "latent_features+unet" and both.info["t"] == 100


def test_cluster_cli_unet_features(cache: Path, unet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(out), "--features", "unet",
                            "--unet", str(unet_ckpt), "--unet-t", "50", "--k-max", "3", "--seeds", "0",
                            "--steps", "50", "--mu", "2.5", "--max-points", "100"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "cluster.json").read_text())
    assert meta["features"]["kind"] == "unet" and meta["features"]["t"] == 50 and meta["features"]["dim"] == 80
    assert meta["config"]["imc"]["mu"] == 2.5 and meta["config"]["features"]["unet"] == str(unet_ckpt)
    assert set(meta["balance"]) == {"size_ratio", "size_entropy"}
    head = IMCHead.load(out / "imc_head.safetensors")
    assert head.in_dim == 80 and head.feature_kind == "unet"
    with pytest.raises(InputError, match="trained on 'unet' features"):
        head.logits_from_latents(torch.zeros(1, 3, 8, 8))
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(tmp_path / "d"), "--features", "unet"])
    assert r.exit_code == 2 and "needs a UNet checkpoint (--unet)" in r.output
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(tmp_path / "d"), "--features", "hog"])
    assert r.exit_code == 2 and "allowed: latent_features, unet" in r.output
    assert not (tmp_path / "d").exists()
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--out", str(tmp_path / "afile" / "o")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output


@pytest.fixture(scope="module")
def labelled(pcam_tiles: list[Path], shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PCam's tumour labels of the first 40 of the 48 tiles (a partial annotation): the rest are unlabelled."""
    with open(shared_data / "pcam" / "train_labels.csv") as f:
        truth = {r["file"]: r["label"] for r in csv.DictReader(f)}
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "tumour"])
        w.writerows([p.name, truth[p.name]] for p in pcam_tiles[:40])
    return path


def test_within_labels_clusters_each_group_and_review_accepts_it(cache: Path, labelled: Path,
                                                                 pcam_tiles: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "within"
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--tiles", str(pcam_tiles[0].parent),
                            "--out", str(out), "--within-labels", str(labelled), "--label-column", "tumour",
                            "--k-min", "2", "--k-max", "3", "--seeds", "0", "--steps", "50", "--max-points", "100"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "cluster.json").read_text())
    with open(labelled) as f:
        label_of = {row["file"]: row["tumour"] for row in csv.DictReader(f)}
    groups = meta["groups"]
    assert list(groups) == ["0", "1", "unlabelled"]
    # Global ids: the groups' local ids one after another; K is their total.
    ids = [c for g in groups.values() for c in g["clusters"]]
    assert ids == list(range(meta["k"])) and meta["k"] == sum(g["k"] for g in groups.values())
    assert all(2 <= g["k"] <= 3 for g in groups.values())
    with open(out / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["tile"] for row in rows] == [p.name for p in pcam_tiles]  # every tile, in the cache's order
    for row in rows:
        group = meta["cluster_groups"][row["cluster"]]
        assert group == label_of.get(row["tile"], "unlabelled")
    assert {g: v["tiles"] for g, v in groups.items()} == {
        "0": sum(v == "0" for v in label_of.values()), "1": sum(v == "1" for v in label_of.values()), "unlabelled": 8}
    # Each group folder is a complete cluster folder with its own choice of K.
    for label, g in groups.items():
        sub = json.loads((out / g["dir"] / "cluster.json").read_text())
        assert sub["k"] == g["k"] and sub["num_tiles"] == g["tiles"] and sub["source"]["group"] == label
        assert (out / g["dir"] / "validity.png").is_file() and (out / g["dir"] / "imc_head.safetensors").is_file()
    # review sheets and review apply work on the combined folder.
    review = tmp_path / "review"
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(out), "--out", str(review)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in review.glob("cluster_*.png")) == sorted(f"cluster_{c}.png" for c in ids)
    edits = yaml.safe_load((review / "clusters.yaml").read_text())
    for c, label in meta["cluster_groups"].items():
        edits["clusters"][int(c)]["name"] = f"{'tumour' if label == '1' else 'normal'}_{c}"
        edits["clusters"][int(c)]["exclude"] = label == "unlabelled"
    (review / "clusters.yaml").write_text(yaml.safe_dump(edits))
    r = runner.invoke(app, ["review", "apply", str(review / "clusters.yaml"), "--clusters", str(out),
                            "--out", str(review / "label_map.yaml")])
    assert r.exit_code == 0, r.output
    with open(review / "label_map_tiles.csv") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == 40
    assert all(row["class_name"].startswith("tumour" if label_of[row["tile"]] == "1" else "normal") for row in kept)


def test_within_labels_errors(cache: Path, labelled: Path, tmp_path: Path) -> None:
    args = ["cluster", "--latents", str(cache), "--out", str(tmp_path / "o"), "--k-max", "3", "--steps", "10"]
    r = runner.invoke(app, [*args, "--within-labels", str(labelled)])
    assert r.exit_code == 2 and "has no column 'label'; columns: file, tumour" in r.output
    (tmp_path / "other.csv").write_text("file,label\nnot_a_tile.jpg,1\n")
    r = runner.invoke(app, [*args, "--within-labels", str(tmp_path / "other.csv")])
    assert r.exit_code == 2 and "none of the 48 tiles has a label" in r.output
    (tmp_path / "bad.csv").write_text("file,label\n" + "".join(f"{p},a/b\n" for p in _names(cache)))
    r = runner.invoke(app, [*args, "--within-labels", str(tmp_path / "bad.csv")])
    assert r.exit_code == 2 and "cannot name a folder" in r.output
    (tmp_path / "small.csv").write_text("file,label\n" + "".join(f"{p},{'x' if i < 3 else 'y'}\n"
                                                                for i, p in enumerate(_names(cache))))
    r = runner.invoke(app, [*args, "--within-labels", str(tmp_path / "small.csv")])
    assert r.exit_code == 2 and "group 'x' (3 tiles): k_max: 3 needs at least 5 tiles" in r.output


def _names(cache: Path) -> list[str]:
    with open(cache / "index.csv") as f:
        return [row["tile"] for row in csv.DictReader(f)]


def test_docs_name_every_method_and_feature_kind() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Stage 2: clustering"):text.index("## Expert review")]
    for name in [*METHODS, *FEATURE_KINDS]:
        assert f"`{name}`" in section, f"docs/training.md's clustering section does not describe `{name}`"
    for option in ("--mu", "--features", "--unet", "--unet-t", "--within-labels", "--label-column"):
        assert option in section, f"docs/training.md's clustering section does not document {option}"
