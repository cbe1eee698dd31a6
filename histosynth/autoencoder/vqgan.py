"""The VQ-GAN autoencoder (f=4): encoder, vector quantizer and decoder.

Latents are the *pre-quantization* encoder output (LDM's "VQ-reg" latent space); the decoder side
quantizes them first. `LatentDecoder` is that decoder side on its own (quantizer + decoder), the module
that is exported to `decoder.onnx` and `decoder.safetensors`.

The quantizer fixes the commitment-weight bug of taming's `VectorQuantizer2` (van den Oord et al. 2017,
eq. 3): beta weighs the *commitment* term ||z - sg[e]||^2 that pulls the encoder toward the codebook,
not the codebook term ||sg[z] - e||^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.configio import from_dict, require
from histosynth.errors import InputError
from histosynth.layers import Downsample, Upsample


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of the VQ-GAN; stored beside the weights so the model is rebuilt without training code."""

    in_channels: int = 3  # RGB tiles
    base_channels: int = 64  # width of the first level; small enough to train on CPU at 96-128 px
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; len L gives f = 2**(L-1), so 3 -> f=4
    num_res_blocks: int = 2  # residual blocks per level (the decoder uses one more, as in taming/LDM)
    # Residual blocks per decoder level; None: num_res_blocks + 1. More blocks give the decoder capacity to draw
    # texture from the same latents (a deeper decoder can be grown from a trained one: `grow_decoder`).
    decoder_res_blocks: int | None = None
    attention: bool = False  # self-attention in the mid block; off by default (costly at 32x32 on CPU)
    latent_channels: int = 3  # C of the (N, C, H/f, W/f) latents the diffusion model sees (LDM VQ-f4: 3)
    codebook_size: int = 1024  # number of codes K
    codebook_dim: int = 3  # code vector size; equals latent_channels (no projection in between)
    beta: float = 0.25  # commitment weight: beta * ||z - sg[e]||^2
    dropout: float = 0.0  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups; must divide every level's width
    usage_decay: float = 0.99  # EMA decay of per-code usage, used to find dead codes

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling f between images and latents."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per decoder level."""
        return self.num_res_blocks + 1 if self.decoder_res_blocks is None else self.decoder_res_blocks

    def validate(self, path: str) -> None:
        """Cross-field checks, called by `configio.from_dict` (and by the modules' constructors)."""
        require(self.in_channels > 0, f"{path}.in_channels", "must be positive")
        require(self.base_channels > 0, f"{path}.base_channels", "must be positive")
        require(len(self.channel_mult) > 0, f"{path}.channel_mult", "needs at least one level")
        require(all(m > 0 for m in self.channel_mult), f"{path}.channel_mult", "multipliers must be positive")
        require(self.num_res_blocks >= 1, f"{path}.num_res_blocks", "must be at least 1")
        require(self.decoder_res_blocks is None or self.decoder_res_blocks >= 1, f"{path}.decoder_res_blocks",
                f"must be at least 1 or null (num_res_blocks + 1), got {self.decoder_res_blocks}")
        require(self.latent_channels > 0, f"{path}.latent_channels", "must be positive")
        require(self.codebook_size >= 2, f"{path}.codebook_size", "must be at least 2")
        require(
            self.codebook_dim == self.latent_channels,
            f"{path}.codebook_dim",
            f"must equal latent_channels ({self.latent_channels}); got {self.codebook_dim}",
        )
        require(self.beta >= 0, f"{path}.beta", "must be >= 0")
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")
        require(0.0 < self.usage_decay < 1.0, f"{path}.usage_decay", "must be in (0, 1)")
        require(self.norm_groups > 0, f"{path}.norm_groups", "must be positive")
        for m in self.channel_mult:
            width = self.base_channels * m
            require(
                width % self.norm_groups == 0,
                f"{path}.norm_groups",
                f"{self.norm_groups} does not divide level width {width} (base_channels * channel_mult)",
            )


def _check(config: VQGANConfig) -> VQGANConfig:
    if not isinstance(config, VQGANConfig):
        raise InputError(f"vqgan: expected a VQGANConfig, got {type(config).__name__}")
    config.validate("vqgan")
    return config


def _exporting() -> bool:
    """True while tracing for ONNX/JIT, where Python-side input checks must not run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# --------------------------------------------------------------------------------------------------
# Building blocks


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention (as in taming's AttnBlock), written with plain matmuls so the
    legacy ONNX exporter handles it at any opset."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.scale = 1.0 / math.sqrt(channels)  # a Python float, so tracing keeps it a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)  # each (N, C, HW)
        weights = torch.softmax(q.transpose(1, 2) @ k * self.scale, dim=-1)  # (N, HW, HW)
        out = (v @ weights.transpose(1, 2)).reshape(n, c, h, w)  # (N, C, H, W)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """ResBlock -> (self-attention) -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups, dropout)
        self.attn = SelfAttention(channels, groups) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


# --------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder(nn.Module):
    """Images (N, in_channels, H, W) -> latents (N, latent_channels, H/f, W/f)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = _check(config)
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = widths[0]
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, width, c.norm_groups, c.dropout))
                ch = width
            if i < len(widths) - 1:
                blocks.append(Downsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = MidBlock(ch, c.norm_groups, c.dropout, c.attention)
        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, c.latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)  # (N, C0, H, W)
        for level in self.levels:
            h = level(h)  # halves H, W except at the last level
        h = self.mid(h)  # (N, C_L, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """Quantized latents (N, latent_channels, h, w) -> images (N, in_channels, h*f, w*f), unbounded
    (the training loss pulls them into [-1, 1]; writers clamp)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = _check(config)
        widths = [c.base_channels * m for m in c.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, c.norm_groups, c.dropout, c.attention)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks: list[nn.Module] = []
            for _ in range(c.decoder_blocks):
                blocks.append(ResBlock(ch, widths[i], c.norm_groups, c.dropout))
                ch = widths[i]
            if i > 0:
                blocks.append(Upsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(quantized))  # (N, C_L, h, w)
        for level in self.levels:
            h = level(h)  # doubles h, w except at the last level
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, in_channels, h*f, w*f)


# --------------------------------------------------------------------------------------------------
# Vector quantizer


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Index of the nearest row of `codebook (K, D)` for every vector of `latents (N, D, h, w)`: (N, h, w).

    Always fp32 with autocast off: under bf16 autocast the distances picked another code than the nearest one for
    22-32% of real latents (benchmarks/codebook_lookup.py). Positions go in blocks of `block` (default
    512 on a CPU, 8,192 on a GPU) as a matrix product over the last axis, so the (block, K) scores stay in cache
    and argmin runs over contiguous memory: 4.2x faster than one (N, K, h, w) convolution on a CPU core at
    K = 8,192. No gradient flows through the choice (the straight-through estimator takes care of that).
    """
    n, d, h, w = latents.shape
    with torch.no_grad(), torch.autocast(latents.device.type, enabled=False):
        z = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        e = codebook.detach().float()
        e_sq = e.pow(2).sum(dim=1)
        step = block or (8192 if z.is_cuda else 512)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for i in range(0, z.shape[0], step):
            out[i:i + step] = torch.addmm(e_sq, z[i:i + step], e.t(), alpha=-2.0).argmin(dim=1)
    return out.view(n, h, w)


def conv_nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """`nearest_codes` as the ONNX export traces it: one (N, K, h, w) 1x1 convolution of scores, then ArgMin."""
    dots = F.conv2d(latents, codebook[:, :, None, None])  # (N, K, h, w)
    return (codebook.pow(2).sum(dim=1)[None, :, None, None] - 2.0 * dots).argmin(dim=1)  # (N, h, w)


class QuantizerOutput(NamedTuple):
    """What `VectorQuantizer.forward` returns (a NamedTuple so DDP and tracing see plain tensors)."""

    quantized: torch.Tensor  # (N, D, h, w) straight-through: forward = codes, backward = identity to z
    codebook_loss: torch.Tensor  # () ||sg[z] - e||^2, gradient only to the codebook
    commitment_loss: torch.Tensor  # () beta * ||z - sg[e]||^2, gradient only to the encoder
    indices: torch.Tensor  # (N, h, w) int64 code ids
    perplexity: torch.Tensor  # () exp(entropy) of this batch's code histogram; K at uniform use
    usage: torch.Tensor  # () fraction of the K codes used at least once in this batch


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantization with the straight-through estimator (van den Oord et al. 2017)."""

    usage_ema: torch.Tensor

    def __init__(self, codebook_size: int, codebook_dim: int, beta: float = 0.25, usage_decay: float = 0.99) -> None:
        super().__init__()
        if codebook_size < 2 or codebook_dim < 1:
            raise InputError(f"vector quantizer: codebook_size must be >= 2 and codebook_dim >= 1, "
                             f"got {codebook_size} and {codebook_dim}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.beta = beta
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Per-code share of assignments times K (1.0 = uniform use), an EMA over training batches.
        # Not persistent: it is training state, and keeping it out of the weights keeps exported
        # state dicts to the parameters alone. It starts at 1 so no code counts as dead before it
        # has had `~1/(1-decay)` batches to be chosen.
        self.register_buffer("usage_ema", torch.ones(codebook_size), persistent=False)

    def lookup(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of `latents (N, D, h, w)`: returns (codes (N, D, h, w), indices (N, h, w)).

        The nearest code minimises ||e||^2 - 2 z.e (||z||^2 is the same for every code). Traced for ONNX, the
        dot product is a 1x1 convolution: Conv + ArgMin + Gather with no reshapes of the batch axis. Eagerly,
        `nearest_codes` finds the same codes in fp32 blocks, also under bf16 autocast.
        """
        codebook = self.embedding.weight  # (K, D)
        indices = conv_nearest_codes(latents, codebook) if _exporting() else nearest_codes(latents, codebook)
        codes = self.embedding(indices).permute(0, 3, 1, 2)  # (N, D, h, w)
        return codes, indices

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        """Quantize `latents (N, D, h, w)`, with the two VQ losses and codebook statistics."""
        codes, indices = self.lookup(latents)
        codebook_loss = F.mse_loss(codes, latents.detach())  # moves codes toward encoder outputs
        commitment_loss = self.beta * F.mse_loss(latents, codes.detach())  # keeps the encoder near its codes
        quantized = latents + (codes - latents).detach()  # straight-through estimator

        with torch.no_grad():
            counts = torch.bincount(indices.flatten(), minlength=self.codebook_size).to(latents.dtype)
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            usage = (counts > 0).to(latents.dtype).mean()
            if self.training:
                share = probs * self.codebook_size
                self.usage_ema.mul_(self.usage_decay).add_(share.to(self.usage_ema.dtype), alpha=1 - self.usage_decay)
        return QuantizerOutput(quantized, codebook_loss, commitment_loss, indices, perplexity, usage)

    def dead_codes(self, threshold: float = 0.01) -> torch.Tensor:
        """Ids of codes whose usage EMA (1.0 = uniform use) fell below `threshold`."""
        return torch.nonzero(self.usage_ema < threshold).flatten()

    @torch.no_grad()
    def reset_dead_codes(
        self,
        latents: torch.Tensor,
        threshold: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> int:
        """Re-initialise dead codes with encoder outputs drawn from `latents (N, D, h, w)`.

        Each dead code becomes a randomly chosen latent vector of the batch (so it lies where the data
        is and will be picked), and its usage EMA is reset to 1. Returns the number of codes reset.
        `threshold=float("inf")` re-initialises every code: a data-dependent codebook init.
        Under DDP call it with the same gathered latents and generator seed on every rank (or on rank 0
        and broadcast the codebook) so the replicas stay identical.
        """
        dead = self.dead_codes(threshold)
        if dead.numel() == 0:
            return 0
        vectors = latents.detach().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (N*h*w, D)
        if vectors.shape[0] == 0:
            raise InputError("reset_dead_codes: latents hold no vectors")
        picks = torch.randint(vectors.shape[0], (dead.numel(),), generator=generator, device="cpu")
        weight = self.embedding.weight
        weight[dead.to(weight.device)] = vectors[picks.to(vectors.device)].to(weight.dtype)
        self.usage_ema[dead.to(self.usage_ema.device)] = 1.0
        return int(dead.numel())


# --------------------------------------------------------------------------------------------------
# The autoencoder


class LatentDecoder(nn.Module):
    """The decoder side on its own: latents (N, C, h, w) -> quantize -> images (N, 3, h*f, w*f).

    Its state dict keys (`quantizer.*`, `decoder.*`) match `VQGAN`'s, so the bundle's
    `decoder.safetensors` loads straight into it, and it is the module exported to `decoder.onnx`.
    """

    def __init__(self, config: VQGANConfig, quantizer: VectorQuantizer | None = None,
                 decoder: Decoder | None = None) -> None:
        super().__init__()
        self.config = _check(config)
        if quantizer is None:
            quantizer = VectorQuantizer(config.codebook_size, config.codebook_dim, config.beta, config.usage_decay)
        self.quantizer = quantizer
        self.decoder = decoder if decoder is not None else Decoder(config)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        codes, _ = self.quantizer.lookup(latents)  # (N, C, h, w)
        return self.decoder(codes)  # (N, 3, h*f, w*f)


class VQGAN(nn.Module):
    """Encoder, vector quantizer and decoder; images are float32 (N, 3, H, W) in [-1, 1]."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = _check(config)
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.codebook_dim, config.beta, config.usage_decay)
        self.decoder = Decoder(config)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], path: str = "vqgan") -> VQGAN:
        """Build from plain data (e.g. a stored config), with key-path errors."""
        return cls(from_dict(VQGANConfig, data, path))

    @property
    def downsample_factor(self) -> int:
        """f: images are f times larger than latents on each side."""
        return self.config.downsample_factor

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv, for the adaptive GAN-loss weight of Esser et al. (2021)."""
        return self.decoder.conv_out.weight

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> pre-quantization latents (N, C, H/f, W/f)."""
        if not _exporting():
            f = self.downsample_factor
            if images.ndim != 4 or images.shape[1] != self.config.in_channels:
                raise InputError(
                    f"vqgan.encode: expected images (N, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
                )
            if images.shape[2] % f or images.shape[3] % f:
                raise InputError(
                    f"vqgan.encode: image size {tuple(images.shape[2:])} is not a multiple of f={f}"
                )
        return self.encoder(images)

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """Quantize latents (N, C, h, w), with the VQ losses and codebook statistics."""
        return self.quantizer(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents (N, C, h, w) -> images (N, 3, h*f, w*f); quantizes first."""
        codes, _ = self.quantizer.lookup(latents)
        return self.decoder(codes)

    def latent_decoder(self) -> LatentDecoder:
        """A `LatentDecoder` sharing this model's quantizer and decoder (for export)."""
        return LatentDecoder(self.config, self.quantizer, self.decoder)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Images -> (reconstruction, QuantizerOutput); gradients reach the encoder straight through."""
        quant = self.quantize(self.encode(images))
        return self.decoder(quant.quantized), quant


def grow_decoder(model: VQGAN, init: VQGAN) -> int:
    """Load `init` into `model`, whose decoder has as many or more residual blocks per level; return the number
    of blocks added.

    Everything else must be the same architecture. The old blocks keep their place at the start of each level,
    and each added block (placed after them, before the level's upsampling) starts with its last conv at zero,
    so it is the identity and `model` reconstructs exactly as `init` does before training goes on (the
    zero-initialised residual branch of Goyal et al. 2017). The encoder and codebook, and so the latent space,
    are untouched.
    """
    old, new = init.config, model.config
    if replace(old, decoder_res_blocks=None) != replace(new, decoder_res_blocks=None):
        raise InputError("grow_decoder: the two VQ-GANs differ in more than decoder_res_blocks")
    n_old, n_new = old.decoder_blocks, new.decoder_blocks
    if n_new < n_old:
        raise InputError(f"grow_decoder: cannot shrink the decoder from {n_old} to {n_new} blocks per level")
    state: dict[str, torch.Tensor] = {}
    for key, value in init.state_dict().items():
        parts = key.split(".")
        # decoder.levels.<level>.<index>.*: the upsampling layer moves from index n_old to n_new.
        if parts[:2] == ["decoder", "levels"] and int(parts[3]) >= n_old:
            parts[3] = str(int(parts[3]) - n_old + n_new)
        state[".".join(parts)] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise InputError(f"grow_decoder: unexpected weights {unexpected[:4]}")
    with torch.no_grad():
        for level in model.decoder.levels:
            for block in list(level)[n_old:n_new]:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
    added = {f"decoder.levels.{i}.{j}" for i in range(len(model.decoder.levels)) for j in range(n_old, n_new)}
    if not {".".join(k.split(".")[:4]) for k in missing} <= added:
        raise InputError(f"grow_decoder: weights not found in init: {sorted(missing)[:4]}")
    return len(added)
