"""`generate` refuses bad input before it creates anything, names what differs in a used folder, and plans
in constant time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from histosynth.bundle.testing import tiny_bundle
from histosynth.cli.app import app
from histosynth.configio import from_dict
from histosynth.errors import InputError, RunError
from histosynth.sampling import backends
from histosynth.sampling.plan import Plan, Shard
from histosynth.sampling.recipe import Recipe
from histosynth.sampling.runner import GenerateOptions, generate, summarize_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), num_classes=2, tile_size=32)


def write_recipe(path: Path, bundle: Path, **changes: object) -> Path:
    data = {"bundle": str(bundle), "seed": 3, "batch_size": 4, "balanced": {"per_class": 2},
            "sampler": {"name": "dpmpp2m", "steps": 2}}
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


BAD_OPTIONS = [
    (["--backend", "tensorrt"], "--backend: unknown value 'tensorrt'; allowed: auto, onnx, torch"),
    (["--device", "gpu"], "--device: 'gpu' is not a device"),
    (["--dtype", "fp8"], "--dtype: unknown value 'fp8'; allowed: auto, fp32, fp16, bf16"),
    (["--backend", "onnx", "--dtype", "fp16"], "the ONNX backend runs fp32 only"),
    (["--backend", "torch", "--device", "cpu", "--dtype", "bf16"], "only supported on CUDA"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_bad_backend_device_dtype_leave_no_folder(tmp_path: Path, bundle: Path, options: list[str],
                                                 message: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", bundle)
    out = tmp_path / "new" / "out"
    for extra in ([], ["--dry-run"]):  # the plan checks them too
        result = runner.invoke(app, ["generate", "-r", str(recipe), "-o", str(out), *options, *extra])
        assert result.exit_code == 2, result.output
        assert message in flat(result.output)
        assert not (tmp_path / "new").exists()


def test_an_onnx_file_that_does_not_load_leaves_no_folder(tmp_path: Path, bundle: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(ort: object, path: object, providers: object) -> None:
        raise RunError(f"{path}: ONNX Runtime cannot load it: [ONNXRuntimeError] INVALID_GRAPH")

    monkeypatch.setattr(backends, "_session", refuse)
    recipe = write_recipe(tmp_path / "r.yaml", bundle)
    out = tmp_path / "out"
    with pytest.raises(RunError, match="cannot load"):
        generate(recipe, out, GenerateOptions(backend="onnx", device="cpu"))
    assert not out.exists()


@pytest.mark.parametrize("sub", ["", "sub/deeper"])
def test_out_through_an_existing_file_is_an_input_error(tmp_path: Path, bundle: Path, sub: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", bundle)
    blocker = tmp_path / "tiles.png"
    blocker.write_bytes(b"not a folder")
    out = blocker / sub if sub else blocker
    result = runner.invoke(app, ["generate", "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{blocker} is a file, not a folder" in flat(result.output) and "Errno" not in result.output
    assert blocker.read_bytes() == b"not a folder"


def test_any_command_reports_a_file_in_the_way_as_bad_input(tmp_path: Path) -> None:
    """The CLI's error handler turns ENOTDIR/EEXIST from a file in the way into exit 2 with a clear line."""
    import typer

    from histosynth.cli.common import handle_errors

    blocker = tmp_path / "report.md"
    blocker.write_text("x")
    mini = typer.Typer()

    @mini.command()
    @handle_errors
    def make(out: Path) -> None:
        (out / "plots").mkdir(parents=True, exist_ok=True)

    result = runner.invoke(mini, [str(blocker)])
    assert result.exit_code == 2
    assert f"{blocker} is a file where a folder is needed" in flat(result.output)
    result = runner.invoke(mini, [str(blocker / "x")])
    assert result.exit_code == 2 and f"{blocker} is a file" in flat(result.output)


def test_a_used_folder_refusal_names_the_settings_that_differ(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "out"
    generate(write_recipe(tmp_path / "a.yaml", bundle), out, GenerateOptions(backend="torch"))
    names = json.loads((out / "classes.json").read_text())["classes"]
    other = write_recipe(tmp_path / "b.yaml", bundle, seed=4, balanced={"per_class": 3},
                         sampler={"name": "ddim", "steps": 2})
    with pytest.raises(InputError) as info:
        generate(other, out, GenerateOptions(backend="torch"))
    message = str(info.value)
    assert "seed: 3 -> 4" in message
    assert f"classes.{names[0]['name']}.count: 2 -> 3" in message
    assert f"classes.{names[0]['name']}.sampler.name: dpmpp2m -> ddim" in message
    assert "--overwrite" in message


def test_dry_run_never_lists_the_images(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_listing(self: Plan, shard: Shard = Shard()) -> None:
        raise AssertionError("the dry run listed every image")

    recipe = write_recipe(tmp_path / "r.yaml", bundle, balanced={"total": 10**12}, split={"val_fraction": 0.1})
    monkeypatch.setattr(Plan, "items", no_listing)
    summary = summarize_plan(recipe, GenerateOptions(shard=Shard(1, 3)))
    assert summary.total == (2 * 10**12) // 3 - 10**12 // 3
    assert any(p.startswith("train/") for p in summary.layout) and any(p.startswith("val/") for p in summary.layout)


@pytest.mark.parametrize("counts", [{"a": 7, "b": 1, "c": 5}, {"a": 1, "b": 1, "c": 1}, {"b": 10}])
def test_shard_counts_match_the_listed_items(counts: dict[str, int]) -> None:
    recipe = from_dict(Recipe, {"bundle": "x", "counts": counts}, "recipe")
    plan = Plan(recipe, ["a", "b", "c"], "hash")
    for n in (1, 2, 3, 5, 13):
        for i in range(n):
            listed: dict[int, int] = {c.class_id: 0 for c in plan.classes}
            for item in plan.items(Shard(i, n)):
                listed[item.class_id] += 1
            assert plan.shard_counts(Shard(i, n)) == listed


def test_help_and_dry_run_show_the_split_layout(tmp_path: Path, bundle: Path) -> None:
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert "DIR/train/<class>/" in flat(result.output)
    recipe = write_recipe(tmp_path / "r.yaml", bundle, split={"val_fraction": 0.5})
    out = tmp_path / "o"
    result = runner.invoke(app, ["generate", "-r", str(recipe), "-o", str(out), "--dry-run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"{out}/train/" in flat(result.output) and f"{out}/val/" in flat(result.output)
    assert not out.exists()


def test_dry_run_shows_a_guidance_interval(tmp_path: Path, bundle: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", bundle,
                          sampler={"name": "dpmpp2m", "steps": 4, "guidance": 2.0, "guidance_interval": [0.5, 10]})
    result = runner.invoke(app, ["generate", "-r", str(recipe), "-o", str(tmp_path / "o"), "--dry-run"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "2 (noise 0.5-10)" in result.output


def test_dry_run_shows_an_autoguidance_interval(tmp_path: Path) -> None:
    guided = tiny_bundle(tmp_path / "guided", num_classes=2, tile_size=32, guide=True)
    recipe = write_recipe(tmp_path / "r.yaml", guided, sampler={"name": "dpmpp2m", "steps": 4, "autoguidance": 2.5,
                                                                "autoguidance_interval": [0.5, 1000]})
    result = runner.invoke(app, ["generate", "-r", str(recipe), "-o", str(tmp_path / "o"), "--dry-run"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "2.5 (noise 0.5-1000)" in result.output and not (tmp_path / "o").exists()
