"""VQ-GAN networks: shapes, config checks, the quantizer's losses and gradients, dead codes, ONNX parity,
the patch discriminator, and a tiny overfit on real tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.autoencoder.discriminator import PatchDiscriminator
from histosynth.autoencoder.vqgan import (
    VQGAN,
    LatentDecoder,
    VectorQuantizer,
    VQGANConfig,
    nearest_codes,
)
from histosynth.configio import from_dict, to_dict
from histosynth.errors import InputError



TINY = VQGANConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, codebook_size=32)


def tiny(**overrides: object) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**to_dict(TINY), "channel_mult": TINY.channel_mult, **overrides}))


# ----------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [96, 128])
def test_shapes_f4(size: int) -> None:
    model = tiny(attention=True)
    images = torch.rand(2, 3, size, size) * 2 - 1
    latents = model.encode(images)
    assert model.downsample_factor == 4
    assert latents.shape == (2, 3, size // 4, size // 4)
    reconstruction, quant = model(images)
    assert reconstruction.shape == images.shape
    assert quant.quantized.shape == latents.shape
    assert quant.indices.shape == (2, size // 4, size // 4) and quant.indices.dtype == torch.int64
    assert model.decode(latents).shape == images.shape


def test_channel_mult_sets_downsample_factor() -> None:
    model = tiny(channel_mult=(1, 2, 2, 2))
    assert model.downsample_factor == 8
    assert model.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 8, 8)


def test_decode_quantizes_first() -> None:
    model = tiny().eval()
    latents = torch.randn(2, 3, 8, 8)
    expected = model.decoder(model.quantize(latents).quantized)
    torch.testing.assert_close(model.decode(latents), expected)
    torch.testing.assert_close(model.latent_decoder()(latents), expected)


def test_latent_decoder_state_dict_matches_vqgan_keys() -> None:
    model = tiny()
    sub = model.latent_decoder().state_dict()
    full = model.state_dict()
    assert set(sub) == {k for k in full if not k.startswith("encoder.")}
    fresh = LatentDecoder(TINY)
    fresh.load_state_dict(sub)  # strict: the bundle's decoder.safetensors loads straight in
    latents = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fresh.eval()(latents), model.eval().decode(latents))


def test_parameter_count_default_is_cpu_sized() -> None:
    model = VQGAN(VQGANConfig())
    count = sum(p.numel() for p in model.parameters())
    # Default: ~5M parameters (taming's f4 model is ~55M); enough for 96-128 px tiles, trainable on CPU.
    assert 3_000_000 < count < 8_000_000, count
    assert model.quantizer.embedding.weight.shape == (1024, 3)
    tiny_count = sum(p.numel() for p in tiny().parameters())
    assert tiny_count < 100_000


def test_bad_image_size_is_input_error() -> None:
    with pytest.raises(InputError, match="multiple of f=4"):
        tiny().encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        tiny().encode(torch.zeros(1, 1, 32, 32))


# ----------------------------------------------------------------------------------------- config


def test_config_round_trips_through_configio() -> None:
    config = VQGANConfig(base_channels=16, channel_mult=(1, 2, 4), attention=True, norm_groups=8)
    assert from_dict(VQGANConfig, to_dict(config)) == config
    model = VQGAN.from_config_dict(to_dict(config))
    assert model.config == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"codebook_dim": 4}, "vqgan.codebook_dim: must equal latent_channels"),
        ({"base_channels": 24, "norm_groups": 32}, "vqgan.norm_groups: 32 does not divide"),
        ({"channel_mult": []}, "vqgan.channel_mult: needs at least one level"),
        ({"beta": -1}, "vqgan.beta"),
        ({"codebook_size": 1}, "vqgan.codebook_size"),
        ({"codebok_size": 8}, "unknown key 'codebok_size'"),
    ],
)
def test_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        VQGAN.from_config_dict(data)


# ----------------------------------------------------------------------------------------- quantizer


def _quantizer(beta: float = 0.25) -> VectorQuantizer:
    torch.manual_seed(1)
    q = VectorQuantizer(codebook_size=16, codebook_dim=3, beta=beta)
    with torch.no_grad():
        q.embedding.weight.normal_()
    return q


def test_quantizer_picks_nearest_code() -> None:
    q = _quantizer()
    latents = torch.randn(2, 3, 5, 7)
    out = q(latents)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, q.embedding.weight).argmin(dim=1).reshape(2, 5, 7)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.quantized, q.embedding.weight[expected].permute(0, 3, 1, 2))


@pytest.mark.parametrize("block", [None, 7, 10_000])
def test_nearest_codes_are_exact_in_blocks_and_under_bf16_autocast(block: int | None) -> None:
    # A large, dense codebook (round 4's 4 x 8,192): bf16 distances would pick a wrong code for many vectors.
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(8192, 4, generator=gen)
    latents = torch.randn(3, 4, 6, 5, generator=gen)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat.double(), codebook.double()).argmin(dim=1).reshape(3, 6, 5)
    assert torch.equal(nearest_codes(latents, codebook, block), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nearest_codes(latents, codebook, block), expected)
        q = VectorQuantizer(8192, 4)
        q.embedding.weight.data.copy_(codebook)
        assert torch.equal(q(latents.requires_grad_()).indices, expected)


def test_traced_lookup_picks_the_same_codes_as_the_eager_one() -> None:
    class Indices(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = _quantizer()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.q.lookup(z)[1]

    module = Indices().eval()
    q = module.q
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(2, 3, 5, 7),))  # the ONNX branch of `lookup`
    other = torch.randn(4, 3, 5, 7)  # another batch size than the traced one
    assert torch.equal(traced(other), q.lookup(other)[1])


def test_codebook_loss_moves_only_the_codebook_unweighted() -> None:
    beta = 0.3
    q = _quantizer(beta)
    latents = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(latents)
    out.codebook_loss.backward()
    assert latents.grad is None  # sg[z]: the encoder gets nothing from this term
    codes = q.embedding.weight[out.indices].permute(0, 3, 1, 2).detach()
    # d/de mean((e - z)^2) = 2 (e - z) / numel, summed over the positions assigned to each code; no beta.
    per_position = (2.0 * (codes - latents.detach()) / latents.numel()).permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.zeros_like(q.embedding.weight).index_add_(0, out.indices.flatten(), per_position)
    torch.testing.assert_close(q.embedding.weight.grad, expected)


def test_commitment_loss_moves_only_the_encoder_weighted_by_beta() -> None:
    beta = 0.3
    q = _quantizer(beta)
    latents = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(latents)
    out.commitment_loss.backward()
    assert q.embedding.weight.grad is None  # sg[e]: the codebook gets nothing from this term
    codes = q.embedding.weight[out.indices].permute(0, 3, 1, 2).detach()
    expected = beta * 2.0 * (latents.detach() - codes) / latents.numel()
    torch.testing.assert_close(latents.grad, expected)
    # The two terms differ exactly by beta (the taming VectorQuantizer2 bug swaps which one carries it).
    torch.testing.assert_close(out.commitment_loss, beta * out.codebook_loss)


def test_straight_through_estimator() -> None:
    q = _quantizer()
    latents = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = q(latents)
    weights = torch.randn_like(latents)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(latents.grad, weights)  # identity gradient to z
    assert q.embedding.weight.grad is None


def test_perplexity_and_usage_known_answer() -> None:
    q = VectorQuantizer(codebook_size=4, codebook_dim=2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    # 4 positions on code 0, 4 on code 1: two codes used equally -> perplexity 2, usage 2/4.
    latents = torch.tensor([[0.1, 0.0]] * 4 + [[9.9, 0.2]] * 4).T.reshape(1, 2, 2, 4)
    out = q.eval()(latents)
    assert sorted(out.indices.flatten().tolist()) == [0] * 4 + [1] * 4
    assert out.perplexity.item() == pytest.approx(2.0, rel=1e-5)
    assert out.usage.item() == pytest.approx(0.5)


def test_dead_codes_are_found_and_reset_from_encoder_outputs() -> None:
    q = VectorQuantizer(codebook_size=8, codebook_dim=2, usage_decay=0.5)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.full((8, 2), 100.0))
        q.embedding.weight[0] = 0.0  # only code 0 is near the data
    latents = torch.randn(4, 2, 6, 6)
    q.eval()(latents)
    assert q.dead_codes().numel() == 0  # eval passes do not touch the usage statistics
    q.train()
    for _ in range(10):
        out = q(latents)
    assert out.usage.item() == pytest.approx(1 / 8)
    assert q.dead_codes().tolist() == list(range(1, 8))

    reset = q.reset_dead_codes(latents, generator=torch.Generator().manual_seed(0))
    assert reset == 7
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in q.embedding.weight[1:]:
        assert torch.isclose(vectors, code).all(dim=1).any()  # each new code is one of the latents
    assert q.dead_codes().numel() == 0
    assert q(latents).usage.item() > 0.5  # the revived codes are chosen now
    assert q.reset_dead_codes(latents) == 0


# ----------------------------------------------------------------------------------------- ONNX


def test_latent_decoder_onnx_matches_torch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = tiny(attention=True).eval()
    with torch.no_grad():  # spread the codebook so the lookup really selects among codes
        model.quantizer.embedding.weight.normal_()
    decoder = model.latent_decoder().eval()
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(
        decoder,
        (torch.randn(2, 3, 6, 6),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["latents"],
        output_names=["images"],
        dynamic_axes={"latents": {0: "batch"}, "images": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        latents = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = decoder(latents).numpy()
        (got,) = session.run(None, {"latents": latents.numpy()})
        assert got.shape == (batch, 3, 24, 24)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("norm", ["group", "spectral"])
def test_patch_discriminator_shapes_and_features(norm: str) -> None:
    disc = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=3, norm=norm, norm_groups=4)
    images = torch.randn(2, 3, 96, 96)
    logits = disc(images)
    assert logits.shape == (2, 1, 10, 10)  # 96 -> 48 -> 24 -> 12 -> 11 -> 10 (70x70 patches)
    logits2, features = disc(images, return_features=True)
    assert len(features) == 4 and features[0].shape == (2, 8, 48, 48)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    # No batch statistics: a sample's logits do not depend on the rest of the batch.
    disc.eval()
    torch.testing.assert_close(disc(images[:1]), disc(images)[:1])


def test_patch_discriminator_rejects_unknown_norm() -> None:
    with pytest.raises(InputError, match="allowed: group, spectral"):
        PatchDiscriminator(norm="batch")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- overfit


def test_tiny_model_overfits_two_real_tiles(pcam_tiles: list[Path]) -> None:
    torch.manual_seed(0)
    tiles = [np.asarray(Image.open(p).convert("RGB"))[:32, :32] for p in pcam_tiles[:2]]
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, 32, 32)
    model = tiny(codebook_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    # The best flat colour per image and channel: a model that beats it has learnt structure, not just colour.
    flat_colour_l1 = (images - images.flatten(2).median(dim=2).values[:, :, None, None]).abs().mean().item()

    def l1() -> float:
        with torch.no_grad():
            return (model.eval()(images)[0] - images).abs().mean().item()

    start = l1()
    model.train()
    # Data-dependent codebook init: every code becomes one of the encoder's outputs.
    model.quantizer.reset_dead_codes(model.encode(images).detach(), threshold=float("inf"))
    for _ in range(60):
        reconstruction, quant = model(images)
        loss = (reconstruction - images).abs().mean() + quant.codebook_loss + quant.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = l1()
    assert end < 0.6 * start, (start, end)
    assert end < 0.9 * flat_colour_l1, (flat_colour_l1, end)
