"""Round 9: a bank of generated latents (`train latent-bank`) and a decoder GAN phase that adapts to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histosynth.autoencoder.losses import (DiscriminatorConfig, VQGANLoss, VQGANLossConfig, colour_anchor_loss,
                                         hinge_d_loss)
from histosynth.autoencoder.train import load_vqgan, train_vqgan
from histosynth.bundle.store import load_bundle
from histosynth.bundle.testing import tiny_bundle
from histosynth.diffusion.samplers import sample
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.errors import InputError
from histosynth.runtime.tracking import read_metrics
from histosynth.runtime.weights import read_checkpoint_metadata
from histosynth.sampling.latent_bank import BankSpec, sample_latent_bank
from test_quality_training import _config


@pytest.fixture(scope="module")
def stage1(tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("stage1")
    train_vqgan(_config(tiles, codebook_init_step=2), run_dir, show_progress=False)
    return run_dir / "vqgan.safetensors"


def test_a_latent_bank_is_the_samplers_output_before_the_decoder(tmp_path: Path) -> None:
    folder = tiny_bundle(tmp_path, num_classes=3, tile_size=32)
    spec = BankSpec(count=5, seed=1, steps=3, batch_size=2)
    path = sample_latent_bank(folder, tmp_path / "bank", spec)
    bank = np.load(path)
    manifest = load_bundle(folder).manifest
    assert bank.shape == (5, *manifest.latent_shape) and bank.dtype == np.float16
    # The first batch by hand: classes in turn, one noise stream, then out of the diffusion scaling.
    unet = load_bundle(folder).build_unet()
    noise = torch.randn((2, *manifest.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = sample(lambda x, t, y: unet(x, t, y), NoiseSchedule(manifest.schedule), noise,
                          torch.tensor([0, 1]), steps=3) / manifest.latent_scale
    np.testing.assert_allclose(bank[:2].astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["count"] == 5 and meta["seed"] == 1 and meta["latent_scale"] == manifest.latent_scale
    # Reproducible from its seed; an existing bank is kept unless --overwrite.
    again = sample_latent_bank(folder, tmp_path / "again", spec)
    assert np.array_equal(np.load(again), bank)
    with pytest.raises(InputError, match="overwrite"):
        sample_latent_bank(folder, tmp_path / "bank", spec)
    with pytest.raises(InputError, match="unknown sampler"):
        sample_latent_bank(folder, tmp_path / "other", BankSpec(count=2, sampler="euler"))


def test_generated_decodings_are_fakes_with_a_gan_term_of_their_own() -> None:
    torch.manual_seed(0)
    loss = VQGANLoss(VQGANLossConfig(ms_ssim_weight=0.0, feature_matching_weight=0.0, adaptive_weight=False,
                                     disc_weight=0.5,
                                     discriminator=DiscriminatorConfig(base_channels=8, num_layers=2, norm_groups=4)))
    disc = loss.config.discriminator.build(3)
    images, recon = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32, requires_grad=True)
    adapt = torch.randn(3, 3, 32, 32, requires_grad=True)
    quant = type("Q", (), {"codebook_loss": torch.zeros(()), "commitment_loss": torch.zeros(())})()
    plain, _ = loss.generator_loss(images, recon, quant, disc, None)
    total, logs = loss.generator_loss(images, recon, quant, disc, None, adapt_fakes=adapt, adapt_weight=0.4)
    assert total.item() == pytest.approx(plain.item() + 0.5 * 0.4 * -disc(adapt).mean().item(), rel=1e-5)
    total.backward()
    assert adapt.grad is not None and adapt.grad.abs().sum() > 0
    d_loss, d_logs = loss.discriminator_loss(images, recon, disc, adapt)
    logits = disc(torch.cat([images, recon, adapt]))
    assert d_loss.item() == pytest.approx(hinge_d_loss(logits[:2], logits[2:]).item(), rel=1e-5)
    assert d_logs["logits_adapt"].item() == pytest.approx(logits[4:].mean().item(), rel=1e-5)


def _bank(folder: Path, rows: int, shape: tuple[int, ...]) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "latents.npy", torch.randn(rows, *shape, generator=torch.Generator().manual_seed(5))
            .numpy().astype(np.float16))
    return folder


def test_a_decoder_gan_phase_adapts_to_generated_latents(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    c = load_vqgan(stage1).config.latent_channels
    bank = _bank(tmp_path / "bank", 10, (c, 8, 8))
    common = dict(init_from=str(stage1), train_parts="decoder", disc_start=0, disc_warmup=2, steps=5, ckpt_every=5)
    adapted = train_vqgan(_config(tiles, adapt_latents=str(bank), adapt_weight=0.5, **common), tmp_path / "a",
                          show_progress=False)
    plain = train_vqgan(_config(tiles, **common), tmp_path / "p", show_progress=False)
    records = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    assert all("logits_adapt" in r for r in records)  # the discriminator sees them from its first step
    assert "gan_adapt" not in records[0] and "gan_adapt" in records[-1]  # the decoder, after the warm-up
    # Only the decoder moved, and differently from the same run without the bank; bank latents are not tiles.
    start, a, p = load_vqgan(stage1), adapted.model, plain.model
    assert all(torch.equal(x, y) for x, y in zip(start.encoder.state_dict().values(), a.encoder.state_dict().values()))
    assert torch.equal(start.quantizer.embedding.weight, a.quantizer.embedding.weight)
    assert not all(torch.equal(x, y) for x, y in zip(a.decoder.parameters(), p.decoder.parameters()))
    assert (read_checkpoint_metadata(adapted.export_path)[1]["samples_seen"]
            == read_checkpoint_metadata(plain.export_path)[1]["samples_seen"])


def test_a_bank_that_does_not_fit_is_refused(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    c = load_vqgan(stage1).config.latent_channels
    with pytest.raises(InputError, match="adapt_latents.*shape"):
        train_vqgan(_config(tiles, init_from=str(stage1), train_parts="decoder", disc_start=0, steps=2,
                            adapt_latents=str(_bank(tmp_path / "wide", 4, (c + 1, 8, 8)))),
                    tmp_path / "run", show_progress=False)
    with pytest.raises(InputError, match="no latent bank"):
        train_vqgan(_config(tiles, init_from=str(stage1), train_parts="decoder", disc_start=0, steps=2,
                            adapt_latents=str(tmp_path / "missing")), tmp_path / "run2", show_progress=False)
    with pytest.raises(InputError, match="adapt_latents.*decoder"):
        _config(tiles, adapt_latents=str(tmp_path / "wide"))
    with pytest.raises(InputError, match="adapt_weight"):
        _config(tiles, init_from=str(stage1), train_parts="decoder", adapt_weight=-1.0)


def test_the_colour_anchor_sees_colour_and_layout_not_texture() -> None:
    torch.manual_seed(0)
    base = torch.rand(2, 3, 32, 32) * 2 - 1
    assert colour_anchor_loss(base, base).item() == 0.0
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.4 - 0.2  # zero mean per 2x2 block
    assert colour_anchor_loss(base + checker, base).item() == pytest.approx(0.0, abs=1e-6)
    shifted = base.clone()
    shifted[:, 1] += 0.3  # one channel recoloured everywhere
    assert colour_anchor_loss(shifted, base).item() == pytest.approx(0.1, rel=1e-5)


def _pooled_gap(model: torch.nn.Module, start: torch.nn.Module, latents: torch.Tensor) -> float:
    with torch.no_grad():
        codes, _ = start.quantizer.lookup(latents)
        return colour_anchor_loss(model.decoder(codes), start.decoder(codes)).item()


def test_the_anchor_keeps_generated_decodings_near_the_starting_decoder(tiles: Path, stage1: Path,
                                                                        tmp_path: Path) -> None:
    c = load_vqgan(stage1).config.latent_channels
    bank = _bank(tmp_path / "bank", 10, (c, 8, 8))
    common = dict(init_from=str(stage1), train_parts="decoder", disc_start=0, disc_warmup=0, steps=6, ckpt_every=6,
                  adapt_latents=str(bank), adapt_weight=4.0, lr=2e-3)
    free = train_vqgan(_config(tiles, **common), tmp_path / "free", show_progress=False)
    anchored = train_vqgan(_config(tiles, adapt_anchor=50.0, **common), tmp_path / "anchored", show_progress=False)
    records = read_metrics(tmp_path / "anchored" / "metrics.jsonl", "train")
    assert records[0]["adapt_anchor"] == pytest.approx(0.0, abs=1e-3)  # the anchor starts as the decoder itself
    assert "adapt_anchor" not in read_metrics(tmp_path / "free" / "metrics.jsonl", "train")[-1]
    start = load_vqgan(stage1)
    latents = torch.from_numpy(np.load(bank / "latents.npy")).float()
    assert _pooled_gap(anchored.model, start, latents) < 0.5 * _pooled_gap(free.model, start, latents)


def test_an_anchor_without_generated_latents_is_refused(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="adapt_anchor.*adapt_latents"):
        _config(tiles, init_from=str(stage1), train_parts="decoder", adapt_anchor=1.0)
    with pytest.raises(InputError, match="adapt_anchor"):
        _config(tiles, init_from=str(stage1), train_parts="decoder", adapt_latents=str(tmp_path), adapt_anchor=-1.0)
