"""The VQ-GAN objective (Esser et al. 2021), trainable without downloaded perceptual networks.

Generator (autoencoder) loss::

    rec   = l1 * |x - x^| + ms_ssim * (1 - MS-SSIM(x, x^)) + lpips * LPIPS(x, x^)      (LPIPS: optional)
          + feature_matching * mean_l |D_l(x) - D_l(x^)|                                 (after disc_start)
    vq    = codebook * ||sg[z] - e||^2 + commitment * beta * ||z - sg[e]||^2             (beta: in the model)
    gan   = -mean D(x^)                                                                  (after disc_start)
    total = rec + vq + lambda * disc_weight * gan,   lambda = |grad_L rec| / (|grad_L gan| + 1e-4)

with L the decoder's last layer (taming's adaptive weight, clamped to [0, 1e4]). Discriminator loss is the
hinge loss ``mean relu(1 - D(x)) + mean relu(1 + D(x^))``.

Decoder adaptation (optional): decodings g of *generated* latents, which have no target, add
``adapt_weight * lambda * disc_weight * -mean D(g)`` to the generator loss and count as fakes for the
discriminator, so the decoder also learns to render the diffusion model's latents as real tissue. With
``adapt_anchor > 0`` they also add ``adapt_anchor * |pool(g) - pool(g0)|``, g0 the same latents decoded by the
decoder the phase started from (frozen) and pool an 8-px average: the GAN term may change texture, not the
colour and layout at 8 px (round 9 without it drained eosin from every tile).

No VGG or LPIPS weights can be downloaded here, so the default replaces the perceptual term by MS-SSIM and
discriminator feature matching (Salimans et al. 2016 / pix2pixHD): the discriminator's intermediate
activations are a learned, data-specific feature space that sharpens reconstructions as LPIPS would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.autoencoder.discriminator import PatchDiscriminator
from histosynth.autoencoder.lpips import LPIPS
from histosynth.autoencoder.vqgan import QuantizerOutput
from histosynth.configio import require
from histosynth.metrics.ssim import ms_ssim


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The patch discriminator (pix2pix PatchGAN, no BatchNorm)."""

    base_channels: int = 64  # width of the first layer
    num_layers: int = 3  # 3 -> 70x70 receptive field per logit
    norm: Literal["group", "spectral"] = "group"  # GroupNorm keeps DDP replicas identical (no running stats)
    norm_groups: int = 32  # GroupNorm groups; must divide every width after the first

    def validate(self, path: str) -> None:
        """Cross-field checks (called by configio)."""
        require(self.base_channels > 0, f"{path}.base_channels", "must be positive")
        require(self.num_layers >= 1, f"{path}.num_layers", "must be at least 1")

    def build(self, in_channels: int = 3) -> PatchDiscriminator:
        """The discriminator network."""
        return PatchDiscriminator(in_channels, self.base_channels, self.num_layers, self.norm, self.norm_groups)


@dataclass(frozen=True)
class VQGANLossConfig:
    """Weights of the VQ-GAN loss terms; see the module docstring for the formula."""

    l1_weight: float = 1.0  # pixel L1 reconstruction
    ms_ssim_weight: float = 0.2  # (1 - MS-SSIM): structure at several scales; 4 scales fit 96-px tiles
    codebook_weight: float = 1.0  # ||sg[z] - e||^2, moves codes toward encoder outputs
    commitment_weight: float = 1.0  # multiplies the model's beta * ||z - sg[e]||^2
    lpips_weights: Path | None = None  # local LPIPS-VGG weights (.safetensors/.pth); None = no LPIPS term
    lpips_weight: float = 1.0  # used only with lpips_weights
    feature_matching_weight: float = 1.0  # L1 between discriminator features of real and reconstructed tiles
    disc_weight: float = 0.5  # multiplies the adaptive GAN weight (taming: 0.8 with LPIPS)
    adaptive_weight: bool = True  # taming's grad-norm ratio at the decoder's last layer; False: lambda = 1
    adaptive_weight_max: float = 1e4  # clamp of lambda
    lecam_weight: float = 0.0  # LeCam regulariser of the discriminator (Tseng et al. 2021); 0: off
    lecam_decay: float = 0.99  # EMA decay of the mean real/fake logits that LeCam anchors to
    discriminator: DiscriminatorConfig = DiscriminatorConfig()

    def validate(self, path: str) -> None:
        """Cross-field checks (called by configio)."""
        for name in ("l1_weight", "ms_ssim_weight", "codebook_weight", "commitment_weight", "lpips_weight",
                     "feature_matching_weight", "disc_weight"):
            require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        require(self.codebook_weight > 0, f"{path}.codebook_weight",
                "must be > 0 (the codebook learns only through this term)")
        require(self.adaptive_weight_max > 0, f"{path}.adaptive_weight_max", "must be > 0")
        require(self.lecam_weight >= 0, f"{path}.lecam_weight", "must be >= 0")
        require(0 <= self.lecam_decay < 1, f"{path}.lecam_decay", "must be in [0, 1)")
        require(self.l1_weight + self.ms_ssim_weight + self.lpips_weight * (self.lpips_weights is not None) > 0,
                f"{path}.l1_weight", "some reconstruction term (l1, ms_ssim or lpips) must have a positive weight")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``mean relu(1 - real) + mean relu(1 + fake)``, halved as in taming."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


class LeCamEMA(nn.Module):
    """The LeCam regulariser (Tseng et al. 2021, eq. 3) and its state, the EMAs of the mean logits.

    ``R = mean(relu(D(x) - a_fake)^2) + mean(relu(a_real - D(x^))^2)`` keeps the discriminator's outputs
    near the moving anchors instead of letting them run apart; it stabilises GANs trained on little data,
    where the discriminator otherwise wins, its gradients vanish and the generator falls back to blur.
    The anchors are buffers, so a resume checkpoint carries them.
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """The penalty for this batch; updates the anchors afterwards (they never carry gradients)."""
        penalty = (F.relu(real_logits - self.fake).pow(2).mean()
                   + F.relu(self.real - fake_logits).pow(2).mean())
        with torch.no_grad():
            self.real.lerp_(real_logits.detach().float().mean(), 1 - self.decay)
            self.fake.lerp_(fake_logits.detach().float().mean(), 1 - self.decay)
        return penalty


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the L1 distance between (detached) real and fake discriminator features."""
    terms = [F.l1_loss(fake, real.detach()) for real, fake in zip(real_features, fake_features)]
    return torch.stack(terms).mean()


ANCHOR_POOL = 8  # px: finer than a nucleus is texture (the GAN's to change), coarser is colour and layout


def colour_anchor_loss(fakes: torch.Tensor, targets: torch.Tensor, pool: int = ANCHOR_POOL) -> torch.Tensor:
    """Mean L1 between `pool`-px averages of `fakes` and of `targets` (N, 3, H, W; H, W multiples of `pool`)."""
    return (F.avg_pool2d(fakes.float(), pool) - F.avg_pool2d(targets.float(), pool)).abs().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """taming's lambda: ``|grad rec| / (|grad gan| + 1e-4)`` at `last_layer`, clamped, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    """Computes the generator and discriminator losses; owns the optional LPIPS network (frozen).

    The discriminator itself is passed to each call (so the trainer can hand in its DDP wrapper or the
    plain module): `generator_loss` takes the *plain* module with frozen parameters, `discriminator_loss`
    the trainable (possibly DDP-wrapped) one.
    """

    def __init__(self, config: VQGANLossConfig) -> None:
        super().__init__()
        self.config = config
        self.lpips = LPIPS.from_file(config.lpips_weights) if config.lpips_weights is not None else None
        self.lecam = LeCamEMA(config.lecam_decay) if config.lecam_weight > 0 else None

    def reconstruction_loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel, structural and (optional) perceptual terms, weighted; with their unweighted values."""
        c = self.config
        logs: dict[str, torch.Tensor] = {}
        l1 = (images - reconstructions).abs().mean()
        total = c.l1_weight * l1
        logs["l1"] = l1.detach()
        if c.ms_ssim_weight > 0:
            # MS-SSIM is undefined for negative contrast-structure terms, which early, noisy reconstructions
            # produce; the metric clamps them, and the clamp has a zero gradient there - L1 carries the start.
            ms = 1.0 - ms_ssim(reconstructions.float(), images.float(), data_range=2.0)
            total = total + c.ms_ssim_weight * ms
            logs["ms_ssim_loss"] = ms.detach()
        if self.lpips is not None and c.lpips_weight > 0:
            lp = self.lpips(reconstructions.float(), images.float()).mean()
            total = total + c.lpips_weight * lp
            logs["lpips"] = lp.detach()
        return total, logs

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quant: QuantizerOutput,
        discriminator: nn.Module | None,
        last_layer: torch.Tensor | None,
        gan_scale: float = 1.0,
        adapt_fakes: torch.Tensor | None = None,
        adapt_weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder loss; pass `discriminator=None` before the GAN warm-up ends (no GAN/feature terms).

        `last_layer` is the decoder's last weight (`VQGAN.decoder_last_layer`) for the adaptive weight;
        `gan_scale` in [0, 1] ramps the GAN and feature-matching terms in after the discriminator's warm-up.
        `adapt_fakes` are decodings of generated latents: they get the GAN term alone, `adapt_weight` times the
        reconstructions' (same adaptive lambda).
        """
        c = self.config
        rec, logs = self.reconstruction_loss(images, reconstructions)
        vq = c.codebook_weight * quant.codebook_loss + c.commitment_weight * quant.commitment_loss
        logs["codebook"] = quant.codebook_loss.detach()
        logs["commitment"] = quant.commitment_loss.detach()
        total = rec + vq
        if discriminator is not None and (c.disc_weight > 0 or c.feature_matching_weight > 0):
            # One discriminator call on [real; fake]: the real half is the feature-matching target only.
            both = torch.cat([images.detach(), reconstructions], dim=0)
            logits, features = discriminator(both, return_features=True)
            n = images.shape[0]
            fake_logits = logits[n:]
            if c.feature_matching_weight > 0:
                fm = feature_matching_loss([f[:n] for f in features], [f[n:] for f in features])
                rec = rec + gan_scale * c.feature_matching_weight * fm
                total = total + gan_scale * c.feature_matching_weight * fm
                logs["feature_matching"] = fm.detach()
            if c.disc_weight > 0:
                gan = -fake_logits.mean()
                if c.adaptive_weight and last_layer is not None:
                    weight = adaptive_gan_weight(rec, gan, last_layer, c.adaptive_weight_max)
                else:
                    weight = torch.ones((), device=images.device)
                total = total + gan_scale * c.disc_weight * weight * gan
                logs["gan"] = gan.detach()
                logs["gan_weight"] = weight
                if adapt_fakes is not None and adapt_weight > 0:
                    adapt = -discriminator(adapt_fakes).mean()
                    total = total + gan_scale * c.disc_weight * adapt_weight * weight * adapt
                    logs["gan_adapt"] = adapt.detach()
        logs["loss"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor, discriminator: nn.Module,
                           adapt_fakes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss on real tiles vs (detached) reconstructions and `adapt_fakes`, in one discriminator call."""
        n, m = images.shape[0], reconstructions.shape[0]
        fakes = [reconstructions.detach()] + ([adapt_fakes.detach()] if adapt_fakes is not None else [])
        logits = discriminator(torch.cat([images.detach(), *fakes], dim=0))
        loss = hinge_d_loss(logits[:n], logits[n:])
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits[:n].detach().mean(),
            "logits_fake": logits[n:n + m].detach().mean(),
        }
        if adapt_fakes is not None:
            logs["logits_adapt"] = logits[n + m:].detach().mean()
        if self.lecam is not None:
            lecam = self.lecam(logits[:n].float(), logits[n:].float())
            loss = loss + self.config.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        return loss, logs
