"""Information-maximization clustering (IMSAT / IIC style, as in Rumman et al. 2025).

A small MLP head maps standardised tile features to K logits. Training minimises, per batch,

    loss = H(Y|X) - mu * H(Y) + lam * KL(p(y|x) || p(y|aug(x)))

- `H(Y|X)`: mean entropy of each tile's assignment -> confident assignments;
- `H(Y)`: entropy of the batch-mean assignment -> all K clusters used, no collapse into one;
- the KL term: a tile and its small augmentation get the same assignment (self-augmented training).
  The augmentation is gaussian noise plus dropout in feature space, and, when `views` are given (features
  of flipped / rotated latents of the same tiles), a randomly chosen view.

The head is a plain `nn.Module` so conditional diffusion training can backprop through it (joint
training); it optionally carries the `FeatureScaler` as buffers, so `logits_from_latents` goes from VQ-GAN
latents to cluster logits in one differentiable call. Weights are stored as safetensors with a JSON config
beside them; nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from histosynth.clusters.features import FeatureScaler, latent_features
from histosynth.configio import from_dict, require
from histosynth.errors import InputError, RunError
from histosynth.io import atomic_path, write_json

HEAD_FORMAT = "histosynth-imc-head/1"


@dataclass
class IMCConfig:
    """Training settings of one information-maximization clustering head."""

    hidden: int = 128  # width of the MLP's hidden layer
    steps: int = 1000  # optimizer steps (not epochs: small tile sets need as many steps as large ones)
    batch_size: int = 512  # large batches make the batch-mean marginal a good estimate of p(y)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam weight decay
    # Weight of the marginal entropy H(Y) (IMSAT's mu = 4): it pushes towards equal cluster sizes. At 0
    # nothing stops clusters from emptying; at 2 some seeds merge two blobs; large values force equal
    # sizes even where tissue types are not equally common.
    mu: float = 4.0
    lam: float = 1.0  # weight of the consistency (augmentation) term
    noise_std: float = 0.1  # std of gaussian noise added to standardised features in the augmentation
    feature_dropout: float = 0.1  # probability of zeroing a feature in the augmentation

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.hidden >= 1, f"{path}.hidden", "must be at least 1")
        require(self.steps >= 1, f"{path}.steps", "must be at least 1")
        require(self.batch_size >= 2, f"{path}.batch_size", "must be at least 2")
        require(self.lr > 0, f"{path}.lr", "must be positive")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(self.mu >= 0, f"{path}.mu", "must be >= 0")
        require(self.lam >= 0, f"{path}.lam", "must be >= 0")
        require(self.noise_std >= 0, f"{path}.noise_std", "must be >= 0")
        require(0 <= self.feature_dropout < 1, f"{path}.feature_dropout", "must be in [0, 1)")


class IMCHead(nn.Module):
    """MLP head: standardised features `(N, D)` -> cluster logits `(N, K)`."""

    def __init__(self, in_dim: int, k: int, hidden: int = 128) -> None:
        super().__init__()
        if k < 1 or in_dim < 1:
            raise InputError(f"IMCHead: need in_dim >= 1 and k >= 1, got in_dim={in_dim}, k={k}")
        self.in_dim, self.k, self.hidden = in_dim, k, hidden
        # The feature kind the head was trained on (feature_kinds.py); only latent_features heads map latents.
        self.feature_kind = "latent_features"
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))
        # Raw-feature scaler (identity until `set_scaler`); used only by `logits_from_latents`.
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_scale", torch.ones(in_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits `(N, K)` of standardised features `(N, D)`."""
        return self.net(features)

    def set_scaler(self, scaler: FeatureScaler) -> None:
        """Carry `scaler` so `logits_from_latents` maps raw latents the way the training tiles were mapped."""
        if len(scaler.mean) != self.in_dim:
            raise InputError(f"scaler: has {len(scaler.mean)} columns, head expects {self.in_dim}")
        mean = torch.tensor(scaler.mean, dtype=torch.float32)
        scale = torch.tensor(scaler.weight, dtype=torch.float32) / torch.tensor(scaler.std, dtype=torch.float32)
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)

    def logits_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits `(N, K)` straight from VQ-GAN latents `(N, C, h, w)`; differentiable (joint training)."""
        if self.feature_kind != "latent_features":
            raise InputError(f"IMC head: trained on {self.feature_kind!r} features, so it cannot map VQ-GAN latents "
                             "to clusters; joint IMC training and `evaluate control` need a head clustered with "
                             "--features latent_features")
        features = latent_features(latents)
        return self((features - self.feature_mean) * self.feature_scale)

    @torch.no_grad()
    def probs(self, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Assignment probabilities `(N, K)` of standardised features, in eval mode, batched."""
        was_training = self.training
        self.eval()
        out = torch.cat([F.softmax(self(features[i : i + batch_size].float()), dim=1)
                         for i in range(0, len(features), batch_size)]) if len(features) else torch.zeros(0, self.k)
        self.train(was_training)
        return out

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster ids `(N,)` int64: the argmax of `probs`."""
        return self.probs(features).argmax(dim=1)

    def save(self, path: str | Path, config: IMCConfig | None = None) -> None:
        """Write weights to `path` (.safetensors) and the architecture (+ training config) to `path`.json."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        meta = {"format": HEAD_FORMAT, "in_dim": self.in_dim, "k": self.k, "hidden": self.hidden,
                "features": self.feature_kind, "config": asdict(config) if config else None}
        write_json(path.with_suffix(".json"), meta)

    @classmethod
    def load(cls, path: str | Path) -> "IMCHead":
        """Rebuild a head saved with `save`; a missing or mismatched file is a clear error."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise InputError(f"{path}: IMC head not found (needs both {path.name} and {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{meta_path}: not valid JSON: {e}") from None
        if meta.get("format") != HEAD_FORMAT:
            raise InputError(f"{meta_path}: format {meta.get('format')!r}; expected {HEAD_FORMAT!r}")
        head = cls(int(meta["in_dim"]), int(meta["k"]), int(meta["hidden"]))
        head.feature_kind = str(meta.get("features", "latent_features"))  # heads saved before the field: latent
        try:
            head.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError) as e:
            raise RunError(f"{path}: cannot load IMC head weights: {e}") from None
        return head


def im_loss(logits: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(H(Y|X) - mu*H(Y), H(Y|X), H(Y))` of a batch of logits `(N, K)`; entropies in nats."""
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    cond_entropy = -(p * log_p).sum(dim=1).mean()
    marginal = p.mean(dim=0)
    marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    return cond_entropy - mu * marginal_entropy, cond_entropy, marginal_entropy


def _augment(x: torch.Tensor, config: IMCConfig, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator) * config.noise_std
    if config.feature_dropout > 0:
        keep = (torch.rand(x.shape, generator=generator) >= config.feature_dropout).to(x.dtype)
        # Inverted dropout keeps the feature scale unchanged in expectation.
        x = x * keep / (1 - config.feature_dropout)
    return x + noise


def train_imc(
    features: torch.Tensor,
    k: int,
    config: IMCConfig | None = None,
    seed: int = 0,
    views: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> IMCHead:
    """Train a K-cluster head on standardised features `(N, D)`; deterministic given `seed`.

    `views` `(V, N, D)`: optional features of augmented copies of the same tiles (e.g. flipped latents);
    each step compares a tile with one randomly chosen view (plus feature noise). `on_step(step, loss)`
    is called after every optimizer step (progress reporting).
    """
    config = config or IMCConfig()
    if features.ndim != 2 or len(features) < 2:
        raise InputError(f"features: expected shape (N >= 2, D), got {tuple(features.shape)}")
    if not 1 <= k <= len(features):
        raise InputError(f"k: must be between 1 and the number of tiles ({len(features)}), got {k}")
    if views is not None and (views.ndim != 3 or views.shape[1:] != features.shape):
        raise InputError(f"views: expected shape (V, {len(features)}, {features.shape[1]}), got {tuple(views.shape)}")
    x_all = features.detach().float()
    n = len(x_all)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # weight init from `seed` without touching the global RNG
        torch.manual_seed(seed)
        head = IMCHead(x_all.shape[1], k, config.hidden)
    head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, n)
    order, cursor, running = torch.randperm(n, generator=generator), 0, 0.0
    for step in range(config.steps):
        if cursor + batch > n:
            # Reshuffle rather than use a short last batch: a tiny batch estimates H(Y) poorly.
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x = x_all[idx]
        if views is not None:
            v = int(torch.randint(0, views.shape[0], (1,), generator=generator))
            x_aug = views[v][idx].float()
        else:
            x_aug = x
        x_aug = _augment(x_aug, config, generator)
        logits = head(x)
        loss, _, _ = im_loss(logits, config.mu)
        if config.lam > 0:
            # Self-augmented training: the clean assignment is the (fixed) target of the augmented one.
            target = F.softmax(logits, dim=1).detach()
            log_q = F.log_softmax(head(x_aug), dim=1)
            loss = loss + config.lam * F.kl_div(log_q, target, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = float(loss.detach())
        if not math.isfinite(running):
            raise RunError(f"IMC training diverged at step {step} (k={k}, seed={seed}); lower imc.lr")
        if on_step is not None:
            on_step(step, running)
    head.eval()
    return head


def load_imc_config(data: dict, path: str = "imc") -> IMCConfig:
    """`IMCConfig` from plain data (YAML), with key-path errors."""
    return from_dict(IMCConfig, data, path)
