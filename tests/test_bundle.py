"""Checkpoints, bundle export, manifest parsing and verified loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from histosynth.bundle import export as export_module
from histosynth.bundle.export import export_bundle, export_from_checkpoints, read_label_map
from histosynth.bundle.manifest import MANIFEST_NAME, REQUIRED_FILES, read_manifest
from histosynth.bundle.store import load_bundle, sha256_file
from histosynth.bundle.testing import tiny_bundle, tiny_networks
from histosynth.configio import to_dict
from histosynth.diffusion.schedule import ScheduleConfig
from histosynth.errors import InputError, RunError
from histosynth.runtime.weights import load_checkpoint, read_checkpoint_metadata, save_checkpoint


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=3, tile_size=32)


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_keeps_weights_config_and_extra(tmp_path: Path) -> None:
    shared = torch.nn.Linear(3, 4)
    module = torch.nn.Sequential(shared, shared)  # shared storage, which raw safetensors refuses
    path = save_checkpoint(module, tmp_path / "m.safetensors", {"width": 4}, {"step": 7, "kind": "unet"})
    state, config, extra = load_checkpoint(path)
    assert config == {"width": 4} and extra == {"step": 7, "kind": "unet"}
    assert torch.equal(state["0.weight"], shared.weight.detach()) and torch.equal(state["1.bias"], shared.bias.detach())
    assert read_checkpoint_metadata(path) == ({"width": 4}, {"step": 7, "kind": "unet"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_pickled_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(InputError, match="model.pt.*never unpickles"):
        load_checkpoint(path)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(torch.nn.Linear(8, 8), tmp_path / "m.safetensors", {}, {})
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-16])
    with pytest.raises(InputError, match="cut.safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="plain.safetensors: not a histosynth checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------- export


def test_export_writes_a_complete_bundle(bundle_dir: Path) -> None:
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted((*REQUIRED_FILES, MANIFEST_NAME))
    manifest = read_manifest(bundle_dir)
    assert manifest.class_names == ["lymphocytes", "stroma", "tumour"] and manifest.null_id == 3
    assert manifest.tile_size == 32 and manifest.latent_shape == (3, 8, 8) and manifest.latent_scale == 0.8
    assert manifest.schedule == ScheduleConfig() and manifest.prediction == "epsilon"
    assert manifest.provenance.date and manifest.provenance.extra == {"K": 3}
    for name, digest in manifest.files.items():
        assert sha256_file(bundle_dir / name) == digest
    # The decoder file holds the decoder half only: no encoder weights ship in a bundle.
    state, _, extra = load_checkpoint(bundle_dir / "decoder.safetensors")
    assert state and not any(k.startswith("encoder.") for k in state) and extra["kind"] == "decoder"


def test_loaded_modules_reproduce_the_exported_networks(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    vqgan, unet = tiny_networks(3, seed=0)  # tiny_bundle's networks, rebuilt from the same seed
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.allclose(bundle.build_unet()(x, t, y), unet(x, t, y), atol=1e-6)
        expected = vqgan.decode(x / 0.8).clamp(-1, 1)
        assert torch.allclose(bundle.build_decoder()(x), expected, atol=1e-6)


def test_export_refuses_a_non_empty_folder_unless_it_is_a_bundle_and_overwrite(
    bundle_dir: Path, tmp_path: Path
) -> None:
    vqgan, unet = tiny_networks(3)
    kwargs = dict(class_names=["a", "b", "c"], schedule_config=ScheduleConfig(), latent_scale=1.0, tile_size=16,
                  microns_per_pixel=0.25)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bundle"):
        export_bundle(vqgan, unet, other, overwrite=True, **kwargs)
    assert (other / "keep.txt").read_text() == "mine"
    target = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    with pytest.raises(InputError, match="--overwrite"):
        export_bundle(vqgan, unet, target, **kwargs)
    export_bundle(vqgan, unet, target, overwrite=True, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "notes"]  # no temporary or old folders left
    assert read_manifest(target).class_names == ["a", "b", "c"] and read_manifest(target).tile_size == 16


def _with_user_files(bundle_dir: Path, target: Path) -> dict[str, bytes]:
    """Copy `bundle_dir` to `target`, add files a user keeps beside a bundle, and list one stale bundle file."""
    shutil.copytree(bundle_dir, target)
    (target / "training").mkdir()
    (target / "training" / "x.yaml").write_text("steps: 5\n")
    (target / "eval").mkdir()
    (target / "eval" / "y.json").write_text('{"fid": 1.0}')
    (target / "MODEL_CARD.md").write_text("# card\n")
    # A file the old bundle lists in its manifest (so it owns it) that the new export does not write.
    (target / "stale.bin").write_bytes(b"old")
    raw = json.loads((target / MANIFEST_NAME).read_text())
    raw["files"]["stale.bin"] = sha256_file(target / "stale.bin")
    (target / MANIFEST_NAME).write_text(json.dumps(raw))
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


_NEW_EXPORT = dict(class_names=["a", "b", "c"], schedule_config=ScheduleConfig(), latent_scale=1.0, tile_size=16,
                   microns_per_pixel=0.25)


def test_overwrite_replaces_only_the_files_the_bundle_owns(bundle_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "b"
    before = _with_user_files(bundle_dir, target)
    old_hashes = read_manifest(target).files
    vqgan, unet = tiny_networks(3, seed=1)  # other weights than the old bundle's, so every file changes
    export_bundle(vqgan, unet, target, overwrite=True, **_NEW_EXPORT)
    for name in ("training/x.yaml", "eval/y.json", "MODEL_CARD.md"):
        assert (target / name).read_bytes() == before[name]
    assert not (target / "stale.bin").exists()  # the old bundle's, so removed with it
    assert sorted(p.name for p in target.iterdir()) == sorted(
        (*REQUIRED_FILES, MANIFEST_NAME, "training", "eval", "MODEL_CARD.md"))  # no staging or backup left
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    bundle = load_bundle(target)  # every file matches the new manifest
    assert bundle.manifest.class_names == ["a", "b", "c"] and bundle.manifest.tile_size == 16
    assert all(bundle.manifest.files[name] != old_hashes[name] for name in REQUIRED_FILES)


def test_a_bundle_owns_only_plain_names_inside_its_folder(bundle_dir: Path, tmp_path: Path) -> None:
    target = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    raw = json.loads((target / MANIFEST_NAME).read_text())
    raw["files"]["../outside.txt"] = "0" * 64  # a hand-edited manifest must not reach beyond the bundle
    raw["files"]["sub/x.bin"] = "0" * 64
    raw["files"]["extra.bin"] = "0" * 64
    (target / MANIFEST_NAME).write_text(json.dumps(raw))
    assert export_module.bundle_owned_files(target) == {*REQUIRED_FILES, MANIFEST_NAME, "extra.bin"}
    (target / MANIFEST_NAME).write_text("[not json")  # damaged: still owns the fixed files, nothing more
    assert export_module.bundle_owned_files(target) == {*REQUIRED_FILES, MANIFEST_NAME}


def test_failed_overwrite_leaves_the_old_bundle_and_user_files_intact(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "b"
    before = _with_user_files(bundle_dir, target)
    vqgan, unet = tiny_networks(3, seed=1)

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}

    # 1. Failure while the new files are being written (the ONNX export raises).
    def broken_export(*args, **kwargs):
        raise RuntimeError("onnx export exploded")

    with monkeypatch.context() as m:
        m.setattr(export_module, "_export_onnx", broken_export)
        with pytest.raises(RuntimeError, match="exploded"):
            export_bundle(vqgan, unet, target, overwrite=True, **_NEW_EXPORT)
    assert snapshot() == before and [p.name for p in tmp_path.iterdir()] == ["b"]

    # 2. Failure in the middle of the swap, with the old files moved away and the new ones in place: all rolled
    # back. The swap is driven directly on a staged folder (a full export only to fail at its end would be slow).
    stage = target / ".export-partial-test"
    stage.mkdir()
    for name in (*REQUIRED_FILES, MANIFEST_NAME):
        (stage / name).write_bytes(b"new " + name.encode())
    real_replace = export_module.os.replace
    moves: list[tuple[Path, Path]] = []

    def replace_failing_on_the_manifest(src, dst):
        if Path(dst) == target / MANIFEST_NAME:
            raise OSError("disk full")
        moves.append((Path(src), Path(dst)))
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(export_module.os, "replace", replace_failing_on_the_manifest)
        with pytest.raises(OSError, match="disk full"):
            export_module._replace_bundle_files(stage, target, export_module.bundle_owned_files(target))
    assert (stage / "unet.onnx", target / "unet.onnx") in moves  # it failed after placing the new files
    assert sorted(p.name for p in stage.iterdir()) == sorted((*REQUIRED_FILES, MANIFEST_NAME))  # and took them back
    shutil.rmtree(stage)
    assert snapshot() == before and [p.name for p in tmp_path.iterdir()] == ["b"]
    assert load_bundle(target).manifest.class_names == ["lymphocytes", "stroma", "tumour"]


def test_overwrite_refuses_a_folder_where_the_bundle_writes_a_file(bundle_dir: Path, tmp_path: Path) -> None:
    target = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    (target / "unet.onnx").unlink()
    (target / "unet.onnx").mkdir()
    vqgan, unet = tiny_networks(3)
    with pytest.raises(InputError, match="unet.onnx is a folder"):
        export_bundle(vqgan, unet, target, overwrite=True, **_NEW_EXPORT)


def test_failed_parity_check_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vqgan, unet = tiny_networks(3)
    monkeypatch.setattr(export_module, "_max_abs_diff", lambda a, b: 0.5)
    with pytest.raises(RunError, match="differs from torch on the unet by 0.5"):
        export_bundle(vqgan, unet, tmp_path / "out", class_names=["a", "b", "c"], schedule_config=ScheduleConfig(),
                      latent_scale=1.0, tile_size=16, microns_per_pixel=0.5)
    assert list(tmp_path.iterdir()) == []


def test_export_checks_arguments_before_writing(tmp_path: Path) -> None:
    vqgan, unet = tiny_networks(3)
    base = dict(schedule_config=ScheduleConfig(), latent_scale=1.0, microns_per_pixel=0.5)
    with pytest.raises(InputError, match="2 class names for a UNet trained on 3"):
        export_bundle(vqgan, unet, tmp_path / "o", class_names=["a", "b"], tile_size=16, **base)
    with pytest.raises(InputError, match="tile_size: 18"):
        export_bundle(vqgan, unet, tmp_path / "o", class_names=["a", "b", "c"], tile_size=18, **base)
    with pytest.raises(InputError, match=r"classes\[1\].name"):
        export_bundle(vqgan, unet, tmp_path / "o", class_names=["a", "b/y", "c"], tile_size=16, **base)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
@pytest.mark.parametrize("name", ["unet.onnx", "decoder.safetensors"])
def test_damaged_files_are_named(bundle_copy: Path, damage: str, name: str) -> None:
    path = bundle_copy / name
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    expected = f"{name} is missing" if damage == "missing" else f"{name} does not match its sha256"
    with pytest.raises(InputError, match=expected):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # an explicit opt-out still reads the manifest


def test_manifest_errors_name_the_key(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["classes"][1]["name"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"manifest.json: manifest.classes\[1\].name: expected a string"):
        load_bundle(bundle_copy)
    data["classes"][1]["name"] = "stroma"
    data["tile_sise"] = 32
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="unknown key 'tile_sise'"):
        load_bundle(bundle_copy)


def test_future_format_version_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 2
    data["new_field_of_v2"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="bundle format 2 is newer.*upgrade histosynth"):
        load_bundle(bundle_copy)


def test_bundle_lookup_and_hash(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.class_id("stroma") == 1 and bundle.null_id == 3 and bundle.num_classes == 3
    with pytest.raises(InputError, match="valid names: lymphocytes, stroma, tumour"):
        bundle.class_id("fat")
    assert len(bundle.hash) == 12 and sha256_file(bundle_dir / MANIFEST_NAME).startswith(bundle.hash)
    with pytest.raises(InputError, match="not found"):
        load_bundle(bundle_dir.parent / "missing")


# ---------------------------------------------------------------------------------------------- from checkpoints


def _checkpoints(tmp_path: Path, unet_extra: dict) -> tuple[Path, Path, Path]:
    vqgan, unet = tiny_networks(2)
    vq_path = save_checkpoint(vqgan, tmp_path / "vqgan.safetensors", to_dict(vqgan.config),
                              {"kind": "vqgan", "step": 100, "tile_size": 16, "microns_per_pixel": 0.25})
    unet_path = save_checkpoint(unet, tmp_path / "unet.safetensors", to_dict(unet.config), unet_extra)
    labels = tmp_path / "labels.yaml"
    labels.write_text(yaml.safe_dump({"classes": [{"id": 0, "name": "stroma", "clusters": [1, 4]},
                                                  {"id": 1, "name": "tumour", "clusters": [0]}], "K": 5}))
    return vq_path, unet_path, labels


def test_export_from_checkpoints_takes_facts_from_metadata(tmp_path: Path) -> None:
    schedule = {"kind": "cosine", "num_train_steps": 500, "prediction": "v"}
    vq, un, labels = _checkpoints(tmp_path, {"kind": "unet", "step": 40, "latent_scale": 1.5, "schedule": schedule,
                                             "data": "pcam train", "class_names": ["stroma", "tumour"]})
    report = export_from_checkpoints(vq, un, labels, tmp_path / "bundle")
    m = load_bundle(report.path).manifest
    assert m.class_names == ["stroma", "tumour"] and m.tile_size == 16 and m.microns_per_pixel == 0.25
    assert m.latent_scale == 1.5 and m.schedule == ScheduleConfig(kind="cosine", num_train_steps=500, prediction="v")
    assert m.provenance.steps == {"vqgan": 100, "ldm": 40} and m.provenance.data == "pcam train"
    assert m.provenance.extra["K"] == 5 and m.provenance.extra["classes"][0]["clusters"] == [1, 4]
    assert report.unet_max_abs_diff <= 1e-3 and report.decoder_max_abs_diff <= 1e-3


def test_export_keeps_the_training_count_in_the_bundle_weights(tmp_path: Path) -> None:
    """A round that continues from the bundle's unet.safetensors must find how much training it had seen."""
    vq, un, labels = _checkpoints(tmp_path, {"kind": "cldm", "step": 40, "samples_seen": 1280, "latent_scale": 1.5,
                                             "class_names": ["stroma", "tumour"]})
    report = export_from_checkpoints(vq, un, labels, tmp_path / "bundle")
    assert read_checkpoint_metadata(report.path / "unet.safetensors")[1] == {"kind": "unet", "step": 40,
                                                                             "samples_seen": 1280}
    decoder_extra = read_checkpoint_metadata(report.path / "decoder.safetensors")[1]
    assert decoder_extra["step"] == 100 and "samples_seen" not in decoder_extra  # not recorded by the VQ-GAN here
    assert load_bundle(report.path).manifest.provenance.extra["samples_seen"] == {"ldm": 1280}


def test_export_from_checkpoints_errors(tmp_path: Path) -> None:
    vq, un, labels = _checkpoints(tmp_path, {"kind": "unet"})
    with pytest.raises(InputError, match="--latent-scale"):
        export_from_checkpoints(vq, un, labels, tmp_path / "b")
    with pytest.raises(InputError, match="unet.safetensors: is a 'unet' checkpoint, expected vqgan"):
        export_from_checkpoints(un, vq, labels, tmp_path / "b", latent_scale=1.0)
    (tmp_path / "three.yaml").write_text(yaml.safe_dump({"classes": [{"id": i, "name": f"c{i}"} for i in range(3)]}))
    with pytest.raises(InputError, match="3 class names for a UNet trained on 2"):
        export_from_checkpoints(vq, un, tmp_path / "three.yaml", tmp_path / "b", latent_scale=1.0)
    _, un2, _ = _checkpoints(tmp_path, {"kind": "cldm", "latent_scale": 1.0, "class_names": ["tumour", "stroma"]})
    with pytest.raises(InputError, match="differ from those .*unet.safetensors was trained on"):
        export_from_checkpoints(vq, un2, labels, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "classes, message",
    [
        ([{"id": 0, "name": "a"}, {"id": 2, "name": "b"}], r"ids must be 0..1"),
        ([{"id": 0, "name": "a"}, {"id": 1, "name": "a"}], "duplicate names a"),
        ([{"id": 0}], r"classes\[0\].name: required key is missing"),
        ([], "non-empty list"),
    ],
)
def test_label_map_errors(tmp_path: Path, classes: list, message: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"classes": classes}))
    with pytest.raises(InputError, match=message):
        read_label_map(path)


def test_manifest_guide_entries_must_come_with_their_files(tmp_path: Path) -> None:
    guided = tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="guided", guide=True)
    data = json.loads((guided / MANIFEST_NAME).read_text())
    del data["files"]["guide_unet.onnx"]
    (guided / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="guide_unet is set but the files list lacks guide_unet.onnx"):
        read_manifest(guided)
    del data["guide_unet"]
    (guided / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="manifest.guide_unet: missing, but the files list has guide_unet.safetensors"):
        read_manifest(guided)
    (guided / "guide_unet.onnx").unlink()  # a bundle without a guide loads as before
    del data["files"]["guide_unet.safetensors"]
    (guided / MANIFEST_NAME).write_text(json.dumps(data))
    assert not load_bundle(guided).has_guide


def test_manifest_experts_must_ascend_and_come_with_their_files(tmp_path: Path) -> None:
    split = tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="split", experts=(400, 700))
    m = load_bundle(split).manifest
    assert m.unet_experts == [400, 700] and m.expert_ranges == [(0, 400), (400, 700), (700, 1000)]
    for name in ("unet_t400.onnx", "unet_t400.safetensors", "unet_t700.onnx", "unet_t700.safetensors"):
        assert name in m.files and (split / name).is_file()
    assert read_checkpoint_metadata(split / "unet_t400.safetensors")[1]["t_range"] == [400, 700]
    data = json.loads((split / MANIFEST_NAME).read_text())
    for experts, message in (([700, 400], r"unet_experts\[1\]: 400: expert ranges start at ascending"),
                             ([400, 1000], r"unet_experts\[1\]: 1000"),
                             ([400], "lacks the expert of unet_t700.onnx, unet_t700.safetensors"),
                             ([400, 700, 800], "files list lacks unet_t800.onnx, unet_t800.safetensors")):
        (split / MANIFEST_NAME).write_text(json.dumps({**data, "unet_experts": experts}))
        with pytest.raises(InputError, match=message):
            read_manifest(split)
    plain = json.loads((tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="plain") / MANIFEST_NAME).read_text())
    assert "unet_experts" not in plain  # a bundle with one UNet is written as before


def test_export_refuses_an_expert_built_unlike_the_unet(tmp_path: Path) -> None:
    vqgan, unet = tiny_networks(2)
    other = tiny_networks(2, latent_channels=4)[1]
    with pytest.raises(InputError, match="expert from t = 500 is not built like the UNet"):
        export_bundle(vqgan, unet, tmp_path / "b", class_names=["a", "b"], schedule_config=ScheduleConfig(),
                      latent_scale=1.0, tile_size=32, microns_per_pixel=0.5, unet_experts=[(500, other)])
    assert not (tmp_path / "b").exists()
