"""How long `evaluate memorization` takes at full size: all PCam training tiles against 2.9k "generated" tiles.

    nice -n 10 python benchmarks/memorization_speed.py       # 19,171 x 2,907 tiles: 26 CPU-s; 9 min on a busy 2 cores
    python benchmarks/memorization_speed.py --n-generated 300  # a quick look

The "generated" folder holds the `pcam/valid` tiles as PNG, which is what `generate` writes. 5 % of them
(`--plant`) are replaced by copies of training tiles that have tissue: exact, flipped or rotated,
JPEG-recompressed (quality 75) or colour-jittered (`perturb_tile`). The run then also measures the recall of
these copies and the false alarms among the real tiles at full size. The reference is the default: 10 %
held out of the training tiles. Prints one JSON object: the seconds per stage and in all, the machine (CPU
name, cores, torch threads, load average before and after), the CPU seconds the process used, and the
audit's numbers. Timings on a shared machine depend on its load; compare runs on one machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histosynth.evaluate.memorization import PERTURBATIONS, MemorizationConfig, evaluate_memorization, perturb_tile

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam"


def machine() -> dict:
    """What the numbers were measured on."""
    model = ""
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"processor": platform.processor() or platform.machine(), "cpu": model, "platform": platform.platform(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def make_generated(folder: Path, valid: list[Path], train: list[Path], fraction: float, seed: int) -> dict[str, str]:
    """Write the valid tiles as PNG, a `fraction` of them replaced by perturbed training tiles; copy -> source."""
    rng = np.random.default_rng(seed)
    n_copies = int(round(fraction * len(valid)))
    copies: dict[str, str] = {}
    order = rng.permutation(len(train))
    j = 0
    for i, path in enumerate(valid):
        if i < n_copies:
            while True:  # copies of tissue: near-flat tiles are out of the audit by design
                source = train[order[j]]
                j += 1
                tile = np.asarray(Image.open(source).convert("RGB"))
                if (tile.astype(np.float64) @ [0.299, 0.587, 0.114]).std() >= 10:
                    break
            kind = PERTURBATIONS[i % len(PERTURBATIONS)]
            target = folder / f"copy{i:04d}-{kind}.png"
            Image.fromarray(perturb_tile(tile, kind, rng)).save(target)
            copies[str(target)] = str(source)
        else:
            Image.open(path).convert("RGB").save(folder / f"{path.stem}.png")
    return copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "train")
    parser.add_argument("--generated-from", type=Path, default=DATA / "valid",
                        help="real tiles standing in for generated ones")
    parser.add_argument("--n-generated", type=int, default=2907)
    parser.add_argument("--plant", type=float, default=0.05, help="share of the generated tiles replaced by copies")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result object here")
    args = parser.parse_args(argv)

    train = sorted(args.train.glob("*.jpg"))
    valid = sorted(args.generated_from.glob("*.jpg"))[: args.n_generated]
    if not train or not valid:
        print(f"no tiles under {args.train} or {args.generated_from}", file=sys.stderr)
        return 2
    before = machine()
    with tempfile.TemporaryDirectory(prefix="memorization-bench-") as tmp:
        generated = Path(tmp) / "generated"
        generated.mkdir()
        copies = make_generated(generated, valid, train, args.plant, args.seed)
        stages: dict[str, list[float]] = {}

        def progress(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            stages.setdefault(stage, [now, now])[1] = now
            if done == total:
                print(f"{stage}: {total} in {now - stages[stage][0]:.1f} s", file=sys.stderr)

        start, cpu_start = time.perf_counter(), time.process_time()
        config = MemorizationConfig(workers=args.workers, seed=args.seed)
        result = evaluate_memorization(args.train, generated, None, config, progress=progress)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    flagged = {m.file for m in result.flagged}
    n_clean = result.n - len(copies)
    false_alarms = len(flagged - set(copies))
    out = {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # all threads of this process; below `seconds` x cores on a busy machine
        "seconds_by_part": result.seconds,
        "n_train": result.n_train,
        "n_generated": result.n,
        "n_reference": result.n_reference,
        "planted": len(copies),
        "recall": len(flagged & set(copies)) / len(copies) if copies else None,
        "false_alarms": false_alarms,
        "false_alarm_rate": false_alarms / n_clean if n_clean else None,
        "n_below_threshold": result.n_below_threshold,
        "threshold": result.threshold,
        "ssim_threshold": result.ssim_threshold,
        "alpha_precision": result.alpha_precision,
        "beta_recall": result.beta_recall,
        "authenticity": result.authenticity,
        "distances": result.distances,
        "ssims": result.ssims,
        "machine": before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
