"""Latent features, information-maximization clustering and the search over K."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from histosynth.clusters.features import FeatureScaler, feature_blocks, latent_features
from histosynth.clusters.imc import IMCConfig, IMCHead, im_loss, load_imc_config, train_imc
from histosynth.clusters.methods import METHODS, get_method
from histosynth.clusters.select import ClusterSearchConfig, search_k
from histosynth.errors import InputError

FAST = IMCConfig(steps=200, hidden=32)


def _blobs(n: int = 400, k: int = 4, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    x, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=1.0, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    return FeatureScaler.fit(x).transform(x), y


def test_latent_features_shape_and_values() -> None:
    latents = torch.zeros(2, 3, 8, 8)
    latents[0, 0] = 1.0  # constant channel: mean 1, std 0, no texture
    latents[1, 1, :, ::2] = 2.0  # stripes: texture in channel 1
    f = latent_features(latents)
    assert f.shape == (2, sum(size for _, size in feature_blocks(3))) == (2, 60)
    assert f[0, 0] == pytest.approx(1.0) and f[0, 3] == pytest.approx(0.0, abs=1e-5)
    texture = f[:, 9:12]  # after mean(3), std(3), corr(3)
    assert texture[1, 1] == pytest.approx(1.0)  # |dx| = 2 everywhere, |dy| = 0 -> (2 + 0) / 2
    assert texture[0].abs().max() == 0
    assert torch.equal(latent_features(latents), f)  # deterministic
    grid = f[0, 12:].reshape(3, 4, 4)
    assert torch.allclose(grid[0], torch.ones(4, 4)) and grid[1:].abs().max() == 0
    with pytest.raises(InputError, match="latents"):
        latent_features(torch.zeros(2, 3, 8))


def test_scaler_standardises_and_weights_blocks() -> None:
    raw = latent_features(torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    scaler = FeatureScaler.fit(raw, channels=3)
    z = scaler.transform(raw)
    # mean block (3 columns) ends with weight 1/sqrt(3); grid block (48 columns) with 1/sqrt(48).
    assert z.mean(0).abs().max() < 1e-5
    assert z[:, :3].std(0) == pytest.approx(torch.full((3,), 3**-0.5), rel=1e-4)
    assert z[:, 12:].std(0) == pytest.approx(torch.full((48,), 48**-0.5), rel=1e-4)
    with pytest.raises(InputError, match="columns"):
        FeatureScaler.fit(raw[:, :10], channels=3)


def test_imc_recovers_separated_blobs() -> None:
    x, y = _blobs()
    head = train_imc(x, 4, FAST, seed=0)
    assert adjusted_rand_score(y, head.assign(x).numpy()) > 0.9
    probs = head.probs(x)
    assert probs.shape == (400, 4) and torch.allclose(probs.sum(1), torch.ones(400))


def test_imc_is_deterministic_given_seed() -> None:
    x, _ = _blobs(n=200)
    a = train_imc(x, 3, IMCConfig(steps=30, hidden=16), seed=5)
    b = train_imc(x, 3, IMCConfig(steps=30, hidden=16), seed=5)
    c = train_imc(x, 3, IMCConfig(steps=30, hidden=16), seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_marginal_term_prevents_collapse() -> None:
    # Without the marginal entropy (mu = 0) nothing stops clusters from emptying (confident assignments and
    # augmentation consistency are both satisfied by fewer clusters); with it (mu = 4) all K are used.
    x, _ = _blobs(n=200)
    for seed in (0, 1, 2):
        collapsed = torch.bincount(train_imc(x, 4, IMCConfig(steps=200, hidden=32, mu=0.0), seed=seed).assign(x),
                                   minlength=4)
        assert (collapsed == 0).any(), f"mu=0, seed {seed}: sizes {collapsed.tolist()} use every cluster"
        sizes = torch.bincount(train_imc(x, 4, IMCConfig(steps=200, hidden=32), seed=seed).assign(x), minlength=4)
        assert (sizes > 0).all(), f"mu=4, seed {seed}: sizes {sizes.tolist()}"
    _, cond, marg = im_loss(torch.tensor([[10.0, -10.0], [-10.0, 10.0]]), mu=1.0)
    assert cond.item() == pytest.approx(0.0, abs=1e-6) and marg.item() == pytest.approx(np.log(2))


def test_imc_views_and_joint_gradients(tmp_path) -> None:
    latents = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    raw = latent_features(latents)
    scaler = FeatureScaler.fit(raw, channels=3)
    x = scaler.transform(raw)
    views = scaler.transform(latent_features(torch.flip(latents, dims=[3])))[None]
    head = train_imc(x, 3, IMCConfig(steps=20, hidden=16, batch_size=32), seed=0, views=views)
    head.set_scaler(scaler)
    # logits_from_latents reproduces the standardised path and is differentiable for joint training.
    assert torch.allclose(head.logits_from_latents(latents), head(x), atol=1e-5)
    lat = latents.clone().requires_grad_(True)
    im_loss(head.logits_from_latents(lat), 2.0)[0].backward()
    assert lat.grad is not None and head.net[0].weight.grad is not None
    # Round trip through safetensors + JSON.
    head.save(tmp_path / "imc_head.safetensors", IMCConfig())
    meta = json.loads((tmp_path / "imc_head.json").read_text())
    assert meta["k"] == 3 and meta["config"]["mu"] == 4.0
    again = IMCHead.load(tmp_path / "imc_head.safetensors")
    assert torch.equal(again.logits_from_latents(latents), head.logits_from_latents(latents))
    with pytest.raises(InputError, match="views"):
        train_imc(x, 3, FAST, views=views[:, :10])


def test_imc_bad_inputs() -> None:
    with pytest.raises(InputError, match="k"):
        train_imc(torch.zeros(5, 2), 6)
    with pytest.raises(InputError, match="imc.mu"):
        load_imc_config({"mu": -1})
    with pytest.raises(InputError, match="unknown key 'epochs'"):
        load_imc_config({"epochs": 3})
    with pytest.raises(InputError, match="not found"):
        IMCHead.load("/nonexistent/head.safetensors")


def test_search_k_picks_true_k_on_blobs() -> None:
    x, y = _blobs(n=300, k=4, d=6)
    config = ClusterSearchConfig(k_min=2, k_max=6, seeds=[0], imc=FAST)
    search = search_k(x, config)
    assert search.k == 4, search.choice.rule
    assert {r["method"] for r in search.table} == {"imc", "kmeans"}
    assert sorted(r["k"] for r in search.table if r["method"] == "imc") == [2, 3, 4, 5, 6]
    assert adjusted_rand_score(y, search.labels[("imc", 4)]) > 0.9
    km = search_k(x, ClusterSearchConfig(k_min=2, k_max=6, method="kmeans"))
    assert km.k == 4 and {r["method"] for r in km.table} == {"kmeans"}


def test_search_table_reports_size_balance() -> None:
    x, _ = _blobs(n=300, k=4, d=6)
    search = search_k(x, ClusterSearchConfig(k_min=2, k_max=5, method="kmeans"))
    for row in search.table:
        sizes = np.bincount(search.labels[("kmeans", row["k"])], minlength=row["k"])
        assert row["size_ratio"] == pytest.approx(sizes.min() / sizes.max())
        p = sizes / sizes.sum()
        assert row["size_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(row["k"]))
    assert next(r for r in search.table if r["k"] == 4)["size_entropy"] > 0.99  # four blobs of 75


def test_method_registry() -> None:
    assert list(METHODS) == ["imc", "kmeans"]
    with pytest.raises(InputError, match="--method: unknown value 'gmm'; allowed: imc, kmeans"):
        get_method("gmm")
    with pytest.raises(InputError, match="cluster.method: unknown value 'gmm'; allowed: imc, kmeans"):
        search_k(torch.zeros(20, 2), ClusterSearchConfig(method="gmm"))
    # The baseline is fitted beside another method only, and each fit gives labels and soft assignments.
    assert ClusterSearchConfig(method="kmeans").methods() == ["kmeans"]
    assert ClusterSearchConfig(compare_kmeans=False).methods() == ["imc"]
    x, _ = _blobs(n=120, k=3, d=4)
    for name in METHODS:
        fit = get_method(name).fit(x, 3, ClusterSearchConfig(seeds=[0], imc=FAST), None)
        probs = fit.probs(x)
        assert probs.shape == (120, 3) and torch.allclose(probs.sum(1), torch.ones(120), atol=1e-5)
        assert np.array_equal(probs.argmax(1).numpy(), fit.labels)


def test_search_config_errors() -> None:
    with pytest.raises(InputError, match="k_max"):
        search_k(torch.zeros(20, 2), ClusterSearchConfig(k_min=5, k_max=3))
    with pytest.raises(InputError, match="k_max: 30 needs"):
        search_k(torch.randn(20, 2), ClusterSearchConfig(k_max=30))
