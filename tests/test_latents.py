"""The latent cache: exact encoder outputs on disk (float16), statistics, index, resume, dihedral views, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histosynth.autoencoder import latents as latents_mod
from histosynth.autoencoder.latents import (
    LatentCache,
    apply_dihedral,
    encode_dataset,
)
from histosynth.autoencoder.vqgan import VQGAN, VQGANConfig
from histosynth.cli.app import app
from histosynth.configio import to_dict
from histosynth.errors import InputError
from histosynth.runtime.weights import save_checkpoint
from histosynth.tiles.dataset import open_tiles


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "scan-cache"))


@pytest.fixture(scope="module")
def model() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(base_channels=8, num_res_blocks=1, codebook_size=16, norm_groups=4)).eval()


def _dataset(tiles: Path):
    return open_tiles(tiles, 32, "crop", show_progress=False)


def test_cache_holds_the_encoder_outputs_and_their_statistics(model: VQGAN, tiles: Path, tmp_path: Path) -> None:
    ds = _dataset(tiles)
    cache = encode_dataset(model, ds, tmp_path / "cache", batch_size=5, show_progress=False)
    assert len(cache) == 24 and cache.shape == (3, 8, 8)
    assert cache.latents.dtype == np.float16 and isinstance(cache.latents, np.memmap)
    with torch.no_grad():
        expected = model.encode(torch.stack([ds[i] for i in range(24)]))
    got = torch.from_numpy(np.asarray(cache.latents, dtype=np.float32))
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)  # float16 rounding only
    meta = json.loads((tmp_path / "cache" / "latents.json").read_text())
    assert meta["shape"] == [24, 3, 8, 8] and meta["dtype"] == "float16"
    e = expected.double()
    assert meta["mean"] == pytest.approx(e.mean().item(), abs=1e-3)
    assert meta["std"] == pytest.approx(e.std(unbiased=False).item(), rel=1e-3)
    assert meta["latent_scale"] == pytest.approx(1 / meta["std"])
    assert meta["channel_std"] == pytest.approx(e.std(dim=(0, 2, 3), unbiased=False).tolist(), rel=1e-3)
    with (tmp_path / "cache" / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Absolute keys: `cluster` and `review` find the tiles from any working folder.
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in ds.files]
    assert all(Path(r["path"]).is_absolute() for r in rows)
    assert {r["transform"] for r in rows} == {"identity"}
    # The dataset view: float32, scaled for diffusion.
    item = cache.dataset()[3]
    assert item.dtype == torch.float32
    torch.testing.assert_close(item, cache[3] * cache.latent_scale)
    # Asking again for the same model and tiles returns the cache; another model is refused.
    assert len(encode_dataset(model, ds, tmp_path / "cache", show_progress=False)) == 24
    other = VQGAN(model.config)
    with pytest.raises(InputError, match="another model or tile set"):
        encode_dataset(other, ds, tmp_path / "cache", show_progress=False)


def test_interrupted_encoding_resumes_where_it_stopped(model: VQGAN, tiles: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset(tiles)
    out = tmp_path / "cache"
    seen: list[int] = []

    def crash(done: int, total: int) -> None:
        seen.append(done)
        if done >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_dataset(model, ds, out, batch_size=4, chunk_batches=1, show_progress=False, on_progress=crash)
    assert not (out / "latents.npy").exists() and (out / "latents.npy.partial").exists()
    with pytest.raises(InputError, match="interrupted"):
        LatentCache.open(out)

    calls: list[int] = []
    real_encode = model.encode

    def counting_encode(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return real_encode(images)

    monkeypatch.setattr(model, "encode", counting_encode)
    cache = encode_dataset(model, ds, out, batch_size=4, show_progress=False)
    monkeypatch.undo()
    assert sum(calls) == 12  # only the tiles not yet encoded
    fresh = encode_dataset(model, ds, tmp_path / "fresh", batch_size=4, show_progress=False)
    assert np.array_equal(np.asarray(cache.latents), np.asarray(fresh.latents))
    assert cache.meta["std"] == pytest.approx(fresh.meta["std"])
    assert not (out / "encode-progress.json").exists()


def test_dihedral_views_are_encoded_not_transformed(model: VQGAN, tiles: Path, tmp_path: Path) -> None:
    ds = open_tiles(tiles, 32, "crop", show_progress=False)
    small = torch.utils.data.Subset(ds, [0, 1, 2])
    cache = encode_dataset(model, small, tmp_path / "c", batch_size=2, dihedral=True, show_progress=False)
    assert len(cache) == 24
    assert cache.transforms[:8] == ["identity", "rot90", "rot180", "rot270", "flip", "rot90+flip",
                                    "rot180+flip", "rot270+flip"]
    assert cache.paths[8] == str(ds.files[1])
    with torch.no_grad():
        view = model.encode(apply_dihedral(ds[1][None], 1, True))[0]  # tile 1, rot90+flip
    torch.testing.assert_close(cache[8 + 5], view, atol=2e-3, rtol=2e-3)


def test_some_views_are_encoded_identity_first_and_named_in_the_key(model: VQGAN, tiles: Path, tmp_path: Path) -> None:
    small = torch.utils.data.Subset(_dataset(tiles), [0, 1, 2])
    # Listed in any order, stored identity first and then in DIHEDRAL order: the layout does not depend on the listing.
    cache = encode_dataset(model, small, tmp_path / "c", batch_size=2, view_names=["flip", "identity", "rot90"],
                           show_progress=False)
    assert len(cache) == 9 and cache.transforms[:3] == ["identity", "rot90", "flip"]
    assert cache.meta["views"] == cache.meta["key"]["views"] == ["identity", "rot90", "flip"]
    with torch.no_grad():
        view = model.encode(apply_dihedral(_dataset(tiles)[2][None], 0, True))[0]  # tile 2, flip
    torch.testing.assert_close(cache[2 * 3 + 2], view, atol=2e-3, rtol=2e-3)
    # Another subset of the same size is another cache, not this one returned as finished.
    with pytest.raises(InputError, match="another model or tile set"):
        encode_dataset(model, small, tmp_path / "c", view_names=["identity", "rot180"], show_progress=False)
    # The two single-count keys of older caches stay as they were.
    assert encode_dataset(model, small, tmp_path / "one", show_progress=False).meta["key"]["views"] == 1


@pytest.mark.parametrize("names, dihedral, message", [
    (["identity", "rot45"], False, "unknown view 'rot45'; allowed: identity, rot90, rot180, rot270, flip"),
    (["flip"], False, "must include identity"),
    (["identity", "flip", "flip"], False, "'flip' is listed twice"),
    (["identity", "flip"], True, "--dihedral and --views: give one"),
])
def test_views_are_checked(model: VQGAN, tiles: Path, tmp_path: Path, names, dihedral, message) -> None:
    with pytest.raises(InputError, match=message):
        encode_dataset(model, _dataset(tiles), tmp_path / "c", view_names=names, dihedral=dihedral,
                       show_progress=False)
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_quarter_turns_of_non_square_tiles_are_refused(model: VQGAN, tmp_path: Path) -> None:
    class Wide(torch.utils.data.Dataset):
        files = [Path("a.png"), Path("b.png")]

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.zeros(3, 32, 64)

    with pytest.raises(InputError, match="not square.*allowed views: identity, rot180, flip, rot180\\+flip"):
        encode_dataset(model, Wide(), tmp_path / "c", view_names=["identity", "rot90"], show_progress=False)
    cache = encode_dataset(model, Wide(), tmp_path / "ok", view_names=["identity", "rot180+flip"], show_progress=False)
    assert cache.shape == (3, 8, 16) and len(cache) == 4


def test_encode_command_reads_an_export(model: VQGAN, tiles: Path, tmp_path: Path) -> None:
    export = tmp_path / "vqgan.safetensors"
    save_checkpoint(model, export, to_dict(model.config), {"kind": "vqgan", "tile_size": 32, "step": 7})
    res = CliRunner().invoke(app, ["train", "encode", "--vqgan", str(export), "--data", str(tiles),
                                   "--out", str(tmp_path / "cache"), "--size-policy", "crop", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cache = LatentCache.open(tmp_path / "cache")
    assert len(cache) == 24 and cache.meta["source"]["vqgan_step"] == 7
    res = CliRunner().invoke(app, ["train", "encode", "--vqgan", str(export), "--data", str(tiles), "--out",
                                   str(tmp_path / "views"), "--size-policy", "crop", "--device", "cpu",
                                   "--views", "identity,rot180+flip"])
    assert res.exit_code == 0, res.output
    assert LatentCache.open(tmp_path / "views").transforms[:2] == ["identity", "rot180+flip"]
    res = CliRunner().invoke(app, ["train", "encode", "--vqgan", str(export), "--data", str(tiles), "--out",
                                   str(tmp_path / "bad"), "--size-policy", "crop", "--views", "rot90"])
    assert res.exit_code == 2 and "must include identity" in res.output
    # Without --size-policy the 96-px tiles do not match the model's 32-px tile size: a clear input error.
    res = CliRunner().invoke(app, ["train", "encode", "--vqgan", str(export), "--data", str(tiles),
                                   "--out", str(tmp_path / "c2"), "--device", "cpu"])
    assert res.exit_code == 2 and "size_policy" in res.output
    with pytest.raises(InputError, match="not a latent cache"):
        LatentCache.open(tmp_path)


def test_inconsistent_cache_is_refused(model: VQGAN, tiles: Path, tmp_path: Path) -> None:
    cache = encode_dataset(model, torch.utils.data.Subset(_dataset(tiles), [0, 1]), tmp_path / "c",
                           show_progress=False)
    (cache.directory / latents_mod.INDEX_FILE).write_text("index,path,transform\n0,a,identity\n")
    with pytest.raises(Exception, match="inconsistent"):
        LatentCache.open(cache.directory)
