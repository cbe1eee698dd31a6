"""ONNX Runtime thread spinning and generation speed: the shipped bundle's sessions with and without spin-waiting.

Each of a bundle's sessions (UNet, guide UNet, decoder) has its own intra-op thread pool. With spinning on (ORT's
default) a pool's threads keep the cores busy for a while after their call, while the next session's threads
wait for them. Runs `generate` on the same recipe with `histosynth.sampling.backends.ORT_SPINNING` = "1" and "0",
alternately, `--repeats` times each, and prints one JSON object (tiles/s per setting and the ratio).

    python benchmarks/ort_spinning.py --bundle weights/pcam96 --n 200 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from histosynth.sampling import backends
from histosynth.sampling.runner import GenerateOptions, generate

SETTINGS = {"unguided": {}, "autoguidance 2": {"autoguidance": 2.0}, "guidance 2": {"guidance": 2.0}}


def run(bundle: Path, n: int, repeats: int, batch_size: int, work: Path) -> dict:
    """Tiles/s of each sampler setting with spinning on and off; the same recipe and seeds each time."""
    results: dict[str, dict[str, list[float]]] = {name: {"1": [], "0": []} for name in SETTINGS}
    default = backends.ORT_SPINNING
    try:
        _measure(bundle, n, repeats, batch_size, work, results)
    finally:
        backends.ORT_SPINNING = default
    rows = []
    for name, by in results.items():
        if by["1"]:
            on, off = max(by["1"]), max(by["0"])  # best of the repeats: the least disturbed run of each
            rows.append({"setting": name, "tiles_per_s_spinning": on, "tiles_per_s_no_spinning": off,
                         "ratio": off / on})
    return {"benchmark": "ort_spinning", "bundle": str(bundle), "n": n, "repeats": repeats,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "results": rows}


def _measure(bundle: Path, n: int, repeats: int, batch_size: int, work: Path,
             results: dict[str, dict[str, list[float]]]) -> None:
    for r in range(repeats):
        for name, extra in SETTINGS.items():
            if extra.get("autoguidance", 1.0) != 1.0 and not (bundle / "guide_unet.onnx").is_file():
                continue
            for spinning in ("1", "0"):
                recipe = work / f"{r}-{len(results[name][spinning])}-{spinning}-{name.replace(' ', '')}.yaml"
                recipe.write_text(yaml.safe_dump({
                    "bundle": str(bundle.resolve()), "seed": 0, "batch_size": batch_size, "balanced": {"total": n},
                    "sampler": {"name": "dpmpp2m", "steps": 20, **extra}}))
                backends.ORT_SPINNING = spinning
                t0 = time.perf_counter()
                result = generate(recipe, work / recipe.stem, GenerateOptions(backend="onnx", device="cpu"))
                results[name][spinning].append(result.made / (time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("weights/pcam96"))
    p.add_argument("--n", type=int, default=200, help="tiles per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="histosynth-ort-spinning-") as tmp:
        out = run(args.bundle, args.n, args.repeats, args.batch_size, Path(tmp))
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
