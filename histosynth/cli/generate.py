"""`histosynth generate`: class-balanced synthetic tiles from a YAML recipe; `merge-shards` joins shard manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from histosynth.cli.common import console, handle_errors
from histosynth.progress import progress_bar
from histosynth.sampling.plan import Shard
from histosynth.sampling.runner import GenerateOptions, generate, merge_shards, summarize_plan


def _explain(value: bool) -> None:
    """`--explain`: every recipe key with its type, default and meaning, read from the recipe dataclasses."""
    if not value:
        return
    from histosynth.configio import describe_keys
    from histosynth.diffusion.samplers import SAMPLERS
    from histosynth.sampling.recipe import Recipe

    table = Table(title="recipe keys (exactly one of counts, balanced, proportions, top_up)")
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for key in describe_keys(Recipe):
        table.add_row(*(Text(cell) for cell in (key.path, key.type, key.default, key.meaning)))  # `[string]` is no markup
    console.print(table)
    samplers = Table(title="samplers (sampler.name)")
    samplers.add_column("name")
    samplers.add_column("what it is", overflow="fold")
    for info in SAMPLERS.values():
        samplers.add_row(Text(info.name), Text(info.summary))
    console.print(samplers)
    console.print("A commented example with every key: recipes/reference.yaml; details: docs/generate.md",
                  highlight=False)
    raise typer.Exit()


@handle_errors
def generate_command(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (see recipes/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (ImageFolder layout)."),
    backend: str = typer.Option("auto", help="auto | onnx | torch"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (CUDA is never silently replaced by CPU)."),
    dtype: str = typer.Option("auto", help="UNet precision on CUDA: auto | fp32 | fp16 | bf16."),
    shard: Optional[str] = typer.Option(None, help="Make only shard i of n (e.g. 0/4); merge with merge-shards."),
    bundle: Optional[Path] = typer.Option(None, help="Use this bundle instead of the recipe's."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per batch (does not change any image)."),
    overwrite: bool = typer.Option(False, help="Replace a different recipe's tiles in --out."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    explain: bool = typer.Option(False, "--explain", is_eager=True, callback=_explain, expose_value=False,
                                 help="Print every recipe key with its type, default and meaning, and exit."),
) -> None:
    """Generate synthetic tiles from a recipe into --out (ImageFolder layout): DIR/<class>/<index>.<ext>, or
    DIR/train/<class>/... and DIR/val/<class>/... when the recipe has a `split` (the shipped recipes/balanced.yaml
    does); plus manifest.csv. --dry-run shows the exact paths."""
    parsed_shard = Shard.parse(shard)
    options = GenerateOptions(backend=backend, device=device, dtype=dtype, shard=parsed_shard, overwrite=overwrite,
                              batch_size=batch_size, bundle=bundle)
    if dry_run:
        summary = summarize_plan(recipe, options)
        table = Table(title=f"plan: {recipe} -> {out}" + (f" (shard {shard})" if shard else ""))
        for column in ("id", "class", "tiles", "sampler", "steps", "guidance", "autoguidance", "train/val"):
            table.add_column(column)
        for r in summary.rows:
            interval = f" (noise {r['guidance_interval']})" if r["guidance_interval"] else ""  # guided steps only
            auto_interval = f" (noise {r['autoguidance_interval']})" if r["autoguidance_interval"] else ""
            table.add_row(str(r["class_id"]), r["name"], str(r["count"]), r["sampler"], str(r["steps"]),
                          f"{r['guidance']:g}{interval}", f"{r['autoguidance']:g}{auto_interval}",
                          f"{r['train']}/{r['val']}")
        console.print(table)
        console.print("files: " + ", ".join(str(out / p) for p in summary.layout), highlight=False, soft_wrap=True)
        b = summary.backend
        console.print(f"bundle {summary.bundle.path} ({summary.bundle.hash[:12]}), seed {summary.recipe.seed}, "
                      f"format {summary.recipe.output.format}, backend {b.backend} on {b.device}; "
                      f"{summary.total} tiles; nothing written", highlight=False, soft_wrap=True)
        return

    progress = progress_bar("tiles", console=console)
    task = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("generating", total=total)
        progress.update(task, completed=done)

    with progress:
        result = generate(recipe, out, options, on_progress=on_progress)

    table = Table(title=f"{out} ({result.backend} on {result.device})")
    for column in ("class", "planned", "made now", "already there"):
        table.add_column(column)
    for c in result.classes:
        table.add_row(c.name, str(c.planned), str(c.made), str(c.skipped))
    console.print(table)
    rate = result.made / result.seconds if result.seconds > 0 and result.made else 0.0
    console.print(f"{result.made} tiles in {result.seconds:.1f} s ({rate:.2f} tiles/s); manifest: {result.manifest}")


@handle_errors
def merge_shards_command(out: Path = typer.Argument(..., help="The folder the shards wrote into.")) -> None:
    """Merge the manifests of `generate --shard i/n` runs into one manifest.csv (checks nothing is missing)."""
    path, rows = merge_shards(out)
    console.print(f"{path}: {rows} images")


def register(app: typer.Typer) -> None:
    """Add `generate` and `merge-shards` to the root app."""
    app.command("generate")(generate_command)
    app.command("merge-shards")(merge_shards_command)
