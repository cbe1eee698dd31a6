"""`histosynth export`: training checkpoints + label map -> a verified model bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from histosynth.cli.common import console, handle_errors


@handle_errors
def export_command(
    vqgan: Path = typer.Option(..., "--vqgan", help="VQ-GAN checkpoint (.safetensors from `train vqgan`)."),
    unet: Path = typer.Option(..., "--unet", help="UNet checkpoint (.safetensors from `train ldm`/`train cldm`)."),
    labels: Path = typer.Option(..., "--labels", help="Label map YAML/JSON from `review apply` (docs/bundle.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    tile_size: Optional[int] = typer.Option(None, min=1, help="Tile size in pixels (default: from the checkpoints)."),
    mpp: Optional[float] = typer.Option(None, "--mpp",
                                        help="Microns per pixel (default: from the checkpoints, else 0.5)."),
    latent_scale: Optional[float] = typer.Option(None,
                                                 help="Diffusion latent scale (default: from the UNet checkpoint)."),
    data: Optional[str] = typer.Option(None, help="Training data description for the provenance."),
    tolerance: float = typer.Option(1e-3, help="Largest allowed |ONNX Runtime - torch| on the parity check."),
    overwrite: bool = typer.Option(False,
                                   help="Replace the bundle in --out (its own files only; other files stay)."),
    guide_unet: Optional[Path] = typer.Option(
        None, "--guide-unet", help="A weaker UNet checkpoint of the same latents and classes (an earlier or smaller "
                                   "one), shipped for autoguidance (docs/generate.md)."),
    unet_expert: Optional[list[Path]] = typer.Option(
        None, "--unet-expert", help="A noise-range expert (`train cldm` with t_min > 0), repeatable: it runs its "
                                    "noisier timesteps and --unet the ones below (docs/bundle.md)."),
) -> None:
    """Write a bundle (ONNX + safetensors + manifest) and check ONNX Runtime against torch."""
    from histosynth.bundle.export import export_from_checkpoints

    with console.status("exporting") as status:
        report = export_from_checkpoints(
            vqgan, unet, labels, out, tile_size=tile_size, microns_per_pixel=mpp, latent_scale=latent_scale,
            data=data, tolerance=tolerance, overwrite=overwrite,
            on_stage=lambda msg: status.update(f"export: {msg}"), guide_unet_ckpt=guide_unet,
            unet_expert_ckpts=unet_expert or (),
        )
    m = report.manifest
    table = Table(title=f"bundle {report.path}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for name, size in report.file_sizes.items():
        table.add_row(name, f"{size:,}", m.files.get(name, "")[:16])
    console.print(table)
    console.print(f"classes: {', '.join(m.class_names)} (null id {m.null_id}); tile {m.tile_size} px at "
                  f"{m.microns_per_pixel:g} um/px; latents {tuple(m.latent_shape)} x {m.latent_scale:.4g}")
    guide = "" if report.guide_max_abs_diff is None else f", guide unet {report.guide_max_abs_diff:.2e}"
    if report.experts_max_abs_diff is not None:
        guide += f", experts {report.experts_max_abs_diff:.2e}"
        console.print("noise ranges: " + ", ".join(f"t in [{a}, {b})" for a, b in m.expert_ranges)
                      + " (unet, then each expert)")
    console.print(f"ONNX Runtime vs torch, max |diff|: unet {report.unet_max_abs_diff:.2e}{guide}, decoder "
                  f"{report.decoder_max_abs_diff:.2e} (tolerance {report.tolerance:g}); {report.seconds:.1f} s")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("export")(export_command)
