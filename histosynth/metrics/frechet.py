"""The Frechet distance between two Gaussians: FID on Inception statistics, and the tile verdict on cheap features."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from histosynth.errors import InputError, RunError


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise InputError(f"mismatched statistics: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or (np.iscomplexobj(covmean) and np.abs(covmean.imag).max() > 1e-3):
        # A singular product (N < d, or duplicated images) has no stable square root; a small ridge on
        # both covariances is the standard fix (pytorch-fid), changing FID by O(eps * d).
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if np.abs(covmean.imag).max() > 1e-3:
            raise RunError(
                f"FID: the covariance product has no real square root (imaginary part "
                f"{np.abs(covmean.imag).max():.3g}); too few or degenerate images?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """`frechet_distance` between Gaussians fitted to feature sets ``(N, D)`` and ``(M, D)``."""
    return frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False))
