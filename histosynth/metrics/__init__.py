"""Image-quality math shared by training losses and evaluation (no dependency on any later stage)."""

from histosynth.metrics.ssim import MS_SSIM_WEIGHTS, gaussian_window, ms_ssim, ms_ssim_scales, mse, psnr, ssim

__all__ = ["MS_SSIM_WEIGHTS", "gaussian_window", "ms_ssim", "ms_ssim_scales", "mse", "psnr", "ssim"]
