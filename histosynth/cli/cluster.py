"""`histosynth cluster`: cluster the cached latents for each K, score the partitions, choose K."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from histosynth.cli.common import console, handle_errors
from histosynth.clusters.imc import IMCConfig
from histosynth.clusters.select import RULES, ClusterSearchConfig, run_cluster
from histosynth.clusters.validity import PAPER_INDICES
from histosynth.errors import InputError


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise InputError("--seeds: give at least one seed")
    return seeds


@handle_errors
def cluster_command(
    latents: Path = typer.Option(..., "--latents", help="Latent cache folder (latents.npy + index.csv), or a "
                                 ".npy of latents (N,C,h,w) or features (N,D)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Tile keys, one per row: CSV (column tile, key, "
                                         "path or file) or JSON list; default: index.csv/.json beside the cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (assignments.csv, validity.*, cluster.json, head)."),
    tiles: Optional[Path] = typer.Option(None, "--tiles", help="Folder the tile keys are relative to; recorded "
                                         "for `histosynth review`."),
    k_min: int = typer.Option(2, "--k-min", help="Smallest K tried."),
    k_max: int = typer.Option(10, "--k-max", help="Largest K tried."),
    method: str = typer.Option("imc", "--method", help="imc | kmeans: whose partition is kept."),
    compare_kmeans: bool = typer.Option(True, "--kmeans-baseline/--no-kmeans-baseline",
                                        help="With --method imc, also score k-means on the same features."),
    rule: str = typer.Option("majority", "--rule", help=f"How K is chosen: {', '.join(RULES)}."),
    seeds: str = typer.Option("0,1", "--seeds", help="IMC restarts per K (the lowest IM objective is kept)."),
    steps: int = typer.Option(1000, "--steps", help="IMC optimizer steps per head."),
    max_points: int = typer.Option(2000, "--max-points", help="Subsample for the O(N^2) indices."),
) -> None:
    """Information-maximization clustering of the latents for each K from --k-min to --k-max; validity indices choose K."""
    if method not in ("imc", "kmeans"):
        raise InputError(f"--method: unknown value {method!r}; allowed: imc, kmeans")
    if tiles is not None and not tiles.is_dir():
        raise InputError(f"--tiles: not a folder: {tiles}")
    config = ClusterSearchConfig(k_min=k_min, k_max=k_max, method=method,  # type: ignore[arg-type]
                                 compare_kmeans=compare_kmeans, seeds=_seeds(seeds), rule=rule,
                                 max_points=max_points, imc=IMCConfig(steps=steps))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("clustering", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=what)

        summary = run_cluster(latents, out, config, index=index, on_progress=on_progress,
                              tiles_root=tiles.resolve() if tiles else None)
    table = Table(title=f"validity ({summary['method']}, chosen K = {summary['k']})")
    for column in ("method", "K", "CH", "C-index", "Dunn", "Hartigan", "McClain-Rao", "silhouette", "DB"):
        table.add_column(column, justify="right")
    for row in summary["table"]:
        mark = "*" if row["method"] == summary["method"] and row["k"] == summary["k"] else ""
        table.add_row(row["method"], f"{row['k']}{mark}",
                      *(f"{row[c]:.4g}" for c in (*PAPER_INDICES, "silhouette", "davies_bouldin")))
    console.print(table)
    console.print(f"K = {summary['k']}: {summary['rule']}", highlight=False)
    sizes = ", ".join(f"{c}: {n}" for c, n in summary["sizes"].items())
    console.print(f"{summary['num_tiles']} tiles; cluster sizes {sizes}; outputs in {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `histosynth cluster` to the root app."""
    app.command("cluster")(cluster_command)
