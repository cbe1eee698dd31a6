"""FID against training samples for both networks of a model (issue 8.5): one point per checkpoint.

    python benchmarks/fid_curve.py vqgan --real ../shared/data/pcam/valid --n 1000 \\
        --point 22400=weights/pcam96/training/vqgan.safetensors --point 62400=runs/.../step-1250.safetensors ...
    python benchmarks/fid_curve.py cldm --real ../shared/data/pcam/valid --n 500 --vqgan DECODER.safetensors \\
        --point 144000=weights/pcam96/unet.safetensors --point 208000=runs/.../checkpoints/step-00002000.safetensors ...
    python benchmarks/fid_curve.py plot --json A.json --json B.json --png curve.png

`--select-real DIR` scores each point against `--n` tiles of DIR too (`select_fid`, ...): use the training tiles
there, and choose between checkpoints by those numbers; `--real` (validation tiles) is monitoring only.
`--label NAME` names the curve in the plot (several architectures of one network).

`--point SAMPLES=PATH`: the checkpoint and the number of training samples (tiles or latents) the network had seen
when it was written, counted over every round of training. A checkpoint is a VQ-GAN export (`vqgan`), or a UNet
export or resume checkpoint whose EMA weights are used (`cldm`).

- `vqgan`: FID of the reconstructions of `--n` real tiles (a seeded subset of `--real`) against those tiles: what
  the autoencoder alone costs.
- `cldm`: FID of `--n` generated tiles (classes in turn, DPM-Solver++(2M) 20 steps, no guidance, decoded with
  `--vqgan`) against `--n` real tiles.

Validation tiles are only measured, never used to choose anything. Prints one JSON object; `--json` writes it.
FID at n = 500-1000 is biased upwards (compare points of one curve, not with FIDs at other n).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.evaluate.features import folder_features, list_images, load_inception, select_files  # noqa: E402
from histosynth.evaluate.fid import compare_features  # noqa: E402


def _points(items: list[str]) -> list[tuple[int, Path]]:
    out = []
    for item in items:
        samples, _, path = item.partition("=")
        if not path or not samples.isdigit():
            raise SystemExit(f"--point: expected SAMPLES=PATH, got {item!r}")
        out.append((int(samples), Path(path)))
    return sorted(out)


def _unet_from(path: Path):
    """A UNet with the EMA weights of an export or resume checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from histosynth.configio import from_dict
    from histosynth.diffusion.unet import UNet, UNetConfig
    from histosynth.runtime.weights import load_checkpoint

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "histosynth-resume" in meta:
        header = json.loads(meta["histosynth-resume"])
        config = header["meta"]["config"]["model"]
        config["num_classes"] = header["meta"]["num_classes"]
        state = {k[len("module/ema/"):]: v for k, v in load_file(str(path)).items()
                 if k.startswith("module/ema/") and not k.endswith("__ema_updates__")}
    else:
        state, config, _ = load_checkpoint(path)
    unet = UNet(from_dict(UNetConfig, config, "unet"))
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    return unet.eval()


def _write(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")


def vqgan_point(path: Path, files: list[Path], out: Path) -> None:
    from histosynth.autoencoder.train import load_vqgan
    from histosynth.evaluate.features import read_rgb
    from histosynth.evaluate.recon import images_to_tensor

    model = load_vqgan(path)
    with torch.no_grad():
        for start in range(0, len(files), 64):
            x = images_to_tensor(np.stack([read_rgb(p) for p in files[start:start + 64]]))
            y = model.decode(model.encode(x)).clamp(-1, 1)
            u8 = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for j, im in enumerate(u8):
                Image.fromarray(im).save(out / f"{start + j:05d}.png")


def cldm_point(path: Path, vqgan: Path, n: int, out: Path, latent_scale: float, seed: int = 0) -> None:
    from histosynth.autoencoder.train import load_vqgan
    from histosynth.diffusion.samplers import sample
    from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig

    unet = _unet_from(path)
    decoder = load_vqgan(vqgan).latent_decoder().eval()
    schedule = NoiseSchedule(ScheduleConfig())
    k = unet.config.num_classes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, n, 50):
            b = min(50, n - start)
            noise = torch.randn((b, unet.config.in_channels, 24, 24), generator=g)  # 96-px tiles, f = 4
            ids = (torch.arange(start, start + b) % k) if k else torch.zeros(b, dtype=torch.long)
            lat = sample(lambda x, t, y: unet(x, t, y), schedule, noise, ids, sampler="dpmpp2m", steps=20)
            y = decoder(lat / latent_scale).clamp(-1, 1)
            u8 = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for j, im in enumerate(u8):
                Image.fromarray(im).save(out / f"{start + j:05d}.png")


def plot(jsons: list[Path], png: Path) -> None:
    from histosynth.evaluate.plots import line_plot

    series = {}
    for p in jsons:
        d = json.loads(p.read_text())
        series[d.get("label") or f"{d['kind']} (n={d['n']})"] = ([r["samples"] / 1000 for r in d["points"]],
                                               [r["fid"] for r in d["points"]], None)
    # Log x: the autoencoder sees ~10^5 tiles, the diffusion model up to ~10^7 latents.
    line_plot(series, png, title="FID against training samples", xlabel="training samples (thousands)",
              ylabel="FID vs pcam/valid", log_x=True, size=(760, 440))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["vqgan", "cldm", "plot"])
    ap.add_argument("--real", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--point", action="append", default=[])
    ap.add_argument("--vqgan", type=Path, help="decoder for `cldm` points")
    ap.add_argument("--latent-scale", type=float, default=None, help="default: the bundle weights/pcam96's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, action="append", default=[])
    ap.add_argument("--png", type=Path)
    ap.add_argument("--select-real", type=Path, default=None,
                    help="also score each point against --n tiles of this folder (training tiles: what a choice "
                         "between checkpoints may use; --real is monitoring only)")
    ap.add_argument("--label", default=None, help="the curve's name in the plot (default: kind and n)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.kind == "plot":
        plot(args.json, args.png)
        return
    files = select_files(list_images(args.real), args.n, args.seed)
    net = load_inception()
    real = folder_features(args.real, net, max_images=args.n, seed=args.seed).features
    select = (folder_features(args.select_real, net, max_images=args.n, seed=args.seed).features
              if args.select_real is not None else None)
    scale = args.latent_scale
    if scale is None:
        scale = json.loads((ROOT / "weights" / "pcam96" / "manifest.json").read_text())["latent_scale"]
    records = []
    for samples, path in _points(args.point):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            if args.kind == "vqgan":
                vqgan_point(path, files, out)
            else:
                cldm_point(path, args.vqgan, args.n, out, scale, args.seed)
            fake = folder_features(out, net, use_cache=False).features
        m = compare_features(real, fake, seed=args.seed)
        records.append({"samples": samples, "checkpoint": str(path), "fid": m.fid, "kid": m.kid_mean,
                        "precision": m.precision, "recall": m.recall, "seconds": round(time.perf_counter() - t0, 1)})
        if select is not None:
            ms = compare_features(select, fake, seed=args.seed)
            records[-1].update(select_fid=ms.fid, select_precision=ms.precision, select_recall=ms.recall)
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    result = {"kind": args.kind, "label": args.label, "n": len(files), "real": str(args.real),
              "select_real": str(args.select_real) if args.select_real is not None else None, "points": records,
              "machine": f"{__import__('platform').machine()}, {__import__('os').cpu_count()} CPU cores, torch "
                         f"{torch.__version__}"}
    print(json.dumps(result, indent=2))
    for p in args.json:
        p.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
