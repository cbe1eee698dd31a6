"""Cut slides and large images into tissue tiles on disk, with a `tiles.csv` index.

For each source: open it (`slides.open_slide`), choose the level for the target scale
(`slides.choose_level`), build a tissue map from a thumbnail (`tissue.detect_tissue`), then walk a grid of
tiles over that level, read only the tiles whose tissue fraction reaches the minimum, resample them to
`tile_size` if the level is finer than the target, and write them atomically. Only whole tiles are cut:
a partial tile at the right or bottom edge is dropped.

Layout of the output folder::

    out_dir/tiles.csv                       source, level, x, y, mpp, tissue_fraction, path
    out_dir/<source stem>/<stem>_x<X>_y<Y>.png    X, Y: level-0 pixel coordinates of the tile's top left

A source that cannot be read (not an image, corrupt, unknown scale for a scale target) is reported with
its reason and skipped; tiles already written for it are removed, so every source is all or nothing and
the run always reaches the end.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
from PIL import Image
from rich.progress import Progress

from histosynth.configio import require
from histosynth.errors import InputError
from histosynth.progress import progress_bar
from histosynth.imageops import encode_image
from histosynth.io import write_bytes, write_text
from histosynth.tiles.slides import Slide, choose_level, open_slide
from histosynth.tiles.tissue import TissueMethod, detect_tissue

CSV_NAME = "tiles.csv"
CSV_COLUMNS = ("source", "level", "x", "y", "mpp", "tissue_fraction", "path")

# The tissue mask gets about this many pixels across one tile: fractions in steps of ~1/256.
MASK_PIXELS_PER_TILE = 16
MAX_MASK_SIDE = 4096


@dataclass
class TileConfig:
    """How to cut tiles. Give `target_mpp` or `magnification` (or neither: native resolution of level 0)."""

    tile_size: int = 128  # output tile side in pixels
    stride: int | None = None  # step between tiles in output pixels; None = tile_size (no overlap)
    target_mpp: float | None = None  # microns per pixel of the output tiles
    magnification: float | None = None  # objective magnification of the output tiles, e.g. 20
    source_mpp: float | None = None  # scale to assume for sources without MPP metadata (plain images)
    min_tissue_fraction: float = 0.5  # keep tiles with at least this fraction of tissue
    tissue_method: TissueMethod = "saturation"  # signal thresholded by Otsu: HSV saturation or optical density
    format: Literal["png", "jpeg"] = "png"  # png is lossless; jpeg is ~5x smaller
    jpeg_quality: int = 95
    overwrite: bool = False  # replace an earlier run's tiles in out_dir (only the files its tiles.csv lists)
    include: tuple[str, ...] = ()  # glob patterns, e.g. "*.svs": tile only files whose path ends matching one
    exclude: tuple[str, ...] = ()  # glob patterns, e.g. "*_anno.png": leave out files matching any (masks)

    def validate(self, path: str = "tile") -> None:
        """Check ranges and the choice between mpp and magnification."""
        require(self.tile_size > 0, f"{path}.tile_size", f"must be a positive integer, got {self.tile_size}")
        require(
            self.stride is None or self.stride > 0, f"{path}.stride", f"must be a positive integer, got {self.stride}"
        )
        require(
            self.target_mpp is None or self.magnification is None,
            f"{path}.target_mpp",
            "give a target mpp or a magnification, not both",
        )
        for name in ("target_mpp", "magnification", "source_mpp"):
            value = getattr(self, name)
            ok = value is None or (value > 0 and math.isfinite(value))
            require(ok, f"{path}.{name}", f"must be positive, got {value}")
        require(
            0.0 <= self.min_tissue_fraction <= 1.0,
            f"{path}.min_tissue_fraction",
            f"must lie in [0, 1], got {self.min_tissue_fraction}",
        )
        require(1 <= self.jpeg_quality <= 100, f"{path}.jpeg_quality", f"must lie in [1, 100], got {self.jpeg_quality}")
        require(
            self.tissue_method in ("saturation", "od"),
            f"{path}.tissue_method",
            f"unknown value {self.tissue_method!r}; allowed: saturation, od",
        )
        require(self.format in ("png", "jpeg"), f"{path}.format", f"unknown value {self.format!r}; allowed: png, jpeg")
        for key in ("include", "exclude"):
            for pattern in getattr(self, key):
                require(bool(pattern.strip()), f"{path}.{key}", "a pattern may not be empty (e.g. '*_anno.png')")


@dataclass
class SourceReport:
    """What happened to one source."""

    source: Path
    status: Literal["tiled", "skipped"]
    reason: str = ""  # why it was skipped, or a note (e.g. "no tile reached 50% tissue")
    kind: str = ""  # svs, tiff, image
    level: int | None = None
    mpp: float | None = None  # scale of the written tiles
    tiles_written: int = 0
    tiles_rejected: int = 0  # grid positions below the minimum tissue fraction
    tissue_fraction: float | None = None  # of the whole source, from the thumbnail


@dataclass
class TileReport:
    """The outcome of `tile_sources`."""

    out_dir: Path
    csv_path: Path
    config: TileConfig
    sources: list[SourceReport] = field(default_factory=list)
    left_out: int = 0  # files under the given sources that --include/--exclude left out

    @property
    def tiles_written(self) -> int:
        """Tiles written over all sources."""
        return sum(s.tiles_written for s in self.sources)

    @property
    def skipped(self) -> list[SourceReport]:
        """Sources that could not be tiled."""
        return [s for s in self.sources if s.status == "skipped"]


def _expand(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders replaced by the files under them (sorted, hidden ones left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            out.append(p)
    return out


def wanted(path: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> bool:
    """Whether `path` passes the glob filters: matches an `include` pattern (if any) and no `exclude` pattern.

    Patterns match the end of the path (`pathlib`'s `match`): `*_anno.png` matches any such file name,
    `masks/*.png` the PNG files directly inside any folder named masks.
    """
    p = PurePath(path)
    if include and not any(p.match(pattern) for pattern in include):
        return False
    return not any(p.match(pattern) for pattern in exclude)


def _remove_previous(out_dir: Path, csv_path: Path) -> None:
    """Delete the tiles listed in an earlier run's tiles.csv (never anything else) and the csv itself."""
    root = out_dir.resolve()
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            tile = (out_dir / row.get("path", "")).resolve()
            if tile.is_file() and root in tile.parents:
                tile.unlink()
    csv_path.unlink()


def _tile_one(
    slide: Slide, config: TileConfig, folder: Path, out_dir: Path, progress: Progress, written: list[Path]
) -> tuple[SourceReport, list[dict]]:
    """Tile one opened slide into `folder`; appends each file it writes to `written`."""
    choice = choose_level(slide, config.target_mpp, config.magnification)
    level = slide.levels[choice.level]
    stride = config.stride or config.tile_size
    # Region read per tile and step between tiles, in pixels of the chosen level.
    read = max(1, round(config.tile_size * choice.resample))
    step = stride * choice.resample
    mpp = level.mpp * read / config.tile_size if level.mpp else None
    cols = 0 if read > level.width else math.floor((level.width - read) / step) + 1
    rows = 0 if read > level.height else math.floor((level.height - read) / step) + 1

    footprint = read * level.downsample  # tile side in level-0 pixels
    w0, h0 = slide.dimensions
    mask_ds = max(footprint / MASK_PIXELS_PER_TILE, max(w0, h0) / MAX_MASK_SIDE, 1.0)
    tissue = detect_tissue(*slide.thumbnail(mask_ds), method=config.tissue_method)

    report = SourceReport(
        slide.path, "tiled", kind=slide.kind, level=choice.level, mpp=mpp, tissue_fraction=tissue.tissue_fraction
    )
    rows_out: list[dict] = []
    task = progress.add_task(slide.path.name, total=rows * cols)
    ext = "png" if config.format == "png" else "jpg"
    stem = folder.name
    for r in range(rows):
        for c in range(cols):
            lx, ly = round(c * step), round(r * step)  # level pixels
            x0, y0 = round(lx * level.downsample), round(ly * level.downsample)  # level-0 pixels
            fraction = tissue.fraction(x0, y0, footprint, footprint)
            if fraction < config.min_tissue_fraction:
                report.tiles_rejected += 1
                progress.advance(task)
                continue
            region = slide.read_region(choice.level, lx, ly, read, read)
            if read != config.tile_size:
                region = np.asarray(
                    Image.fromarray(region).resize((config.tile_size, config.tile_size), Image.Resampling.LANCZOS)
                )
            path = folder / f"{stem}_x{x0}_y{y0}.{ext}"
            # zlib level 3: a slide gives thousands of tiles, so speed before the last percent of size
            write_bytes(path, encode_image(region, config.format, config.jpeg_quality, png_level=3))
            written.append(path)
            report.tiles_written += 1
            rows_out.append(
                {
                    "source": str(slide.path),
                    "level": choice.level,
                    "x": x0,
                    "y": y0,
                    "mpp": f"{mpp:.5g}" if mpp else "",
                    "tissue_fraction": f"{fraction:.4f}",
                    "path": path.relative_to(out_dir).as_posix(),
                }
            )
            progress.advance(task)
    progress.remove_task(task)
    if report.tiles_written == 0:
        report.reason = (
            "smaller than one tile at this scale"
            if rows * cols == 0
            else f"no tile reached {config.min_tissue_fraction:.0%} tissue"
        )
    return report, rows_out


def tile_sources(
    paths: list[str | Path], out_dir: str | Path, config: TileConfig, show_progress: bool = True
) -> TileReport:
    """Tile every source (files, or folders searched recursively) into `out_dir`; write `tiles.csv`.

    Bad sources are reported in the returned `TileReport` and skipped, never raised. Raises `InputError`
    only for a bad `config` or an `out_dir` that already holds tiles (unless ``config.overwrite``).
    """
    config.validate("tile")
    found = _expand(list(paths))
    if not found:
        raise InputError(f"sources: no files found in {', '.join(map(str, paths)) or 'an empty list'}")
    sources = [s for s in found if wanted(s, config.include, config.exclude)]
    if not sources:
        filters = " ".join([*(f"--include {p!r}" for p in config.include),
                            *(f"--exclude {p!r}" for p in config.exclude)])
        raise InputError(f"sources: {filters} leave none of the {len(found)} files found (e.g. {found[0]})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a folder")
    csv_path = out / CSV_NAME
    if csv_path.exists():
        if not config.overwrite:
            raise InputError(
                f"--out: {out} already holds {CSV_NAME} from an earlier run; pass --overwrite or use another folder"
            )
        _remove_previous(out, csv_path)
    out.mkdir(parents=True, exist_ok=True)

    report = TileReport(out, csv_path, config, left_out=len(found) - len(sources))
    rows: list[dict] = []
    used_names: set[str] = set()
    with progress_bar("tiles", disable=not show_progress) as progress:
        overall = progress.add_task("sources", total=len(sources), unit="sources")
        for source in sources:
            # One folder per source; a second source with the same stem gets a numbered folder.
            stem = source.stem or "source"
            name, n = stem, 1
            while name in used_names:
                n += 1
                name = f"{stem}-{n}"
            written: list[Path] = []
            folder = out / name
            try:
                with open_slide(source, config.source_mpp) as slide:
                    folder.mkdir(exist_ok=True)
                    used_names.add(name)
                    source_report, source_rows = _tile_one(slide, config, folder, out, progress, written)
                report.sources.append(source_report)
                rows.extend(source_rows)
            except Exception as e:  # noqa: BLE001 - one bad slide (any codec or format error) must not stop the run
                for path in written:
                    path.unlink(missing_ok=True)
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
                reason = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
                reason = reason.removeprefix(f"{source}: ")  # the report names the source already
                report.sources.append(SourceReport(source, "skipped", reason=reason))
            progress.advance(overall)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, buf.getvalue())
    return report
