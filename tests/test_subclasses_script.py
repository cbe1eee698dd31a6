"""configs/pcam96/subclasses.py (round 19): a UNet split into sub-classes is its parent UNet at step 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from histosynth.bundle.testing import tiny_unet_config
from histosynth.configio import to_dict
from histosynth.diffusion.unet import UNet
from histosynth.runtime.weights import load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "configs" / "pcam96" / "subclasses.py"


def _script():
    spec = importlib.util.spec_from_file_location("pcam96_subclasses", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_unet_matches_its_parent_class_by_class(tmp_path: Path) -> None:
    torch.manual_seed(0)
    parent = UNet(tiny_unet_config(num_classes=2)).eval()
    with torch.no_grad():  # trained-looking weights: the zero-initialised output layers too, every class row distinct
        for p in parent.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(parent, tmp_path / "parent.safetensors", to_dict(parent.config), {"step": 7})
    parent_of = [0, 0, 0, 1, 1]
    _script().split_embedding(tmp_path / "parent.safetensors", tmp_path / "split.safetensors", parent_of)

    state, config, extra = load_checkpoint(tmp_path / "split.safetensors")
    assert config["num_classes"] == 5 and extra["step"] == 7 and extra["parent_of"] == parent_of
    child = UNet(tiny_unet_config(num_classes=5)).eval()
    child.load_state_dict(state)
    x, t = torch.randn(6, 3, 8, 8), torch.tensor([10, 500, 999, 3, 250, 700])
    sub = torch.tensor([0, 2, 3, 4, 5, 1])  # 5 = the child's null class
    par = torch.tensor([0, 0, 1, 1, 2, 0])  # 2 = the parent's null class
    with torch.no_grad():
        assert torch.allclose(child(x, t, sub), parent(x, t, par), atol=1e-6)
        # and the sub-class condition does reach the network: another parent's row changes the output
        assert not torch.allclose(child(x, t, torch.full((6,), 3)), parent(x, t, torch.zeros(6, dtype=torch.long)))
