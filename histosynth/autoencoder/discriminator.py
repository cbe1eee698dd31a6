"""PatchGAN discriminator (Isola et al. 2017) for the VQ-GAN's adversarial loss.

Unlike taming's `NLayerDiscriminator` it has no BatchNorm: running statistics make DDP replicas drift
and tie the model to a batch size. Normalisation is GroupNorm or spectral norm instead.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from histosynth.errors import InputError

NORMS = ("group", "spectral")


class PatchDiscriminator(nn.Module):
    """Images (N, C, H, W) -> real/fake logits per overlapping patch (N, 1, H', W').

    With `num_layers=3` each logit sees a 70x70 receptive field, the pix2pix default. `return_features`
    also returns the activations after every block, for a feature-matching loss.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: Literal["group", "spectral"] = "group",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise InputError(f"discriminator.norm: unknown value {norm!r}; allowed: {', '.join(NORMS)}")
        if in_channels < 1 or base_channels < 1 or num_layers < 1:
            raise InputError("discriminator: in_channels, base_channels and num_layers must be positive")
        widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]
        if norm == "group":
            bad = [w for w in widths[1:] if w % norm_groups]
            if bad:
                raise InputError(f"discriminator.norm_groups: {norm_groups} does not divide widths {bad}")

        def conv(cin: int, cout: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=bias)
            nn.init.normal_(layer.weight, 0.0, 0.02)  # pix2pix init
            if bias:
                nn.init.zeros_(layer.bias)
            return spectral_norm(layer) if norm == "spectral" else layer

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            # GroupNorm replaces the conv bias; spectral norm keeps it.
            if norm == "group":
                return nn.Sequential(conv(cin, cout, stride, False), nn.GroupNorm(norm_groups, cout), nn.LeakyReLU(0.2))
            return nn.Sequential(conv(cin, cout, stride, True), nn.LeakyReLU(0.2))

        # The first block is never normalised (pix2pix); the last hidden block has stride 1.
        blocks = [nn.Sequential(conv(in_channels, widths[0], 2, True), nn.LeakyReLU(0.2))]
        for i in range(1, num_layers + 1):
            blocks.append(block(widths[i - 1], widths[i], 2 if i < num_layers else 1))
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(widths[-1], 1, 1, True)

    @overload
    def forward(self, images: torch.Tensor, return_features: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def forward(
        self, images: torch.Tensor, return_features: Literal[True]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def forward(
        self, images: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (N, 1, H', W'); with `return_features`, also each block's output."""
        features: list[torch.Tensor] = []
        h = images
        for block in self.blocks:
            h = block(h)
            features.append(h)
        logits = self.head(h)
        return (logits, features) if return_features else logits
