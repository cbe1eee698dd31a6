"""Two CPU processes (gloo) train a tiny VQ-GAN with DDP: replicas stay identical, only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from histosynth.runtime import dist

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tiles: str, out: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the library call."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "HISTOSYNTH_CACHE": f"{out}/cache{rank}"})
    torch.set_num_threads(1)
    from histosynth.autoencoder.train import VQGANTrainConfig, train_vqgan
    from histosynth.configio import from_dict

    config = from_dict(VQGANTrainConfig, {
        "data": tiles, "tile_size": 32, "size_policy": "crop", "val_fraction": 0.25,
        "model": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "codebook_size": 16,
                  "norm_groups": 4},
        "loss": {"discriminator": {"base_channels": 8, "num_layers": 2, "norm_groups": 4}},
        "batch_size": 3, "lr": 0.002, "steps": 6, "disc_start": 2, "dead_code_every": 3,
        "dead_code_threshold": 0.99, "log_every": 3, "val_every": 3, "sample_every": 6, "ckpt_every": 3,
        "seed": 11, "device": "cpu",
    }, "vqgan_config")
    # Each rank gets its own run folder so the test can see who wrote what (a real run shares one).
    result = train_vqgan(config, Path(out) / f"run{rank}", show_progress=False)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    state["usage_ema"] = result.model.quantizer.usage_ema.clone()
    save_file(state, f"{out}/rank{rank}.safetensors", metadata={"step": str(result.step)})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, pcam_tiles: list[Path]) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    tiles = out / "tiles"
    tiles.mkdir()
    for p in pcam_tiles[:20]:
        shutil.copy(p, tiles / p.name)
    mp.spawn(_worker, args=(_free_port(), str(tiles), str(out)), nprocs=WORLD, join=True)
    return out


def test_replicas_stay_identical(ddp_run: Path) -> None:
    a = load_file(str(ddp_run / "rank0.safetensors"))
    b = load_file(str(ddp_run / "rank1.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if k != "usage_ema" and not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # The ranks saw different tiles (their own shares), so identical weights mean gradients were averaged.
    init = load_file(str(ddp_run / "run0" / "checkpoints" / "step-00000003.safetensors"))
    assert not torch.equal(init["module/vqgan/encoder.conv_in.weight"], a["encoder.conv_in.weight"])


def test_only_rank0_writes(ddp_run: Path) -> None:
    assert not (ddp_run / "run1").exists()
    run0 = ddp_run / "run0"
    assert sorted(p.name for p in (run0 / "checkpoints").iterdir()) == ["step-00000003.safetensors",
                                                                       "step-00000006.safetensors"]
    assert (run0 / "vqgan.safetensors").is_file() and (run0 / "metrics.jsonl").is_file()
    assert (run0 / "samples" / "step-00000006.png").is_file()
    # The checkpoint holds both ranks' RNG states, so a 2-process run resumes exactly.
    ckpt = load_file(str(run0 / "checkpoints" / "step-00000006.safetensors"))
    assert not torch.equal(ckpt["rng/0/torch"], ckpt["rng/1/torch"])
    final = load_file(str(ddp_run / "rank0.safetensors"))
    assert torch.equal(ckpt["module/vqgan/decoder.conv_out.weight"], final["decoder.conv_out.weight"])


def test_train_log_averages_over_ranks(ddp_run: Path) -> None:
    from histosynth.runtime.tracking import read_metrics

    info = read_metrics(ddp_run / "run0" / "metrics.jsonl", "info")
    assert info[0]["world_size"] == WORLD
    train = read_metrics(ddp_run / "run0" / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [3, 6]
    assert train[0]["dead_codes_reset"] > 0  # the rank-0 reset + broadcast path ran


# --------------------------------------------------------------------------------------------------
# Single-process behaviour of the helpers


def test_single_process_without_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert dist.is_main() and dist.all_reduce_mean(3.0).item() == 3.0
    net = torch.nn.Linear(2, 2)
    assert dist.wrap_ddp(net, info) is net and dist.unwrap(net) is net
    dist.barrier()
    dist.cleanup()


def test_sampler_shares_are_disjoint_and_resumable() -> None:
    data = list(range(10))
    shares = []
    for rank in range(2):
        info = dist.DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        sampler = dist.make_sampler(data, info, seed=4)  # type: ignore[arg-type]
        sampler.set_epoch(1)
        shares.append(list(sampler))
        sampler.set_epoch(1)
        sampler.set_start(2)
        assert list(sampler) == shares[-1][2:]  # the same order, minus what was already seen
        assert list(sampler) == shares[-1]  # set_start is one-shot
    assert sorted(shares[0] + shares[1]) == data
