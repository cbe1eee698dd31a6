"""`histosynth info` and `histosynth export` through Typer's CliRunner: output and exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from histosynth.bundle.store import load_bundle
from histosynth.bundle.testing import tiny_bundle, tiny_networks
from histosynth.cli.app import app
from histosynth.configio import to_dict
from histosynth.runtime.weights import save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("b"), num_classes=2, tile_size=32)


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    vqgan, unet = tiny_networks(2)
    paths = {
        "vqgan": save_checkpoint(vqgan, tmp_path / "vqgan.safetensors", to_dict(vqgan.config),
                                 {"kind": "vqgan", "tile_size": 32}),
        "unet": save_checkpoint(unet, tmp_path / "unet.safetensors", to_dict(unet.config),
                                {"kind": "unet", "latent_scale": 0.7, "step": 5}),
        "labels": tmp_path / "labels.yaml",
    }
    paths["labels"].write_text(yaml.safe_dump({"classes": [{"id": 0, "name": "stroma"}, {"id": 1, "name": "tumour"}]}))
    return paths


def test_info_without_bundle_shows_versions_and_active_providers() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps long cells
    assert torch.__version__ in out and "onnxruntime" in out
    assert "providers (active)" in out and "CPUExecutionProvider" in out


def test_info_names_onnxruntime_once_and_lists_only_local_providers_as_active() -> None:
    from importlib import metadata

    from histosynth.sampling.backends import available_providers, environment_info

    info = environment_info()
    installed = {d: v for d in ("onnxruntime", "onnxruntime-gpu") if (v := _version(metadata, d))}
    if list(installed) == ["onnxruntime"]:
        assert info["onnxruntime"] == installed["onnxruntime"]  # not "onnxruntime 1.x" under the name onnxruntime
    active = info["ONNX Runtime providers (active)"].split(", ")
    assert "AzureExecutionProvider" not in active and "CPUExecutionProvider" in active
    assert set(active) <= set(available_providers())


def _version(metadata, dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def test_info_describes_a_bundle(bundle_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    for text in ("tumour", "stroma", "32 px", "0.5", "unet.onnx", "decoder.safetensors", load_bundle(bundle_dir).hash):
        assert text in result.output
    assert result.output.count("OK") >= 4 and "FAILED" not in result.output


def test_info_flags_a_damaged_file(bundle_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "copy"))
    with (copy / "unet.onnx").open("ab") as f:
        f.write(b"\0")
    (copy / "decoder.onnx").unlink()
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 2
    assert "FAILED (altered)" in result.output and "FAILED (missing)" in result.output
    assert result.output.count("OK") == 2


def test_info_on_a_missing_bundle_is_an_input_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a folder" in " ".join(result.output.split())


def test_export_command_writes_a_loadable_bundle(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["export", "--vqgan", str(checkpoints["vqgan"]), "--unet", str(checkpoints["unet"]),
            "--labels", str(checkpoints["labels"]), "--out", str(out), "--mpp", "0.25", "--data", "test tiles"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime vs torch" in result.output and "manifest.json" in result.output
    m = load_bundle(out).manifest
    assert m.class_names == ["stroma", "tumour"] and m.microns_per_pixel == 0.25 and m.latent_scale == 0.7
    assert m.provenance.data == "test tiles" and m.provenance.steps == {"ldm": 5}
    # Again into the same folder: refused without --overwrite (exit 2); replacing is tested in test_bundle.py.
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_export_writes_the_same_weight_files_for_the_same_networks(checkpoints: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    # safetensors writes its metadata in a random order; a re-export of unchanged networks must not churn hashes.
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = runner.invoke(app, ["export", "--vqgan", str(checkpoints["vqgan"]), "--unet", str(checkpoints["unet"]),
                                     "--labels", str(checkpoints["labels"]), "--out", str(out)])
        assert result.exit_code == 0, result.output
    weights = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in outs[1].glob("*.safetensors"))
    assert all((outs[0] / n).read_bytes() == (outs[1] / n).read_bytes() for n in weights)


def test_export_command_input_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    base = ["export", "--vqgan", str(checkpoints["vqgan"]), "--unet", str(checkpoints["unet"]),
            "--out", str(tmp_path / "b")]
    bad_labels = tmp_path / "bad.yaml"
    bad_labels.write_text(yaml.safe_dump({"classes": [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}]}))
    result = runner.invoke(app, base + ["--labels", str(bad_labels)])
    assert result.exit_code == 2 and "ids must be 0..1" in " ".join(result.output.split())
    pickled = tmp_path / "vqgan.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    result = runner.invoke(app, ["export", "--vqgan", str(pickled), "--unet", str(checkpoints["unet"]),
                                 "--labels", str(checkpoints["labels"]), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "never unpickles" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()


def test_export_with_a_guide_network_and_info_shows_it(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    guide = tiny_networks(2, seed=5)[1]
    guide_path = save_checkpoint(guide, tmp_path / "guide.safetensors", to_dict(guide.config),
                                 {"kind": "unet", "step": 3, "samples_seen": 96})
    out = tmp_path / "guided"
    base = ["export", "--vqgan", str(checkpoints["vqgan"]), "--unet", str(checkpoints["unet"]),
            "--labels", str(checkpoints["labels"])]
    result = runner.invoke(app, base + ["--out", str(out), "--guide-unet", str(guide_path)])
    assert result.exit_code == 0, result.output
    assert "guide unet" in result.output and "guide_unet.onnx" in result.output
    b = load_bundle(out)
    assert b.has_guide and b.manifest.provenance.extra["guide_unet"] == {"step": 3, "samples_seen": 96}
    assert b.manifest.provenance.extra["checkpoints"]["guide_unet"] == "guide.safetensors"
    torch.testing.assert_close(b.build_guide_unet().state_dict(), guide.state_dict())
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "guide UNet" in result.output and "96 latents seen" in result.output
    plain = runner.invoke(app, ["info", str(tiny_bundle(tmp_path, num_classes=2, tile_size=32))])
    assert "no guide network" in plain.output

    # A guide of other classes than the UNet's is refused, and nothing is written.
    other = tiny_networks(3, seed=5)[1]
    other_path = save_checkpoint(other, tmp_path / "other.safetensors", to_dict(other.config), {"kind": "unet"})
    result = runner.invoke(app, base + ["--out", str(tmp_path / "refused"), "--guide-unet", str(other_path)])
    assert result.exit_code == 2 and "same latents and classes" in " ".join(result.output.split())
    assert not (tmp_path / "refused").exists()


def test_export_with_noise_range_experts_and_info_shows_them(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def expert(seed: int, t_range: list[int] | None, name: str) -> Path:
        net = tiny_networks(2, seed=seed)[1]
        extra = {"kind": "cldm", "step": 7, "samples_seen": 224, **({"t_range": t_range} if t_range else {})}
        return save_checkpoint(net, tmp_path / name, to_dict(net.config), extra)

    base = ["export", "--vqgan", str(checkpoints["vqgan"]), "--unet", str(checkpoints["unet"]),
            "--labels", str(checkpoints["labels"])]
    hi, mid = expert(6, [700, 1000], "hi.safetensors"), expert(7, [400, 700], "mid.safetensors")
    out = tmp_path / "split"
    result = runner.invoke(app, base + ["--out", str(out), "--unet-expert", str(hi), "--unet-expert", str(mid)])
    assert result.exit_code == 0, result.output
    assert "t in [0, 400), t in [400, 700), t in [700, 1000)" in result.output and "experts" in result.output
    b = load_bundle(out)
    assert b.unet_experts == [400, 700]
    assert b.manifest.provenance.extra["unet_experts"] == [
        {"t_min": 400, "checkpoint": "mid.safetensors", "step": 7, "samples_seen": 224},
        {"t_min": 700, "checkpoint": "hi.safetensors", "step": 7, "samples_seen": 224}]
    torch.testing.assert_close(dict(b.build_unet_experts())[700].state_dict(),
                               tiny_networks(2, seed=6)[1].state_dict())
    info = runner.invoke(app, ["info", str(out)])
    assert "noise-range experts" in info.output and "t in [400, 700): unet_t400" in " ".join(info.output.split())

    refusals = (([expert(8, None, "plain.safetensors")], "records no noisier timestep range"),
                ([mid], "the last range ends at t = 700, not at T = 1000"),
                ([expert(9, [300, 600], "gap.safetensors"), hi], "starts at t = 700, the previous range ends at 600"))
    for experts, message in refusals:
        result = runner.invoke(app, base + ["--out", str(tmp_path / "refused")]
                               + [a for p in experts for a in ("--unet-expert", str(p))])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "refused").exists()
