"""Distribution metrics between real and generated images, all from one Inception feature pass.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature sets, with
  ``scipy.linalg.sqrtm`` and pytorch-fid's fix for a singular product (retry with ``eps * I`` added).
  When a set has fewer images than feature dimensions (N < 2048) the covariances are singular and sqrtm
  is slow and unstable; `fid_from_features` then uses the exact identity in `trace_sqrt_product`.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``, mean
  and std over random subsets; unbiased, so it is ~0 (and can be slightly negative) for one distribution.
- Precision / recall (Kynkaanniemi et al. 2019): k-NN balls (k=3) around each real (fake) feature
  approximate the real (fake) manifold; precision = share of fakes inside the real manifold, recall =
  share of reals inside the fake manifold.
- Density / coverage (Naeem et al. 2020, k=5 as they recommend): density counts how many real balls
  contain each fake (divided by k; ~1 when the distributions match, can exceed 1); coverage = share of
  real points whose ball holds at least one fake.

A point is "inside" a ball when its distance is <= the radius (closed balls, as in both papers).
FID is biased at small N and should be computed from >= 2048 images per side; smaller inputs give a
warning (and ``warnings`` in the JSON) rather than an error, since small runs are still useful for
relative comparisons on the same N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.linalg

from histosynth.errors import InputError, RunError
from histosynth.metrics.frechet import frechet_distance  # noqa: F401  (FID is this on Inception statistics)

FID_MIN_SAMPLES = 2048
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100

# Distances are computed in blocks of this many rows so memory stays O(block * N), not O(N^2).
_BLOCK = 1024


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased, float64) of ``(N, d)`` features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"need at least 2 feature vectors (N, d), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(real: np.ndarray, fake: np.ndarray) -> float:
    """``tr(sqrt(S1 S2))`` of the two sets' covariances, exactly, from the features themselves.

    With ``A = centred(real) / sqrt(n1 - 1)`` and ``B = centred(fake) / sqrt(n2 - 1)``, ``S1 S2 = A^T A B^T B``
    shares its non-zero eigenvalues with ``(A B^T)(A B^T)^T``, so the trace of its square root is the sum
    of the singular values of the small ``(n1, n2)`` matrix ``A B^T``. No square root of a singular
    ``(d, d)`` matrix is needed, which is what makes FID at N < d both slow and unstable with sqrtm.
    """
    a = np.asarray(real, dtype=np.float64)
    b = np.asarray(fake, dtype=np.float64)
    a = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)
    b = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())


def fid_from_features(real: np.ndarray, fake: np.ndarray, method: str = "auto") -> float:
    """FID between two ``(N, d)`` feature sets.

    ``method="sqrtm"``: `frechet_distance` of the fitted Gaussians (scipy sqrtm, the reference route).
    ``method="svd"``: the same number through `trace_sqrt_product` (exact; cost grows with N1*N2*d).
    ``"auto"`` takes ``svd`` when either set has fewer samples than dimensions (a singular covariance),
    else ``sqrtm``.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if method not in ("auto", "sqrtm", "svd"):
        raise InputError(f"FID method: unknown value {method!r}; allowed: auto, sqrtm, svd")
    mu1, sigma1 = feature_statistics(real)
    mu2, sigma2 = feature_statistics(fake)
    if method == "sqrtm" or (method == "auto" and min(len(real), len(fake)) > real.shape[1]):
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(real, fake))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased polynomial-kernel MMD^2.

    Each subset draws ``subset_size`` real and fake features without replacement; the caller must pass
    a ``subset_size`` <= both N (`compare_features` shrinks it and warns).
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    m = subset_size
    if m < 2 or m > min(len(real), len(fake)):
        raise InputError(f"KID subset size {m} must be in [2, min(N_real, N_fake) = {min(len(real), len(fake))}]")
    if subsets < 1:
        raise InputError(f"KID needs at least 1 subset, got {subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        # Unbiased MMD^2: within-set sums leave out the diagonal (a point compared with itself).
        values[s] = (
            (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
            + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
            - 2 * k_xy.mean()
        )
    return float(values.mean()), float(values.std())


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(a), len(b))`` via the Gram trick (clipped at 0 against round-off)."""
    d2 = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest *other* row (``(N,)``)."""
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= k < len(x):
        raise InputError(f"k-nearest-neighbour radius needs 1 <= k < N, got k={k}, N={len(x)}")
    sq = _sq_norms(x)
    radii = np.empty(len(x))
    for start in range(0, len(x), _BLOCK):
        d = _distances(x[start : start + _BLOCK], x, sq)
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = np.inf  # a point is not its own neighbour (robust to exact duplicates)
        radii[start : start + _BLOCK] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def _ball_counts(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point, how many of the balls ``(centres, radii)`` contain it (``(len(points),)``)."""
    sq = _sq_norms(centres)
    counts = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), _BLOCK):
        d = _distances(points[start : start + _BLOCK], centres, sq)
        counts[start : start + _BLOCK] = (d <= radii[None, :]).sum(axis=1)
    return counts


def _nearest(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Distance from each point to its nearest row of ``others``."""
    sq = _sq_norms(others)
    out = np.empty(len(points))
    for start in range(0, len(points), _BLOCK):
        out[start : start + _BLOCK] = _distances(points[start : start + _BLOCK], others, sq).min(axis=1)
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds."""
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    precision = float((_ball_counts(fake, real, knn_radii(real, k)) > 0).mean())
    recall = float((_ball_counts(real, fake, knn_radii(fake, k)) > 0).mean())
    return precision, recall


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN balls around the real features."""
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    radii = knn_radii(real, k)
    density = float(_ball_counts(fake, real, radii).sum() / (k * len(fake)))
    coverage = float((_nearest(real, fake) <= radii).mean())
    return density, coverage


@dataclass
class DistributionMetrics:
    """Everything `evaluate fid` reports; `to_json` gives the documented, stable keys."""

    n_real: int
    n_fake: int
    fid: float
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    precision: float
    recall: float
    pr_k: int
    density: float
    coverage: float
    dc_k: int
    warnings: list[str] = field(default_factory=list)
    small_sample: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)  # folders, network path and hash, cache hits

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "fid"``)."""
        return {
            "metric": "fid",
            "n_real": self.n_real,
            "n_fake": self.n_fake,
            "fid": self.fid,
            "kid": {"mean": self.kid_mean, "std": self.kid_std, "subsets": self.kid_subsets, "subset_size": self.kid_subset_size},
            "precision": self.precision,
            "recall": self.recall,
            "pr_k": self.pr_k,
            "density": self.density,
            "coverage": self.coverage,
            "dc_k": self.dc_k,
            "small_sample": self.small_sample,
            "warnings": list(self.warnings),
            "inputs": dict(self.inputs),
        }


def compare_features(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    pr_k: int = 3,
    dc_k: int = 5,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> DistributionMetrics:
    """FID, KID, precision/recall and density/coverage of two ``(N, d)`` feature sets.

    Too small inputs give warnings, not errors: N < 2048 for FID; N below ``kid_subset_size`` shrinks the
    KID subsets to min(N) (their values are then not comparable with the standard 1000).
    """
    n_real, n_fake = len(real), len(fake)
    need = max(pr_k, dc_k) + 1
    if min(n_real, n_fake) < need:
        raise InputError(f"need at least {need} real and fake images for k-NN metrics; got {n_real} and {n_fake}")
    warnings: list[str] = []
    if min(n_real, n_fake) < FID_MIN_SAMPLES:
        warnings.append(
            f"FID from {n_real} real and {n_fake} fake images; FID is biased below {FID_MIN_SAMPLES} per side "
            "and only comparable between runs with the same N"
        )
    subset_size = kid_subset_size
    if min(n_real, n_fake) < kid_subset_size:
        subset_size = min(n_real, n_fake)
        warnings.append(
            f"KID subset size reduced from {kid_subset_size} to {subset_size} (the smaller set); "
            "its spread over subsets is then underestimated"
        )
    kid_mean, kid_std = kernel_inception_distance(real, fake, subsets=kid_subsets, subset_size=subset_size, seed=seed)
    precision, recall = precision_recall(real, fake, pr_k)
    density, coverage = density_coverage(real, fake, dc_k)
    return DistributionMetrics(
        n_real=n_real,
        n_fake=n_fake,
        fid=fid_from_features(real, fake),
        kid_mean=kid_mean,
        kid_std=kid_std,
        kid_subsets=kid_subsets,
        kid_subset_size=subset_size,
        precision=precision,
        recall=recall,
        pr_k=pr_k,
        density=density,
        coverage=coverage,
        dc_k=dc_k,
        warnings=warnings,
        small_sample=bool(warnings),
    )


def evaluate_fid(
    real_dir: str | Path,
    fake_dir: str | Path,
    *,
    inception: str | Path | None = None,
    device: str = "cpu",
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    pr_k: int = 3,
    dc_k: int = 5,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    progress: Callable[[str, int, int], None] | None = None,
) -> DistributionMetrics:
    """`compare_features` on the Inception features of two image folders (each cached per folder).

    ``max_images`` takes a seeded random subset of each folder; ``progress(side, done, total)`` is called
    per batch with side ``"real"`` or ``"fake"``.
    """
    from histosynth.evaluate.features import folder_features, list_images, load_inception
    from histosynth.runtime.devices import resolve_device

    for folder in (real_dir, fake_dir):
        list_images(folder)  # both folders are checked before the long feature pass starts
    network = load_inception(inception, resolve_device(device))
    sets = {}
    for side, folder in (("real", real_dir), ("fake", fake_dir)):
        report = (lambda done, total, side=side: progress(side, done, total)) if progress else None
        sets[side] = folder_features(
            folder, network, max_images=max_images, seed=seed, batch_size=batch_size,
            cache_dir=cache_dir, use_cache=use_cache, progress=report,
        )
    metrics = compare_features(
        sets["real"].features, sets["fake"].features, pr_k=pr_k, dc_k=dc_k,
        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
    )
    metrics.inputs = {
        "real_dir": str(Path(real_dir)),
        "fake_dir": str(Path(fake_dir)),
        "inception": str(network.path),
        "inception_sha256": network.sha256,
        "features_cached": {side: s.from_cache for side, s in sets.items()},
    }
    return metrics
