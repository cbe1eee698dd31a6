"""Round 19 (issue 8): split each of the shipped classes into sub-classes, and a UNet conditioned on them.

A conditional diffusion model covers more of its data the more informative its condition (cluster-conditioned
models close much of the gap to class-conditioned ones: Hu et al. 2023, "Self-guided diffusion models"; Bao et al.
2022, "Why are conditional generative models better than unconditional ones?"). The shipped classes are two tissue
clusters crossed with the tumour flag; here each is cut into K sub-classes by k-means on the clustering features of
its tiles' latents (`clusters.features.latent_features`, standardised over all tiles). Sampling a class then means
sampling its sub-classes in their training shares, which `sampler_quality.py --proportions auto` already does.

Writes into OUT:
  label_map.yaml, label_map_tiles.csv   4K classes `<class>_s<j>`, each with its parent's label
  unet-init.safetensors                  UNET with its class-embedding rows copied to the sub-classes (row 4K: null)
  guide-init.safetensors                 GUIDE the same way: the same function as the 4-class guide, per parent
At step 0 the sub-class UNet is the shipped one exactly (each sub-class's row is its parent's), so any change
after training comes from what the sub-class condition taught it.

    python configs/pcam96/subclasses.py --latents runs/pcam96/latents-v2 --out runs/pcam96/sub8 --k 8
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.cluster import KMeans

from histosynth.autoencoder.latents import LatentCache
from histosynth.clusters.features import FeatureScaler, latent_features
from histosynth.diffusion.data import read_labels
from histosynth.labels import read_label_map
from histosynth.runtime.weights import load_checkpoint, save_checkpoint

EMBEDDING = "class_embedder.embedding.weight"


def split_embedding(src: Path, dst: Path, parent_of: list[int]) -> None:
    """Copy a UNet checkpoint with one class-embedding row per sub-class (its parent's) and the null row last."""
    state, config, extra = load_checkpoint(src)
    old = state[EMBEDDING]
    k_old = int(config["num_classes"])
    if old.shape[0] != k_old + 1 or max(parent_of) >= k_old:
        raise SystemExit(f"{src}: {old.shape[0]} embedding rows for {k_old} classes; parents up to {max(parent_of)}")
    rows = [old[p] for p in parent_of] + [old[k_old]]
    state = dict(state)
    state[EMBEDDING] = torch.stack(rows).contiguous()
    save_checkpoint(state, dst, {**config, "num_classes": len(parent_of)},
                    {**extra, "split_from": str(src), "parent_of": parent_of})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latents", type=Path, required=True)
    p.add_argument("--labels", type=Path, default=Path("weights/pcam96/training/label_map_tiles.csv"))
    p.add_argument("--label-map", type=Path, default=Path("weights/pcam96/training/label_map.yaml"))
    p.add_argument("--unet", type=Path, default=Path("weights/pcam96/unet.safetensors"))
    p.add_argument("--guide", type=Path, default=Path("weights/pcam96/guide_unet.safetensors"))
    p.add_argument("--k", type=int, default=8, help="sub-classes per class")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    cache = LatentCache.open(a.latents)
    keys = list(cache.paths)
    parents = read_labels(a.labels, keys)
    latents = torch.from_numpy(np.asarray(cache.latents[:], dtype=np.float32))
    raw = torch.cat([latent_features(latents[i:i + 2048]) for i in range(0, len(latents), 2048)])
    feats = FeatureScaler.fit(raw, latents.shape[1]).transform(raw).numpy()

    read_label_map(a.label_map)  # the product's checks of the map being split
    raw_map = yaml.safe_load(a.label_map.read_text())
    sub = np.full(len(keys), -1, dtype=np.int64)
    classes, parent_of = [], []
    for c in raw_map["classes"]:
        rows = np.flatnonzero(parents == c["id"])
        if len(rows) < a.k:
            raise SystemExit(f"class {c['name']} has {len(rows)} tiles, fewer than --k {a.k}")
        km = KMeans(n_clusters=a.k, n_init=4, random_state=a.seed).fit(feats[rows])
        # Sub-classes in order of size, so `_s0` is the largest: stable names across reruns of the same data.
        order = np.argsort(-np.bincount(km.labels_, minlength=a.k), kind="stable")
        rank = np.empty(a.k, dtype=np.int64)
        rank[order] = np.arange(a.k)
        sub[rows] = len(classes) + rank[km.labels_]
        for j in range(a.k):
            classes.append({"id": len(classes), "name": f"{c['name']}_s{j}", "clusters": c["clusters"],
                            "tiles": int((rank[km.labels_] == j).sum()), "label": c["label"],
                            "label_name": c["label_name"]})
            parent_of.append(int(c["id"]))
    cluster_table = {cl: [s["name"] for s in classes if cl in s["clusters"]] for cl in raw_map["clusters"]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "label_map.yaml").write_text(yaml.safe_dump(
        {"classes": classes, "clusters": cluster_table, "K": raw_map["K"], "tile_labels": "label_map_tiles.csv",
         "excluded_tiles": raw_map.get("excluded_tiles", 0),
         "source": {"split_from": str(a.label_map), "k_per_class": a.k, "features": "latent_features, k-means",
                    "seed": a.seed}}, sort_keys=False))
    with open(a.out / "label_map_tiles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "class_id", "class_name"])
        for key, s in zip(keys, sub):
            if s >= 0:
                w.writerow([key, int(s), classes[s]["name"]])
    read_label_map(a.out / "label_map.yaml")  # the product's own checks
    split_embedding(a.unet, a.out / "unet-init.safetensors", parent_of)
    split_embedding(a.guide, a.out / "guide-init.safetensors", parent_of)
    print({c["name"]: c["tiles"] for c in classes})


if __name__ == "__main__":
    main()
