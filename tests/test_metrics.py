"""Paired image metrics (histosynth.metrics) against known answers and a direct numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from histosynth.errors import InputError
from histosynth.metrics import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales, mse, psnr, ssim


def _images(n: int, size: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish structure plus texture, in [-1, 1], like real tiles rather than pure noise.
    base = torch.rand(n, 3, size // 4, size // 4, generator=g, dtype=dtype)
    up = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 1.6 - 0.8 + 0.1 * torch.randn(n, 3, size, size, generator=g, dtype=dtype)).clamp(-1, 1)


# --- a direct numpy reference: every valid window, no convolution tricks -------------------------------


def _np_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _np_terms(x: np.ndarray, y: np.ndarray, L: float, size: int, sigma: float = 1.5):
    """(mean SSIM, mean CS) of one channel (H, W), computed window by window."""
    w = _np_window(size, sigma)
    px = sliding_window_view(x, (size, size))  # (H', W', k, k)
    py = sliding_window_view(y, (size, size))
    mx = np.einsum("ijkl,kl->ij", px, w)
    my = np.einsum("ijkl,kl->ij", py, w)
    vx = np.einsum("ijkl,kl->ij", (px - mx[..., None, None]) ** 2, w)
    vy = np.einsum("ijkl,kl->ij", (py - my[..., None, None]) ** 2, w)
    cxy = np.einsum("ijkl,kl->ij", (px - mx[..., None, None]) * (py - my[..., None, None]), w)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return float((lum * cs).mean()), float(cs.mean())


def _np_ssim(a: torch.Tensor, b: torch.Tensor, L: float = 2.0, size: int = 11) -> np.ndarray:
    A, B = a.numpy(), b.numpy()
    return np.array([np.mean([_np_terms(A[n, c], B[n, c], L, size)[0] for c in range(A.shape[1])]) for n in range(len(A))])


def _np_ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int, L: float = 2.0, size: int = 11) -> np.ndarray:
    w = np.array(MS_SSIM_WEIGHTS[:scales])
    w = w / w.sum()
    out = []
    for n in range(a.shape[0]):
        per_channel = []
        for c in range(a.shape[1]):
            x, y = a[n, c].numpy(), b[n, c].numpy()
            value = 1.0
            for s in range(scales):
                s_val, cs_val = _np_terms(x, y, L, size)
                value *= (s_val if s == scales - 1 else cs_val) ** w[s]
                # Replicating an odd last row/column and averaging 2x2 blocks = averaging what exists.
                pad = ((0, x.shape[0] % 2), (0, x.shape[1] % 2))
                x, y = np.pad(x, pad, mode="edge"), np.pad(y, pad, mode="edge")
                h, wd = x.shape
                x = x.reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
                y = y.reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
            per_channel.append(value)
        out.append(np.mean(per_channel))
    return np.array(out)


# --- tests ---------------------------------------------------------------------------------------------


def test_identical_images_score_perfectly() -> None:
    a = _images(3, 96, seed=0)
    assert torch.allclose(ssim(a, a, reduction="none"), torch.ones(3, dtype=a.dtype))
    assert torch.allclose(ms_ssim(a, a, reduction="none"), torch.ones(3, dtype=a.dtype))
    assert torch.all(torch.isinf(psnr(a, a, reduction="none")))
    assert float(mse(a, a)) == 0.0


def test_psnr_of_gaussian_noise_of_known_power() -> None:
    a = _images(4, 64, seed=1)
    for sigma in (0.02, 0.05, 0.2):
        noisy = a + sigma * torch.randn(a.shape, generator=torch.Generator().manual_seed(7), dtype=a.dtype)
        expected = 10 * math.log10(2.0**2 / sigma**2)
        assert abs(float(psnr(a, noisy)) - expected) < 0.1
        assert abs(float(mse(a, noisy)) - sigma**2) / sigma**2 < 0.03
    # data_range enters as range^2: images in [0, 1] with the same noise are 20*log10(2) dB worse.
    noisy = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(8), dtype=a.dtype)
    assert float(psnr(a, noisy, 1.0)) == pytest.approx(float(psnr(a, noisy, 2.0)) - 20 * math.log10(2), abs=1e-9)


def test_ssim_matches_direct_numpy_reference() -> None:
    a = _images(2, 32, seed=2)
    b = (a + 0.15 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3), dtype=a.dtype)).clamp(-1, 1)
    b[1] = b[1] * 0.7 + 0.2  # a contrast/brightness change on the second image
    got = ssim(a, b, reduction="none").numpy()
    np.testing.assert_allclose(got, _np_ssim(a, b), rtol=1e-10, atol=1e-12)
    got7 = ssim(a, b, window_size=7, reduction="none").numpy()
    np.testing.assert_allclose(got7, _np_ssim(a, b, size=7), rtol=1e-10, atol=1e-12)
    assert 0.0 < got.min() < got.max() < 0.99


def test_ms_ssim_matches_direct_numpy_reference_on_96px_tiles() -> None:
    a = _images(2, 96, seed=4)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=a.dtype)).clamp(-1, 1)
    assert ms_ssim_scales(96, 96) == 4  # 96, 48, 24, 12 px; 6 px would be smaller than the window
    got = ms_ssim(a, b, reduction="none").numpy()
    np.testing.assert_allclose(got, _np_ms_ssim(a, b, scales=4), rtol=1e-9)
    got2 = ms_ssim(a, b, scales=2, reduction="none").numpy()
    np.testing.assert_allclose(got2, _np_ms_ssim(a, b, scales=2), rtol=1e-9)
    # Odd sizes: 45 -> 23 -> 12 px with a 7-px window.
    a_odd, b_odd = a[..., :45, :47], b[..., :45, :47]
    assert ms_ssim_scales(45, 47, window_size=7) == 3
    got3 = ms_ssim(a_odd, b_odd, window_size=7, reduction="none").numpy()
    np.testing.assert_allclose(got3, _np_ms_ssim(a_odd, b_odd, scales=3, size=7), rtol=1e-9)


def test_scale_count_follows_image_size() -> None:
    assert ms_ssim_scales(161, 161) == 5
    assert ms_ssim_scales(160, 200) == 4  # 160 -> 80 -> 40 -> 20 -> 10 < 11
    assert ms_ssim_scales(10, 10) == 0
    a = _images(1, 96, seed=6, dtype=torch.float32)
    with pytest.raises(InputError, match="5 scales need images of at least 161 px"):
        ms_ssim(a, a, scales=5)
    with pytest.raises(InputError, match="smaller than the SSIM window"):
        ssim(a[..., :8, :8], a[..., :8, :8])
    with pytest.raises(InputError, match="same shape"):
        ssim(a, a[..., :90, :90])


def test_more_noise_means_lower_scores() -> None:
    a = _images(2, 96, seed=9, dtype=torch.float32)
    g = torch.Generator().manual_seed(10)
    prev_s, prev_m, prev_p = 1.0, 1.0, float("inf")
    for sigma in (0.02, 0.1, 0.3):
        b = a + sigma * torch.randn(a.shape, generator=g)
        s, m, p = float(ssim(a, b)), float(ms_ssim(a, b)), float(psnr(a, b))
        assert s < prev_s and m < prev_m and p < prev_p
        prev_s, prev_m, prev_p = s, m, p


def _fit(start: torch.Tensor, target: torch.Tensor, steps: int, **kwargs) -> tuple[float, float]:
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = 1 - ms_ssim(x, target, **kwargs)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], float(1 - ms_ssim(x.detach(), target))


def test_ms_ssim_is_a_usable_loss() -> None:
    target = _images(1, 64, seed=11, dtype=torch.float32)
    noisy = target + 0.5 * torch.randn(target.shape, generator=torch.Generator().manual_seed(14))
    first, last = _fit(noisy, target, 20)
    assert last < first / 2
    # Anti-correlated start: every clamped term is floored and passes no gradient; rescaling gets out.
    first, last = _fit(-target, target, 20)
    assert last == pytest.approx(first, abs=1e-4)
    _, last = _fit(-target, target, 20, negative="rescale")
    assert last < 0.9  # the clamped metric's loss started at 1.0


def test_ssim_gradient_is_correct() -> None:
    a = _images(1, 16, seed=12)[:, :1]
    b = _images(1, 16, seed=13)[:, :1].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: ssim(a, y, window_size=7), (b,))
