"""Generation speed: tiles/s and time per denoiser step for each backend, device, sampler and step count, and the
sampler's own overhead beyond the denoiser calls. Prints JSON (one object) to stdout.

    python benchmarks/generate_speed.py --bundle weights/pcam96 --batch 16
    python benchmarks/generate_speed.py --tiny          # a tiny random bundle: measures sampler overhead only

The overhead is (loop time - time inside denoise) / loop time, measured on the same run; decoding is timed
apart. Timings on a shared machine are noisy: compare ratios from one run, and name the machine.
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

from histosynth.bundle.store import load_bundle
from histosynth.diffusion.samplers import SAMPLERS, sample
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.sampling.backends import make_backend


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_one(backend, schedule: NoiseSchedule, latent_shape, null_id: int, sampler: str, steps: int, batch: int,
            repeats: int) -> dict:
    device = torch.device(backend.tensor_device)  # the host when ONNX Runtime runs CUDA for CPU torch
    inside = 0.0
    calls = 0

    def timed(x, t, y):
        nonlocal inside, calls
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = backend.denoise(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        inside += time.perf_counter() - t0
        calls += 1
        return out

    g = torch.Generator().manual_seed(0)
    class_ids = torch.full((batch,), 0, dtype=torch.long, device=device)
    randn = lambda i: torch.randn((batch, *latent_shape), generator=g).to(device)  # noqa: E731
    # Warm-up: first calls pay for allocation and kernel selection.
    sample(timed, schedule, randn(0), class_ids, sampler=sampler, steps=min(steps, 3), randn=randn)
    inside, calls = 0.0, 0
    loop = 0.0
    decode = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        latents = sample(timed, schedule, randn(0), class_ids, sampler=sampler, steps=steps, randn=randn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        loop += time.perf_counter() - t0
        t1 = time.perf_counter()
        backend.decode(latents)
        decode += time.perf_counter() - t1
    tiles = batch * repeats
    return {
        "backend": backend.name, "device": backend.device, "sampler": sampler, "steps": steps, "batch": batch,
        "tiles_per_s": tiles / (loop + decode), "step_ms": 1000 * inside / calls,
        "sampler_overhead": (loop - inside) / loop, "decode_ms_per_tile": 1000 * decode / tiles,
    }


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """`"dpmpp2m:20,ddim:50"` -> `[("dpmpp2m", 20), ("ddim", 50)]`, names checked against the sampler registry."""
    settings = []
    for spec in (s.strip() for s in text.split(",")):
        name, sep, steps = spec.partition(":")
        if not sep or name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--samplers: {spec!r} is not sampler:steps; allowed samplers: {', '.join(SAMPLERS)}, "
                             "steps a positive integer (e.g. dpmpp2m:20)")
        settings.append((name, int(steps)))
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--tiny", action="store_true", help="benchmark a tiny random bundle instead")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--devices", default="cpu" + (",cuda" if torch.cuda.is_available() else ""))
    parser.add_argument("--dtypes", default="fp32", help="torch CUDA UNet precisions, e.g. fp32,fp16,bf16")
    parser.add_argument("--samplers", default="dpmpp2m:20,dpmpp2m:10,ddim:50,ddim:20")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        samplers = parse_samplers(args.samplers)  # before any work: a typo must not cost a bundle load
    except ValueError as e:
        parser.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from histosynth.bundle.testing import tiny_bundle

            bundle_path = tiny_bundle(Path(tmp))
        elif args.bundle:
            bundle_path = args.bundle
        else:
            parser.error("give --bundle or --tiny")
        bundle = load_bundle(bundle_path)
        schedule = NoiseSchedule(bundle.manifest.schedule)
        results = []
        for device in args.devices.split(","):
            for backend_name in args.backends.split(","):
                dtypes = args.dtypes.split(",") if (device.startswith("cuda") and backend_name == "torch") else ["fp32"]
                for dtype in dtypes:
                    try:
                        backend = make_backend(bundle, backend=backend_name, device=device, dtype=dtype)
                    except Exception as e:  # a backend this machine lacks (e.g. ORT CUDA) is reported, not fatal
                        results.append({"backend": backend_name, "device": device, "dtype": dtype, "error": str(e)})
                        continue
                    for sampler, steps in samplers:
                        row = run_one(backend, schedule, tuple(bundle.manifest.latent_shape), bundle.null_id, sampler,
                                      steps, args.batch, args.repeats)
                        row["dtype"] = dtype
                        results.append(row)
                        print(json.dumps(row), file=sys.stderr)
        print(json.dumps({"machine": machine(), "bundle": str(bundle_path) if not args.tiny else "tiny",
                          "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
