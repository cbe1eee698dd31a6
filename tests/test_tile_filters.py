"""`tile --include/--exclude`: glob filters keep masks (and anything else) beside the images out of the tiles."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.configio import from_dict
from histosynth.errors import InputError
from histosynth.tiles.tiler import TileConfig, tile_sources, wanted


@pytest.fixture
def images_with_masks(pcam_tiles: list[Path], tmp_path: Path) -> Path:
    """Two real H&E tiles, each with a tissue mask beside it (`*_anno.png`), as annotated datasets ship them."""
    root = tmp_path / "dataset"
    (root / "case1").mkdir(parents=True)
    for i, tile in enumerate(pcam_tiles[:2]):
        shutil.copy(tile, root / "case1" / f"img{i}.jpg")
        mask = np.zeros((96, 96, 3), dtype=np.uint8)
        mask[20:70, 10:80] = (255, 0, 255)  # a saturated blob: tissue detection would keep it
        Image.fromarray(mask).save(root / "case1" / f"img{i}_anno.png")
    return root


def _sources(csv_path: Path) -> set[str]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return {Path(r["source"]).name for r in csv.DictReader(f)}


def test_wanted_matches_the_end_of_the_path() -> None:
    assert not wanted(Path("data/case1/img0_anno.png"), exclude=("*_anno.png",))
    assert wanted(Path("data/case1/img0.png"), exclude=("*_anno.png",))
    assert wanted(Path("a/slide.svs"), include=("*.svs", "*.tiff")) and not wanted(Path("a/x.png"), include=("*.svs",))
    assert not wanted(Path("d/masks/m.png"), exclude=("masks/*.png",)) and wanted(Path("d/img/m.png"), exclude=("masks/*",))
    assert not wanted(Path("a/b.svs"), include=("*.svs",), exclude=("b.*",))  # exclude wins


def test_masks_beside_images_are_tiled_without_the_filter_and_left_out_with_it(images_with_masks: Path,
                                                                               tmp_path: Path) -> None:
    base = dict(tile_size=48, min_tissue_fraction=0.1)
    unfiltered = tile_sources([images_with_masks], tmp_path / "all", TileConfig(**base), show_progress=False)
    assert any(s.source.name.endswith("_anno.png") and s.tiles_written for s in unfiltered.sources)  # the problem

    report = tile_sources([images_with_masks], tmp_path / "out", TileConfig(**base, exclude=("*_anno.png",)),
                          show_progress=False)
    assert report.left_out == 2 and report.tiles_written > 0
    assert _sources(tmp_path / "out" / "tiles.csv") == {"img0.jpg", "img1.jpg"}
    only = tile_sources([images_with_masks], tmp_path / "only", TileConfig(**base, include=("*.jpg",)),
                        show_progress=False)
    assert {s.source.name for s in only.sources} == {"img0.jpg", "img1.jpg"} and only.left_out == 2


def test_tile_command_filters_and_refuses_filters_that_leave_nothing(images_with_masks: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(images_with_masks), "--out", str(out), "--tile-size", "48",
                                 "--min-tissue", "0.1", "--exclude", "*_anno.png"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 files left out by --include/--exclude" in result.output
    assert _sources(out / "tiles.csv") == {"img0.jpg", "img1.jpg"}
    result = runner.invoke(app, ["tile", str(images_with_masks), "--out", str(tmp_path / "none"),
                                 "--include", "*.svs"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--include '*.svs' leave none of the 4 files found" in " ".join(result.output.split())
    assert not (tmp_path / "none").exists()


def test_filters_in_a_pipeline_config_and_their_validation() -> None:
    config = from_dict(TileConfig, {"exclude": ["*_anno.png", "masks/*"]}, "tile")
    assert config.exclude == ("*_anno.png", "masks/*") and config.include == ()
    with pytest.raises(InputError, match="tile.include: a pattern may not be empty"):
        from_dict(TileConfig, {"include": [" "]}, "tile")
