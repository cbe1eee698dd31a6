"""LDM / cLDM training on a tiny in-memory latent cache with a tiny UNet (a few seconds each on a CPU)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

import histosynth.diffusion.train as T
from histosynth.configio import from_dict
from histosynth.clusters.features import FeatureScaler, latent_features
from histosynth.clusters.imc import IMCHead, train_imc
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError
from histosynth.runtime.checkpointing import latest_checkpoint
from histosynth.runtime.tracking import read_metrics
from histosynth.runtime.weights import load_checkpoint

N_TILES = 48
TINY_UNET = UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       num_heads=2, norm_groups=8)


def _latents() -> np.ndarray:
    """Two kinds of structured 8x8 latents (stripes and blobs), so there is something to learn."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    out = np.empty((N_TILES, 3, 8, 8), dtype=np.float32)
    for i in range(N_TILES):
        pattern = np.sin(xx * 1.5 + i) if i % 2 else np.exp(-((yy - 4) ** 2 + (xx - 4) ** 2) / 6.0)
        out[i] = 2.0 * pattern[None] * np.array([1.0, -0.5, 0.25])[:, None, None]
    return (out + 0.05 * rng.standard_normal(out.shape)).astype(np.float16)


@pytest.fixture
def cache(monkeypatch):
    """`open_latents` served from memory (the on-disk cache is exercised by the pipeline test)."""
    data = T.LatentData(_latents(), [f"tile{i:03d}.jpg" for i in range(N_TILES)], 0.5, {"tile_size": [32, 32]})
    monkeypatch.setattr(T, "open_latents", lambda path: data)
    return data


def _config(**kw) -> T.LDMTrainConfig:
    base = dict(latents=Path("cache"), model=TINY_UNET, steps=20, batch_size=8, lr=1e-3, warmup_steps=2,
                log_every=5, checkpoint_every=10, sample_count=4, sample_steps=2, device="cpu", seed=3)
    base.update(kw)
    return T.LDMTrainConfig(**base)


def _labels_csv(path: Path, keys: list[str], excluded: set[int] = frozenset()) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "class_id", "class_name"])
        for i, k in enumerate(keys):
            w.writerow([k, "" if i in excluded else i % 2, "" if i in excluded else ["blob", "stripes"][i % 2]])
    return path


def test_ldm_loss_decreases_and_writes_export(cache, tmp_path):
    result = T.train_ldm(_config(steps=120, loss="mse", log_every=20), tmp_path / "run", progress=False)
    losses = [r["loss_window"] for r in read_metrics(tmp_path / "run" / T.LOG_FILE, "train")]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    _, config, extra = load_checkpoint(result.unet)
    assert extra["kind"] == "ldm" and extra["latent_scale"] == 0.5 and extra["tile_size"] == 32
    assert extra["step"] == 120 and config["num_classes"] == 0
    assert (tmp_path / "run" / T.SAMPLES_DIR / "step-00000120.png").is_file()


def test_export_holds_ema_weights(cache, tmp_path):
    result = T.train_ldm(_config(steps=10, ema_decay=0.9), tmp_path / "a", progress=False)
    from safetensors.torch import load_file

    ckpt = load_file(str(latest_checkpoint(tmp_path / "a" / T.CHECKPOINT_DIR)))
    shipped, _, _ = load_checkpoint(result.unet)
    key = "conv_in.weight"
    assert torch.equal(shipped[key], ckpt[f"module/ema/{key}"])
    assert not torch.allclose(shipped[key], ckpt[f"module/unet/{key}"])
    # decay 0: the average is the last weights
    result = T.train_ldm(_config(steps=10, ema_decay=0.0), tmp_path / "b", progress=False)
    ckpt = load_file(str(latest_checkpoint(tmp_path / "b" / T.CHECKPOINT_DIR)))
    shipped, _, _ = load_checkpoint(result.unet)
    assert torch.equal(shipped[key], ckpt[f"module/unet/{key}"])


def test_resume_equals_uninterrupted(cache, tmp_path):
    full = T.train_ldm(_config(steps=20, augment=True), tmp_path / "full", progress=False)
    first = T.train_ldm(_config(steps=10, augment=True), tmp_path / "split", progress=False)
    assert first.resumed_from is None
    second = T.train_ldm(_config(steps=20, augment=True), tmp_path / "split", progress=False)
    assert second.resumed_from == 10
    a, _, _ = load_checkpoint(full.unet)
    b, _, _ = load_checkpoint(second.unet)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = read_metrics(tmp_path / "full" / T.LOG_FILE, "train")
    log_b = read_metrics(tmp_path / "split" / T.LOG_FILE, "train")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    # a finished run does nothing more
    again = T.train_ldm(_config(steps=20, augment=True), tmp_path / "split", progress=False)
    assert again.resumed_from == 20 and again.steps == 20


def test_resume_equals_uninterrupted_with_a_vqgan_for_the_grids(cache, tmp_path):
    # Building the VQ-GAN decoder draws random initial weights; it must not shift the training stream that
    # a resumed run restores from its checkpoint.
    from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
    from histosynth.runtime.weights import save_export

    vqgan = save_export(VQGAN(VQGANConfig(base_channels=8, num_res_blocks=1, codebook_size=16, norm_groups=4)),
                        tmp_path / "vqgan.safetensors", {"base_channels": 8, "num_res_blocks": 1, "codebook_size": 16,
                                                         "norm_groups": 4}, {"kind": "vqgan"})
    cfg = dict(vqgan=vqgan, sample_count=2, check_samples=0)
    full = T.train_ldm(_config(steps=12, **cfg), tmp_path / "full", progress=False)
    T.train_ldm(_config(steps=6, **cfg), tmp_path / "split", progress=False)
    second = T.train_ldm(_config(steps=12, **cfg), tmp_path / "split", progress=False)
    assert second.resumed_from == 6 and (tmp_path / "split" / T.SAMPLES_DIR / "step-00000012.png").is_file()
    a, b = load_checkpoint(full.unet).state_dict, load_checkpoint(second.unet).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def _record_class_ids(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    forward = UNet.forward

    def recording(self, x, t, class_ids):
        if self.training:
            seen.append(class_ids.detach().clone())
        return forward(self, x, t, class_ids)

    monkeypatch.setattr(UNet, "forward", recording)
    return seen


def test_label_dropout_fraction_and_excluded_tiles(cache, tmp_path, monkeypatch):
    seen = _record_class_ids(monkeypatch)
    excluded = {0, 1, 2, 3}
    labels = _labels_csv(tmp_path / "labels.csv", cache.keys, excluded)
    result = T.train_cldm(_config(steps=40, labels=labels, label_dropout=0.3, batch_size=16), tmp_path / "c",
                          progress=False)
    ids = torch.cat(seen)
    assert len(ids) == 40 * 16
    null_fraction = (ids == 2).float().mean().item()  # 2 classes: the null id is 2
    assert 0.22 < null_fraction < 0.38
    assert set(ids.unique().tolist()) == {0, 1, 2}
    _, config, extra = load_checkpoint(result.unet)
    assert config["num_classes"] == 2 and extra["kind"] == "cldm"

    seen.clear()
    T.train_ldm(_config(steps=5), tmp_path / "u", progress=False)
    assert all((ids == 0).all() for ids in seen)  # unconditional: null id 0 everywhere


def test_read_labels_errors(cache, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("tile,class_id\nnot-a-tile.jpg,0\n")
    with pytest.raises(InputError, match="not in the latent cache"):
        T.read_labels(bad, cache.keys)
    bad.write_text("file,label\nx,0\n")
    with pytest.raises(InputError, match="'tile' and 'class_id'"):
        T.read_labels(bad, cache.keys)
    ids = T.read_labels(_labels_csv(tmp_path / "ok.csv", cache.keys, {5}), cache.keys)
    assert ids[5] == -1 and ids[4] == 0 and ids[7] == 1


def test_read_labels_matches_relative_tile_names(tmp_path):
    """Review sheets name tiles relative to the data folder; `train encode` keys them by absolute path."""
    keys = ["/data/pcam/train/a.jpg", "/data/pcam/train/b.jpg", "/data/pcam/valid/b.jpg"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("tile,class_id\npcam/train/a.jpg,1\n./pcam/valid/b.jpg,0\n/data/pcam/train/b.jpg,1\n")
    assert T.read_labels(csv_path, keys).tolist() == [1, 1, 0]
    csv_path.write_text("tile,class_id\nb.jpg,1\n")  # fits two tiles: refused, not guessed
    with pytest.raises(InputError, match="fits 2 tiles"):
        T.read_labels(csv_path, keys)
    csv_path.write_text("tile,class_id\nrain/a.jpg,1\n")  # suffixes end on whole path components
    with pytest.raises(InputError, match="not in the latent cache"):
        T.read_labels(csv_path, keys)


def test_cldm_fine_tunes_from_ldm(cache, tmp_path):
    ldm = T.train_ldm(_config(steps=5), tmp_path / "ldm", progress=False)
    state, _, _ = load_checkpoint(ldm.unet)
    unet = UNet(TINY_UNET.__class__(**{**TINY_UNET.__dict__, "num_classes": 3}))
    report = T.copy_matching_weights(unet, state)
    assert not report["skipped"]
    own = unet.state_dict()
    assert torch.equal(own["conv_in.weight"], state["conv_in.weight"])
    emb = own["class_embedder.embedding.weight"]
    assert emb.shape[0] == 4 and all(torch.equal(row, state["class_embedder.embedding.weight"][0]) for row in emb)

    labels = _labels_csv(tmp_path / "labels.csv", cache.keys)
    result = T.train_cldm(_config(steps=5, labels=labels, init_from=ldm.unet), tmp_path / "cldm", progress=False)
    assert load_checkpoint(result.unet).config["num_classes"] == 2
    with pytest.raises(InputError, match="belong to `train cldm`"):
        T.train_ldm(_config(labels=labels), tmp_path / "x", progress=False)


def test_joint_imc_trains_head(cache, tmp_path):
    latents = torch.from_numpy(cache.latents.astype(np.float32))
    raw = latent_features(latents)
    scaler = FeatureScaler.fit(raw, channels=3)
    head = train_imc(scaler.transform(raw), k=3, seed=0)
    head.set_scaler(scaler)
    head.save(tmp_path / "head.safetensors")
    label_map = tmp_path / "labels.yaml"
    label_map.write_text(yaml.safe_dump({"classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
                                         "clusters": {0: "a", 1: "b", 2: "a"}}))
    result = T.train_cldm(_config(steps=10, joint_imc=True, imc_head=tmp_path / "head.safetensors",
                                  label_map=label_map, imc_lr=1e-2), tmp_path / "j", progress=False)
    records = read_metrics(tmp_path / "j" / T.LOG_FILE, "train")
    assert all(np.isfinite(r["imc_loss"]) for r in records)
    trained = IMCHead.load(tmp_path / "j" / "imc_head.safetensors")
    assert not torch.allclose(trained.net[0].weight, head.net[0].weight)
    assert load_checkpoint(result.unet).config["num_classes"] == 2
    with pytest.raises(InputError, match="imc_head"):
        T.train_cldm(T.load_ldm_config({"latents": "x", "joint_imc": True}), tmp_path / "k", progress=False)


# ------------------------------------------------------------------ two CPU processes (gloo), as under torchrun


def _write_cache(folder: Path) -> Path:
    """A real on-disk latent cache in the format of `histosynth.autoencoder.latents` (written by hand)."""
    folder.mkdir(parents=True)
    latents = _latents()
    np.save(folder / "latents.npy", latents)
    with (folder / "index.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "transform"])
        for i in range(N_TILES):
            w.writerow([i, f"tile{i:03d}.jpg", "identity"])
    (folder / "latents.json").write_text(json.dumps({"version": 1, "shape": list(latents.shape),
                                                     "latent_scale": 0.5, "tile_size": [32, 32]}))
    return folder


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    labels = _labels_csv(Path(out) / f"labels{rank}.csv", [f"tile{i:03d}.jpg" for i in range(N_TILES)])
    config = _config(latents=Path(out) / "cache", labels=labels, steps=6, batch_size=4, checkpoint_every=3,
                     log_every=3, ema_decay=0.0)
    # Each rank gets its own run folder so the test sees who wrote what (a real run shares one).
    result = T.train_cldm(config, Path(out) / f"run{rank}", progress=False)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")


def test_two_processes_keep_identical_replicas_and_only_rank0_writes(tmp_path):
    _write_cache(tmp_path / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run0" / T.UNET_FILE).is_file() and not (tmp_path / "run1").exists()
    first = load_file(str(tmp_path / "run0" / T.CHECKPOINT_DIR / "step-00000003.safetensors"))
    assert not torch.equal(first["module/unet/conv_in.weight"], a["conv_in.weight"])  # it trained
    assert [r["step"] for r in read_metrics(tmp_path / "run0" / T.LOG_FILE, "train")] == [3, 6]


def test_threads_option_applies_during_training_and_is_restored(cache, tmp_path, monkeypatch):
    # Two trainings on a 2-core machine with torch's default threads spin on each other's cores (issue 8 log):
    # `threads` pins the training's intra-op threads and leaves the caller's setting as it was.
    seen: list[int] = []
    run = T._run
    monkeypatch.setattr(T, "_run", lambda *a, **k: (seen.append(torch.get_num_threads()), run(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a caller's setting other than the run's
    try:
        T.train_ldm(_config(steps=2, threads=1, sample_count=0), tmp_path / "run", progress=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(InputError, match="threads"):
        from_dict(T.LDMTrainConfig, {"latents": "cache", "threads": -1}, "ldm")


def test_compile_option_compiles_the_step_and_keeps_checkpoints_plain(cache, tmp_path, monkeypatch):
    # `compile: true` must reach torch.compile and leave the checkpoint and export keys as an eager run writes
    # them (a compiled UNet's state dict would carry `_orig_mod.`). aot_eager traces forward and backward as
    # inductor does, without a C++ compiler, so the test stays quick.
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def recording_compile(module, **kw):
        compiled.append(module)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = T.train_ldm(_config(steps=4, sample_count=0, checkpoint_every=2), tmp_path / "eager", progress=False)
    assert compiled == []
    fast = T.train_ldm(_config(steps=4, sample_count=0, checkpoint_every=2, compile=True, autocast="bf16"),
                       tmp_path / "compiled", progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], T.DiffusionObjective)
    assert np.isfinite(fast.final_loss)
    from safetensors.torch import load_file

    keys = set(load_file(str(latest_checkpoint(tmp_path / "compiled" / T.CHECKPOINT_DIR))))
    assert keys == set(load_file(str(latest_checkpoint(tmp_path / "eager" / T.CHECKPOINT_DIR))))
    assert set(load_checkpoint(fast.unet)[0]) == set(load_checkpoint(eager.unet)[0])
    # and it resumes from its own checkpoint
    again = T.train_ldm(_config(steps=6, sample_count=0, checkpoint_every=2, compile=True, autocast="bf16"),
                        tmp_path / "compiled", progress=False)
    assert again.resumed_from == 4 and again.steps == 6


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    flat = _config(steps=100, lr=1e-3, warmup_steps=10)
    assert [T.lr_factor(s, flat) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    for kind in ("linear", "cosine"):
        cfg = _config(steps=110, lr=1e-3, warmup_steps=10, lr_decay=kind, min_lr=1e-4)
        f = [T.lr_factor(s, cfg) for s in range(0, 120)]
        assert f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
        assert f[60] == pytest.approx(0.55)  # half way: the mean of 1 and min_lr / lr for both shapes
        assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after the warm-up
        assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)  # held at min_lr past `steps`
    cos = _config(steps=110, warmup_steps=10, lr_decay="cosine")
    lin = _config(steps=110, warmup_steps=10, lr_decay="linear")
    assert T.lr_factor(35, cos) > T.lr_factor(35, lin)  # cosine stays high longer


def test_lr_decay_is_checked_and_logged(cache, tmp_path):
    with pytest.raises(InputError, match="min_lr"):
        from_dict(T.LDMTrainConfig, {"lr": 1e-4, "min_lr": 1e-3}, "cldm")
    with pytest.raises(InputError, match="lr_decay"):
        from_dict(T.LDMTrainConfig, {"lr_decay": "step"}, "cldm")
    with pytest.raises(InputError, match="warmup_steps"):
        from_dict(T.LDMTrainConfig, {"lr_decay": "linear", "steps": 50, "warmup_steps": 50}, "cldm")
    T.train_ldm(_config(steps=20, warmup_steps=0, lr_decay="linear", log_every=5), tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / T.LOG_FILE, "train")]
    assert lrs == pytest.approx([1e-3 * (1 - s / 20) for s in (4, 9, 14, 19)])


def test_a_resumed_cldm_counts_from_where_it_started_though_init_from_was_replaced(cache, tmp_path):
    labels = _labels_csv(tmp_path / "labels.csv", cache.keys)
    base = T.train_ldm(_config(steps=4), tmp_path / "base", progress=False)
    init = tmp_path / "init.safetensors"
    init.write_bytes(base.unet.read_bytes())
    cfg = _config(steps=6, labels=labels, init_from=init)
    first = T.train_cldm(cfg, tmp_path / "run", progress=False)
    assert load_checkpoint(first.unet)[2]["samples_seen"] == (4 + 6) * 8
    init.write_bytes(first.unet.read_bytes())  # ships, and becomes what init_from names
    second = T.train_cldm(_config(steps=12, labels=labels, init_from=init), tmp_path / "run", progress=False)
    assert second.resumed_from == 6  # the checkpoint written at the end of the first call
    assert load_checkpoint(second.unet)[2]["samples_seen"] == (4 + 12) * 8


def test_a_continuation_can_start_its_average_at_init_from(cache, tmp_path):
    """ema_warmup false: the export blends the run into init_from's weights at the full decay."""
    labels = _labels_csv(tmp_path / "labels.csv", cache.keys)
    base = T.train_ldm(_config(steps=4), tmp_path / "base", progress=False)
    init, _, _ = load_checkpoint(base.unet)
    runs = {}
    for warmup in (True, False):
        cfg = _config(steps=10, lr=1e-2, labels=labels, init_from=base.unet, ema_decay=0.99, ema_warmup=warmup)
        result = T.train_cldm(cfg, tmp_path / f"warmup-{warmup}", progress=False)
        ckpt = load_file(str(latest_checkpoint(tmp_path / f"warmup-{warmup}" / T.CHECKPOINT_DIR)))
        runs[warmup] = (load_checkpoint(result.unet)[0], ckpt)
    key = "conv_in.weight"
    shipped, ckpt = runs[False]
    drift = (ckpt[f"module/unet/{key}"].float() - init[key].float()).abs().max()
    assert drift > 0.01  # the run itself moved
    # ten updates at 0.99 from the initial weights: 0.99^10 = 90% of the average is still init_from's
    assert (shipped[key].float() - init[key].float()).abs().max() < 0.15 * drift
    warmed = runs[True][0][key].float()  # warmed up (decay 0.1 ... 0.47): mostly the run's own weights
    assert (warmed - init[key].float()).abs().max() > 0.5 * drift
    with pytest.raises(InputError, match="ema_warmup"):
        from_dict(T.LDMTrainConfig, {"ema_warmup": False}, "cldm")


def test_an_expert_trains_only_its_timesteps_and_samples_with_its_partner(cache, tmp_path):
    """t_min/t_max: every drawn timestep is in the range; grids and the check run the init network elsewhere."""
    labels = _labels_csv(tmp_path / "labels.csv", cache.keys)
    base = T.train_ldm(_config(steps=4), tmp_path / "base", progress=False)
    drawn: list[torch.Tensor] = []
    real_randint, real_switch = torch.randint, T.range_with_partner
    switched: list[tuple[int, int]] = []

    def spy(low, high, size, *a, **kw):
        out = real_randint(low, high, size, *a, **kw)
        if high == 1000 or low > 0:  # the timesteps (not the data pipeline's or label dropout's draws)
            drawn.append(out)
        return out

    def spy_switch(expert, partner, t_min, t_max, top):
        switched.append((t_min, t_max))
        return real_switch(expert, partner, t_min, t_max, top)

    with pytest.MonkeyPatch.context() as spies:
        spies.setattr(T.torch, "randint", spy)
        spies.setattr(T, "range_with_partner", spy_switch)
        result = T.train_cldm(_config(steps=6, labels=labels, init_from=base.unet, t_min=600, ema_warmup=False),
                              tmp_path / "hi", progress=False)
    steps = torch.cat(drawn)
    assert steps.numel() == 6 * 8 and int(steps.min()) >= 600 and int(steps.max()) <= 999
    assert load_checkpoint(result.unet)[2]["t_range"] == [600, 1000]
    assert switched and set(switched) == {(600, 1000)}  # the end-of-run grid sampled through the switch
    full = T.train_cldm(_config(steps=2, labels=labels, init_from=base.unet), tmp_path / "full", progress=False)
    assert "t_range" not in load_checkpoint(full.unet)[2]


def test_an_expert_needs_init_from_and_a_range_with_timesteps():
    for data, key in (({"t_min": 500}, "t_min"), ({"t_max": 0}, "t_max"), ({"t_max": 1001}, "t_max"),
                      ({"t_min": 400, "t_max": 400, "init_from": "u.safetensors"}, "t_min")):
        with pytest.raises(InputError, match=key):
            from_dict(T.LDMTrainConfig, data, "cldm")
    cfg = from_dict(T.LDMTrainConfig, {"t_max": 500, "init_from": "u.safetensors"}, "cldm")
    assert (cfg.t_min, T._t_max(cfg)) == (0, 500)
