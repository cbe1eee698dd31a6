"""Rebuild the shipped model's cluster folder (runs/pcam96/clusters) from the committed IMC head.

    python configs/pcam96/clusters_from_head.py runs/pcam96/latents runs/pcam96/clusters

`histosynth cluster` chose K = 2 in the first round and its head
(`weights/pcam96/training/clustering/imc_head.safetensors`, fitted on the round-1 encoder's latents)
and `cluster.json` were committed; its per-tile `assignments.csv` was not (it is rebuilt in a second). This writes
exactly what `histosynth cluster` wrote for that head: `cluster.json` (the committed one) and `assignments.csv`
(tile, cluster = the head's argmax, probability = its softmax maximum, distance = the Euclidean distance of the
tile's standardised feature to its cluster's mean), so that `histosynth review apply` can apply the committed
review edits (`weights/pcam96/training/clusters.yaml`) to it. The sizes must match the committed ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from histosynth.autoencoder.latents import LatentCache  # noqa: E402
from histosynth.clusters.features import latent_features  # noqa: E402
from histosynth.clusters.imc import IMCHead  # noqa: E402

# The clustering stage's artefacts; since round 4 the bundle's own VQ-GAN has another latent space, so they live
# beside the round-1-encoder VQ-GAN they were fitted on (clustering/vqgan.safetensors), not the bundle's.
TRAINING = ROOT / "weights" / "pcam96" / "training" / "clustering"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("latents", type=Path, help="the latent cache of the PCam training tiles (train encode)")
    ap.add_argument("out", type=Path, help="cluster folder to write")
    args = ap.parse_args()
    meta = json.loads((TRAINING / "cluster.json").read_text(encoding="utf-8"))
    cache = LatentCache.open(args.latents)
    head = IMCHead.load(TRAINING / "imc_head.safetensors").eval()
    latents = torch.from_numpy(np.asarray(cache.latents, dtype=np.float32))
    with torch.no_grad():
        feats = torch.cat([(latent_features(latents[i:i + 4096]) - head.feature_mean) * head.feature_scale
                           for i in range(0, len(latents), 4096)])
        probs = head.probs(feats)
    clusters = probs.argmax(dim=1)
    sizes = {str(k): int((clusters == k).sum()) for k in range(head.k)}
    if sizes != meta["sizes"]:
        raise SystemExit(f"cluster sizes {sizes} differ from the committed {meta['sizes']}: another latent cache?")
    means = torch.stack([feats[clusters == k].mean(dim=0) for k in range(head.k)])
    distance = (feats - means[clusters]).norm(dim=1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("cluster.json", "imc_head.safetensors", "imc_head.json", "validity.csv"):
        shutil.copyfile(TRAINING / name, args.out / name)
    with open(args.out / "assignments.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tile", "cluster", "probability", "distance"])
        for path, c, p, d in zip(cache.paths, clusters.tolist(), probs.max(dim=1).values.tolist(), distance.tolist()):
            w.writerow([path, c, f"{p:.6f}", f"{d:.6f}"])
    print(f"{args.out}: {len(cache.paths)} tiles, sizes {sizes}")


if __name__ == "__main__":
    main()
