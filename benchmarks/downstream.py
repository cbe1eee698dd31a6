"""The downstream protocol of issue 9 on PCam: does a folder of synthetic tiles help a classifier?

    python benchmarks/downstream.py --synthetic gen/ --out results/downstream              # labels from the bundle
    python benchmarks/downstream.py --synthetic gen/ --class-map map.yaml --out results/downstream

Real labelled training tiles are PCam's training tiles (`pcam/train`, `train_labels.csv`), test tiles a fixed
stratified 1,000 of `pcam/valid` (`valid_labels.csv`), both from `../shared/data` (or `--data`). The default
protocol is `evaluate downstream`'s: 100, 300 and 1,000 real tiles, each alone and with 1x and 4x as many
synthetic tiles, synthetic only, 5 seeds, the fixed `ClassifierConfig` (50 models). It writes
`downstream.json`, `downstream.md` and `downstream.png` into `--out` and prints one JSON summary: the
machine, total seconds, seconds per model, and the ROC-AUC gain of each mixed arm with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from histosynth.errors import InputError, RunError

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=Path, required=True, help="a `generate` output folder")
    p.add_argument("--class-map", type=Path, help="YAML class name -> label (default: the bundle manifest's labels)")
    p.add_argument("--bundle", type=Path, help="bundle whose manifest labels the classes (default: the recorded one)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding pcam/ (default: ../shared/data)")
    p.add_argument("--out", type=Path, required=True, help="folder for downstream.json, .md and .png")
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--ratios", default="1,4")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: ClassifierConfig's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the protocol's budget is 2 CPU cores)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the protocol and write its files; returns (and prints) the summary."""
    from histosynth.evaluate.downstream import ClassifierConfig, downstream_markdown, evaluate_downstream, plot_downstream
    from histosynth.runtime.tracking import TrainProgress
    from histosynth.io import write_bytes

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pcam = args.data / "pcam"
    if not (pcam / "train_labels.csv").is_file():
        raise InputError(f"--data {args.data}: no pcam/train_labels.csv (see ../shared/data/README.md)")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: is a file; give a folder")
    config = ClassifierConfig() if args.steps is None else ClassifierConfig(steps=args.steps)
    sizes, ratios = [int(s) for s in args.sizes.split(",")], [float(r) for r in args.ratios.split(",")]
    models = args.seeds * (len(sizes) * (1 + len(ratios)) + 1)  # + the synthetic-only arm
    with TrainProgress(models, description="downstream models") as bar:
        result = evaluate_downstream(
            pcam / "train", pcam / "train_labels.csv", pcam / "valid", pcam / "valid_labels.csv", sizes=sizes,
            ratios=ratios, synthetic=args.synthetic, class_map=args.class_map, bundle=args.bundle, seeds=args.seeds,
            max_test=args.max_test, config=config, progress=lambda done, total, what: bar.update(done))
    d = result.to_json()
    d["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_bytes(args.out / "downstream.json", (json.dumps(d, indent=2, allow_nan=False) + "\n").encode())
    plot_downstream(d, args.out / "downstream.png")
    write_bytes(args.out / "downstream.md", "\n".join(downstream_markdown(d, "downstream.png")).encode())
    summary = {"machine": d["machine"], **d["timing"], "label_source": d["label_source"], "notes": d["notes"],
               "auc_gains": [{"n_real": g["n_real"], "ratio": g["ratio"], "mean": g["auc"]["mean"], "ci95": g["auc"]["ci95"]}
                             for g in d["gains"]],
               "files": [str(args.out / n) for n in ("downstream.json", "downstream.md", "downstream.png")]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (InputError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)
