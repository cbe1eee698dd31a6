"""`histosynth review sheets` (contact sheets, HTML, clusters.yaml) and `histosynth review apply` (label map).

Two commands under one `review` group: the expert runs `sheets`, edits clusters.yaml, then runs `apply`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from histosynth.cli.common import console, err_console, handle_errors
from histosynth.review.edits import review_apply
from histosynth.review.sheets import make_review_sheets

review_app = typer.Typer(help="Expert review of the clusters: contact sheets, then apply clusters.yaml edits.",
                         no_args_is_help=True)


@handle_errors
def sheets_command(
    clusters: Path = typer.Option(..., "--clusters", help="Output folder of `histosynth cluster`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for cluster_<id>.png, review.html, clusters.yaml."),
    tiles: Optional[Path] = typer.Option(None, "--tiles", help="Folder the tile keys are relative to "
                                         "(default: the one given to `histosynth cluster`)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Partial annotation CSV (file,label): "
                                          "suggest cluster names by majority vote."),
    n_centre: int = typer.Option(8, "--n-centre", min=0, help="Tiles nearest the cluster centre per sheet."),
    n_random: int = typer.Option(8, "--n-random", min=0, help="Randomly sampled tiles per sheet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sample."),
) -> None:
    """Write a contact sheet per cluster, one self-contained review.html and the clusters.yaml to edit."""
    summary = make_review_sheets(clusters, out, tiles_root=tiles, labels=labels, n_centre=n_centre,
                                 n_random=n_random, seed=seed)
    table = Table(title=f"clusters (K = {summary.k})")
    for column in ("cluster", "tiles", "suggestion"):
        table.add_column(column, justify="right" if column != "suggestion" else "left")
    for c in range(summary.k):
        table.add_row(str(c), str(summary.sizes.get(c, 0)), str(summary.suggestions.get(c, "")))
    console.print(table)
    if summary.missing_tiles:
        err_console.print(f"[yellow]warning:[/] {summary.missing_tiles} tiles could not be read "
                          "(grey placeholders); check --tiles", highlight=False)
    console.print(f"wrote {len(summary.files)} files to {out}; open {out / 'review.html'}, edit "
                  f"{out / 'clusters.yaml'}, then run `histosynth review apply`", highlight=False)


@handle_errors
def apply_command(
    edits: Path = typer.Argument(..., help="The edited clusters.yaml."),
    clusters: Path = typer.Option(..., "--clusters", help="Output folder of `histosynth cluster`."),
    out: Path = typer.Option(..., "--out", "-o", help="Label map YAML to write (per-tile CSV beside it)."),
    latents: Optional[Path] = typer.Option(None, "--latents", help="Latent cache for `by: kmeans` splits "
                                           "(default: the one given to `histosynth cluster`)."),
) -> None:
    """Check the edits (names, merges, moves, splits) and write the label map and per-tile labels."""
    label_map, tiles_csv = review_apply(edits, clusters, out, latents=latents)
    table = Table(title="classes")
    for column in ("id", "name", "clusters", "tiles", "label", "part"):
        table.add_column(column, justify="left" if column in ("name", "label") else "right")
    for c in label_map.classes:
        label = "" if c.label is None else c.label + (f" ({c.label_name})" if c.label_name else "")
        part = "" if c.subcluster is None else str(c.subcluster)
        table.add_row(str(c.id), c.name, ", ".join(map(str, c.clusters)), str(c.tiles), label, part)
    console.print(table)
    console.print(f"{label_map.excluded_tiles} tiles excluded; wrote {out} and {tiles_csv}", highlight=False)


review_app.command("sheets")(sheets_command)
review_app.command("apply")(apply_command)


def register(app: typer.Typer) -> None:
    """Add the `histosynth review` group to the root app."""
    app.add_typer(review_app, name="review")
