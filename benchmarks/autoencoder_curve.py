"""Validation SSIM and PSNR of a VQ-GAN run against training samples, and how far the SSIM target is (issue 8.3).

    python benchmarks/autoencoder_curve.py RUN_DIR [--prior-samples N] [--target 0.80] [--fit-from 32000]
        [--json OUT.json] [--png OUT.png]

Reads the run's `metrics.jsonl` (the validation rows the training loop writes every `val_every` steps: monitoring
tiles, nothing is chosen from them) and its export's `samples_seen` and `step` (tiles per optimizer step over all
processes; `--prior-samples`: tiles seen by the runs this one continued from, 0 for a run from scratch).
Fits SSIM = a + b * log10(samples) to the points from `--fit-from` samples on and reports where that
line would cross `--target`: a rough extrapolation (curves flatten), printed as such, not a promise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.runtime.weights import read_checkpoint_metadata  # noqa: E402


def validation_curve(run_dir: Path, prior_samples: int = 0) -> list[dict]:
    """One row per validation: step, samples seen (over every round), and the logged validation metrics."""
    extra = read_checkpoint_metadata(run_dir / "vqgan.safetensors")[1]
    per_step = (extra["samples_seen"] - prior_samples) / max(extra["step"], 1)
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "val":
            rows.append({"step": rec["step"], "samples": int(prior_samples + rec["step"] * per_step),
                         **{k: rec[k] for k in ("ssim", "ms_ssim", "psnr", "l1") if k in rec}})
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation rows yet")
    return rows


def log_fit(rows: list[dict], key: str, fit_from: int) -> dict | None:
    """Least-squares a + b*log10(samples) over the rows from `fit_from` samples on (None with < 3 points)."""
    pts = [(r["samples"], r[key]) for r in rows if r["samples"] >= fit_from and key in r]
    if len(pts) < 3:
        return None
    x = np.log10([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    return {"a": float(a), "b_per_decade": float(b), "points": len(pts), "from_samples": fit_from}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--prior-samples", type=int, default=0, help="tiles seen before this run (init_from)")
    ap.add_argument("--target", type=float, default=0.80, help="SSIM target (issue 8.3: 0.80)")
    ap.add_argument("--fit-from", type=int, default=32000, help="fit the log-line to points from here on")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    rows = validation_curve(args.run_dir, args.prior_samples)
    fit = log_fit(rows, "ssim", args.fit_from)
    result: dict = {"run": str(args.run_dir), "rows": rows, "target_ssim": args.target, "ssim_log_fit": fit}
    if fit is not None and fit["b_per_decade"] > 0:
        crossing = 10 ** ((args.target - fit["a"]) / fit["b_per_decade"])
        result["ssim_target_at_samples_if_log_linear"] = float(crossing) if math.isfinite(crossing) else None
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        from histosynth.evaluate.plots import line_plot

        xs = [r["samples"] / 1000 for r in rows]
        series = {"val SSIM": (xs, [r["ssim"] for r in rows], None),
                  f"target {args.target:.2f}": ([xs[0], xs[-1]], [args.target, args.target], None)}
        if fit is not None:
            fx = [x for x in xs if x * 1000 >= fit["from_samples"]]
            series["log fit"] = (fx, [fit["a"] + fit["b_per_decade"] * math.log10(x * 1000) for x in fx], None)
        line_plot(series, args.png, title="VQ-GAN validation SSIM against training samples",
                  xlabel="training samples (thousands)", ylabel="SSIM (256 pcam/valid tiles)", log_x=True)


if __name__ == "__main__":
    main()
