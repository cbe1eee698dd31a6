"""The torch modules a bundle holds, and how they are rebuilt from the manifest and safetensors weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from histosynth.autoencoder.vqgan import LatentDecoder, VQGANConfig
from histosynth.configio import from_dict
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.runtime.weights import load_checkpoint, load_state_dict


class BundleDecoder(nn.Module):
    """Diffusion-space latents (N, C, h, w) -> images (N, 3, h*f, w*f) in [-1, 1].

    Undoes the diffusion scaling (``latents / latent_scale``), quantizes, decodes and clamps, so that
    ``decoder.onnx`` and the torch backend do the same thing end to end. Its weights are only the
    VQ-GAN's decoder half (`LatentDecoder`: quantizer + decoder); the encoder never ships in a bundle.
    """

    def __init__(self, latent_decoder: LatentDecoder, latent_scale: float) -> None:
        super().__init__()
        self.latent_decoder = latent_decoder
        self.latent_scale = float(latent_scale)  # a constant of the graph, recorded in the manifest

    @property
    def config(self) -> VQGANConfig:
        return self.latent_decoder.config

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.latent_decoder(latents / self.latent_scale)  # (N, 3, H, W)
        return images.clamp(-1.0, 1.0)


def build_unet_module(config: dict[str, Any], weights: str | Path) -> UNet:
    """A `UNet` from its config dict and a safetensors checkpoint (strict key and shape match)."""
    unet = UNet(from_dict(UNetConfig, config, "manifest.unet"))
    state_dict, _, _ = load_checkpoint(weights)
    load_state_dict(unet, state_dict, weights)
    return unet


def build_decoder_module(config: dict[str, Any], latent_scale: float, weights: str | Path) -> BundleDecoder:
    """A `BundleDecoder` from the VQ-GAN config dict, the latent scale and the decoder-half weights."""
    latent_decoder = LatentDecoder(from_dict(VQGANConfig, config, "manifest.vqgan"))
    state_dict, _, _ = load_checkpoint(weights)
    load_state_dict(latent_decoder, state_dict, weights)
    return BundleDecoder(latent_decoder, latent_scale)
