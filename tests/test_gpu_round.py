"""configs/gpu/round.py (the prepared GPU round) refuses bad input and runs end to end on a CPU.

A lent GPU comes rarely and for minutes, so the script must work the first time: the end-to-end test runs it on
the CPU with a tiny 4-channel VQ-GAN (round 4's latent layout) and the shipped UNet as a partial warm start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from histosynth.autoencoder.latents import encode_tiles
from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.runtime.weights import load_checkpoint, read_checkpoint_metadata, save_export

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "configs" / "gpu" / "round.py"
SHIPPED_UNET = ROOT / "weights" / "pcam96" / "unet.safetensors"
PACK = ROOT / "configs" / "gpu" / "pack.py"
TINY = {"base_channels": 8, "num_res_blocks": 1, "latent_channels": 4, "codebook_dim": 4, "codebook_size": 32,
        "norm_groups": 4}


def _tile_folder(folder: Path, tiles: list[Path]) -> Path:
    folder.mkdir()
    for p in tiles:
        shutil.copy(p, folder / p.name)
    return folder


def _tiny_vqgan(tmp_path: Path) -> Path:
    return save_export(VQGAN(VQGANConfig(**TINY)), tmp_path / "vqgan-v2.safetensors", TINY, {"kind": "vqgan"})


def _pack_module():
    sys.path.insert(0, str(PACK.parent))
    try:
        import pack
    finally:
        sys.path.remove(str(PACK.parent))
    return pack


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_missing_checkpoint_is_named(tmp_path: Path, pcam_tiles: list[Path]) -> None:
    data = pcam_tiles[0].parent
    missing = tmp_path / "nope.safetensors"
    proc = _run(str(tmp_path / "out"), "--data", str(data), "--vqgan-init", str(missing), "--device", "cpu")
    assert proc.returncode != 0
    assert f"{missing}: no such file" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_missing_data_is_named(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "out"), "--data", str(tmp_path / "none"), "--device", "cpu")
    assert proc.returncode != 0 and "is not a folder" in proc.stderr


@pytest.mark.skipif(not SHIPPED_UNET.is_file(), reason="needs the shipped bundle")
def test_round_on_cpu_with_a_four_channel_vqgan(tmp_path: Path, pcam_tiles: list[Path]) -> None:
    data = _tile_folder(tmp_path / "tiles", pcam_tiles[:64])
    vqgan = _tiny_vqgan(tmp_path)
    out = tmp_path / "round"
    proc = _run(str(out), "--data", str(data), "--device", "cpu", "--minutes", "0.4", "--vqgan", "all",
                "--vqgan-init", str(vqgan), "--vqgan-config", str(ROOT / "configs" / "pcam96" / "vqgan-v2.yaml"),
                "--unet-init", str(SHIPPED_UNET))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    keep = out / "keep"
    assert (keep / "vqgan.safetensors").is_file() and (keep / "cldm-v2-unet.safetensors").is_file()
    unet_config = read_checkpoint_metadata(keep / "cldm-v2-unet.safetensors")[0]
    assert unet_config["in_channels"] == 4 and unet_config["out_channels"] == 4
    assert read_checkpoint_metadata(keep / "vqgan.safetensors")[0]["latent_channels"] == 4
    assert "tiles have a reviewed class" in proc.stdout


@pytest.mark.skipif(not SHIPPED_UNET.is_file(), reason="needs the shipped bundle")
def test_decoder_round_keeps_its_discriminator_for_the_next(tmp_path: Path, pcam_tiles: list[Path]) -> None:
    data = _tile_folder(tmp_path / "tiles", pcam_tiles[:32])
    vqgan = _tiny_vqgan(tmp_path)
    common = ["--data", str(data), "--device", "cpu", "--minutes", "0.3", "--vqgan", "decoder",
              "--vqgan-init", str(vqgan), "--unet-init", str(SHIPPED_UNET),
              "--vqgan-config", str(ROOT / "configs" / "pcam96" / "vqgan-v2-decoder-r6b.yaml")]
    first = _run(str(tmp_path / "a"), *common, "--vqgan-disc-init", "none")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    disc = tmp_path / "a" / "keep" / "discriminator.safetensors"
    assert disc.is_file()
    config = yaml.safe_load((tmp_path / "a" / "vqgan" / "config.yaml").read_text())
    assert config["warmup_freezes_autoencoder"] is True and config["disc_init_from"] is None
    # The next round goes on with it, after a short frozen warm-up for its new Adam moments.
    second = _run(str(tmp_path / "b"), *common, "--vqgan-disc-init", str(disc))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "b" / "vqgan" / "config.yaml").read_text())
    assert config["disc_init_from"] == str(disc) and config["disc_warmup"] == 2 and config["gan_ramp"] == 0
    missing = _run(str(tmp_path / "c"), *common, "--vqgan-disc-init", str(tmp_path / "nope.safetensors"))
    assert missing.returncode != 0 and "nope.safetensors: no such file" in missing.stderr


def test_latent_pack_round_trip(tmp_path: Path, pcam_tiles: list[Path]) -> None:
    """8-bit packing keeps every latent within half a quantisation step, and the unpacked cache opens."""
    from histosynth.autoencoder.latents import LatentCache

    original = encode_tiles(_tiny_vqgan(tmp_path), pcam_tiles[0].parent, tmp_path / "cache", batch_size=32,
                            tile_size=96, device="cpu", show_progress=False)
    pack = _pack_module()
    pack.pack_latents(original.directory, tmp_path / "pack")
    assert (tmp_path / "pack" / pack.PACKED).stat().st_size < (original.directory / "latents.npy").stat().st_size / 1.9
    back = LatentCache.open(pack.unpack_latents(tmp_path / "pack", tmp_path / "unpacked"))
    step = np.asarray(json.loads((tmp_path / "pack" / pack.QUANT).read_text())["step"])[None, :, None, None]
    err = np.abs(np.asarray(back.latents, np.float32) - np.asarray(original.latents, np.float32))
    assert np.all(err <= step / 2 + 1e-2 * np.abs(np.asarray(original.latents, np.float32)) + 1e-3)  # + fp16 rounding
    assert back.paths == original.paths and back.latent_scale == original.latent_scale


def test_pack_refuses_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(PACK), str(tmp_path / "out"), "--latents", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "is not a latent cache" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not SHIPPED_UNET.is_file(), reason="needs the shipped bundle")
def test_round_from_a_latent_pack_trains_configs_side_by_side(tmp_path: Path, pcam_tiles: list[Path]) -> None:
    """--latents-pack skips the VQ-GAN; two --cldm-config runs train in their own processes and both come back."""
    vqgan = _tiny_vqgan(tmp_path)
    cache = encode_tiles(vqgan, pcam_tiles[0].parent, tmp_path / "cache", batch_size=32, device="cpu",
                         tile_size=96, show_progress=False)
    _pack_module().pack_latents(cache.directory, tmp_path / "pack")
    small = yaml.safe_load((ROOT / "configs" / "pcam96" / "cldm-v3-mid.yaml").read_text())
    small["model"].update(base_channels=16, attention_levels=[2])
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    out, keep = tmp_path / "round", tmp_path / "keep"
    proc = _run(str(out), "--keep", str(keep), "--latents-pack", str(tmp_path / "pack"), "--device", "cpu",
                "--minutes", "0.4", "--vqgan-init", str(vqgan),
                "--cldm-config", str(ROOT / "configs" / "pcam96" / "cldm-v2.yaml"),
                "--cldm-config", str(tmp_path / "small.yaml"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
    assert not (keep / "vqgan.safetensors").exists()  # skipped: the latents are already made
    for name, width in (("cldm-v2", 48), ("small", 16)):
        state, config, extra = load_checkpoint(keep / f"{name}-unet.safetensors")
        assert config["base_channels"] == width and config["in_channels"] == 4
        assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
        assert extra["step"] >= 1 and extra["dtype"] == "float16"
    with tarfile.open(keep / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "cldm-v2/metrics.jsonl" in names and "small/metrics.jsonl" in names
    assert len(list(keep.iterdir())) <= 8  # what the device tool brings back


def test_two_configs_with_one_name_are_refused(tmp_path: Path) -> None:
    cfg = str(ROOT / "configs" / "pcam96" / "cldm-v2.yaml")
    proc = _run(str(tmp_path / "out"), "--latents-pack", str(tmp_path), "--device", "cpu",
                "--cldm-config", cfg, "--cldm-config", cfg)
    assert proc.returncode != 0 and "share a name" in proc.stderr
