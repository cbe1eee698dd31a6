"""Growing a trained UNet into a deeper one (diffusion.grow): the same function at step 0, then it trains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import histosynth.diffusion.train as T
from histosynth.diffusion.grow import check_growable, deepen, grown_from
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError
from histosynth.runtime.tracking import read_metrics
from histosynth.runtime.weights import load_checkpoint, save_checkpoint
from histosynth.configio import to_dict

# Three levels with a width change at the last transition (as the shipped UNet's (1, 2, 2)) and one at the first,
# so grown decoder blocks sit after width-changing blocks.
SOURCE = UNetConfig(in_channels=4, out_channels=4, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_levels=(2,), num_heads=2, norm_groups=4, num_classes=3)


def _trained_like(config: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised layers are not zero, as after training (else growth is trivially exact)."""
    torch.manual_seed(seed)
    unet = UNet(config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.mark.parametrize("blocks, attention", [(2, (2,)), (3, (2,)), (1, (1, 2)), (2, (0, 1, 2))])
def test_a_grown_unet_computes_what_its_source_computed(blocks, attention):
    source = _trained_like(SOURCE)
    target = replace(SOURCE, num_res_blocks=blocks, attention_levels=attention)
    grown = UNet(target).eval()
    grown.load_state_dict(deepen(source.state_dict(), SOURCE, target))
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in source.parameters())
    torch.manual_seed(1)
    x, t, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, y), source(x, t, y), rtol=0, atol=1e-6)


def test_the_new_blocks_learn():
    source = _trained_like(SOURCE)
    target = replace(SOURCE, num_res_blocks=2)
    grown = UNet(target)
    grown.load_state_dict(deepen(source.state_dict(), SOURCE, target))
    x, t, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    grown(x, t, y).square().mean().backward()
    # New encoder block and new decoder block: their zero last convs get gradients, so they leave the identity.
    assert grown.down[0][1].res.conv2.weight.grad.abs().sum() > 0
    assert grown.up[2][1].res.conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    (dict(base_channels=32), "base_channels: 16 -> 32"),
    (dict(num_res_blocks=2, num_heads=4), "num_heads: 2 -> 4"),
    (dict(attention_levels=(1,)), r"drops level\(s\) \[2\]"),
])
def test_a_growth_that_would_change_more_than_depth_is_refused(change, message):
    with pytest.raises(InputError, match=message):
        check_growable(SOURCE, replace(SOURCE, **change))


def test_grown_from_tells_growth_from_fine_tuning():
    stored = to_dict(SOURCE)
    assert grown_from(stored, replace(SOURCE, num_res_blocks=2)) == SOURCE
    assert grown_from(stored, SOURCE) is None  # same architecture: a plain continuation
    assert grown_from(stored, replace(SOURCE, num_classes=5)) is None  # e.g. an LDM into a cLDM: copy what fits
    assert grown_from(None, SOURCE) is None
    with pytest.raises(InputError, match="norm_groups"):
        grown_from(stored, replace(SOURCE, num_res_blocks=2, norm_groups=8))


def test_train_cldm_grows_init_from_and_counts_its_samples(monkeypatch, tmp_path: Path):
    """`init_from` a shallower UNet: the run starts from the same function, logs the growth and keeps the count."""
    import numpy as np

    rng = np.random.default_rng(0)
    keys = [f"t{i}.jpg" for i in range(16)]
    data = T.LatentData(rng.standard_normal((16, 4, 8, 8)).astype(np.float16), keys, 0.5, {"tile_size": [32, 32]})
    monkeypatch.setattr(T, "open_latents", lambda path: data)
    labels = tmp_path / "labels.csv"
    labels.write_text("tile,class_id,class_name\n" + "".join(f"{k},{i % 2},{'ab'[i % 2]}\n"
                                                              for i, k in enumerate(keys)))
    small = replace(SOURCE, channel_mult=(1, 2), attention_levels=(1,), num_classes=2)
    source = _trained_like(small)
    init = tmp_path / "unet.safetensors"
    save_checkpoint(source.state_dict(), init, to_dict(small), {"kind": "unet", "samples_seen": 1000})
    deeper = replace(small, num_res_blocks=2, num_classes=0)  # num_classes comes from the labels
    config = T.LDMTrainConfig(latents=Path("cache"), model=deeper, labels=labels, init_from=init, steps=3,
                              batch_size=4, lr=1e-12, warmup_steps=1, ema_decay=0.0, checkpoint_every=10,
                              sample_count=2, sample_steps=2, check_samples=0, device="cpu", seed=0)
    result = T.train_cldm(config, tmp_path / "run", progress=False)
    state, stored, extra = load_checkpoint(result.unet)
    assert stored["num_res_blocks"] == 2 and extra["samples_seen"] == 1000 + 3 * 4
    init_row = read_metrics(tmp_path / "run" / T.LOG_FILE, "init")[0]
    assert init_row["init_grown_blocks"] == 1 and init_row["init_skipped"] == 0
    grown = UNet(replace(deeper, num_classes=2)).eval()
    grown.load_state_dict(state)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1])
    with torch.no_grad():  # lr ~0: the export is the grown source itself
        torch.testing.assert_close(grown(x, t, y), source(x, t, y), rtol=0, atol=1e-3)
