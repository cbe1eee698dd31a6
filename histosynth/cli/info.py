"""`histosynth info`: what a bundle holds and whether its files are intact; versions, devices, ORT providers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from histosynth.cli.common import console, handle_errors


@handle_errors
def info_command(
    bundle: Optional[Path] = typer.Argument(None, help="A bundle folder to describe and verify."),
) -> None:
    """Describe a bundle (hashes checked) and this machine: versions, devices, active ONNX Runtime providers."""
    from histosynth.bundle.store import inspect_bundle
    from histosynth.sampling.backends import environment_info

    failed = False
    if bundle is not None:
        report = inspect_bundle(bundle)
        m = report.manifest
        summary = Table(title=f"bundle {bundle}", show_header=False)
        summary.add_column("key", style="bold")
        summary.add_column("value")
        summary.add_row("hash", report.hash)
        summary.add_row("format version", str(m.format_version))
        summary.add_row("tile size", f"{m.tile_size} px")
        summary.add_row("microns per pixel", f"{m.microns_per_pixel:g}")
        summary.add_row("latents", f"{tuple(m.latent_shape)}, scale {m.latent_scale:.4g}")
        summary.add_row("schedule", f"{m.schedule.kind}, T={m.schedule.num_train_steps}, {m.prediction}-prediction")
        summary.add_row("null id", str(m.null_id))
        guide = m.provenance.extra.get("guide_unet") or {}
        summary.add_row("autoguidance", "no guide network (recipes: autoguidance 1)" if not m.has_guide else
                        f"guide UNet, base {m.guide_unet.get('base_channels', '?')} channels"
                        + (f", {guide['samples_seen']:,} latents seen" if "samples_seen" in guide else "")
                        + " (recipes: autoguidance > 1)")
        if m.unet_experts:
            summary.add_row("noise-range experts", ", ".join(
                f"t in [{a}, {b}): {'unet' if k == 0 else f'unet_t{a}'}" for k, (a, b) in enumerate(m.expert_ranges)))
        p = m.provenance
        summary.add_row("provenance", f"data: {p.data or '-'}; steps: {p.steps or '-'}; date: {p.date or '-'}")
        console.print(summary)
        classes = Table(title="classes")
        classes.add_column("id", justify="right")
        classes.add_column("name")
        for c in m.classes:
            classes.add_row(str(c.id), c.name)
        console.print(classes)
        files = Table(title="files")
        files.add_column("file")
        files.add_column("sha256")
        files.add_column("check")
        for c in report.files:
            verdict = "[green]OK[/]" if c.ok else f"[bold red]FAILED ({c.status})[/]"
            files.add_row(c.name, c.expected[:16], verdict)
        console.print(files)
        failed = not report.ok

    env = environment_info()
    table = Table(title="environment", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, value)
    console.print(table)
    if failed:
        # The table shows which files; the exit code lets scripts refuse a damaged bundle.
        console.print(f"[bold red]bundle {bundle}: some files are missing or do not match their sha256[/]")
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("info")(info_command)
