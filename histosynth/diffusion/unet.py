"""The class-conditional UNet denoiser over VQ-GAN latents (ADM-style, Dhariwal & Nichol 2021).

`UNet(x, t, class_ids) -> model_output` (epsilon or v, as the schedule says; the network does not know).
Time: sinusoidal embedding -> MLP. Class: an embedding table with `num_classes + 1` rows, the last being
the *null* class of classifier-free guidance (DiT's convention); label dropout lives in `ClassEmbedder.drop`.
The sum of both embeddings conditions every residual block through a GroupNorm scale-shift.

For ONNX the inputs are `x` float32 (N, C, H, W), `t` float32 (N,) (training timesteps as floats; the
embedding is computed in float anyway, and it keeps the graph free of casts of int inputs) and
`class_ids` int64 (N,). In torch, `t` may be int64 or float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.configio import from_dict, require
from histosynth.errors import InputError
from histosynth.layers import Downsample, Upsample


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the latent UNet; stored beside the weights so the model is rebuilt without training code."""

    in_channels: int = 3  # latent channels of the VQ-GAN (f=4: 3)
    out_channels: int = 3  # = in_channels for epsilon- or v-prediction
    base_channels: int = 64  # width of the first level; with the defaults ~11M parameters, CPU-trainable
    channel_mult: tuple[int, ...] = (1, 2, 3)  # width per level; 24x24 latents run at 24, 12, 6 (32: 32, 16, 8)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up, as ADM)
    attention_levels: tuple[int, ...] = (1, 2)  # level indices with self-attention (the low resolutions)
    num_heads: int = 4  # attention heads; must divide the width of every attention level
    num_classes: int = 0  # number of real classes; id num_classes is the null class; 0 = unconditional
    dropout: float = 0.0  # dropout in residual blocks (ADM uses 0.1 on small data sets)
    norm_groups: int = 32  # GroupNorm groups; must divide every level's width

    @property
    def null_class(self) -> int:
        """The id of the null ("no class") label used for unconditional / guidance passes."""
        return self.num_classes

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (one halving per level transition)."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self, path: str) -> None:
        """Cross-field checks, called by `configio.from_dict` (and by `UNet`)."""
        require(self.in_channels > 0, f"{path}.in_channels", "must be positive")
        require(self.out_channels > 0, f"{path}.out_channels", "must be positive")
        require(self.base_channels > 0, f"{path}.base_channels", "must be positive")
        require(len(self.channel_mult) > 0, f"{path}.channel_mult", "needs at least one level")
        require(all(m > 0 for m in self.channel_mult), f"{path}.channel_mult", "multipliers must be positive")
        require(self.num_res_blocks >= 1, f"{path}.num_res_blocks", "must be at least 1")
        require(self.num_heads >= 1, f"{path}.num_heads", "must be at least 1")
        require(self.num_classes >= 0, f"{path}.num_classes", "must be >= 0 (0 = unconditional)")
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")
        require(self.norm_groups > 0, f"{path}.norm_groups", "must be positive")
        levels = len(self.channel_mult)
        for level in self.attention_levels:
            require(
                0 <= level < levels,
                f"{path}.attention_levels",
                f"level {level} does not exist; allowed: 0..{levels - 1} (one per channel_mult entry)",
            )
            width = self.base_channels * self.channel_mult[level]
            require(
                width % self.num_heads == 0,
                f"{path}.num_heads",
                f"{self.num_heads} heads do not divide width {width} of attention level {level}",
            )
        for m in self.channel_mult:
            width = self.base_channels * m
            require(
                width % self.norm_groups == 0,
                f"{path}.norm_groups",
                f"{self.norm_groups} does not divide level width {width} (base_channels * channel_mult)",
            )


def _exporting() -> bool:
    """True while tracing for ONNX/JIT, where Python-side input checks must not run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# --------------------------------------------------------------------------------------------------
# Conditioning


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> (N, emb_dim): sinusoidal features (Transformer / ADM) then a two-layer MLP."""

    frequencies: torch.Tensor

    def __init__(self, frequency_dim: int, emb_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = frequency_dim // 2
        # Not persistent: a function of the config, recomputed at build time.
        self.register_buffer(
            "frequencies", torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half),
            persistent=False,
        )
        self.mlp = nn.Sequential(nn.Linear(2 * half, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(torch.float32)[:, None] * self.frequencies[None, :]  # (N, half), float32 even under fp16
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, 2*half)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, emb_dim)


class ClassEmbedder(nn.Module):
    """Class ids (N,) in [0, num_classes] -> (N, emb_dim); row `num_classes` is the null class."""

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, emb_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop(self, class_ids: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Label dropout for classifier-free guidance: each id becomes the null id with probability `p`.

        The coin flips are drawn on the CPU from `generator` so a seeded run drops the same labels on
        any device.
        """
        if not 0.0 <= p <= 1.0:
            raise InputError(f"label dropout: p must be in [0, 1], got {p}")
        drop = torch.rand(class_ids.shape, generator=generator) < p
        return torch.where(drop.to(class_ids.device), torch.full_like(class_ids, self.num_classes), class_ids)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_ids)  # (N, emb_dim)


# --------------------------------------------------------------------------------------------------
# Building blocks


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches start as the identity (ADM), and the output starts at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm * (1 + scale) + shift -> SiLU -> dropout -> conv (zero-init)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)  # scale and shift
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each (N, C_out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with a zero-init output projection.

    Plain matmuls rather than `scaled_dot_product_attention` so the legacy ONNX exporter emits simple
    MatMul/Softmax nodes; the softmax runs in float32 so fp16/bf16 inference cannot overflow it.
    """

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n * self.num_heads, 3 * self.head_dim, h * w)  # (N*heads, 3d, HW)
        q, k, v = qkv.chunk(3, dim=1)  # each (N*heads, d, HW)
        logits = (q.transpose(1, 2) @ k) * self.scale  # (N*heads, HW, HW)
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = (v @ weights.transpose(1, 2)).reshape(n, c, h, w)  # (N, C, H, W)
        return x + self.proj(out)


class Stage(nn.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


# --------------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """x (N, C, H, W), t (N,), class_ids (N,) int64 -> model output (N, out_channels, H, W)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise InputError(f"unet: expected a UNetConfig, got {type(config).__name__}")
        config.validate("unet")
        self.config = c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        emb_dim = 4 * c.base_channels  # ADM: time embedding 4x the base width
        self.time_embedder = TimestepEmbedder(c.base_channels, emb_dim)
        self.class_embedder = ClassEmbedder(c.num_classes, emb_dim)

        def stage(cin: int, cout: int, level: int) -> Stage:
            attn = AttentionBlock(cout, c.num_heads, c.norm_groups) if level in c.attention_levels else None
            return Stage(ResBlock(cin, cout, emb_dim, c.norm_groups, c.dropout), attn)

        # Encoder: conv_in, then per level num_res_blocks stages and a downsample; every output is a skip.
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        skip_widths = [widths[0]]
        ch = widths[0]
        self.down = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, width in enumerate(widths):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stages.append(stage(ch, width, level))
                ch = width
                skip_widths.append(ch)
            self.down.append(stages)
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(ch))
                skip_widths.append(ch)

        # Middle: ResBlock -> attention -> ResBlock at the lowest resolution (always with attention, as ADM).
        self.mid_res1 = ResBlock(ch, ch, emb_dim, c.norm_groups, c.dropout)
        self.mid_attn = AttentionBlock(ch, c.num_heads, c.norm_groups)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, c.norm_groups, c.dropout)

        # Decoder: per level num_res_blocks + 1 stages, each eating one skip, then an upsample.
        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stages.append(stage(ch + skip_widths.pop(), widths[level], level))
                ch = widths[level]
            self.up.append(stages)
            if level > 0:
                self.upsamples.append(Upsample(ch))
        assert not skip_widths  # every skip is consumed exactly once

        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1))

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], path: str = "unet") -> UNet:
        """Build from plain data (e.g. a stored config), with key-path errors."""
        return cls(from_dict(UNetConfig, data, path))

    @property
    def null_class(self) -> int:
        """Id of the null class (= num_classes)."""
        return self.config.num_classes

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise InputError(f"unet: expected x (N, {c.in_channels}, H, W), got {tuple(x.shape)}")
        m = c.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise InputError(f"unet: latent size {tuple(x.shape[2:])} is not a multiple of {m} "
                             f"(2 ** (len(channel_mult) - 1))")
        if t.shape != (x.shape[0],) or class_ids.shape != (x.shape[0],):
            raise InputError(f"unet: t and class_ids must have shape ({x.shape[0]},), "
                             f"got {tuple(t.shape)} and {tuple(class_ids.shape)}")
        if class_ids.dtype != torch.int64:
            raise InputError(f"unet: class_ids must be int64, got {class_ids.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Predict the schedule's target for noisy latents `x` at training timesteps `t`."""
        if not _exporting():
            self._check_inputs(x, t, class_ids)
        emb = self.time_embedder(t) + self.class_embedder(class_ids)  # (N, E)

        h = self.conv_in(x)  # (N, C0, H, W)
        skips = [h]
        for level, stages in enumerate(self.down):
            for s in stages:
                h = s(h, emb)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)  # (N, C, H/2, W/2)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)  # (N, C_L, H/m, W/m)

        for i, stages in enumerate(self.up):
            for s in stages:
                h = s(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)  # (N, C, 2H, 2W)

        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, H, W)
