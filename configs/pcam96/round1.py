"""Extract the round-1 weights of the shipped model from git history, with the samples they had seen.

    python configs/pcam96/round1.py runs/pcam96/round1

Round 2 (configs/pcam96/vqgan-decoder.yaml, cldm-labels.yaml) starts from round 1's VQ-GAN and cLDM, which the
round-2 bundle replaced in `weights/pcam96`. Their exports predate the `samples_seen` field; it is filled in from
round 1's training record (MODEL_CARD.md): VQ-GAN 1,400 steps x 16 tiles; LDM 1,000 + cLDM 3,500 steps x 32 latents.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from histosynth.runtime.weights import load_checkpoint, save_checkpoint  # noqa: E402

ROUND1 = "5cdd777"  # the commit that shipped round 1
FILES = {"vqgan.safetensors": ("weights/pcam96/training/vqgan.safetensors", 1_400 * 16),
         "unet.safetensors": ("weights/pcam96/unet.safetensors", (1_000 + 3_500) * 32)}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pcam96/round1")
    out.mkdir(parents=True, exist_ok=True)
    for name, (path, samples) in FILES.items():
        raw = subprocess.run(["git", "show", f"{ROUND1}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(raw)
        state, config, extra = load_checkpoint(tmp)
        save_checkpoint(state, out / name, config, {**extra, "samples_seen": extra.get("samples_seen", samples)})
        tmp.unlink()
        print(f"{out / name}: round 1, {samples} samples seen")


if __name__ == "__main__":
    main()
