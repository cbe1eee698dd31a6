"""VQ-GAN training on real PCam tiles with a tiny model: learning, checkpoints, exact resume, logs, samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from histosynth.autoencoder.losses import (
    VQGANLoss,
    VQGANLossConfig,
    adaptive_gan_weight,
    feature_matching_loss,
    hinge_d_loss,
)
from histosynth.autoencoder.lpips import LPIPS
from histosynth.autoencoder.train import VQGANTrainConfig, load_train_config, load_vqgan, train_vqgan
from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.cli.app import app
from histosynth.configio import from_dict
from histosynth.errors import InputError
from histosynth.runtime.checkpointing import (
    TrainState,
    capture_rng_state,
    list_checkpoints,
    load_resume_checkpoint,
    restore_rng_state,
    save_resume_checkpoint,
)
from histosynth.runtime.tracking import MetricsLogger, read_metrics
from histosynth.runtime.ema import EMA

# 32-px centre crops of the 96-px PCam tiles keep each step cheap on a shared 2-core machine.
TINY = {
    "tile_size": 32,
    "size_policy": "crop",
    "val_fraction": 0.25,
    "model": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "codebook_size": 32,
              "norm_groups": 4},
    "loss": {"discriminator": {"base_channels": 8, "num_layers": 2, "norm_groups": 4}},
    "batch_size": 4,
    "lr": 0.002,
    "steps": 16,
    "disc_start": 6,
    "dead_code_every": 4,
    "log_every": 4,
    "val_every": 8,
    "sample_every": 8,
    "ckpt_every": 8,
    "keep_checkpoints": 2,
    "seed": 3,
    "device": "cpu",
    "threads": 1,
}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory, pcam_tiles: list[Path], copy_tiles) -> Path:
    return copy_tiles(pcam_tiles[:32], tmp_path_factory.mktemp("tiles"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))


def _config(tiles: Path, **changes) -> VQGANTrainConfig:
    return from_dict(VQGANTrainConfig, {"data": str(tiles), **TINY, **changes}, "vqgan_config")


@pytest.fixture(scope="module")
def full_run(tiles: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("run_full")
    return run_dir, train_vqgan(_config(tiles), run_dir, show_progress=False)


def test_training_learns_and_writes_its_run_folder(full_run) -> None:
    run_dir, result = full_run
    assert result.step == 16 and result.resumed_from is None
    train = read_metrics(run_dir / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [4, 8, 12, 16]
    assert train[-1]["l1"] < 0.9 * train[0]["l1"], [r["l1"] for r in train]  # reconstruction improves
    for key in ("codebook", "commitment", "perplexity", "codebook_usage", "tiles_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert "gan" in train[-1] and "disc_loss" in train[-1] and "feature_matching" in train[-1]
    assert "gan" not in train[0]  # before disc_start
    val = read_metrics(run_dir / "metrics.jsonl", "val")
    assert [r["step"] for r in val] == [8, 16]
    assert {"psnr", "ssim", "ms_ssim", "perplexity", "codebook_usage"} <= set(val[-1])
    assert val[-1]["psnr"] == pytest.approx(result.val_metrics["psnr"])

    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000008.safetensors",
                                                                         "step-00000016.safetensors"]
    grid = Image.open(run_dir / "samples" / "step-00000016.png")
    assert grid.size == (8 * 32 + 7, 2 * 32 + 1)  # 8 originals over 8 reconstructions

    model = load_vqgan(run_dir)  # the fp16 export loads into an fp32 network
    assert next(model.parameters()).dtype == torch.float32
    assert load_file(str(run_dir / "vqgan.safetensors"))["decoder.conv_out.weight"].dtype == torch.float16
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["steps"] == 16 and saved["model"]["codebook_size"] == 32


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(full_run, tiles: Path, tmp_path: Path) -> None:
    run_dir, _ = full_run
    # Interrupted at step 10 (not a multiple of any interval), then resumed to 16 with the same seed.
    first = train_vqgan(_config(tiles, steps=10), tmp_path, show_progress=False)
    assert first.step == 10
    second = train_vqgan(_config(tiles), tmp_path, show_progress=False)
    assert second.resumed_from == 10 and second.step == 16
    a = load_file(str(run_dir / "checkpoints" / "step-00000016.safetensors"))
    b = load_file(str(tmp_path / "checkpoints" / "step-00000016.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # The log reads as one run: no duplicate steps.
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_a_used_run_folder_is_not_silently_restarted(full_run, tiles: Path) -> None:
    run_dir, _ = full_run
    with pytest.raises(InputError, match="already holds checkpoints"):
        train_vqgan(_config(tiles), run_dir, resume=False, show_progress=False)
    with pytest.raises(InputError, match="another model config"):
        train_vqgan(_config(tiles, model={**TINY["model"], "codebook_size": 64}), run_dir, show_progress=False)


def test_config_errors_name_the_key(tiles: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"vqgan_config.tile_size: must be a positive multiple"):
        _config(tiles, tile_size=98)
    with pytest.raises(InputError, match=r"vqgan_config.loss: unknown key 'perceptual'"):
        _config(tiles, loss={"perceptual": 1.0})
    with pytest.raises(InputError, match=r"batch_size: 64 is larger"):
        train_vqgan(_config(tiles, batch_size=64), tmp_path / "r", show_progress=False)


def test_shipped_pcam_config_loads() -> None:
    repo = Path(__file__).resolve().parents[1]
    config = load_train_config(repo / "configs" / "vqgan-pcam.yaml", steps=5)
    assert config.steps == 5 and config.tile_size == 96 and config.model.downsample_factor == 4
    assert config.loss.lpips_weights is None  # trains without downloaded perceptual weights


def test_cli_runs_and_resumes(tiles: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(tiles), **TINY, "steps": 4, "disc_start": 2}))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "vqgan", "--config", str(cfg), "--run-dir", str(tmp_path / "run"),
                              "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "vqgan.safetensors").is_file()
    res = runner.invoke(app, ["train", "vqgan", "--config", str(cfg), "--run-dir", str(tmp_path / "run"),
                              "--steps", "6"])
    assert res.exit_code == 0, res.output
    assert "resumed from step 4" in res.output
    res = runner.invoke(app, ["train", "vqgan", "--config", str(tmp_path / "missing.yaml"), "--run-dir",
                              str(tmp_path / "x")])
    assert res.exit_code == 2 and "file not found" in res.output


# --------------------------------------------------------------------------------------------------
# Loss pieces


def test_hinge_and_feature_matching_known_values() -> None:
    real = torch.tensor([2.0, 0.5])  # relu(1-2)=0, relu(1-0.5)=0.5 -> mean 0.25
    fake = torch.tensor([-2.0, 0.0])  # relu(1-2)=0, relu(1+0)=1 -> mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    a = [torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 2, 2)]
    b = [torch.ones(1, 2, 2, 2), torch.ones(1, 1, 2, 2) * 3]
    assert feature_matching_loss(a, b).item() == pytest.approx((1.0 + 2.0) / 2)


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    rec = (w * torch.tensor([1.0, 0.0])).sum() * 2  # grad (2, 0): norm 2
    gan = (w * w).sum()  # grad (6, 8): norm 10
    assert adaptive_gan_weight(rec, gan, w).item() == pytest.approx(2 / (10 + 1e-4))
    assert adaptive_gan_weight(rec, gan * 1e-9, w, max_weight=5.0).item() == 5.0


def test_generator_loss_terms_switch_on_with_the_discriminator() -> None:
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(base_channels=8, num_res_blocks=1, codebook_size=16, norm_groups=4))
    cfg = VQGANLossConfig()
    loss = VQGANLoss(cfg)
    disc = from_dict(VQGANLossConfig, {"discriminator": {"base_channels": 8, "num_layers": 2, "norm_groups": 4}}
                     ).discriminator.build()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = vq(x)
    total, logs = loss.generator_loss(x, recon, quant, None, vq.decoder_last_layer)
    expected = logs["l1"] + 0.2 * logs["ms_ssim_loss"] + logs["codebook"] + logs["commitment"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "gan" not in logs
    total2, logs2 = loss.generator_loss(x, recon, quant, disc, vq.decoder_last_layer)
    assert {"gan", "gan_weight", "feature_matching"} <= set(logs2)
    total2.backward()
    assert vq.encoder.conv_in.weight.grad is not None and vq.quantizer.embedding.weight.grad is not None


def test_lpips_loads_an_lpips_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = LPIPS()
    for p in reference.parameters():
        p.data.uniform_(0.0, 0.1)  # stand-in weights; the real ones come from the user's file
    path = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = LPIPS.from_file(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded(x, y), reference(x, y))
    assert loaded(x, x).abs().max().item() < 1e-6 and (loaded(x, y) > 0).all()
    assert "lin0.model.1.weight" in loaded.state_dict() and "net.slice5.28.weight" in loaded.state_dict()
    bad = tmp_path / "bad.safetensors"
    save_file({"foo": torch.zeros(1)}, str(bad))
    with pytest.raises(InputError, match="not an LPIPS-VGG state dict"):
        LPIPS.from_file(bad)


# --------------------------------------------------------------------------------------------------
# Runtime pieces


def test_resume_checkpoint_roundtrip_without_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = capture_rng_state()
    for step in (1, 2, 3):
        save_resume_checkpoint(tmp_path, TrainState(step=step, epoch=1, epoch_position=8), {"net": net},
                               {"net": opt}, extra_tensors={"buf": torch.arange(3)}, meta={"a": 1}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.safetensors", "step-00000003.safetensors"]
    torch.rand(5)  # move the RNG on; loading must bring it back
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    ckpt = load_resume_checkpoint(tmp_path / "step-00000003.safetensors", {"net": net2}, {"net": opt2})
    assert (ckpt.state.step, ckpt.state.epoch, ckpt.state.epoch_position) == (3, 1, 8)
    assert torch.equal(net2.weight, net.weight) and ckpt.meta == {"a": 1}
    assert torch.equal(ckpt.extra_tensors["buf"], torch.arange(3))
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[net2.weight]["exp_avg"], opt.state[net.weight]["exp_avg"])
    after = capture_rng_state()
    assert all(torch.equal(rng[k], after[k]) for k in rng)
    restore_rng_state(rng)


def test_ema_moves_toward_the_weights() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = EMA(net, decay=0.5, warmup=False)
    net.weight.data.fill_(1.0)
    ema.update(net)
    ema.update(net)
    assert ema.averaged(net).weight.item() == pytest.approx(0.75)
    assert net.weight.item() == 1.0


def test_metrics_logger_drops_records_after_the_resume_step(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path / "m.jsonl")
    for s in (1, 2, 3):
        log.log(s, {"loss": torch.tensor(float(s)), "bad": float("nan")})
    MetricsLogger(tmp_path / "m.jsonl", resume_step=2)
    records = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 1.0 and records[0]["bad"] == "nan"
    json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])


def test_codebook_is_initialised_from_encoder_outputs(tiles: Path, tmp_path: Path) -> None:
    """At `codebook_init_step` every code is replaced by an encoder output: the +-1/K init lies far from the data,
    and without this a real run used ~5 of 1024 codes."""
    run_dir = tmp_path / "run"
    result = train_vqgan(_config(tiles, steps=4, codebook_init_step=2, dead_code_every=0, log_every=1, val_every=4,
                                 sample_every=4, ckpt_every=4, disc_start=100), run_dir, show_progress=False)
    train = read_metrics(run_dir / "metrics.jsonl", "train")
    resets = {r["step"]: r.get("dead_codes_reset") for r in train}
    assert resets[2] == 32 and resets[1] is None and resets[3] is None
    codes = result.model.quantizer.embedding.weight
    assert codes.abs().max() > 10 / 32  # no longer the +-1/K uniform init
