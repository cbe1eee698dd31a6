"""Issue 8's training changes: EMA warm-up, decoder-only GAN fine-tuning on crops in bf16, LeCam, the plain-text
train log, tile statistics and the post-training sample check."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from histosynth.autoencoder.losses import LeCamEMA
from histosynth.autoencoder.train import (DISC_EXPORT_NAME, VQGANTrainConfig, load_discriminator, load_vqgan,
                                         random_crop_pair, train_vqgan)
from histosynth.autoencoder.vqgan import VQGAN, grow_decoder
from histosynth.configio import from_dict
from histosynth.errors import InputError
from histosynth.metrics.tilestats import FLAT_STD, compare, sample_verdict, tile_stats
from histosynth.runtime.tracking import TrainProgress, read_metrics
from test_train_vqgan import TINY as TINY_VQGAN
from histosynth.runtime.checkpointing import SampleCount
from histosynth.runtime.ema import EMA
from histosynth.runtime.weights import read_checkpoint_metadata

# test_train_vqgan's tiny VQ-GAN on 32-px crops, with short, GAN-free defaults for these tests.
TINY = {**TINY_VQGAN, "loss": {**TINY_VQGAN["loss"], "ms_ssim_weight": 0.0}, "steps": 8, "disc_start": 100,
        "dead_code_every": 200, "log_every": 1}


def _config(tiles: Path, **changes) -> VQGANTrainConfig:
    merged = {"data": str(tiles), **TINY}
    for k, v in changes.items():
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return from_dict(VQGANTrainConfig, merged, "vqgan_config")


@pytest.fixture(scope="module")
def stage1(tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("stage1")
    train_vqgan(_config(tiles, codebook_init_step=2), run_dir, show_progress=False)
    return run_dir / "vqgan.safetensors"


# ---- EMA


def test_ema_warm_up_follows_the_schedule_and_survives_a_resume() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = EMA(net, decay=0.999)
    net.weight.data.fill_(1.0)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(net)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    # 0 -> 1 through decays 0.1, 0.18, 0.25: 1 - 0.1*0.1818*0.25
    assert ema.averaged(net).weight.item() == pytest.approx(1 - 0.1 * (2 / 11) * 0.25)
    restored = EMA(net, decay=0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3 and restored.current_decay() == pytest.approx(4 / 13)
    # Late in a run the configured decay caps the schedule; without warm-up it applies from the start.
    ema.updates = 10**6
    assert ema.current_decay() == 0.999
    assert EMA(net, decay=0.9, warmup=False).current_decay() == 0.9


# ---- crops, LeCam


def test_random_crop_pair_keeps_latents_and_pixels_aligned() -> None:
    f = 4
    codes = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    # Each image pixel carries the value of the latent cell it decodes from.
    images = codes.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3).repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    c, x = random_crop_pair(codes, images, 8, f)
    assert c.shape == (2, 1, 2, 2) and x.shape == (2, 3, 8, 8)
    assert torch.equal(x[:, :1, ::f, ::f], c)


def test_lecam_penalty_known_values_and_anchor_update() -> None:
    lecam = LeCamEMA(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.5])
    # anchors start at 0: mean(relu(real - 0)^2) + mean(relu(0 - fake)^2) = (1 + 9)/2 + (4 + 0)/2
    assert lecam(real, fake).item() == pytest.approx(7.0)
    assert lecam.real.item() == pytest.approx(1.0) and lecam.fake.item() == pytest.approx(-0.375)


# ---- decoder-only fine-tuning


def test_decoder_fine_tuning_keeps_the_latent_space(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "dec"
    cfg = _config(tiles, init_from=str(stage1), train_parts="decoder", crop_size=16, autocast="bf16",
                  channels_last=True, ema_decay=0.9, disc_start=0, disc_warmup=3, gan_ramp=2,
                  loss={"lecam_weight": 0.1})
    result = train_vqgan(cfg, run_dir, show_progress=False)
    before, after = load_file(str(stage1)), load_file(str(result.export_path))
    frozen = [k for k in before if k.startswith(("encoder.", "quantizer."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen if before[k].is_floating_point()
                          and "usage" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    train = read_metrics(run_dir / "metrics.jsonl", "train")
    # The discriminator trains from step 0; its GAN terms reach the decoder only after the warm-up, ramped.
    assert all("disc_loss" in r and "lecam" in r for r in train)
    assert [("gan" in r) for r in train] == [False] * 3 + [True] * 5
    assert [round(r["gan_scale"], 3) for r in train if "gan" in r] == [0.5, 1.0, 1.0, 1.0, 1.0]
    # Validation runs on whole tiles, not crops.
    assert read_metrics(run_dir / "metrics.jsonl", "val")[-1]["ssim"] > 0
    log = (run_dir / "train.log").read_text()
    assert "train vqgan: started, 8 steps" in log and "finished at step 8 of 8" in log


def test_a_frozen_warmup_leaves_the_autoencoder_as_it_was(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # Continuing a GAN phase with a new discriminator: while it warms up, the decoder must not drift back towards
    # the reconstruction-only optimum, so nothing but the discriminator steps.
    run_dir = tmp_path / "frozen"
    cfg = _config(tiles, init_from=str(stage1), train_parts="decoder", ema_decay=0.9, disc_start=0,
                  disc_warmup=4, warmup_freezes_autoencoder=True, steps=4, log_every=2)
    result = train_vqgan(cfg, run_dir, show_progress=False)
    before, after = load_file(str(stage1)), load_file(str(result.export_path))
    weights = [k for k in before if before[k].is_floating_point() and "usage" not in k]
    assert any(k.startswith("decoder.") for k in weights)
    assert all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in weights)
    # ... and it has seen no more tiles than it had.
    assert (read_checkpoint_metadata(result.export_path)[1]["samples_seen"]
            == read_checkpoint_metadata(stage1)[1]["samples_seen"])
    train = read_metrics(run_dir / "metrics.jsonl", "train")
    assert len(train) == 2 and all("disc_loss" in r and "gan" not in r for r in train)
    # Without the option the same warm-up trains the decoder on the reconstruction terms.
    result = train_vqgan(replace(cfg, warmup_freezes_autoencoder=False), tmp_path / "free", show_progress=False)
    after = load_file(str(result.export_path))
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in weights if k.startswith("decoder."))
    assert (read_checkpoint_metadata(result.export_path)[1]["samples_seen"]
            == read_checkpoint_metadata(stage1)[1]["samples_seen"] + 4 * cfg.batch_size)


def test_a_gan_phase_goes_on_from_its_exported_discriminator(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    first = _config(tiles, init_from=str(stage1), train_parts="decoder", disc_start=0, steps=3,
                    loss={"lecam_weight": 0.1}, export_dtype="float32")
    train_vqgan(first, tmp_path / "a", show_progress=False)
    saved = load_file(str(tmp_path / "a" / DISC_EXPORT_NAME))
    assert any(k.startswith("discriminator.") for k in saved) and {"lecam.real", "lecam.fake"} <= set(saved)
    # The next round's discriminator starts as the saved one, anchors included.
    nxt = replace(first, disc_init_from=tmp_path / "a" / DISC_EXPORT_NAME)
    disc = nxt.loss.discriminator.build(3)
    lecam = LeCamEMA()
    assert load_discriminator(nxt.disc_init_from, disc, lecam, nxt) == 3
    assert all(torch.equal(v, saved[f"discriminator.{k}"]) for k, v in disc.state_dict().items())
    assert lecam.real.item() == saved["lecam.real"].item() != 0
    train_vqgan(nxt, tmp_path / "b", show_progress=False)
    # Another discriminator, or a file that is not one, is refused by name.
    other = _config(tiles, init_from=str(stage1), train_parts="decoder", disc_init_from=str(nxt.disc_init_from),
                    loss={"discriminator": {"base_channels": 12, "num_layers": 2, "norm_groups": 4}})
    with pytest.raises(InputError, match="another config"):
        train_vqgan(other, tmp_path / "c", show_progress=False)
    with pytest.raises(InputError, match="not a discriminator"):
        train_vqgan(replace(nxt, disc_init_from=stage1), tmp_path / "d", show_progress=False)
    # A run whose discriminator never trained writes none.
    train_vqgan(_config(tiles, steps=2, disc_start=5), tmp_path / "e", show_progress=False)
    assert not (tmp_path / "e" / DISC_EXPORT_NAME).exists()


def test_a_resumed_run_counts_from_where_it_started_though_init_from_was_replaced(
        tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # Round 7 resumed a run whose init_from (the shipped export) had meanwhile been replaced by that run's own
    # export: the count of earlier rounds must come from the run's checkpoint, not from the file as it is now.
    init = tmp_path / "init.safetensors"
    shutil.copy(stage1, init)
    before = read_checkpoint_metadata(init)[1]["samples_seen"]
    cfg = _config(tiles, init_from=str(init), train_parts="decoder", steps=2, ckpt_every=1)
    first = train_vqgan(cfg, tmp_path / "run", show_progress=False)
    assert read_checkpoint_metadata(first.export_path)[1]["samples_seen"] == before + 2 * cfg.batch_size
    shutil.copy(first.export_path, init)  # ships, and becomes what init_from names
    result = train_vqgan(replace(cfg, steps=4), tmp_path / "run", show_progress=False)
    assert result.resumed_from == 2
    assert read_checkpoint_metadata(result.export_path)[1]["samples_seen"] == before + 4 * cfg.batch_size


def test_a_run_resumed_at_another_batch_size_counts_its_past_steps_at_their_own(
        tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # The count used to be steps x the *current* batch x processes: a resume at another batch size (or process
    # count) recounted every earlier step at the new rate.
    before = read_checkpoint_metadata(stage1)[1]["samples_seen"]
    cfg = _config(tiles, init_from=str(stage1), train_parts="decoder", steps=2, ckpt_every=1, batch_size=4)
    train_vqgan(cfg, tmp_path / "run", show_progress=False)
    result = train_vqgan(replace(cfg, steps=5, batch_size=2), tmp_path / "run", show_progress=False)
    assert result.resumed_from == 2
    assert read_checkpoint_metadata(result.export_path)[1]["samples_seen"] == before + 2 * 4 + 3 * 2


def test_sample_counts_go_on_from_a_checkpoints_record() -> None:
    count = SampleCount(100)
    assert count.at(10, 8, 2) == 260
    meta: dict = {"prior_samples": 100}
    count.record(meta, 10, 8, 2)
    resumed = SampleCount.resumed(meta, prior=0)
    assert resumed.at(10, 4, 1) == 260 and resumed.at(15, 4, 1) == 280
    # A checkpoint written before the record existed: its run's starting count, every step at today's rate.
    assert SampleCount.resumed({"prior_samples": 50}, prior=0).at(3, 4, 1) == 62
    assert SampleCount.resumed({}, prior=7).at(3, 4, 1) == 19


def test_a_resumed_gan_phase_cools_down_from_where_it_stands(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # Round 8: a GAN phase resumed at step 4 with both learning rates falling linearly to 0 at step 8.
    base = _config(tiles, init_from=str(stage1), train_parts="decoder", disc_start=0, steps=4, ckpt_every=2,
                   lr=1e-3, disc_lr=2e-3)
    train_vqgan(base, tmp_path / "run", show_progress=False)
    cool = replace(base, steps=8, lr_decay="linear", lr_decay_start=4, min_lr=1e-4)
    cool.validate("vqgan_config")
    result = train_vqgan(cool, tmp_path / "run", show_progress=False)
    assert result.resumed_from == 4
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    lr = {r["step"]: (r["lr"], r["disc_lr"]) for r in records}
    # Before the cool-down both rates are the config's; then they fall together, the discriminator's in proportion.
    assert lr[2] == pytest.approx((1e-3, 2e-3))
    for step in (5, 6, 7, 8):
        factor = 0.1 + 0.9 * (1 - (step - 1 - 4) / 4) if step - 1 > 4 else 1.0  # set at the step's start
        assert lr[step] == pytest.approx((1e-3 * factor, 2e-3 * factor))
    # A resumed run takes the config's rate, not the one saved in the optimizer's state.
    slower = replace(base, steps=10, lr=5e-4, disc_lr=5e-4)
    train_vqgan(slower, tmp_path / "run", show_progress=False)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl", "train")[-1]["lr"] == pytest.approx(5e-4)


def test_a_continued_gan_phase_warms_its_fresh_optimizers_up(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # Round 9: committed weights go on with new Adam states; both rates rise over lr_warmup steps, then hold.
    cfg = _config(tiles, init_from=str(stage1), train_parts="decoder", disc_start=0, steps=6, lr=1e-3,
                  disc_lr=2e-3, lr_warmup=4, log_every=1)
    train_vqgan(cfg, tmp_path / "run", show_progress=False)
    lr = {r["step"]: (r["lr"], r["disc_lr"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")}
    for step in (1, 2, 3, 4):  # logged after the step, whose rate was set at its start (index step - 1)
        assert lr[step] == pytest.approx((1e-3 * step / 4, 2e-3 * step / 4))
    assert lr[6] == pytest.approx((1e-3, 2e-3))
    with pytest.raises(InputError, match="lr_warmup"):
        _config(tiles, lr_warmup=-1)


def test_lr_decay_of_the_autoencoder_is_checked(tiles: Path) -> None:
    with pytest.raises(InputError, match="min_lr"):
        _config(tiles, lr=1e-4, min_lr=1e-3)
    with pytest.raises(InputError, match="lr_decay"):
        _config(tiles, lr_decay="step")
    with pytest.raises(InputError, match="lr_decay_start"):
        _config(tiles, lr_decay="cosine", steps=50, lr_decay_start=50)
    with pytest.raises(InputError, match="lr_decay_start"):
        _config(tiles, lr_decay_start=-1)


def test_decoder_fine_tuning_needs_a_checkpoint_and_sane_crops(tiles: Path) -> None:
    with pytest.raises(InputError, match="init_from"):
        _config(tiles, train_parts="decoder")
    with pytest.raises(InputError, match="crop_size"):
        _config(tiles, crop_size=18)
    with pytest.raises(InputError, match="crop_size"):
        _config(tiles, crop_size=64)


def test_init_from_must_match_the_model(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    cfg = _config(tiles, init_from=str(stage1), model={"codebook_size": 64})
    with pytest.raises(InputError, match="another model config"):
        train_vqgan(cfg, tmp_path / "x", show_progress=False)


def test_a_deeper_decoder_grows_from_a_trained_one(tiles: Path, stage1: Path, tmp_path: Path) -> None:
    # Added blocks start as the identity: before training, the grown VQ-GAN reconstructs exactly as its source.
    init = load_vqgan(stage1)
    grown = VQGAN(replace(init.config, decoder_res_blocks=init.config.decoder_blocks + 2)).eval()
    assert grow_decoder(grown, init) == 2 * len(init.config.channel_mult)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(grown(images)[0], init(images)[0], atol=1e-6)
    with pytest.raises(InputError, match="shrink"):
        grow_decoder(VQGAN(replace(init.config, decoder_res_blocks=1)), grown)
    with pytest.raises(InputError, match="more than decoder_res_blocks"):
        grow_decoder(VQGAN(replace(init.config, codebook_size=2 * init.config.codebook_size, decoder_res_blocks=4)), init)
    # ... and a decoder-only run trains it, the latent space untouched, the samples counted on from the source.
    cfg = _config(tiles, init_from=str(stage1), train_parts="decoder", crop_size=16, steps=2,
                  model={"decoder_res_blocks": init.config.decoder_blocks + 1})
    result = train_vqgan(cfg, tmp_path / "deep", show_progress=False)
    after = load_vqgan(result.export_path)
    assert after.config.decoder_blocks == init.config.decoder_blocks + 1
    assert torch.equal(after.quantizer.embedding.weight, init.quantizer.embedding.weight)
    assert read_checkpoint_metadata(result.export_path)[1]["samples_seen"] > \
        read_checkpoint_metadata(stage1)[1]["samples_seen"]


# ---- the plain-text training log


def test_train_log_says_when_a_run_resumes(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    with TrainProgress(10, 0, "train x", enabled=False, log_file=log, log_interval_s=0.0) as bar:
        for step in range(1, 5):
            bar.update(step, loss=0.5)
    with pytest.raises(KeyboardInterrupt):
        with TrainProgress(10, 4, "train x", enabled=False, log_file=log, log_interval_s=0.0) as bar:
            bar.update(5)
            raise KeyboardInterrupt
    lines = log.read_text().splitlines()
    assert "train x: started, 10 steps" in lines[0]
    assert any("step 4/10 (40.0%)" in line and "loss 0.5" in line for line in lines)
    assert any("train x: resumed at step 4 of 10" in line for line in lines)
    assert "interrupted at step 5; rerun to resume" in lines[-1]


def test_a_terminated_run_says_where_it_stopped(tmp_path: Path) -> None:
    # A run killed with SIGTERM (kill, a scheduler, a session's end) used to leave no last line in train.log.
    script = tmp_path / "loop.py"
    script.write_text(
        "import os, signal, sys\n"
        "from histosynth.runtime.tracking import TrainProgress\n"
        "with TrainProgress(10, 0, 'train x', enabled=False, log_file=sys.argv[1], log_interval_s=0.0) as bar:\n"
        "    bar.update(3)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    bar.update(4)\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "train.log")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Terminated" in done.stderr
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert "terminated (SIGTERM) at step 3" in last and "rerun to resume" in last
    # Outside a training loop the default SIGTERM behaviour is back.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- tile statistics and the sample verdict


@pytest.fixture(scope="module")
def real_tiles(shared_data: Path) -> np.ndarray:
    files = sorted((shared_data / "pcam" / "train").glob("*.jpg"))[:120]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


def test_tile_stats_measure_contrast_colour_and_blanks(real_tiles: np.ndarray) -> None:
    s = tile_stats(real_tiles)
    assert 25 < s.grey_std < 80 and s.eosin_od > 0 and s.haematoxylin_od > 0
    washed = (real_tiles.astype(np.float32) * 0.5 + 0.5 * real_tiles.mean()).astype(np.uint8)
    d = compare(tile_stats(washed), s)
    assert d["grey_std"] == pytest.approx(-0.5, abs=0.02)  # half the contrast
    blank = np.full((10, 96, 96, 3), 230, dtype=np.uint8)
    assert tile_stats(blank).flat_fraction == 1.0 and tile_stats(blank).grey_std < FLAT_STD
    purple = real_tiles.copy()
    purple[..., 0] = (purple[..., 0] * 0.8).astype(np.uint8)  # less red: pink shifts to purple
    assert compare(tile_stats(purple), s)["mean_r"] == pytest.approx(-0.2, abs=0.01)


def test_verdict_separates_tissue_from_noise_and_blanks(real_tiles: np.ndarray) -> None:
    assert sample_verdict(real_tiles[:60], real_tiles[60:]).level == "ok"
    rng = np.random.default_rng(0)
    speckle = rng.integers(0, 256, (60, 96, 96, 3), dtype=np.uint8)
    noise = sample_verdict(speckle, real_tiles)
    assert noise.level == "noise" and "NOISE" in noise.message()
    grey = np.full((60, 96, 96, 3), 200, dtype=np.uint8) + rng.integers(0, 3, (60, 96, 96, 3), dtype=np.uint8)
    assert sample_verdict(grey, real_tiles).level == "noise"
    washed = (real_tiles[:60].astype(np.float32) * 0.5 + 100).astype(np.uint8)
    assert sample_verdict(washed, real_tiles[60:]).level == "poor"


# ---- stopping on time (a lent GPU, a session's end)


def test_vqgan_stops_on_time_with_a_checkpoint_and_resumes(tiles: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "timed"
    first = train_vqgan(_config(tiles, time_limit_s=1e-9), run_dir, show_progress=False)
    assert first.step == 1 and first.export_path.is_file()
    assert (run_dir / "checkpoints" / "step-00000001.safetensors").is_file()
    second = train_vqgan(_config(tiles, steps=3), run_dir, show_progress=False)
    assert second.resumed_from == 1 and second.step == 3


def test_diffusion_stops_on_time(monkeypatch, tmp_path: Path) -> None:
    import histosynth.diffusion.train as T
    from histosynth.diffusion.unet import UNetConfig

    rng = np.random.default_rng(0)
    data = T.LatentData(rng.standard_normal((16, 3, 8, 8)).astype(np.float16), [f"t{i}" for i in range(16)], 0.5, {})
    monkeypatch.setattr(T, "open_latents", lambda path: data)
    cfg = T.LDMTrainConfig(latents=Path("x"), model=UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                                               attention_levels=(), norm_groups=4),
                           steps=50, batch_size=4, sample_count=0, device="cpu", time_limit_s=1e-9)
    result = T.train_ldm(cfg, tmp_path / "ldm", progress=False)
    assert result.steps == 1 and result.unet.is_file()
    assert (tmp_path / "ldm" / "checkpoints" / "step-00000001.safetensors").is_file()


def test_tile_stats_stay_exact_over_millions_of_pixels() -> None:
    # 3,000 tiles = 27.6 M pixels: a float32 running sum stalls long before that (R and B came out equal).
    images = np.empty((3000, 96, 96, 3), dtype=np.uint8)
    images[...] = (200, 100, 150)
    s = tile_stats(images)
    assert s.mean_rgb == pytest.approx((200.0, 100.0, 150.0), abs=1e-6)
    assert s.flat_fraction == 1.0


def test_whole_vqgan_trains_in_bf16_on_crops(tiles: Path, tmp_path: Path) -> None:
    # train_parts: all under autocast returns (reconstruction, QuantizerOutput): the NamedTuple must survive the
    # fp32 hand-back (it did not, and only decoder-only runs had been tried).
    result = train_vqgan(_config(tiles, steps=2, autocast="bf16", channels_last=True, crop_size=16, disc_start=0,
                                 codebook_init_step=-1), tmp_path / "all", show_progress=False)
    assert result.step == 2 and result.export_path.is_file()
