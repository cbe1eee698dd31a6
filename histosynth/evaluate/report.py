"""One Markdown report from the JSON results of `histosynth evaluate ...`, sample grids and plots.

``build_report(out_dir, results=[...json...], samples=DIR, run_dir=RUN)`` writes ``out_dir/report.md`` and
its PNGs beside it:

- each result file becomes a section chosen by its ``metric`` key (``fid``, ``recon``, ``control``,
  ``downstream``, ``memorization``; a list of ``{sampler, steps, fid, ...}`` records, as the sampler
  benchmarks print, becomes a quality-against-steps table and plot);
- ``samples`` (a `generate` output folder) gives one grid of tiles per class;
- ``run_dir`` (a training run folder) contributes its cluster-validity plots (``*validity*.png``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histosynth.errors import InputError
from histosynth.evaluate.features import read_rgb
from histosynth.evaluate.plots import confusion_plot, image_grid, line_plot
from histosynth.sampling.recipe import interval_text


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fid_section(d: dict[str, Any]) -> list[str]:
    out = ["## Realism and diversity (FID, KID, precision/recall, density/coverage)", ""]
    out += _table(
        ["N real", "N fake", "FID", "KID (x1e3)", "precision", "recall", "density", "coverage"],
        [[d["n_real"], d["n_fake"], d["fid"], f"{d['kid']['mean'] * 1e3:.3g} +- {d['kid']['std'] * 1e3:.2g}",
          d["precision"], d["recall"], d["density"], d["coverage"]]],
    )
    out += [f"> warning: {w}" for w in d.get("warnings", [])]
    return out + [""]


def _recon_section(d: dict[str, Any]) -> list[str]:
    out = ["## VQ-GAN reconstruction (paired metrics)", ""]
    rows = [[name.upper().replace("_", "-"), d[name]["mean"], d[name]["std"], d[name]["n"]] for name in ("ssim", "ms_ssim", "psnr", "mse")]
    out += _table(["metric", "mean", "std", "n"], rows)
    return out + [f"MS-SSIM used {d['ms_ssim_scales']} scales; PSNR in dB with data range 2 ([-1, 1] images).", ""]


def _control_section(d: dict[str, Any], out_dir: Path, tag: str) -> list[str]:
    png = confusion_plot(np.asarray(d["confusion"]), d["rows"], d["columns"], out_dir / f"confusion-{tag}.png",
                         title=f"controllability ({d['assigner']})")
    out = [f"## Controllability ({d['assigner']} assigner): overall accuracy {_f(d['accuracy'], 3)}", ""]
    out += _table(["class", "expected", "correct / n", "accuracy"],
                  [[k, v["expected"], f"{v['correct']} / {v['n']}", v["accuracy"]] for k, v in d["per_class"].items()])
    from histosynth.evaluate.control import real_holdout_line

    if (line := real_holdout_line(d)) is not None:
        out += [line, ""]
    out += [f"- warning: {w}" for w in d.get("warnings", [])] + ([""] if d.get("warnings") else [])
    return out + [f"![confusion matrix]({png.name})", ""]


def _downstream_section(d: dict[str, Any], out_dir: Path, tag: str) -> list[str]:
    from histosynth.evaluate.downstream import downstream_markdown, plot_downstream

    png = plot_downstream(d, out_dir / f"downstream-{tag}.png") if d["results"] else None
    return downstream_markdown(d, png.name if png else None)


def _memorization_section(d: dict[str, Any], out_dir: Path, tag: str) -> list[str]:
    from histosynth.errors import RunError
    from histosynth.evaluate.memorization import contact_sheet

    out = ["## Memorization: copies of training tiles", ""]
    out += _table(["generated", "training", "reference", "threshold", "SSIM bar", "below threshold", "flagged",
                   "alpha-precision", "beta-recall", "authenticity"],
                  [[d["n"], d["n_train"], f"{d['n_reference']} ({d['reference_source']})", d["threshold"],
                    d["ssim_threshold"], f"{d['n_below_threshold']} ({d['fraction_below_threshold']:.2%})",
                    f"{len(d['flagged'])} ({d['fraction_flagged']:.2%})", d["alpha_precision"], d["beta_recall"],
                    d["authenticity"]]])
    out += [f"A generated tile is flagged when it is closer to a training tile than percentile {d['percentile']:g} "
            f"of the reference tiles' distances and its SSIM reaches percentile {d['ssim_percentile']:g} of the "
            f"SSIMs of the {d['n_reference_near']} nearest reference tiles; {d['n_flat']} near-flat generated tiles "
            "are left out.", ""]
    if d["flagged"]:
        out += _table(["generated", "nearest training tile", "view", "distance", "SSIM"],
                      [[Path(m["file"]).name, Path(m["nearest"]).name, m["view"], m["distance"], m["ssim"]]
                       for m in d["flagged"][:20]])
    if d.get("closest"):
        try:
            png = contact_sheet(d["closest"], out_dir / f"memorization-{tag}.png")
            out += ["Closest pairs (generated left, in the matching view; training right; framed red: flagged):", "",
                    f"![closest pairs]({png.name})", ""]
        except RunError as e:  # the tiles moved or were deleted since the audit
            out += [f"> the closest pairs could not be drawn: {e}", ""]
    out += [f"> warning: {w}" for w in d.get("warnings", [])]
    return out + [""]


def _sweep_section(records: list[dict[str, Any]], out_dir: Path, tag: str) -> list[str]:
    out = ["## Quality against sampler steps", ""]
    # KID comes as a {mean, std} dict from `evaluate fid` and as flat kid_mean/kid_std from the benchmarks.
    records = [{**r, "kid": r["kid"].get("mean")} if isinstance(r.get("kid"), dict) else
               ({**r, "kid": r["kid_mean"]} if "kid_mean" in r else r) for r in records]
    # An interval is shown in its scale's cell: "2 @0.5-10" (that guidance at those noise levels only).
    for key in ("guidance", "autoguidance"):
        records = [{**r, key: f"{r[key]:g} @{interval_text(r[f'{key}_interval'])}"}
                   if r.get(f"{key}_interval") and isinstance(r.get(key), (int, float)) else r for r in records]
    keys = [k for k in ("sampler", "steps", "guidance", "autoguidance", "fid", "kid", "seconds", "seconds_per_image")
            if any(k in r for r in records)]
    out += _table(keys, [[r.get(k) for k in keys] for r in records])
    series: dict[str, tuple[list[float], list[float], None]] = {}
    for r in sorted(records, key=lambda r: r.get("steps", 0)):
        if r.get("fid") is not None and "steps" in r:  # timing-only records (--no-fid) have no FID to plot
            # One line per sampler and guidance (or autoguidance) scale.
            name = str(r.get("sampler", "?"))
            if r.get("guidance") not in (None, 1.0):
                g = r["guidance"]
                name += f" (guidance {g:g})" if isinstance(g, (int, float)) else f" (guidance {g})"
            if r.get("autoguidance") not in (None, 1.0):
                a = r["autoguidance"]
                name += f" (autoguidance {a:g})" if isinstance(a, (int, float)) else f" (autoguidance {a})"
            xs, ys, _ = series.setdefault(name, ([], [], None))
            xs.append(r["steps"])
            ys.append(r["fid"])
    if series:
        png = line_plot(series, out_dir / f"sweep-{tag}.png", title="FID against sampler steps", xlabel="steps", ylabel="FID", log_x=True)
        out += [f"![FID against steps]({png.name})", ""]
    return out


def _samples_section(samples: Path, out_dir: Path, per_class: int) -> list[str]:
    from histosynth.evaluate.control import generated_tiles

    files, names, _ = generated_tiles(samples)
    out = ["## Samples per class", ""]
    for name in dict.fromkeys(names):
        picks = [f for f, n in zip(files, names) if n == name][:per_class]
        grid = image_grid([read_rgb(p) for p in picks], columns=8)
        path = out_dir / f"samples-{name}.png"
        grid.save(path)
        out += [f"### {name}", "", f"![{name}]({path.name})", ""]
    return out


def build_report(
    out_dir: str | Path,
    *,
    results: Sequence[str | Path] = (),
    samples: str | Path | None = None,
    run_dir: str | Path | None = None,
    per_class: int = 16,
    title: str = "histosynth evaluation",
) -> Path:
    """Write ``out_dir/report.md`` (and its PNGs) and return its path."""
    if not results and samples is None and run_dir is None:
        raise InputError("report: give at least one of --results, --samples, --run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    for i, path in enumerate(results):
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"--results: {p}: file not found") from None
        except json.JSONDecodeError as e:
            raise InputError(f"--results: {p}: not valid JSON: {e}") from None
        tag = f"{i}"
        lines += [f"<!-- from {p} -->"]
        if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            lines += _sweep_section(data, out, tag)
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list) and "metric" not in data:
            lines += _sweep_section(data["results"], out, tag)  # a benchmark's whole stdout object
            continue
        metric = data.get("metric") if isinstance(data, dict) else None
        if metric == "fid":
            lines += _fid_section(data)
        elif metric == "recon":
            lines += _recon_section(data)
        elif metric == "control":
            if "assigners" in data:  # both assigners of one `evaluate control` call
                for d in data["assigners"]:
                    lines += _control_section(d, out, f"{tag}-{d['assigner']}")
            else:
                lines += _control_section(data, out, tag)
        elif metric == "downstream":
            lines += _downstream_section(data, out, tag)
        elif metric == "budget":
            from histosynth.evaluate.budget import budget_markdown

            lines += ["## Error budget", ""] + budget_markdown(data) + [""]
        elif metric == "memorization":
            lines += _memorization_section(data, out, tag)
        else:
            raise InputError(f"--results: {p}: unknown result (key 'metric' is {metric!r}; allowed: fid, recon, budget, control, downstream, memorization, or a list of sweep records)")
    if samples is not None:
        lines += _samples_section(Path(samples), out, per_class)
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise InputError(f"--run: {run}: not a folder")
        plots = sorted(run.rglob("*validity*.png"))
        if plots:
            lines += ["## Cluster validity against K", ""]
            for j, png in enumerate(plots):
                target = out / f"validity-{j}.png"
                shutil.copyfile(png, target)
                lines += [f"![{png.relative_to(run)}]({target.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
