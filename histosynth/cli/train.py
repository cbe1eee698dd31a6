"""`histosynth train ...`: one small command function per training stage, registered in `COMMANDS`.

Every command parses options, calls one library function and prints a short summary with rich (on rank 0
only when started by ``torchrun``). To add a stage, write ``<stage>_command`` here and append
``("<stage>", <stage>_command)`` to `COMMANDS` (kept in data-flow order: that is `--help`'s order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import typer
import yaml
from rich.table import Table

from histosynth.cli.common import console, handle_errors
from histosynth.configio import to_dict
from histosynth.runtime.checkpointing import latest_checkpoint, read_resume_header


def _rank0() -> bool:
    """True unless this process is a non-zero rank of a torchrun job (those print nothing)."""
    return os.environ.get("RANK", "0") == "0"


@handle_errors
def vqgan_command(
    config: Path = typer.Option(..., "--config", "-c", help="VQ-GAN training config YAML (see configs/vqgan-pcam.yaml)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: checkpoints, metrics.jsonl, samples, vqgan.safetensors."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from the newest checkpoint in --run-dir (--no-resume refuses a used folder)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Train up to this many steps (overrides the config)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (overrides the config)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and what would happen; train nothing."),
) -> None:
    """Train the VQ-GAN autoencoder (stage 1). Runs unchanged under `torchrun --nproc_per_node N`."""
    from histosynth.autoencoder.train import load_train_config, train_vqgan

    cfg = load_train_config(config, steps=steps, seed=seed, device=device)
    if dry_run:
        latest = latest_checkpoint(run_dir / "checkpoints")
        console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False), highlight=False)
        if latest is not None and resume:
            step = read_resume_header(latest)["state"]["step"]
            console.print(f"would resume {run_dir} from step {step} and train to step {cfg.steps}; nothing written")
        else:
            console.print(f"would train a new VQ-GAN in {run_dir} for {cfg.steps} steps; nothing written")
        return
    result = train_vqgan(cfg, run_dir, resume=resume)
    if not _rank0():
        return
    table = Table(title=f"VQ-GAN {result.run_dir} (step {result.step})")
    table.add_column("metric")
    table.add_column("held-out value")
    for name, value in result.val_metrics.items():
        table.add_row(name, f"{value:.4g}")
    console.print(table)
    start = f"resumed from step {result.resumed_from}; " if result.resumed_from is not None else ""
    console.print(
        f"{start}{result.train_tiles} training / {result.val_tiles} held-out tiles; "
        f"{result.seconds:.1f} s ({result.tiles_per_second:.1f} tiles/s); export: {result.export_path}"
    )


@handle_errors
def encode_command(
    vqgan: Path = typer.Option(..., "--vqgan", help="vqgan.safetensors, or the run folder of `train vqgan`."),
    data: Path = typer.Option(..., "--data", help="Folder of tiles (recursive) or an (N, H, W, 3) uint8 .npy."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder: latents.npy, index.csv, latents.json."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", min=1, help="Default: the VQ-GAN's training tile size."),
    size_policy: str = typer.Option("error", "--size-policy", help="Tiles of another size: error | crop | resize."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Tiles per encoder batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dihedral: bool = typer.Option(False, "--dihedral",
                                  help="Also encode the 7 other flips/rotations of every tile (8 rows per tile)."),
    views: Optional[str] = typer.Option(None, "--views", metavar="NAMES",
                                        help="Encode these views of every tile, comma-separated, identity among "
                                             "them: identity, rot90, rot180, rot270, flip, rot90+flip, "
                                             "rot180+flip, rot270+flip."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader worker processes."),
) -> None:
    """Encode tiles once with a trained VQ-GAN into a latent cache (resumable) for diffusion training."""
    from histosynth.autoencoder.latents import encode_tiles

    cache = encode_tiles(vqgan, data, out, tile_size=tile_size, size_policy=size_policy, batch_size=batch_size,
                         device=device, dihedral=dihedral, num_workers=num_workers,
                         view_names=views.split(",") if views is not None else None)
    console.print(
        f"{cache.directory}: {len(cache)} latents of shape {cache.shape} (float16); "
        f"mean {cache.meta['mean']:.4g}, std {cache.meta['std']:.4g}, latent_scale {cache.latent_scale:.4g}"
    )


def _diffusion_command(kind: str, config: Path, run_dir: Path, steps: Optional[int], seed: Optional[int],
                       device: Optional[str]) -> None:
    """Shared body of `train ldm` and `train cldm`: load the config, train, print a summary."""
    from dataclasses import replace

    from histosynth.configio import load
    from histosynth.diffusion.train import LDMTrainConfig, train_cldm, train_ldm

    cfg = load(LDMTrainConfig, config, root=kind)
    changes = {k: v for k, v in (("steps", steps), ("seed", seed), ("device", device)) if v is not None}
    if changes:
        cfg = replace(cfg, **changes)
        cfg.validate(kind)
    result = (train_ldm if kind == "ldm" else train_cldm)(cfg, run_dir)
    if _rank0():
        start = f"resumed from step {result.resumed_from}; " if result.resumed_from is not None else ""
        loss = f", loss {result.final_loss:.4g}" if result.final_loss == result.final_loss else ""  # nan: no step run
        console.print(f"{start}{kind} at step {result.steps}{loss}; EMA weights: {result.unet}", highlight=False)
        print_verdict(result.verdict)


def print_verdict(verdict: Optional[dict]) -> None:
    """Print the post-training sample check (diffusion.verdict) so that noise cannot go unnoticed."""
    if not verdict:
        return
    style = {"ok": "green", "poor": "yellow", "noise": "bold red", "unchecked": "yellow"}.get(verdict["level"], "")
    console.print(f"[{style}]sample check: {verdict['message']}[/]", highlight=False)
    if verdict["level"] == "noise":
        console.print("[bold red]WARNING: this model generates noise, not tissue. Train longer (docs/training.md, "
                      "'Minimum training for a usable model') before exporting or generating.[/]", highlight=False)


@handle_errors
def ldm_command(
    config: Path = typer.Option(..., "--config", "-c", help="LDM training config YAML (latents: the cache of `train encode`)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder (resumed if it holds checkpoints): unet.safetensors, metrics.jsonl, samples."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Train up to this many steps (overrides the config)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (overrides the config)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
) -> None:
    """Train the unconditional latent diffusion model on the cached latents. Runs under `torchrun`."""
    _diffusion_command("ldm", config, run_dir, steps, seed, device)


@handle_errors
def cldm_command(
    config: Path = typer.Option(..., "--config", "-c", help="cLDM config YAML: latents, labels (review apply's _tiles.csv), label_map, optional init_from."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder (resumed if it holds checkpoints): unet.safetensors for `histosynth export`."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Train up to this many steps (overrides the config)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (overrides the config)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
) -> None:
    """Train (or fine-tune from an LDM) the cluster-conditioned diffusion model, with label dropout for guidance."""
    _diffusion_command("cldm", config, run_dir, steps, seed, device)


@handle_errors
def latent_bank_command(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder whose UNet samples the latents (e.g. weights/pcam96)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bank folder: latents.npy (float16, VQ-GAN space) and bank.json."),
    count: int = typer.Option(4000, "--count", min=1, help="Latents to sample, classes in turn."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the noise (use another than your evaluations')."),
    sampler: str = typer.Option("dpmpp2m", "--sampler", help="Sampler name (see `histosynth generate --explain`)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Sampler steps."),
    guidance: float = typer.Option(1.0, "--guidance", min=0.0, help="Classifier-free guidance scale (1 = none)."),
    batch_size: int = typer.Option(50, "--batch-size", min=1, help="Latents per UNet batch."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bank in --out."),
) -> None:
    """Sample generated latents for a decoder GAN phase to adapt to (`adapt_latents` of `train vqgan`)."""
    from histosynth.progress import progress_bar
    from histosynth.sampling.latent_bank import BankSpec, sample_latent_bank

    spec = BankSpec(count=count, seed=seed, sampler=sampler, steps=steps, guidance=guidance, batch_size=batch_size)
    with progress_bar("latents") as progress:
        task = progress.add_task("sampling latents", total=count)
        path = sample_latent_bank(bundle, out, spec, device=device, overwrite=overwrite,
                                  on_progress=lambda done, total: progress.update(task, completed=done))
    console.print(f"{path}: {count} generated latents ({sampler}, {steps} steps, guidance {guidance}, seed {seed})",
                  highlight=False)


@handle_errors
def pipeline_command(
    config: Path = typer.Option(..., "--config", "-c", help="pipeline.yaml (see configs/pipeline-example.yaml)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: one NN-stage subfolder per stage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages, done/pending, outputs); write nothing."),
) -> None:
    """Run every stage in order (tile, vqgan, encode, ldm, cluster, review, cldm, export); rerun to resume."""
    from histosynth.pipeline.config import load_pipeline_config
    from histosynth.pipeline.run import run_pipeline

    cfg = load_pipeline_config(config)
    result = run_pipeline(cfg, run_dir, dry_run=dry_run, log=lambda m: console.print(f"[bold]{m}[/]"))
    table = Table(title=f"pipeline {run_dir}" + (" (dry run: nothing written)" if dry_run else ""))
    for column in ("stage", "folder", "status", "outputs", "note"):
        table.add_column(column)
    for row in result.plan:
        status = "done (now)" if row.name in result.ran else row.status
        table.add_row(row.name, row.folder.name, status, "\n".join(p.name for p in row.outputs), row.note)
    console.print(table)
    if result.stopped_at:
        console.print(f"[bold yellow]stopped at {result.stopped_at}:[/] {result.message}", highlight=False)
    elif not dry_run:
        console.print(f"done; bundle: {result.bundle}  (histosynth generate --recipe ... with bundle: {result.bundle})",
                      highlight=False)


# (name, command) in data-flow order; later stages append theirs here.
COMMANDS: list[tuple[str, Callable[..., None]]] = [
    ("vqgan", vqgan_command),
    ("encode", encode_command),
]
COMMANDS += [
    ("ldm", ldm_command),
    ("cldm", cldm_command),
    ("latent-bank", latent_bank_command),
    ("pipeline", pipeline_command),
]


def register(app: typer.Typer) -> None:
    """Add the `train` sub-command group with every command in `COMMANDS`."""
    train_app = typer.Typer(
        name="train",
        help="Train the model stage by stage on your own tiles (Rumman et al. 2025).",
        no_args_is_help=True,
    )
    for name, command in COMMANDS:
        train_app.command(name)(command)
    app.add_typer(train_app, name="train")
