"""Which features make clusters that mean something? Compare the clustering feature kinds on real PCam tiles.

    nice -n 10 python benchmarks/cluster_features.py                      # 3,000 PCam train tiles, ~25 min on 2 cores
    python benchmarks/cluster_features.py --n 400 --k-max 5 --steps 200  # a quick look

For each feature kind (feature_kinds.py: `latent_features`, `unet` at several noise steps, both) the tiles are
clustered exactly as `histosynth cluster` does (IMC and the k-means baseline, K = k_min..k_max, the majority
vote with monotone indices left out), and every partition is scored against PCam's tumour label, which is
used for evaluation only: normalised mutual information (NMI), purity (the share of tiles in their cluster's
majority label) and the tumour share of the most tumour-rich cluster; plus the cluster-size balance (min/max
size ratio, size entropy / log K). A sweep of IMC's marginal-entropy weight mu (`--mus`) at a fixed K shows
how it trades balance against label agreement. Writes `cluster_features.json` and one contact sheet per
feature kind (a row of random tiles per cluster, titled with its size and tumour share) to `--out`.

The latents come from the shipped VQ-GAN (`weights/pcam96/training/vqgan.safetensors`) and the UNet features
from the shipped conditional UNet (`weights/pcam96/unet.safetensors`, read with its null class). Both were
trained on pcam/train, so these are the features a user of the shipped model's pipeline would cluster.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from histosynth.autoencoder.train import load_vqgan
from histosynth.clusters.feature_kinds import FeatureConfig, compute_features
from histosynth.clusters.features import FeatureScaler
from histosynth.clusters.imc import IMCConfig, train_imc
from histosynth.clusters.select import ClusterSearchConfig, search_k
from histosynth.clusters.validity import size_balance
from histosynth.io import atomic_path, write_json
from histosynth.review.sheets import contact_sheet

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pcam"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def sample_tiles(n: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """`n` PCam training tiles drawn at random (seeded) and their tumour labels."""
    with open(DATA / "train_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False))
    return [DATA / "train" / rows[i]["file"] for i in pick], np.array([int(rows[i]["label"]) for i in pick])


def encode(paths: list[Path], vqgan: Path, cache: Path, batch: int = 64) -> np.ndarray:
    """VQ-GAN latents `(N, C, h, w)` of the tiles, cached in `cache` (keyed by the tile list and model file)."""
    key = hashlib.sha256("\n".join([str(vqgan), *(p.name for p in paths)]).encode()).hexdigest()[:16]
    file = cache / f"latents-{key}.npy"
    if file.is_file():
        return np.load(file)
    model = load_vqgan(vqgan)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths[i : i + batch]])
        x = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            out.append(model.encode(x).numpy())
        done = min(i + batch, len(paths))
        print(f"  encoded {done}/{len(paths)} ({done / (time.perf_counter() - t0):.1f} tiles/s)", file=sys.stderr)
    latents = np.concatenate(out).astype(np.float32)
    with atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.save(f, latents)
    return latents


def agreement(labels: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float]:
    """NMI and purity of a partition against the label, the top cluster's tumour share, and size balance."""
    purity = sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(labels)
    tumour = max(truth[labels == c].mean() for c in np.unique(labels))
    return {"nmi": float(normalized_mutual_info_score(truth, labels)), "purity": float(purity),
            "max_tumour_share": float(tumour), **size_balance(labels, k)}


def sheet(paths: list[Path], labels: np.ndarray, truth: np.ndarray, k: int, title: str, path: Path,
          per_row: int = 10, seed: int = 0) -> None:
    """A contact sheet: one row of random tiles per cluster, with its size and tumour share."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        pick = rng.choice(members, size=min(per_row, len(members)), replace=False) if len(members) else []
        share = truth[members].mean() if len(members) else float("nan")
        rows.append((f"cluster {c}: {len(members)} tiles, {100 * share:.0f}% tumour", [paths[i] for i in pick]))
    image, _ = contact_sheet(title, rows, thumb=56, columns=per_row)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="PCam training tiles sampled")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tile sample")
    ap.add_argument("--vqgan", type=Path, default=REPO / "weights/pcam96/training/vqgan.safetensors")
    ap.add_argument("--unet", type=Path, default=REPO / "weights/pcam96/unet.safetensors")
    ap.add_argument("--ts", default="20,100,300", help="UNet noise steps compared")
    ap.add_argument("--both-t", type=int, default=100, help="noise step of the latent_features+unet kind")
    ap.add_argument("--k-min", type=int, default=2)
    ap.add_argument("--k-max", type=int, default=10)
    ap.add_argument("--seeds", default="0,1", help="IMC restarts per K")
    ap.add_argument("--steps", type=int, default=1000, help="IMC steps per head")
    ap.add_argument("--mus", default="1,2,4,8", help="IMC mu values of the sweep")
    ap.add_argument("--mu-k", type=int, default=6, help="K of the mu sweep")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/histosynth-bench"), help="latent cache folder")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    paths, truth = sample_tiles(args.n, args.seed)
    latents = encode(paths, args.vqgan, args.cache)
    imc = IMCConfig(steps=args.steps)
    kinds = [("latent_features", FeatureConfig())]
    kinds += [(f"unet_t{t}", FeatureConfig(kind="unet", unet=str(args.unet), t=int(t))) for t in args.ts.split(",")]
    kinds += [(f"latent_features+unet_t{args.both_t}",
               FeatureConfig(kind="latent_features+unet", unet=str(args.unet), t=args.both_t))]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "n": len(paths), "tumour_share": float(truth.mean()),
                               "config": {k: str(v) for k, v in vars(args).items()}, "kinds": {}}
    standardised: dict[str, torch.Tensor] = {}
    for name, fc in kinds:
        t0 = time.perf_counter()
        raw = compute_features(latents, fc)
        t_features = time.perf_counter() - t0
        x = FeatureScaler.fit(raw.features, blocks=raw.blocks).transform(raw.features)
        standardised[name] = x
        config = ClusterSearchConfig(k_min=args.k_min, k_max=args.k_max, seeds=[int(s) for s in args.seeds.split(",")],
                                     imc=imc, features=fc)
        t0 = time.perf_counter()
        search = search_k(x, config, lambda d, t, w: print(f"  {name}: {w} ({d}/{t})", file=sys.stderr))
        t_search = time.perf_counter() - t0
        scores = {f"{m}:{k}": agreement(lab, truth, k) for (m, k), lab in search.labels.items()
                  if args.k_min <= k <= args.k_max}
        chosen = search.k
        results["kinds"][name] = {
            "features": raw.info, "feature_seconds": round(t_features, 1), "search_seconds": round(t_search, 1),
            "chosen_k": chosen, "rule": search.choice.rule, "monotone": search.choice.monotone,
            "warnings": search.choice.warnings, "at_chosen_k": scores[f"imc:{chosen}"], "scores": scores,
            "table": search.table,
        }
        sheet(paths, search.labels[("imc", chosen)], truth, chosen,
              f"{name}: IMC, K = {chosen} chosen by the vote (PCam label for evaluation only)",
              args.out / f"cluster_features_{name}.png")
        print(f"{name}: K={chosen} {scores[f'imc:{chosen}']}", file=sys.stderr)
    # mu sweep at a fixed K on every kind: balance against agreement with the label.
    sweep: dict[str, Any] = {}
    for name, x in standardised.items():
        for mu in [float(m) for m in args.mus.split(",")]:
            head = train_imc(x, args.mu_k, IMCConfig(steps=args.steps, mu=mu), seed=0)
            sweep[f"{name}:mu={mu:g}"] = agreement(head.assign(x).numpy(), truth, args.mu_k)
            print(f"  mu sweep {name} mu={mu:g}: {sweep[f'{name}:mu={mu:g}']}", file=sys.stderr)
    results["mu_sweep"] = {"k": args.mu_k, "scores": sweep}
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "cluster_features.json", results)
    return results


if __name__ == "__main__":
    res = main()
    for name, r in res["kinds"].items():
        a = r["at_chosen_k"]
        print(f"{name:28s} K={r['chosen_k']:2d} NMI={a['nmi']:.3f} purity={a['purity']:.3f} "
              f"min/max={a['size_ratio']:.2f} entropy={a['size_entropy']:.2f}")
