"""Clustering methods, one registry entry each.

A method turns standardised features `(N, D)` and a K into a `Fitted` partition: hard labels, soft
assignment probabilities, and a model file it can write beside the assignments. `METHODS` is the one
list the CLI (`--method`), config validation (`cluster.method`) and docs/training.md are checked
against; adding a method is one `register(ClusterMethod(...))` call here.

| name     | what                                                                                         |
|----------|----------------------------------------------------------------------------------------------|
| `imc`    | information-maximization clustering head (imc.py), best of `seeds` restarts by the IM objective |
| `kmeans` | k-means (scikit-learn, `max(4, len(seeds))` inits); the baseline scored beside other methods  |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch
from sklearn.cluster import KMeans

from histosynth.clusters.imc import IMCHead, im_loss, train_imc
from histosynth.errors import InputError
from histosynth.io import atomic_path

if TYPE_CHECKING:
    from histosynth.clusters.features import FeatureScaler
    from histosynth.clusters.select import ClusterSearchConfig

BASELINE = "kmeans"  # scored beside the chosen method when `compare_kmeans` is on


class Fitted(Protocol):
    """One method's partition of the tiles at one K."""

    labels: np.ndarray  # (N,) int64 cluster id per tile

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Soft assignment `(N, K)` of standardised features (rows sum to 1)."""

    def save(self, out_dir: Path, config: "ClusterSearchConfig", scaler: "FeatureScaler | None",
             feature_kind: str) -> str | None:
        """Write the model into `out_dir`; returns the file `cluster.json` names as its `head` (or None)."""


@dataclass(frozen=True)
class ClusterMethod:
    """A registry entry: the name users type, one line of help, and the fit function."""

    name: str
    summary: str  # one line for --help and the docs
    fit: Callable[[torch.Tensor, int, "ClusterSearchConfig", torch.Tensor | None], Fitted]


METHODS: dict[str, ClusterMethod] = {}


def register(method: ClusterMethod) -> ClusterMethod:
    """Add `method` to `METHODS` (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"clustering method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def method_names() -> str:
    """The registered names, comma-separated, for messages and help."""
    return ", ".join(METHODS)


def get_method(name: str, option: str = "--method") -> ClusterMethod:
    """The registered method `name`, or an `InputError` naming `option` and the allowed values."""
    if name not in METHODS:
        raise InputError(f"{option}: unknown value {name!r}; allowed: {method_names()}")
    return METHODS[name]


# --------------------------------------------------------------------------------------------------
# imc


@dataclass
class IMCFit:
    """The IMC head with the lowest IM objective over the seeds."""

    head: IMCHead
    labels: np.ndarray

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.probs(features)

    def save(self, out_dir: Path, config: "ClusterSearchConfig", scaler: "FeatureScaler | None",
             feature_kind: str) -> str:
        # Only a head on latent_features can go from VQ-GAN latents to logits (joint IMC, evaluate control),
        # so only that head carries the scaler; the head records its feature kind either way.
        if scaler is not None and feature_kind == "latent_features":
            self.head.set_scaler(scaler)
        self.head.feature_kind = feature_kind
        self.head.save(out_dir / "imc_head.safetensors", config.imc)
        return "imc_head.safetensors"


def _fit_imc(x: torch.Tensor, k: int, config: "ClusterSearchConfig", views: torch.Tensor | None) -> IMCFit:
    best, best_obj = None, math.inf
    for seed in config.seeds:
        head = train_imc(x, k, config.imc, seed=seed, views=views)
        with torch.no_grad():
            objective = float(im_loss(head(x), config.imc.mu)[0])  # on every tile, no augmentation
        if objective < best_obj:
            best, best_obj = head, objective
    assert best is not None
    return IMCFit(best, best.assign(x).numpy())


register(ClusterMethod("imc", "information-maximization clustering head (the paper's method)", _fit_imc))


# --------------------------------------------------------------------------------------------------
# kmeans


@dataclass
class KMeansFit:
    """k-means centres `(K, D)` and labels."""

    centres: np.ndarray
    labels: np.ndarray

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        # A softmax of negative squared distances: a confidence, not a calibrated probability.
        d2 = torch.cdist(features.double(), torch.from_numpy(self.centres).double()) ** 2
        return torch.softmax(-d2, dim=1).float()

    def save(self, out_dir: Path, config: "ClusterSearchConfig", scaler: "FeatureScaler | None",
             feature_kind: str) -> None:
        with atomic_path(out_dir / "kmeans_centres.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, self.centres.astype(np.float32), allow_pickle=False)
        return None


def _fit_kmeans(x: torch.Tensor, k: int, config: "ClusterSearchConfig", views: torch.Tensor | None) -> KMeansFit:
    xn = x.numpy().astype(np.float64)
    km = KMeans(n_clusters=k, n_init=max(4, len(config.seeds)), random_state=config.seeds[0]).fit(xn)
    return KMeansFit(km.cluster_centers_, km.labels_.astype(np.int64))


register(ClusterMethod("kmeans", "k-means on the same features (scikit-learn); also the baseline", _fit_kmeans))
