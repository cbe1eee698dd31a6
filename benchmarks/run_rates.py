"""Training rates from runs' metrics.jsonl files (the GPU round's numbers in docs/training.md and the model card).

    python benchmarks/run_rates.py weights/pcam96/eval/round5/gpu/*-metrics.jsonl --batch 512 \\
        --machine "NVIDIA H200, torch 2.11.0+cu130"

Steps/s between the second and the last training record (the first interval holds start-up), latents (or tiles)
per second at `--batch`, and the window loss at the last record. Prints one JSON object per file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rate(path: Path, batch: int) -> dict:
    """Steps/s, samples/s and the last window loss of one metrics.jsonl."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train" and "time" in r and "step" in r]
    if len(train) < 3:
        raise SystemExit(f"{path}: fewer than 3 training records; no rate")
    a, b = train[1], train[-1]
    steps_per_s = (b["step"] - a["step"]) / (b["time"] - a["time"])
    return {"file": str(path), "steps_per_s": round(steps_per_s, 2), "samples_per_s": round(steps_per_s * batch),
            "last_step": b["step"], "loss_window": b.get("loss_window")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path, nargs="+")
    ap.add_argument("--batch", type=int, required=True, help="samples per step (all processes together)")
    ap.add_argument("--machine", required=True, help="where the runs ran (the files do not say)")
    args = ap.parse_args()
    for path in args.metrics:
        print(json.dumps({**rate(path, args.batch), "machine": args.machine}))


if __name__ == "__main__":
    main()
