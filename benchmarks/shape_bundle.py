"""A speed-only bundle of a VQ-GAN export with the shipped UNet architecture on its latent channels.

    python benchmarks/shape_bundle.py VQGAN.safetensors OUT_DIR [--unet runs/pcam96/cldm-labels/unet.safetensors]
    python benchmarks/generate_speed.py --bundle OUT_DIR --backends onnx,torch --samplers dpmpp2m:20 --batch 16

Round 4's autoencoder has 4 latent channels, so no trained UNet fits it yet; generation speed does not depend on
the weights, so this copies every shape-matching weight of `--unet` (a cLDM training export, whose metadata the
exporter reads) into a UNet of the same architecture on the VQ-GAN's channels and exports the pair with
`histosynth export`. **Not a model**: its input/output convolutions are untrained. For timing only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.autoencoder.vqgan import VQGANConfig  # noqa: E402
from histosynth.configio import from_dict, to_dict  # noqa: E402
from histosynth.diffusion.unet import UNet, UNetConfig  # noqa: E402
from histosynth.runtime.weights import load_checkpoint, read_checkpoint_metadata, save_export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vqgan", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--unet", type=Path, default=ROOT / "runs" / "pcam96" / "cldm-labels" / "unet.safetensors")
    ap.add_argument("--labels", type=Path, default=ROOT / "runs" / "pcam96" / "review" / "label_map.yaml")
    args = ap.parse_args()
    channels = from_dict(VQGANConfig, read_checkpoint_metadata(args.vqgan)[0], "vqgan").latent_channels
    state, config, extra = load_checkpoint(args.unet)
    arch = replace(from_dict(UNetConfig, config, "unet"), in_channels=channels, out_channels=channels)
    unet = UNet(arch)
    own = unet.state_dict()
    own.update({k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape})
    unet.load_state_dict(own)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_export(unet, Path(tmp) / "unet.safetensors", to_dict(arch), dict(extra))
        subprocess.run([sys.executable, "-m", "histosynth", "export", "--vqgan", str(args.vqgan), "--unet", str(ckpt),
                        "--labels", str(args.labels), "--out", str(args.out), "--mpp", "0.972"], check=True)


if __name__ == "__main__":
    main()
