"""End to end: a tiny exported bundle, `histosynth generate` into temp folders; files, manifest, determinism,
resume after a kill, refusal of a different recipe, shards and their merge, exit codes."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from typer.testing import CliRunner

from histosynth.bundle.store import load_bundle
from histosynth.bundle.testing import tiny_bundle
from histosynth.cli.app import app
from histosynth.sampling.plan import Shard
from histosynth.sampling.runner import GenerateOptions, generate

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=3, tile_size=32)


def write_recipe(folder: Path, bundle: Path, **changes) -> Path:
    data = {"bundle": str(bundle), "seed": 3, "batch_size": 4, "balanced": {"per_class": 3},
            "sampler": {"name": "dpmpp2m", "steps": 4}}
    data.update(changes)
    path = folder / f"recipe-{abs(hash(json.dumps(changes, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def digests(folder: Path, pattern: str = "*/*.png") -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern))}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_generate_writes_imagefolder_manifest_and_metadata(tmp_path, bundle):
    names = load_bundle(bundle).class_names
    recipe = write_recipe(tmp_path, bundle, sampler={"name": "dpmpp2m", "steps": 4, "guidance": 2.0},
                          overrides={names[1]: {"steps": 3, "guidance": 1.0}})
    out = tmp_path / "out"
    result = invoke("generate", "--recipe", str(recipe), "--out", str(out), "--backend", "torch")
    assert result.exit_code == 0, result.output
    files = digests(out)
    assert sorted(files) == [f"{n}/{i:05d}.png" for n in names for i in range(3)]
    image = np.asarray(Image.open(out / names[0] / "00000.png"))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["path"] for r in rows] == sorted(files, key=lambda p: (names.index(p.split("/")[0]), p))
    assert {r["class_name"]: r["class_id"] for r in rows} == {n: str(i) for i, n in enumerate(names)}
    assert {(r["class_name"], r["steps"], r["guidance"]) for r in rows} == {
        (names[0], "4", "2.0"), (names[1], "3", "1.0"), (names[2], "4", "2.0")}
    assert all(r["backend"] == "torch" and r["device"] == "cpu" and len(r["bundle_hash"]) == 64 for r in rows)
    assert len({r["seed"] for r in rows}) == 9
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == names and classes["null_id"] == 3
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["resolved_counts"] == dict.fromkeys(names, 3)
    assert "tiles/s" in result.output


def test_same_command_gives_byte_identical_files_and_batch_size_does_not_matter(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle, sampler={"name": "ddpm", "steps": 6})
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(recipe, a, GenerateOptions(backend="torch"))
    generate(recipe, b, GenerateOptions(backend="torch"))
    assert digests(a) == digests(b)
    generate(recipe, c, GenerateOptions(backend="torch", batch_size=1))
    for rel in digests(a):
        x = np.asarray(Image.open(a / rel)).astype(int)
        y = np.asarray(Image.open(c / rel)).astype(int)
        assert np.abs(x - y).max() <= 1, rel  # same noise; only float summation order may differ


class Killed(Exception):
    pass


def test_kill_and_rerun_completes_the_set_without_duplicates(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle, batch_size=2)
    reference = tmp_path / "reference"
    generate(recipe, reference, GenerateOptions(backend="torch"))

    out = tmp_path / "out"

    def kill_after_two_batches(done: int, total: int) -> None:
        if done >= 4:
            raise Killed

    with pytest.raises(Killed):
        generate(recipe, out, GenerateOptions(backend="torch"), on_progress=kill_after_two_batches)
    assert len(digests(out)) == 4 and not (out / "manifest.csv").exists()
    # What a kill can leave besides: a temporary file mid-write and a torn journal line.
    first = sorted(out.glob("*/*.png"))[0]
    (first.parent / f".00002.png.tmp-main").write_bytes(b"\x89PNG torn")
    with open(out / ".histosynth" / "journal-main.jsonl", "a") as f:
        f.write('{"class_id": 0, "indi')
    result = generate(recipe, out, GenerateOptions(backend="torch"))
    assert sum(c.skipped for c in result.classes) == 4 and result.made == 5
    assert digests(out) == digests(reference)
    assert not list(out.rglob("*.tmp-*"))
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 9 and len({r["path"] for r in rows}) == 9
    # A third run has nothing left to do.
    assert generate(recipe, out, GenerateOptions(backend="torch")).made == 0


def test_different_recipe_into_used_folder_is_refused_without_overwrite(tmp_path, bundle):
    out = tmp_path / "out"
    first = write_recipe(tmp_path, bundle)
    assert invoke("generate", "--recipe", str(first), "--out", str(out)).exit_code == 0
    other = write_recipe(tmp_path, bundle, seed=99, balanced={"per_class": 1})
    result = invoke("generate", "--recipe", str(other), "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = invoke("generate", "--recipe", str(other), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(digests(out)) == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = invoke("generate", "--recipe", str(first), "--out", str(foreign))
    assert result.exit_code == 2 and "not empty" in result.output


def test_shards_union_equals_single_process_and_merge(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle, balanced={"per_class": 3})
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    generate(recipe, single, GenerateOptions(backend="torch"))
    for i in range(3):
        result = invoke("generate", "--recipe", str(recipe), "--out", str(sharded), "--shard", f"{i}/3",
                        "--backend", "torch")
        assert result.exit_code == 0, result.output
    assert digests(sharded) == digests(single)
    assert invoke("merge-shards", str(sharded)).exit_code == 0
    assert (sharded / "manifest.csv").read_text() == (single / "manifest.csv").read_text()
    # Shard manifests from before the autoguidance and interval columns (shards finished by an older histosynth)
    # still merge; a header with a column that was never optional does not.
    for shard_file, dropped in (("manifest.shard-0-of-3.csv",
                                 ("autoguidance", "guidance_interval", "autoguidance_interval")),
                                ("manifest.shard-1-of-3.csv", ("autoguidance_interval",))):
        old = sharded / shard_file
        with open(old, newline="") as f:
            rows = list(csv.reader(f))
        keep = [i for i, c in enumerate(rows[0]) if c not in dropped]
        with open(old, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([[r[i] for i in keep] for r in rows])
    assert invoke("merge-shards", str(sharded)).exit_code == 0
    assert (sharded / "manifest.csv").read_text() == (single / "manifest.csv").read_text()
    broken = sharded / "manifest.shard-2-of-3.csv"
    with open(broken, newline="") as f:
        rows = list(csv.reader(f))
    at = rows[0].index("seed")
    with open(broken, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([r[:at] + r[at + 1:] for r in rows])
    result = invoke("merge-shards", str(sharded))
    assert result.exit_code != 0 and "unexpected header" in result.output


def test_merge_refuses_incomplete_shards(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle)
    out = tmp_path / "out"
    generate(recipe, out, GenerateOptions(backend="torch", shard=Shard(0, 2)))
    result = invoke("merge-shards", str(out))
    assert result.exit_code == 1 and "rerun the missing shards" in result.output


def test_dry_run_writes_nothing(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle, split={"val_fraction": 0.34})
    out = tmp_path / "out"
    result = invoke("generate", "--recipe", str(recipe), "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.output and not out.exists()


def test_split_and_tiff_resolution(tmp_path, bundle):
    recipe = write_recipe(tmp_path, bundle, split={"val_fraction": 0.34}, output={"format": "tiff"})
    out = tmp_path / "out"
    generate(recipe, out, GenerateOptions(backend="torch"))
    names = load_bundle(bundle).class_names
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tif")) == sorted(
        [f"train/{n}/{i:05d}.tif" for n in names for i in range(2)] + [f"val/{n}/00002.tif" for n in names])
    mpp = load_bundle(bundle).manifest.microns_per_pixel
    with tifffile.TiffFile(out / "val" / names[0] / "00002.tif") as tif:
        page = tif.pages[0]
        x_res = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert abs(x_res[0] / x_res[1] - 1e4 / mpp) < 1e-3
        assert page.asarray().shape == (32, 32, 3)


def test_bad_input_exit_codes(tmp_path, bundle):
    names = load_bundle(bundle).class_names
    bad = write_recipe(tmp_path, bundle, balanced=None, counts={"nonsense": 2})
    result = invoke("generate", "--recipe", str(bad), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "recipe.counts.nonsense" in result.output and names[0] in result.output
    result = invoke("generate", "--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    good = write_recipe(tmp_path, bundle)
    result = invoke("generate", "--recipe", str(good), "--out", str(tmp_path / "o"), "--device", "cuda:0")
    assert result.exit_code == 2 and "CUDA" in result.output
    result = invoke("generate", "--recipe", str(good), "--out", str(tmp_path / "o"), "--shard", "3/2")
    assert result.exit_code == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("generate", "--recipe", str(good), "--out", str(blocker / "sub"))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output  # bad input (issue 10, item 7)


def test_autoguidance_with_a_guided_bundle_and_a_clear_refusal_without_one(tmp_path, bundle):
    guided_bundle = tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="guided", guide=True)
    b = load_bundle(guided_bundle)
    assert b.has_guide and not load_bundle(bundle).has_guide
    assert "guide_unet" not in json.loads((bundle / "manifest.json").read_text())  # old bundles keep their bytes
    assert {"guide_unet.onnx", "guide_unet.safetensors"} <= set(b.manifest.files)

    plain = write_recipe(tmp_path, guided_bundle)
    auto = write_recipe(tmp_path, guided_bundle, sampler={"name": "dpmpp2m", "steps": 4, "autoguidance": 2.0})
    out = {}
    for name, recipe, backend in (("plain", plain, "torch"), ("torch", auto, "torch"), ("onnx", auto, "onnx")):
        result = invoke("generate", "--recipe", str(recipe), "--out", str(tmp_path / name), "--backend", backend)
        assert result.exit_code == 0, result.output
        out[name] = {k: np.asarray(Image.open(tmp_path / name / k), dtype=np.int16)
                     for k in digests(tmp_path / name)}
    assert out["plain"].keys() == out["torch"].keys() == out["onnx"].keys()
    # The guide changes the images; torch and ONNX Runtime agree on them (to rounding of a few levels).
    assert any(np.abs(out["plain"][k] - out["torch"][k]).max() > 8 for k in out["plain"])
    assert max(np.abs(out["torch"][k] - out["onnx"][k]).max() for k in out["torch"]) <= 3
    with open(tmp_path / "torch" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["autoguidance"] for r in rows} == {"2.0"} and {r["guidance_interval"] for r in rows} == {""}

    # Both guidance kinds at once, or either at some noise levels only. dpmpp2m's 4 steps sit at noise levels 157,
    # 17.2, 3.4 and 0.95: an interval of (100, 200] acts at the first step only and changes the images; (0, 0.5]
    # acts at none, and the images are those without that term. The manifest says what was used.
    both = {"name": "dpmpp2m", "steps": 4, "autoguidance": 2.0, "guidance": 3.0}
    auto = {"name": "dpmpp2m", "steps": 4, "autoguidance": 2.0}
    for name, sampler in (("both", both), ("first", {**both, "guidance_interval": [100, 200]}),
                          ("none", {**both, "guidance_interval": [0, 0.5]}),
                          ("auto-first", {**auto, "autoguidance_interval": [100, 200]}),
                          ("auto-none", {**auto, "autoguidance_interval": [0, 0.5]})):
        result = invoke("generate", "--recipe", str(write_recipe(tmp_path, guided_bundle, sampler=sampler)),
                        "--out", str(tmp_path / name), "--backend", "torch")
        assert result.exit_code == 0, result.output
        out[name] = {k: np.asarray(Image.open(tmp_path / name / k), dtype=np.int16) for k in out["plain"]}
    for a, b in (("torch", "both"), ("torch", "first"), ("plain", "auto-first"), ("torch", "auto-first")):
        assert any(np.abs(out[a][k] - out[b][k]).max() > 8 for k in out["plain"]), (a, b)
    for a, b in (("none", "torch"), ("auto-none", "plain")):
        assert all(np.array_equal(out[a][k], out[b][k]) for k in out["plain"]), (a, b)
    columns = ("guidance", "autoguidance", "guidance_interval", "autoguidance_interval")
    for name, used in (("first", ("3.0", "2.0", "100-200", "")), ("auto-first", ("1.0", "2.0", "", "100-200"))):
        with open(tmp_path / name / "manifest.csv", newline="") as f:
            assert {tuple(r[c] for c in columns) for r in csv.DictReader(f)} == {used}, name

    # The same recipe against a bundle without a guide: refused before anything is written.
    refused = write_recipe(tmp_path, bundle, sampler={"name": "dpmpp2m", "steps": 4, "autoguidance": 2.0})
    result = invoke("generate", "--recipe", str(refused), "--out", str(tmp_path / "refused"))
    assert result.exit_code == 2
    assert "ships no guide network" in result.output and "allowed: 1 (off)" in result.output
    assert not (tmp_path / "refused").exists()
