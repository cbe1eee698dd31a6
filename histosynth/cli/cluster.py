"""`histosynth cluster`: cluster the cached latents for each K, score the partitions, choose K."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from histosynth.cli.common import console, handle_errors
from histosynth.clusters.feature_kinds import FEATURE_KINDS, FeatureConfig
from histosynth.clusters.imc import IMCConfig
from histosynth.clusters.methods import get_method, method_names
from histosynth.clusters.select import BALANCE, RULES, ClusterSearchConfig, run_cluster
from histosynth.clusters.validity import PAPER_INDICES
from histosynth.errors import InputError
from histosynth.io import check_writable


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
    method: str = typer.Option("imc", "--method", help=f"Whose partition is kept: {method_names()}."),
    compare_kmeans: bool = typer.Option(True, "--kmeans-baseline/--no-kmeans-baseline",
                                        help="With --method imc, also score k-means on the same features."),
    rule: str = typer.Option("majority", "--rule", help=f"How K is chosen: {', '.join(RULES)}."),
    seeds: str = typer.Option("0,1", "--seeds", help="IMC restarts per K (the lowest IM objective is kept)."),
    steps: int = typer.Option(1000, "--steps", help="IMC optimizer steps per head."),
    mu: float = typer.Option(4.0, "--mu", help="IMC weight of the marginal entropy H(Y): higher pushes towards "
                             "equal cluster sizes; 0 lets clusters empty."),
    max_points: int = typer.Option(2000, "--max-points", help="Subsample for the O(N^2) indices."),
    features: str = typer.Option("latent_features", "--features",
                                 help=f"What is clustered: {', '.join(FEATURE_KINDS)}."),
    unet: Optional[Path] = typer.Option(None, "--unet", help="UNet checkpoint for the unet feature kinds (`train "
                                        "ldm`/`cldm` output or a bundle's unet.safetensors)."),
    unet_t: int = typer.Option(100, "--unet-t", help="Training timestep the latents are noised to before the UNet "
                               "reads them."),
    device: str = typer.Option("cpu", "--device", help="Device of the UNet features: auto, cpu, cuda, cuda:N."),
    within_labels: Optional[Path] = typer.Option(None, "--within-labels", help="CSV of tile labels (a tile, key, "
                                                 "path or file column): cluster each label group separately."),
    label_column: str = typer.Option("label", "--label-column", help="The label column of --within-labels."),
) -> None:
    """Information-maximization clustering of the latents for each K from --k-min to --k-max; validity indices choose K."""
    get_method(method)  # an unknown --method is refused before anything is read
    if tiles is not None and not tiles.is_dir():
        raise InputError(f"--tiles: not a folder: {tiles}")
    if features not in FEATURE_KINDS:
        raise InputError(f"--features: unknown value {features!r}; allowed: {', '.join(FEATURE_KINDS)}")
    check_writable(out, "--out")  # a file in the way is bad input, found before any work
    feature_config = FeatureConfig(kind=features, unet=str(unet) if unet else None, t=unet_t, device=device)
    config = ClusterSearchConfig(k_min=k_min, k_max=k_max, method=method, compare_kmeans=compare_kmeans,
                                 seeds=_seeds(seeds), rule=rule, max_points=max_points,
                                 imc=IMCConfig(steps=steps, mu=mu), features=feature_config)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("clustering", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=what)

        summary = run_cluster(latents, out, config, index=index, on_progress=on_progress,
                              tiles_root=tiles.resolve() if tiles else None, within_labels=within_labels,
                              label_column=label_column)
    groups = summary.get("groups")
    for group in groups or [None]:
        rows = [r for r in summary["table"] if r.get("group") == group]
        k = groups[group]["k"] if groups else summary["k"]
        where = f"group {group}, " if groups else ""
        table = Table(title=f"validity ({where}{summary['method']}, chosen K = {k})")
        for column in ("method", "K", "CH", "C-index", "Dunn", "Hartigan", "McClain-Rao", "silhouette", "DB",
                       "min/max size", "size entropy"):
            table.add_column(column, justify="right")
        for row in rows:
            mark = "*" if row["method"] == summary["method"] and row["k"] == k else ""
            table.add_row(row["method"], f"{row['k']}{mark}",
                          *(f"{row[c]:.4g}" for c in (*PAPER_INDICES, "silhouette", "davies_bouldin", *BALANCE)))
        console.print(table)
        console.print(f"K = {k}: {groups[group]['rule'] if groups else summary['rule']}", highlight=False)
    for warning in summary["warnings"]:
        console.print(Text.assemble(("warning: ", "yellow"), warning))
    sizes = ", ".join(f"{c}: {n}" for c, n in summary["sizes"].items())
    console.print(f"{summary['num_tiles']} tiles; cluster sizes {sizes} (min/max "
                  f"{summary['balance']['size_ratio']:.2f}, size entropy {summary['balance']['size_entropy']:.2f}); "
                  f"outputs in {out}", highlight=False)
    if groups:
        console.print("groups: " + "; ".join(f"{g}: clusters {v['clusters'][0]}-{v['clusters'][-1]} "
                                             f"({v['tiles']} tiles)" for g, v in groups.items()), highlight=False)


def register(app: typer.Typer) -> None:
    """Add `histosynth cluster` to the root app."""
    app.command("cluster")(cluster_command)
