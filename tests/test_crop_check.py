"""benchmarks/crop_check.py runs its three arms end to end on real PCam tiles with a tiny network."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crop_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_crop_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def tiles(tmp_path: Path, pcam_tiles: list[Path], copy_tiles) -> Path:
    return copy_tiles(pcam_tiles[:24], tmp_path / "tiles")


def test_crop_check_tiny(tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = _load()
    out = tmp_path / "eval" / "crop_check.json"
    rc = check.main(["--tiny", "--data", str(tiles), "--steps", "3", "--val-tiles", "4", "--batch", "8",
                     "--out", str(out), "--markdown", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert json.loads(out.read_text()) == result
    assert result["tiles"] == 24 and result["steps"] == 3 and result["gan"] is False
    assert result["model_is_shipped"] is False  # --tiny
    assert result["eval_steps"] == [0, 1, 2, 3]

    arms = {a["name"]: a for a in result["arms"]}
    assert list(arms) == ["crops", "whole", "whole-b2"]
    assert (arms["crops"]["crop"], arms["whole"]["crop"], arms["whole-b2"]["crop"]) == (48, None, None)
    assert (arms["crops"]["batch"], arms["whole"]["batch"], arms["whole-b2"]["batch"]) == (8, 8, 2)
    # Equal samples for crops vs whole; equal pixels per step for crops vs whole-b2.
    assert arms["crops"]["samples"] == arms["whole"]["samples"] == 24
    assert arms["crops"]["pixels_per_step"] == arms["whole-b2"]["pixels_per_step"] == 2 * 96 * 96
    for arm in arms.values():
        assert arm["train_tiles"] == 20 and arm["val_tiles"] == 4
        assert arm["train_seconds"] > 0 and arm["samples_per_s"] > 0
        assert [p["step"] for p in arm["curve"]] == [0, 1, 2, 3]
        for point in arm["curve"]:
            for key in ("l1", "psnr", "ssim", "ms_ssim", "perplexity", "codebook_usage"):
                assert math.isfinite(point[key]), (arm["name"], point)
        assert arm["curve"][-1]["l1"] != arm["curve"][0]["l1"]  # it trained
    # Same init and same held-out tiles: identical step-0 validation; the arms then diverge.
    assert len({a["init_checksum"] for a in arms.values()}) == 1
    assert len({a["val_tiles_sha1"] for a in arms.values()}) == 1
    assert len({json.dumps(a["curve"][0]) for a in arms.values()}) == 1
    assert len({a["curve"][-1]["l1"] for a in arms.values()}) == 3
    assert set(result["comparison"]) == {"crops_minus_whole", "crops_minus_whole-b2"}
    assert "| whole-b2 | 3 | 6 |" in captured.err  # the curve table


def test_crop_check_bad_input(tiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = _load()
    # 3 crops of 48 px are 3/4 of a 96-px tile: no whole-tile batch has equal pixels.
    assert check.main(["--tiny", "--data", str(tiles), "--steps", "1", "--batch", "3", "--val-tiles", "4"]) == 2
    assert "--batch 3" in capsys.readouterr().err
    assert check.main(["--tiny", "--data", str(tiles), "--steps", "1", "--val-tiles", "24"]) == 2
    assert "--val-tiles 24" in capsys.readouterr().err
