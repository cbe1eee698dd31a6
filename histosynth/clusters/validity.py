"""Cluster validity indices used to choose K (the paper's five, plus silhouette and Davies-Bouldin).

| index               | better | how it picks K                                                      | source  |
|---------------------|--------|---------------------------------------------------------------------|---------|
| calinski_harabasz   | higher | the K with the maximum                                              | sklearn |
| c_index             | lower  | the K with the minimum                                              | here    |
| dunn                | higher | the K with the maximum                                              | here    |
| hartigan            | -      | the K with the largest drop H(K-1) - H(K) (NbClust's rule); the     | here    |
|                     |        | classic rule "smallest K with H(K) <= 10" is available as           |         |
|                     |        | `hartigan_threshold` but saturates at the largest K for big N       |         |
| mcclain_rao         | lower  | the K with the minimum                                              | here    |
| silhouette          | higher | the K with the maximum                                              | sklearn |
| davies_bouldin      | lower  | the K with the minimum                                              | sklearn |

Definitions (X: N points, labels: cluster ids; d: Euclidean distance):
- C-index = (S_w - S_min) / (S_max - S_min): S_w is the sum of the N_w within-cluster pair distances,
  S_min / S_max the sums of the N_w smallest / largest of all pair distances. In [0, 1].
- Dunn = min distance between points of different clusters / max within-cluster diameter.
- Hartigan H(K) = (W_K / W_{K+1} - 1) * (N - K - 1), W_K the within-cluster sum of squares of the
  K-cluster partition: the gain of adding a (K+1)-th cluster. It needs the partitions at K and K+1.
- McClain-Rao = (S_w / N_w) / (S_b / N_b): mean within-cluster over mean between-cluster pair distance.

Monotone indices: C-index and McClain-Rao tend to fall with K on features without clear clusters (more,
smaller clusters always shrink within-cluster distances), so their optimum sits at an end of the K range
whatever the data. `monotone` detects an index whose values move one way over the whole range (at least
`MIN_MONOTONE_KS` values); the choice of K (select.py) then does not count its vote.

Cluster-size balance (`size_balance`): the min/max size ratio (0 when a cluster is empty) and the entropy of
the size distribution divided by log K (1 = equal sizes). IMC's marginal-entropy term pushes towards 1.

C-index, Dunn, McClain-Rao and silhouette need all N^2/2 pair distances, so they are computed on a random
subsample of at most `max_points` points (default 2000: 2 million pairs, ~16 MB), drawn with a fixed seed
so the same input gives the same numbers. Calinski-Harabasz, Davies-Bouldin and W_K use every point.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.spatial.distance import pdist
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from histosynth.errors import InputError

PAPER_INDICES = ("calinski_harabasz", "c_index", "dunn", "hartigan", "mcclain_rao")
ALL_INDICES = PAPER_INDICES + ("silhouette", "davies_bouldin")

# How each index picks K (see the module doc); "drop" is Hartigan's largest H(K-1) - H(K).
Direction = Literal["max", "min", "drop"]
DIRECTION: dict[str, Direction] = {
    "calinski_harabasz": "max",
    "c_index": "min",
    "dunn": "max",
    "hartigan": "drop",
    "mcclain_rao": "min",
    "silhouette": "max",
    "davies_bouldin": "min",
}
HARTIGAN_THRESHOLD = 10.0  # Hartigan's (1975) rule of thumb: stop adding clusters once H(K) <= 10
# With 3 values a random sequence is monotone half the time; with 4, one time in 12.
MIN_MONOTONE_KS = 4


def _check(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (len(x),):
        raise InputError(f"validity: need points (N, D) and labels (N,), got {x.shape} and {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise InputError("validity: need at least 2 non-empty clusters")
    return x, labels


def subsample(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a fixed random subsample of `min(n, max_points)` points (all points, in order, if fewer)."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _pairs(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Condensed pair distances and a mask of the within-cluster pairs, in `pdist` order."""
    dist = pdist(x)
    i, j = np.triu_indices(len(x), k=1)  # the same (i < j) order as pdist's condensed vector
    return dist, labels[i] == labels[j]


def c_index(x: np.ndarray, labels: np.ndarray) -> float:
    """Hubert & Levin's C-index (lower is better); O(N^2), subsample large N first."""
    x, labels = _check(x, labels)
    dist, within = _pairs(x, labels)
    n_w = int(within.sum())
    if n_w == 0:
        return float("nan")  # every cluster is a singleton: no within-cluster pairs
    s_w = dist[within].sum()
    part = np.partition(dist, [n_w - 1, len(dist) - n_w])
    s_min = part[:n_w].sum()
    s_max = part[len(dist) - n_w :].sum()
    return float((s_w - s_min) / (s_max - s_min)) if s_max > s_min else float("nan")


def dunn(x: np.ndarray, labels: np.ndarray) -> float:
    """Dunn index (higher is better): closest inter-cluster pair / largest cluster diameter."""
    x, labels = _check(x, labels)
    dist, within = _pairs(x, labels)
    diameter = dist[within].max() if within.any() else 0.0
    separation = dist[~within].min()
    return float(separation / diameter) if diameter > 0 else float("inf")


def mcclain_rao(x: np.ndarray, labels: np.ndarray) -> float:
    """McClain-Rao index (lower is better): mean within- over mean between-cluster pair distance."""
    x, labels = _check(x, labels)
    dist, within = _pairs(x, labels)
    if not within.any():
        return float("nan")
    return float(dist[within].mean() / dist[~within].mean())


def within_ss(x: np.ndarray, labels: np.ndarray) -> float:
    """W_K: the total within-cluster sum of squared distances to the cluster means (one cluster allowed)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    _, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, inverse, x)
    # sum ||x||^2 - sum_k ||S_k||^2 / n_k: no per-cluster loop.
    return float((x**2).sum() - ((sums**2).sum(axis=1) / counts).sum())


def hartigan(wss_k: float, wss_next: float, n: int, k: int) -> float:
    """Hartigan's H(K) = (W_K / W_{K+1} - 1) * (N - K - 1) from the within-cluster sums of squares."""
    if wss_next <= 0:
        return float("inf")
    return (wss_k / wss_next - 1.0) * (n - k - 1)


def compute_indices(
    x: np.ndarray,
    labels: np.ndarray,
    max_points: int | None = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Every index except Hartigan (which needs two partitions) for one partition, plus `wss`."""
    x, labels = _check(x, labels)
    sub = subsample(len(x), max_points, seed)
    xs, ls = x[sub], labels[sub]
    pairwise_ok = len(np.unique(ls)) >= 2
    out = {
        "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
        "davies_bouldin": float(davies_bouldin_score(x, labels)),
        "c_index": c_index(xs, ls) if pairwise_ok else float("nan"),
        "dunn": dunn(xs, ls) if pairwise_ok else float("nan"),
        "mcclain_rao": mcclain_rao(xs, ls) if pairwise_ok else float("nan"),
        # sklearn wants 2 <= n_labels <= n_samples - 1 on the sample it scores.
        "silhouette": float(silhouette_score(xs, ls)) if 2 <= len(np.unique(ls)) < len(ls) else float("nan"),
        "wss": within_ss(x, labels),
    }
    return out


def pick_k(ks: list[int], values: list[float], index: str, hartigan_drops: list[float] | None = None) -> int | None:
    """The K that `index` picks from its values at `ks` (NaNs ignored; ties go to the smaller K).

    For "hartigan" pass `hartigan_drops` (H(K-1) - H(K) per K); "hartigan_threshold" applies the
    classic rule to `values` (H(K)): the smallest K with H(K) <= 10, else the largest K.
    """
    if index == "hartigan_threshold":
        for k, h in zip(ks, values):
            if not math.isnan(h) and h <= HARTIGAN_THRESHOLD:
                return k
        return max(ks) if ks else None
    if index not in DIRECTION:
        raise InputError(f"index: unknown {index!r}; allowed: {', '.join(ALL_INDICES)}, hartigan_threshold")
    direction = DIRECTION[index]
    if direction == "drop":
        if hartigan_drops is None:
            raise InputError("hartigan: the largest-drop rule needs hartigan_drops")
        values, direction = hartigan_drops, "max"
    best_k, best = None, None
    for k, v in sorted(zip(ks, values)):
        if v is None or math.isnan(v):
            continue
        better = best is None or (v > best if direction == "max" else v < best)
        if better:  # strict: ties keep the smaller K
            best_k, best = k, v
    return best_k


def monotone(ks: list[int], values: list[float]) -> Literal["rises", "falls"] | None:
    """"rises" / "falls" when the finite `values` (at `ks`) strictly move one way over the whole range.

    None when they do not, or when fewer than `MIN_MONOTONE_KS` values are finite (too few to tell).
    """
    pts = [v for _, v in sorted(zip(ks, values)) if v is not None and math.isfinite(v)]
    if len(pts) < MIN_MONOTONE_KS:
        return None
    steps = [b - a for a, b in zip(pts, pts[1:])]
    if all(d > 0 for d in steps):
        return "rises"
    if all(d < 0 for d in steps):
        return "falls"
    return None


def size_balance(labels: np.ndarray, k: int) -> dict[str, float]:
    """`size_ratio` (smallest / largest cluster, 0 if one is empty) and `size_entropy` (H(sizes) / log K)."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].astype(np.float64)
    if k < 2 or sizes.sum() == 0:
        return {"size_ratio": 1.0, "size_entropy": 1.0}
    p = sizes / sizes.sum()
    nz = p[p > 0]
    return {"size_ratio": float(sizes.min() / sizes.max()),
            "size_entropy": float(-(nz * np.log(nz)).sum() / math.log(k))}
