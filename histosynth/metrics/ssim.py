"""Paired image-quality metrics as differentiable torch functions: SSIM, MS-SSIM, PSNR, MSE.

Images are float tensors ``(N, C, H, W)``; histosynth's images live in ``[-1, 1]``, hence the default
``data_range=2.0``. Every function returns one value per image with ``reduction="none"`` or their mean with
``reduction="mean"`` (the default, handy as a loss: ``1 - ms_ssim(x, y)``).

SSIM follows Wang et al. (2004): an 11-px Gaussian window (sigma 1.5) applied per channel without padding
("valid" positions only, as in the reference MATLAB code), ``K1=0.01, K2=0.03``, the map averaged over
positions and then over channels.

MS-SSIM follows Wang, Simoncelli & Bovik (2003): contrast-structure terms at each scale, the luminance term
only at the coarsest, weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``, 2x average-pool downsampling
(an odd last row or column is kept and averaged on its own, so a side of 161 px halves to 81, 41, 21, 11).

Small images (histosynth's PCam tiles are 96 px): the standard 5 scales with an 11-px window need a side of
at least ``(11 - 1) * 2**4 + 1 = 161`` px. With ``scales=None`` (the default) `ms_ssim` uses as many of the
5 scales as keep the coarsest image at least one window wide, and renormalises the first ``scales`` weights
to sum to 1. For 96-px tiles and the 11-px window that is 4 scales (96, 48, 24, 12 px) with weights
``(0.0448, 0.2856, 0.3001, 0.2363) / 0.8668``. Pass ``scales=`` explicitly to fix the count (an
`InputError` if the image is too small for it) so numbers from different image sizes stay comparable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from histosynth.errors import InputError

Reduction = Literal["mean", "none"]

# Wang, Simoncelli & Bovik (2003), Table/Eq. for 5 scales, finest first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Fractional powers of contrast-structure terms at or below 0 are undefined (negative) or have an infinite
# gradient (zero); clamping to this floor keeps the MS-SSIM loss finite for badly mismatched images.
_CS_FLOOR = 1e-6


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise InputError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise InputError(f"images must be (N, C, H, W), got shape {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise InputError(f"images must be floating point, got {a.dtype} and {b.dtype}")


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise InputError(f"reduction: unknown value {reduction!r}; allowed: mean, none")


def gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian ``(size,)``; SSIM's 2-D window is its outer product with itself."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian blur per channel (groups=C), "valid" positions only: (N, C, H-k+1, W-k+1).
    c = x.shape[1]
    k = window.numel()
    x = F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _ssim_terms(
    a: torch.Tensor, b: torch.Tensor, data_range: float, window: torch.Tensor, k1: float, k2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel means of the SSIM map and the contrast-structure map: two ``(N, C)``."""
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_a = _filter(a, window)
    mu_b = _filter(b, window)
    var_a = _filter(a * a, window) - mu_a**2
    var_b = _filter(b * b, window) - mu_b**2
    cov = _filter(a * b, window) - mu_a * mu_b
    cs_map = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (luminance * cs_map).mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def _window_for(a: torch.Tensor, window_size: int, sigma: float) -> torch.Tensor:
    if window_size < 1 or window_size % 2 == 0:
        raise InputError(f"window_size must be a positive odd number, got {window_size}")
    side = min(a.shape[-2:])
    if side < window_size:
        raise InputError(
            f"images of {a.shape[-2]}x{a.shape[-1]} px are smaller than the SSIM window ({window_size} px); "
            "pass a smaller window_size"
        )
    return gaussian_window(window_size, sigma, a.dtype, a.device)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of two image batches ``(N, C, H, W)``; 1 for identical images.

    Returns the mean over the batch, or ``(N,)`` per-image values with ``reduction="none"``.
    """
    _check_pair(a, b)
    window = _window_for(a, window_size, sigma)
    ssim_per_channel, _ = _ssim_terms(a, b, data_range, window, k1, k2)
    return _reduce(ssim_per_channel.mean(dim=1), reduction)


def ms_ssim_scales(height: int, width: int, window_size: int = 11, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales fit an image: the coarsest (after ``scales-1`` halvings) is >= one window."""
    side = min(height, width)
    scales = 0
    while scales < max_scales and side >= window_size:
        scales += 1
        side = (side + 1) // 2  # ceil: an odd row/column is kept, averaged on its own
    return scales


def ms_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    *,
    scales: int | None = None,
    weights: tuple[float, ...] | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    negative: Literal["clamp", "rescale"] = "clamp",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of two image batches ``(N, C, H, W)``; 1 for identical images.

    ``scales=None`` picks as many of the 5 standard scales as the image size allows (see the module
    docstring: 4 for 96-px tiles); ``weights`` (finest first) default to the first ``scales`` of
    `MS_SSIM_WEIGHTS`, renormalised to sum to 1. Differentiable: ``1 - ms_ssim(x, y)`` is a loss.

    A per-scale term can be negative (anti-correlated structure), and a negative number has no real
    fractional power. ``negative="clamp"`` (the metric, as in common implementations) floors each term
    at a tiny positive value, so a floored term passes no gradient. ``negative="rescale"`` maps each term
    from ``[-1, 1]`` to ``[0, 1]`` by ``(x + 1) / 2`` first: a different number, but gradients flow from
    any start, which suits a training loss whose reconstructions start out unrelated to the input.
    """
    if negative not in ("clamp", "rescale"):
        raise InputError(f"negative: unknown value {negative!r}; allowed: clamp, rescale")
    _check_pair(a, b)
    fit = ms_ssim_scales(a.shape[-2], a.shape[-1], window_size)
    if weights is not None:
        if scales is not None and scales != len(weights):
            raise InputError(f"scales={scales} but {len(weights)} weights were given")
        scales = len(weights)
    if scales is None:
        scales = fit
    if scales < 1 or scales > fit:
        need = (window_size - 1) * 2 ** max(scales - 1, 0) + 1
        raise InputError(
            f"ms_ssim: {scales} scales need images of at least {need} px with a {window_size}-px window; "
            f"these are {a.shape[-2]}x{a.shape[-1]} (at most {fit} scales fit)"
        )
    if weights is None:
        if scales > len(MS_SSIM_WEIGHTS):
            raise InputError(f"ms_ssim: at most {len(MS_SSIM_WEIGHTS)} standard weights; pass weights=")
        weights = MS_SSIM_WEIGHTS[:scales]
    total = math.fsum(weights)
    w = torch.tensor([x / total for x in weights], dtype=a.dtype, device=a.device)

    window = gaussian_window(window_size, sigma, a.dtype, a.device)
    factors = []
    for level in range(scales):
        ssim_c, cs_c = _ssim_terms(a, b, data_range, window, k1, k2)
        if negative == "rescale":
            ssim_c, cs_c = (ssim_c + 1) / 2, (cs_c + 1) / 2
        if level < scales - 1:
            factors.append(cs_c.clamp_min(_CS_FLOOR))
            # ceil_mode keeps an odd last row/column (averaged over the pixels that exist).
            a = F.avg_pool2d(a, kernel_size=2, ceil_mode=True)
            b = F.avg_pool2d(b, kernel_size=2, ceil_mode=True)
        else:
            # The full SSIM (luminance x contrast-structure) only at the coarsest scale.
            factors.append(ssim_c.clamp_min(_CS_FLOOR))
    stacked = torch.stack(factors, dim=0)  # (scales, N, C)
    per_channel = torch.prod(stacked ** w.view(-1, 1, 1), dim=0)  # (N, C)
    return _reduce(per_channel.mean(dim=1), reduction)


def mse(a: torch.Tensor, b: torch.Tensor, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per image (over C, H, W), in the images' own units."""
    _check_pair(a, b)
    return _reduce(((a - b) ** 2).mean(dim=(1, 2, 3)), reduction)


def psnr(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, *, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB per image; ``inf`` if identical.

    ``reduction="mean"`` averages the per-image dB values (not the MSEs), the usual convention for
    reporting reconstruction PSNR.
    """
    err = mse(a, b, reduction="none")
    return _reduce(10 * torch.log10(data_range**2 / err), reduction)
