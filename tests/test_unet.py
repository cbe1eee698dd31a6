"""The latent UNet: shapes, conditioning, label dropout, ADM zero-init, config checks, ONNX parity and a
tiny denoising fit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from histosynth.configio import from_dict, to_dict
from histosynth.diffusion.unet import ClassEmbedder, TimestepEmbedder, UNet, UNetConfig
from histosynth.errors import InputError



TINY = UNetConfig(
    base_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(1, 2),
    num_heads=2,
    norm_groups=8,
    num_classes=3,
)


def tiny(num_classes: int = 3, randomize: bool = True) -> UNet:
    """A tiny UNet; `randomize` replaces ADM's zero-init so the output depends on every input."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(**{**to_dict(TINY), "channel_mult": (1, 2, 2), "attention_levels": (1, 2),
                               "num_classes": num_classes}))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.05)
    return model


def inputs(batch: int, size: int, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    class_ids = torch.randint(0, num_classes + 1, (batch,), generator=g)
    return x, t, class_ids


# ----------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [24, 32])  # latents of 96 px and 128 px tiles at f=4
def test_shapes(size: int) -> None:
    model = tiny()
    x, t, class_ids = inputs(2, size)
    out = model(x, t, class_ids)
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_int_and_float_timesteps_agree() -> None:
    model = tiny().eval()
    x, t, class_ids = inputs(3, 24)
    torch.testing.assert_close(model(x, t, class_ids), model(x, t.float(), class_ids))


def test_samples_do_not_interact_within_a_batch() -> None:
    # No batch statistics anywhere: guidance batches (cond + null halves) give the same answer as single calls.
    model = tiny().eval()
    x, t, class_ids = inputs(4, 24)
    batched = model(x, t, class_ids)
    for i in range(4):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], class_ids[i : i + 1]), batched[i : i + 1],
                                   atol=1e-5, rtol=1e-5)


def test_class_and_time_condition_the_output() -> None:
    model = tiny().eval()
    x, t, _ = inputs(1, 24)
    outs = [model(x, t, torch.tensor([c])) for c in range(4)]  # 3 classes + null
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(outs[a], outs[b], atol=1e-4)
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t + 100, torch.tensor([0])), atol=1e-4)


def test_bad_inputs_are_input_errors() -> None:
    model = tiny()
    x, t, class_ids = inputs(2, 24)
    with pytest.raises(InputError, match="not a multiple of 4"):
        model(torch.zeros(2, 3, 22, 24), t, class_ids)
    with pytest.raises(InputError, match=r"expected x \(N, 3, H, W\)"):
        model(torch.zeros(2, 4, 24, 24), t, class_ids)
    with pytest.raises(InputError, match="shape"):
        model(x, t[:1], class_ids)
    with pytest.raises(InputError, match="int64"):
        model(x, t, class_ids.int())


# ----------------------------------------------------------------------------------------- conditioning


def test_timestep_embedding_is_sinusoidal() -> None:
    embedder = TimestepEmbedder(frequency_dim=8, emb_dim=4)
    features: list[torch.Tensor] = []
    embedder.mlp[0].register_forward_hook(lambda _m, args, _o: features.append(args[0]))
    embedder(torch.tensor([0.0, 10.0]))
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    expected = [[math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs] for t in (0.0, 10.0)]
    torch.testing.assert_close(features[0], torch.tensor(expected))


def test_class_embedder_has_a_null_row() -> None:
    model = tiny(num_classes=5)
    assert model.null_class == 5 == model.class_embedder.null_class
    assert model.class_embedder.embedding.weight.shape[0] == 6


def test_label_dropout() -> None:
    embedder = ClassEmbedder(num_classes=4, emb_dim=8)
    ids = torch.arange(4).repeat(2500)  # 10,000 labels
    assert torch.equal(embedder.drop(ids, 0.0), ids)
    assert (embedder.drop(ids, 1.0) == 4).all()
    dropped = embedder.drop(ids, 0.1, generator=torch.Generator().manual_seed(0))
    changed = dropped != ids
    assert (dropped[changed] == 4).all()  # dropped labels become the null id, the rest are untouched
    assert abs(changed.float().mean().item() - 0.1) < 0.015  # 5 sigma for n=10,000
    again = embedder.drop(ids, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)  # seeded: reproducible
    with pytest.raises(InputError, match="p must be in"):
        embedder.drop(ids, 1.5)


def test_unconditional_model() -> None:
    model = tiny(num_classes=0)
    assert model.null_class == 0
    assert model.class_embedder.embedding.weight.shape[0] == 1
    x, t, _ = inputs(2, 24)
    assert model(x, t, torch.zeros(2, dtype=torch.int64)).shape == (2, 3, 24, 24)
    with pytest.raises(IndexError):
        model(x, t, torch.ones(2, dtype=torch.int64))  # no real classes exist
    dropped = model.class_embedder.drop(torch.zeros(5, dtype=torch.int64), 0.5)
    assert (dropped == 0).all()


# ----------------------------------------------------------------------------------------- init and size


def test_adm_zero_init() -> None:
    model = tiny(randomize=False)
    assert model.conv_out.weight.abs().max() == 0 and model.conv_out.bias.abs().max() == 0
    for name, module in model.named_modules():
        if name.endswith("conv2") or name.endswith("attn.proj") or name == "mid_attn.proj":
            assert module.weight.abs().max() == 0, name
    x, t, class_ids = inputs(2, 24)
    assert (model(x, t, class_ids) == 0).all()  # the untrained model predicts zero


def test_parameter_count_default_is_cpu_sized() -> None:
    count = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    assert 8_000_000 < count < 15_000_000, count  # ~11M (ADM ImageNet-64 is ~300M)
    conditional = sum(p.numel() for p in UNet(UNetConfig(num_classes=7)).parameters())
    assert conditional - count == 7 * 4 * 64  # seven more embedding rows of width 4 * base_channels


# ----------------------------------------------------------------------------------------- config


def test_config_round_trips_through_configio() -> None:
    assert from_dict(UNetConfig, to_dict(TINY)) == TINY
    assert UNet.from_config_dict(to_dict(TINY)).config == TINY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"attention_levels": [3]}, r"unet.attention_levels: level 3 does not exist; allowed: 0..2"),
        ({"num_heads": 5}, "unet.num_heads: 5 heads do not divide width"),
        ({"base_channels": 48, "norm_groups": 32}, "unet.norm_groups: 32 does not divide"),
        ({"num_classes": -1}, "unet.num_classes"),
        ({"dropout": 1.0}, "unet.dropout"),
        ({"heads": 2}, "unknown key 'heads'"),
    ],
)
def test_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        UNet.from_config_dict(data)


# ----------------------------------------------------------------------------------------- ONNX


def test_onnx_matches_torch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = tiny().eval()
    path = tmp_path / "unet.onnx"
    x, t, class_ids = inputs(2, 24)
    torch.onnx.export(
        model,
        (x, t.float(), class_ids),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x", "t", "class_ids"],
        output_names=["model_output"],
        dynamic_axes={name: {0: "batch"} for name in ("x", "t", "class_ids", "model_output")},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)", "tensor(float)", "tensor(int64)"]
    for batch in (1, 3):
        x, t, class_ids = inputs(batch, 24, seed=batch)
        with torch.no_grad():
            expected = model(x, t, class_ids).numpy()
        (got,) = session.run(None, {"x": x.numpy(), "t": t.float().numpy(), "class_ids": class_ids.numpy()})
        assert got.shape == (batch, 3, 24, 24)
        assert np.abs(expected).max() > 1e-2  # not a trivially zero output
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- training signal


def test_tiny_denoising_fit() -> None:
    # From ADM's zero init, a few dozen steps of epsilon-regression on fixed noisy latents must cut the loss:
    # gradients reach every zero-initialised layer and the conditioning.
    model = tiny(randomize=False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    x_t = math.sqrt(0.5) * x0 + math.sqrt(0.5) * noise
    t = torch.tensor([500, 500])
    class_ids = torch.tensor([0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = (model(x_t, t, class_ids) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(noise.pow(2).mean().item())  # zero output at start
    assert losses[-1] < 0.2 * losses[0], losses[-1]
