"""LPIPS-VGG (Zhang et al. 2018) for users who have its weights on disk; histosynth never downloads them.

The network is the ``lpips`` package's ``LPIPS(net="vgg")`` rebuilt in plain torch (no torchvision), with
the same state-dict keys, so a file made by

```python
import lpips, safetensors.torch
safetensors.torch.save_file(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.safetensors")
```

loads here. ``.safetensors`` is preferred; a torch ``.pth``/``.pt`` is read with ``weights_only=True``
(tensors only, never arbitrary objects).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import InputError

# VGG16 `features` layer indices per LPIPS slice (each slice ends at a ReLU): conv widths per index.
_SLICES: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((0, 3, 64), (2, 64, 64)),
    ((5, 64, 128), (7, 128, 128)),
    ((10, 128, 256), (12, 256, 256), (14, 256, 256)),
    ((17, 256, 512), (19, 512, 512), (21, 512, 512)),
    ((24, 512, 512), (26, 512, 512), (28, 512, 512)),
)
_POOL_BEFORE = (False, True, True, True, True)  # a 2x2 max-pool opens slices 2..5
_CHANNELS = (64, 128, 256, 512, 512)


class _Slice(nn.Module):
    """Convs (+ ReLU) of one VGG stage, keyed by their index in `vgg16().features` as `lpips` keys them."""

    def __init__(self, convs: tuple[tuple[int, int, int], ...], pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.order = [str(i) for i, _, _ in convs]
        for index, cin, cout in convs:
            self.add_module(str(index), nn.Conv2d(cin, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(x, 2, 2)
        for name in self.order:
            x = F.relu(getattr(self, name)(x))
        return x


class _Linear(nn.Module):
    """LPIPS's 1x1 channel weighting; ``model.1`` is the conv (``model.0`` a dropout in `lpips`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _ScalingLayer(nn.Module):
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGGFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for k, (convs, pool) in enumerate(zip(_SLICES, _POOL_BEFORE), start=1):
            self.add_module(f"slice{k}", _Slice(convs, pool))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            out.append(x)
        return out


class LPIPS(nn.Module):
    """Learned perceptual distance of two image batches in [-1, 1]: ``(N,)`` per image (0 for identical)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGGFeatures()
        for k, ch in enumerate(_CHANNELS):
            self.add_module(f"lin{k}", _Linear(ch))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Load `lpips.LPIPS(net="vgg")` weights from a ``.safetensors`` or ``.pth`` file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"loss.lpips_weights: {path} not found")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
            raise InputError(f"loss.lpips_weights: cannot read {path}: {e}") from None
        model = cls()
        own = model.state_dict()
        # `lpips` stores the scaling constants as buffers too; older files may lack them.
        state = {k: v for k, v in state.items() if k in own or not k.startswith("scaling_layer.")}
        for k in ("scaling_layer.shift", "scaling_layer.scale"):
            state.setdefault(k, own[k])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise InputError(
                f"loss.lpips_weights: {path} is not an LPIPS-VGG state dict: {str(e).splitlines()[0]}"
            ) from None
        return model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feats_a = self.net(self.scaling_layer(a))
        feats_b = self.net(self.scaling_layer(b))
        total = a.new_zeros(a.shape[0])
        for k, (fa, fb) in enumerate(zip(feats_a, feats_b)):
            # Unit-normalise along channels, as `lpips.normalize_tensor` (eps 1e-10).
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total
