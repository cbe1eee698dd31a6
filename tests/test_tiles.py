"""Tiling slides and images, tissue detection, tile datasets and `histosynth tile`, on real H&E data."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli import tile as tile_cli
from histosynth.errors import InputError
from histosynth.tiles.dataset import TileArray, TileFolder, open_tiles, random_dihedral
from histosynth.tiles.slides import choose_level, open_slide
from histosynth.tiles.tiler import TileConfig, tile_sources
from histosynth.tiles.tissue import TissueMap, otsu_threshold, saturation, tissue_mask


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    return shared_data / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def svs_pixels(svs: Path) -> np.ndarray:
    return tifffile.imread(svs)  # reference decode of level 0, for comparisons only


def _rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- slides ------------------------------------------------------------------------------------------------


def test_svs_metadata_and_lazy_regions(svs: Path, svs_pixels: np.ndarray) -> None:
    with open_slide(svs) as slide:
        assert slide.kind == "svs"
        assert [(lv.width, lv.height) for lv in slide.levels] == [(2220, 2967)]
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "aperio"
        assert slide.magnification == 20
        # Regions inside one 240-px TIFF tile, across tile borders, and at the ragged bottom-right edge.
        for x, y, w, h in [(0, 0, 17, 9), (230, 235, 300, 250), (2000, 2700, 220, 267), (1234, 987, 1, 1)]:
            np.testing.assert_array_equal(slide.read_region(0, x, y, w, h), svs_pixels[y : y + h, x : x + w])
        slide._cache.clear()
        thumb, sx, sy = slide.thumbnail(8.0)
        # The tissue map comes from Aperio's thumbnail page: not one level-0 tile was decoded for it.
        assert len(slide._cache) == 0
        assert sx == pytest.approx(2220 / thumb.shape[1]) and 7 < sx < 8.5 and 7 < sy < 8.5
        with pytest.raises(ValueError, match="outside"):
            slide.read_region(0, 2200, 0, 40, 10)


def test_choose_level_on_svs(svs: Path) -> None:
    with open_slide(svs) as slide:
        at_05 = choose_level(slide, target_mpp=0.5)  # 0.499 is within tolerance: no resampling
        assert (at_05.level, at_05.resample) == (0, 1.0)
        at_1 = choose_level(slide, target_mpp=1.0)
        assert at_1.level == 0 and at_1.resample == pytest.approx(1.0 / 0.499)
        at_10x = choose_level(slide, magnification=10)
        assert at_10x.resample == pytest.approx(2.0) and at_10x.mpp == pytest.approx(0.998)
        with pytest.raises(InputError, match="finer than"):
            choose_level(slide, target_mpp=0.25)
        with pytest.raises(InputError, match="not both"):
            choose_level(slide, target_mpp=1.0, magnification=10)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 3-level tiled pyramidal TIFF (SubIFDs) at 0.25 um/px declared by resolution tags in centimetres."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (512, 640, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    with tifffile.TiffWriter(path) as w:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        w.write(base, subifds=2, resolution=(40000, 40000), resolutionunit="CENTIMETER", **opts)
        w.write(base[::2, ::2], subfiletype=1, **opts)
        w.write(base[::4, ::4], subfiletype=1, **opts)
    return path, base


def test_pyramidal_tiff_levels(pyramid: tuple[Path, np.ndarray]) -> None:
    path, base = pyramid
    with open_slide(path) as slide:
        assert slide.kind == "tiff" and slide.mpp == pytest.approx(0.25) and slide.mpp_source == "tiff-resolution"
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert [lv.mpp for lv in slide.levels] == pytest.approx([0.25, 0.5, 1.0])
        np.testing.assert_array_equal(slide.read_region(1, 100, 60, 150, 140), base[::2, ::2][60:200, 100:250])
        # Nearest level at or finer than the target, then the remaining factor.
        assert (choose_level(slide, 1.0).level, choose_level(slide, 1.0).resample) == (2, 1.0)
        c = choose_level(slide, 0.75)
        assert (c.level, c.resample) == (1, pytest.approx(1.5))
        assert choose_level(slide, 4.0).level == 2 and choose_level(slide, 4.0).resample == pytest.approx(4.0)
        # Magnification without AppMag uses 10 / mpp: level 0 is "40x", so 10x is level 2.
        assert choose_level(slide, magnification=10).level == 2
        slide._cache.clear()
        slide.thumbnail(4.0)
        assert {level for level, _ in slide._cache} == {2}  # only the coarsest level was decoded


def test_screen_dpi_is_not_a_scale(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(InputError, match="--source-mpp"):
            choose_level(slide, target_mpp=0.5)
    with open_slide(path, assume_mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "assumed"


def test_transparent_image_areas_are_glass(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:20, 10:20] = (200, 50, 120, 255)
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    with open_slide(tmp_path / "cutout.png") as slide:
        region = slide.read_region(0, 0, 0, 40, 40)
    assert region[0, 0].tolist() == [255, 255, 255] and region[15, 15].tolist() == [200, 50, 120]


# -- tissue ------------------------------------------------------------------------------------------------


def test_otsu_finds_the_valley() -> None:
    rng = np.random.default_rng(1)
    low, high = rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 3000)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min() and 0.25 < t < 0.45  # in the middle of the empty valley


def test_tissue_mask_on_synthetic_and_real(shared_data: Path) -> None:
    image = np.full((100, 120, 3), 240, np.uint8)
    image[20:70, 30:90] = (200, 90, 160)  # an eosin-pink block on glass
    mask, _ = tissue_mask(image)
    truth = np.zeros((100, 120), bool)
    truth[20:70, 30:90] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95
    tmap = TissueMap(truth, 4.0, 4.0, 0.1, "saturation")
    assert tmap.fraction(120, 80, 240, 200) == pytest.approx(1.0)  # level-0 rect = mask rows 20:70, cols 30:90
    assert tmap.fraction(0, 0, 80, 80) == 0.0
    assert tmap.fraction(120 - 40, 80, 80, 80) == pytest.approx(0.5)

    # A crop with no glass at all: the clipped threshold keeps nearly all of it as tissue.
    full = np.asarray(Image.open(shared_data / "he-images" / "carcinoma_1000px.png").convert("RGB"))[::4, ::4]
    od_mask, _ = tissue_mask(full, method="od")
    assert tissue_mask(full)[0].mean() > 0.85 and od_mask.mean() > 0.85


# -- tiler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_tile_svs_at_mpp(svs: Path, svs_pixels: np.ndarray, tmp_path: Path, mpp: float) -> None:
    report = tile_sources([svs], tmp_path, TileConfig(tile_size=128, target_mpp=mpp), show_progress=False)
    (source,) = report.sources
    assert source.status == "tiled" and source.tiles_written > 0 and source.tiles_rejected > 0
    rows = _rows(tmp_path / "tiles.csv")
    assert len(rows) == source.tiles_written
    assert list(rows[0]) == ["source", "level", "x", "y", "mpp", "tissue_fraction", "path"]
    read = round(128 * mpp / 0.499)  # level-0 pixels per tile side
    assert float(rows[0]["mpp"]) == pytest.approx(0.499 * read / 128, rel=1e-3)
    grid = {(int(r["x"]), int(r["y"])) for r in rows}
    # 0.499 um/px counts as 0.5 (no resampling); for 1.0 the grid keeps the exact physical spacing of
    # 128 * 1.0 / 0.499 level-0 pixels, so positions are rounded multiples of it.
    step = 128.0 if mpp == 0.5 else 128 * mpp / 0.499
    assert all(round(round(v / step) * step) == v for xy in grid for v in xy)
    assert (0, 0) not in grid  # the top left corner is glass
    for r in rows:
        assert float(r["tissue_fraction"]) >= 0.5
        tile = np.asarray(Image.open(tmp_path / r["path"]))
        assert tile.shape == (128, 128, 3)
        x, y = int(r["x"]), int(r["y"])
        region = svs_pixels[y : y + read, x : x + read]
        if read == 128:
            np.testing.assert_array_equal(tile, region)  # PNG is lossless and no resampling happened
        else:
            expected = np.asarray(Image.fromarray(region).resize((128, 128), Image.Resampling.LANCZOS))
            np.testing.assert_array_equal(tile, expected)
    # Tissue only: written tiles are stained; the tiles rejected were mostly glass.
    sat = [saturation(np.asarray(Image.open(tmp_path / r["path"]))).mean() for r in rows]
    assert np.median(sat) > 0.2


def test_bad_sources_are_skipped_and_the_run_goes_on(svs: Path, shared_data: Path, tmp_path: Path) -> None:
    fake = tmp_path / "in" / "slide.svs"
    fake.parent.mkdir()
    fake.write_text("this is not a slide\n")
    # A real slide with one tissue tile's JPEG data destroyed: fails half-way through.
    broken = tmp_path / "in" / "broken.svs"
    shutil.copy(svs, broken)
    page = tifffile.TiffFile(svs).pages[0]
    index = 6 * 10 + 5
    with broken.open("r+b") as f:
        f.seek(page.dataoffsets[index])
        f.write(b"\0" * page.databytecounts[index])

    out = tmp_path / "out"
    config = TileConfig(tile_size=96, target_mpp=1.0, source_mpp=0.5, format="jpeg")
    report = tile_sources([fake, broken, shared_data / "he-images"], out, config, show_progress=False)
    by_name = {s.source.name: s for s in report.sources}
    assert by_name["slide.svs"].status == "skipped" and "not an image or slide" in by_name["slide.svs"].reason
    assert by_name["broken.svs"].status == "skipped" and "JPEG" in by_name["broken.svs"].reason.upper()
    assert not (out / "broken").exists()  # all or nothing: its tiles written before the failure are gone
    tiled = [s for s in report.sources if s.status == "tiled"]
    assert len(tiled) == 3 and all(s.tiles_written > 0 and s.mpp == pytest.approx(1.0) for s in tiled)
    rows = _rows(out / "tiles.csv")
    assert len(rows) == report.tiles_written == sum(s.tiles_written for s in tiled)
    assert all((out / r["path"]).suffix == ".jpg" and (out / r["path"]).is_file() for r in rows)
    assert not list(out.rglob("*.tmp"))

    # Without a scale for plain images, a target mpp skips them with a reason naming the option.
    he_images = shared_data / "he-images"
    report2 = tile_sources([he_images], tmp_path / "o2", TileConfig(target_mpp=1.0), show_progress=False)
    assert all(s.status == "skipped" and "--source-mpp" in s.reason for s in report2.sources)

    with pytest.raises(InputError, match="--overwrite"):
        tile_sources([shared_data / "he-images"], out, config, show_progress=False)
    config.overwrite = True
    config.tile_size = 128
    tile_sources([shared_data / "he-images" / "tissue_500x300.jpg"], out, config, show_progress=False)
    rows = _rows(out / "tiles.csv")
    assert rows and all(r["source"].endswith("tissue_500x300.jpg") for r in rows)
    # The earlier run's tiles are gone; only the new run's remain.
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.jpg")} == {r["path"] for r in rows}


def test_tile_config_validation() -> None:
    with pytest.raises(InputError, match="tile.min_tissue_fraction"):
        TileConfig(min_tissue_fraction=1.5).validate()
    with pytest.raises(InputError, match="not both"):
        TileConfig(target_mpp=0.5, magnification=20).validate()


# -- datasets ----------------------------------------------------------------------------------------------


@pytest.fixture()
def tile_folder(pcam_tiles: list[Path], tmp_path: Path) -> Path:
    """40 PCam tiles in two subfolders, a truncated JPEG, a text file named .jpg and a 128x112 tile."""
    root = tmp_path / "tiles"
    for i, p in enumerate(pcam_tiles[:40]):
        dest = root / ("a" if i % 2 else "b/c") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    data = pcam_tiles[40].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("not an image")
    big = Image.open(pcam_tiles[41]).convert("RGB").resize((128, 112))
    big.save(root / "a" / "wrong_size.png")
    return root


def test_tile_folder_policies(tile_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    with pytest.raises(InputError) as err:
        TileFolder(tile_folder, 96, cache=cache, show_progress=False)
    message = str(err.value)
    assert "wrong_size.png" in message and "128x112" in message and "crop" in message and "resize" in message

    ds = TileFolder(tile_folder, 96, "crop", cache=cache, show_progress=False)
    assert len(ds) == 41 and ds.report.found == 43 and ds.report.usable == 41
    assert ds.report.decoded == 0  # verdicts cached by the first (refused) scan
    assert ds.report.sizes == {(96, 96): 40, (128, 112): 1}
    reasons = dict((p.name, r) for p, r in ds.report.skipped)
    assert set(reasons) == {"truncated.jpg", "notes.jpg"} and "truncated" in reasons["truncated.jpg"]
    x = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 96, 96) and -1 <= x.min() and x.max() <= 1
    first = np.asarray(Image.open(ds.files[0]).convert("RGB"))
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), first / 127.5 - 1, atol=1e-6)
    wrong = ds.files.index(tile_folder / "a" / "wrong_size.png")
    big = np.asarray(Image.open(ds.files[wrong]))
    np.testing.assert_allclose(ds[wrong].permute(1, 2, 0).numpy(), big[8:104, 16:112] / 127.5 - 1, atol=1e-6)

    ds = TileFolder(tile_folder, 64, "resize", cache=cache, show_progress=False)
    assert len(ds) == 41 and ds[wrong].shape == (3, 64, 64) and "resized" in ds.report.summary()
    # A 64x64 tile cannot be cropped to 96: skipped and reported, not padded.
    Image.fromarray(big[:64, :64]).save(tile_folder / "small.png")
    ds = TileFolder(tile_folder, 96, "crop", cache=cache, show_progress=False)
    assert ds.report.decoded == 1 and "small.png" in {p.name for p, _ in ds.report.skipped}
    assert TileFolder(tile_folder, None, "crop", cache=False, show_progress=False).tile_size == 96
    with pytest.raises(InputError, match="size_policy"):
        TileFolder(tile_folder, 96, "pad", cache=False, show_progress=False)  # type: ignore[arg-type]


def test_tile_array(pcam_tiles: list[Path], tmp_path: Path) -> None:
    tiles = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pcam_tiles[:12]])
    path = tmp_path / "tiles.npy"
    np.save(path, tiles)
    ds = open_tiles(path)
    assert isinstance(ds, TileArray) and len(ds) == 12 and ds.tile_size == 96
    np.testing.assert_allclose(ds[3].permute(1, 2, 0).numpy(), tiles[3] / 127.5 - 1, atol=1e-6)
    assert len(pickle.dumps(ds)) < 4096  # workers reopen the memory map instead of copying it
    with pytest.raises(InputError, match="size_policy"):
        TileArray(path, 64)
    assert TileArray(path, 64, "crop")[0].shape == (3, 64, 64)
    np.save(tmp_path / "bad.npy", tiles.astype(np.float32))
    with pytest.raises(InputError, match="uint8"):
        open_tiles(tmp_path / "bad.npy")
    (tmp_path / "cut.npy").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.npy"):
        open_tiles(tmp_path / "cut.npy")
    with pytest.raises(InputError, match="not found"):
        open_tiles(tmp_path / "missing")


def test_random_dihedral_covers_the_group() -> None:
    x = torch.arange(16.0).reshape(1, 4, 4)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(random_dihedral(x, g).flatten().tolist()) for _ in range(200)}
    assert len(seen) == 8 and all(sorted(s) == list(range(16)) for s in seen)


# -- CLI ---------------------------------------------------------------------------------------------------


def test_tile_command_exit_codes(svs: Path, tmp_path: Path) -> None:
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # keeps `tile` a subcommand, as in the real app
        pass

    tile_cli.register(app)
    runner = CliRunner()
    fake = tmp_path / "fake.svs"
    fake.write_text("text")
    out = tmp_path / "out"

    result = runner.invoke(app, ["tile", str(svs), str(fake), "--out", str(out), "--mpp", "1.0", "--tile-size", "128"])
    assert result.exit_code == 0, result.output
    assert "CMU-1-Small-Region.svs" in result.output and "skipped" in result.output
    assert len(_rows(out / "tiles.csv")) > 0

    result = runner.invoke(app, ["tile", str(svs), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    both = ["--mpp", "1", "--magnification", "20"]
    result = runner.invoke(app, ["tile", str(svs), "--out", str(tmp_path / "o2"), *both])
    assert result.exit_code == 2
    result = runner.invoke(app, ["tile", str(fake), "--out", str(tmp_path / "o3")])
    assert result.exit_code == 1 and "no tiles written" in result.output
    result = runner.invoke(app, ["tile", str(svs), "--out", str(tmp_path / "o4"), "--format", "webp"])
    assert result.exit_code == 2 and "--format" in result.output
