"""`histosynth tile`: cut slides and large images into tissue tiles with a tiles.csv index."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from histosynth.cli.common import console, err_console, handle_errors
from histosynth.errors import InputError, RunError
from histosynth.tiles.tiler import TileConfig, tile_sources


@handle_errors
def tile_command(
    sources: List[Path] = typer.Argument(..., help="Slides (SVS, pyramidal TIFF), images, or folders of them."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <source>/<tile> files and tiles.csv."),
    tile_size: int = typer.Option(128, "--tile-size", min=1, help="Tile side in pixels."),
    stride: Optional[int] = typer.Option(
        None, min=1, help="Step between tiles in output pixels (default: the tile size, no overlap)."
    ),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Target microns per pixel (e.g. 0.5)."),
    magnification: Optional[float] = typer.Option(None, "--magnification", help="Target magnification (e.g. 20)."),
    source_mpp: Optional[float] = typer.Option(
        None, "--source-mpp", help="Microns per pixel of sources without scale metadata (plain PNG/JPEG)."
    ),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Keep tiles with at least this tissue fraction."),
    tissue_method: str = typer.Option("saturation", "--tissue-method", help="saturation | od (optical density)."),
    format: str = typer.Option("png", "--format", help="png | jpeg"),
    overwrite: bool = typer.Option(False, help="Replace the tiles of an earlier run in --out."),
    include: List[str] = typer.Option([], "--include", help="Tile only files matching this glob, e.g. '*.svs' "
                                      "(repeatable; matches the end of the path)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Leave out files matching this glob, e.g. '*_anno.png' "
                                      "for masks beside images (repeatable)."),
) -> None:
    """Cut tissue tiles at a chosen scale; a source that cannot be read is reported and skipped."""
    if tissue_method not in ("saturation", "od"):
        raise InputError(f"--tissue-method: unknown value {tissue_method!r}; allowed: saturation, od")
    if format not in ("png", "jpeg"):
        raise InputError(f"--format: unknown value {format!r}; allowed: png, jpeg")
    if mpp is not None and magnification is not None:
        raise InputError("--mpp and --magnification: give one of them, not both")
    config = TileConfig(
        tile_size=tile_size,
        stride=stride,
        target_mpp=mpp,
        magnification=magnification,
        source_mpp=source_mpp,
        min_tissue_fraction=min_tissue,
        tissue_method=tissue_method,  # type: ignore[arg-type]
        format=format,  # type: ignore[arg-type]
        overwrite=overwrite,
        include=tuple(include),
        exclude=tuple(exclude),
    )
    report = tile_sources(sources, out, config)

    table = Table(title=f"tiles -> {report.out_dir}")
    # Kind of source (svs, tiff, image) goes with the name; reasons follow the table, full length.
    for column in ("source", "status", "level", "mpp", "tissue", "tiles", "rejected"):
        numeric = column != "source" and column != "status"
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "source")
    for s in report.sources:
        table.add_row(
            escape(s.source.name) + (f" [dim]({s.kind})[/]" if s.kind else ""),
            "[red]skipped[/]" if s.status == "skipped" else ("ok" if s.tiles_written else "[yellow]no tiles[/]"),
            "-" if s.level is None else str(s.level),
            f"{s.mpp:.4g}" if s.mpp else "-",
            f"{s.tissue_fraction:.0%}" if s.tissue_fraction is not None else "-",
            str(s.tiles_written),
            str(s.tiles_rejected),
        )
    console.print(table)
    for s in report.sources:
        if s.reason:
            err_console.print(f"[yellow]{s.status}[/] {escape(str(s.source))}: {escape(s.reason)}", highlight=False)
    console.print(f"{report.tiles_written} tiles written; index {report.csv_path}")
    if report.left_out:
        console.print(f"{report.left_out} files left out by --include/--exclude", highlight=False)
    if report.skipped:
        err_console.print(f"[yellow]warning:[/] {len(report.skipped)} of {len(report.sources)} sources skipped")
    if report.tiles_written == 0:
        raise RunError("no tiles written (see the table above); check the sources, --mpp or --min-tissue")


def register(app: typer.Typer) -> None:
    """Add `tile` to the root app."""
    app.command("tile")(tile_command)
