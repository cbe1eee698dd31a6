"""The diffusion training objective: noise, targets, the min-SNR weighting, and joint IMC.

    x0 = latents * latent_scale            (diffusion space, unit variance)
    x_t = alpha_t x0 + sigma_t eps         (NoiseSchedule.add_noise, t ~ U{0..T-1})
    loss = w(t) * ||UNet(x_t, t, y) - target||^2,  target = eps or v (NoiseSchedule.target)

`w(t)` is 1 (plain MSE) or the min-SNR-gamma weight of Hang et al. (2023), which speeds up convergence
by not letting the easy low-noise timesteps dominate. Also here: starting a cLDM from an LDM's weights
(`copy_matching_weights`).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.diffusion.unet import UNet


def snr_weights(schedule: NoiseSchedule, t: torch.Tensor, loss: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights (N,): 1 for plain MSE, min-SNR-gamma (Hang et al. 2023, eq. 10) otherwise.

    With SNR(t) = alpha-bar / (1 - alpha-bar), the weight is min(SNR, gamma) / SNR for eps targets and
    min(SNR, gamma) / (SNR + 1) for v targets (the v loss is already (SNR + 1) times the eps loss).
    """
    if loss == "mse":
        return torch.ones(t.shape[0], dtype=torch.float32)
    abar = schedule.alphas_cumprod[t.cpu()]  # float64
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    w = clipped / snr if schedule.config.prediction == "epsilon" else clipped / (snr + 1)
    return w.float()


class DiffusionObjective(nn.Module):
    """The trained modules and the per-sample loss in one module, so DDP syncs every gradient (UNet and head).

    `forward(x0, latents, noise, t, class_ids, label_dropout)` returns ``(loss, logs)``. With an IMC head,
    the class ids come from the head's argmax (mapped through `cluster_to_class`) and its IM loss, weighted
    by `imc_weight`, is added; then each id becomes the null class with probability `label_dropout` (the
    UNet's label embedder).
    """

    def __init__(self, unet: UNet, schedule: NoiseSchedule, *, loss: Literal["min_snr", "mse"] = "min_snr",
                 min_snr_gamma: float = 5.0, autocast: Literal["none", "bf16"] = "none",
                 head: Optional[nn.Module] = None, cluster_to_class: Optional[torch.Tensor] = None,
                 imc_mu: float = 4.0, imc_weight: float = 0.1) -> None:
        super().__init__()
        self.unet = unet
        self.head = head
        self.schedule = schedule
        self.loss, self.min_snr_gamma, self.autocast = loss, min_snr_gamma, autocast
        self.imc_mu, self.imc_weight = imc_mu, imc_weight
        if cluster_to_class is not None:
            self.register_buffer("cluster_to_class", cluster_to_class, persistent=False)
        else:
            self.cluster_to_class = None

    def forward(self, x0: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                class_ids: torch.Tensor, label_dropout: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logs: dict[str, torch.Tensor] = {}
        keep = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)
        imc_loss = None
        if self.head is not None:
            from histosynth.clusters.imc import im_loss

            logits = self.head.logits_from_latents(latents)  # (N, K), raw (unscaled) latents as in `cluster`
            clusters = logits.argmax(dim=1)
            class_ids = self.cluster_to_class[clusters] if self.cluster_to_class is not None else clusters
            keep = (class_ids >= 0).to(x0.dtype)  # excluded clusters do not train the UNet
            class_ids = class_ids.clamp(min=0)
            imc_loss, cond_h, marg_h = im_loss(logits, self.imc_mu)
            logs.update(imc_loss=imc_loss.detach(), imc_cond_entropy=cond_h.detach(),
                        imc_marginal_entropy=marg_h.detach())
        if label_dropout > 0:
            class_ids = self.unet.class_embedder.drop(class_ids, label_dropout)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.target(x0, noise, t)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
            output = self.unet(x_t, t, class_ids)
        per_sample = (output.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (N,)
        w = snr_weights(self.schedule, t, self.loss, self.min_snr_gamma).to(x0.device)
        loss = (w * per_sample * keep).sum() / keep.sum().clamp(min=1.0)
        logs["mse"] = (per_sample * keep).sum().detach() / keep.sum().clamp(min=1.0)
        logs["diffusion_loss"] = loss.detach()
        if imc_loss is not None:
            loss = loss + self.imc_weight * imc_loss
        return loss, logs


def copy_matching_weights(unet: UNet, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor of `state` whose name and shape match into `unet`; returns what was copied/skipped.

    The class embedding of an LDM (1 row: the null class) differs in shape from a cLDM's (K+1 rows); its
    null row is copied to the cLDM's null row, so the unconditional model becomes the cLDM's null class
    and the K new class rows start from it too (fine-tuning starts from the LDM's unconditional output).
    """
    own = unet.state_dict()
    copied, skipped = [], []
    new = {}
    for key, value in own.items():
        src = state.get(key)
        if src is not None and src.shape == value.shape:
            new[key] = src.to(value.dtype)
            copied.append(key)
        elif (src is not None and "class_embed" in key and src.ndim == 2 and value.ndim == 2
              and src.shape[1] == value.shape[1]):
            rows = value.clone()
            rows[:] = src[-1].to(value.dtype)  # the source's null row, the last one
            new[key] = rows
            copied.append(f"{key} (null row)")
        else:
            new[key] = value
            skipped.append(key)
    unet.load_state_dict(new, strict=True)
    return {"copied": copied, "skipped": skipped}
