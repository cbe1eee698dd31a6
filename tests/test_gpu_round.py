"""configs/gpu/round.py (the prepared GPU round) refuses bad input and runs end to end on a CPU.

A lent GPU comes rarely and for minutes, so the script must work the first time: the end-to-end test runs it on
the CPU with a tiny 4-channel VQ-GAN (round 4's latent layout) and the shipped UNet as a partial warm start.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.runtime.weights import read_checkpoint_metadata, save_export

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "configs" / "gpu" / "round.py"
SHIPPED_UNET = ROOT / "weights" / "pcam96" / "unet.safetensors"


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
    data = tmp_path / "tiles"
    data.mkdir()
    for p in pcam_tiles[:64]:
        shutil.copy(p, data / p.name)
    arch = {"base_channels": 8, "num_res_blocks": 1, "latent_channels": 4, "codebook_dim": 4, "codebook_size": 32,
            "norm_groups": 4}
    vqgan = save_export(VQGAN(VQGANConfig(**arch)), tmp_path / "vqgan-v2.safetensors", arch, {"kind": "vqgan"})
    out = tmp_path / "round"
    proc = _run(str(out), "--data", str(data), "--device", "cpu", "--minutes", "0.4", "--vqgan", "all",
                "--vqgan-init", str(vqgan), "--vqgan-config", str(ROOT / "configs" / "pcam96" / "vqgan-v2.yaml"),
                "--unet-init", str(SHIPPED_UNET))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    keep = out / "keep"
    assert (keep / "vqgan.safetensors").is_file() and (keep / "unet.safetensors").is_file()
    unet_config = read_checkpoint_metadata(keep / "unet.safetensors")[0]
    assert unet_config["in_channels"] == 4 and unet_config["out_channels"] == 4
    assert read_checkpoint_metadata(keep / "vqgan.safetensors")[0]["latent_channels"] == 4
    assert "tiles have a reviewed class" in proc.stdout
