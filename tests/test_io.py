"""The leaf modules every stage writes and converts images with: histosynth.io and histosynth.imageops."""

from __future__ import annotations

import io as _io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from histosynth.errors import InputError
from histosynth.imageops import (
    DIHEDRAL,
    apply_dihedral,
    dihedral_name,
    dihedral_views,
    encode_image,
    random_dihedral,
    tile_grid,
    to_uint8,
)
from histosynth.io import (
    TMP_MARK,
    atomic_path,
    check_writable,
    json_safe,
    stale_temporaries,
    temporary_path,
    write_bytes,
    write_csv,
    write_json,
)


def test_atomic_write_replaces_whole_and_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.png"
    write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"torn")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"  # the old file stands, the torn one is gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_temporary_names_are_hidden_and_not_images(tmp_path: Path) -> None:
    tmp = temporary_path(tmp_path / "00001.png", tag="shard-1-of-2")
    assert tmp.name == f".00001.png{TMP_MARK}shard-1-of-2"
    assert tmp.name.startswith(".") and tmp.suffix != ".png"  # no folder scan or ImageFolder reads a torn one
    for name in (".a.png.tmp-main", ".b.png.tmp-shard-1-of-2", ".c.png.tmp-main2", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in stale_temporaries(tmp_path, "main")] == [".a.png.tmp-main"]


def test_json_is_strict_with_nan_inf_and_numpy(tmp_path: Path) -> None:
    data = {"fid": math.nan, "kid": [1.0, math.inf, -math.inf], "n": np.int64(3), "x": np.float32(0.5),
            "nested": ({"v": np.float64("nan")},), np.int64(7): "key"}
    assert json_safe(data) == {"fid": None, "kid": [1.0, None, None], "n": 3, "x": 0.5,
                               "nested": [{"v": None}], 7: "key"}
    path = write_json(tmp_path / "r.json", data)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["kid"] == [1.0, None, None]


def test_write_csv_line_ends(tmp_path: Path) -> None:
    rows = [["a", 1], ["b,c", 2]]
    assert write_csv(tmp_path / "t.csv", ["k", "v"], rows).read_bytes() == b'k,v\r\na,1\r\n"b,c",2\r\n'
    assert write_csv(tmp_path / "u.csv", ["k"], [["x"]], line_end="\n").read_bytes() == b"k\nx\n"


def test_check_writable_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "out", "--out")
    check_writable(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_to_uint8_rounds_and_clamps() -> None:
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, -0.99]).view(1, 1, 1, 6).repeat(1, 3, 1, 1)
    u8 = to_uint8(images)
    assert u8.shape == (1, 1, 6, 3) and u8.dtype == np.uint8
    assert u8[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 1]  # 127.5 rounds to even; 1.275 to 1


def test_dihedral_views_are_the_group() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [apply_dihedral(x, k, f) for k, f in DIHEDRAL]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert [dihedral_name(k, f) for k, f in DIHEDRAL][:5] == ["identity", "rot90", "rot180", "rot270", "flip"]
    assert torch.equal(apply_dihedral(x, 1, False), torch.rot90(x, 1, dims=(-2, -1)))
    turns, flips = torch.tensor([0, 1, 3]), torch.tensor([True, False, True])
    batch = x.repeat(3, 1, 1, 1)
    out = dihedral_views(batch, turns, flips)
    for i in range(3):
        assert torch.equal(out[i], apply_dihedral(x[0], int(turns[i]), bool(flips[i])))


def test_random_dihedral_draws_one_view_per_tile() -> None:
    x = torch.randn(64, 2, 6, 6)
    g = torch.Generator().manual_seed(1)
    out = random_dihedral(x, torch.Generator().manual_seed(1))
    choice = torch.randint(0, 8, (64,), generator=g)  # the same single draw
    for i in range(64):
        k, f = DIHEDRAL[int(choice[i])]
        assert torch.equal(out[i], apply_dihedral(x[i], k, f))
    wide = torch.arange(12.0).view(1, 1, 3, 4).repeat(200, 1, 1, 1)
    seen = {tuple(v.flatten().tolist()) for v in random_dihedral(wide, torch.Generator().manual_seed(0))}
    assert len(seen) == 4  # non-square: identity, both flips, half turn - and the shape is kept


def test_encode_image_formats() -> None:
    pixels = (np.arange(8 * 6 * 3) % 256).astype(np.uint8).reshape(8, 6, 3)
    assert np.array_equal(np.asarray(Image.open(_io.BytesIO(encode_image(pixels, "png")))), pixels)
    assert Image.open(_io.BytesIO(encode_image(pixels, "jpeg"))).format == "JPEG"
    with tifffile.TiffFile(_io.BytesIO(encode_image(pixels, "tiff", microns_per_pixel=0.5))) as tif:
        page = tif.pages[0]
        assert np.array_equal(page.asarray(), pixels)
        assert page.tags["XResolution"].value == (20000, 1)  # 1 cm / 0.5 um
    with pytest.raises(ValueError, match="png, jpeg, tiff"):
        encode_image(pixels, "bmp")


def test_tile_grid_layout() -> None:
    tiles = np.stack([np.full((2, 3, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    grid = tile_grid(tiles, 2, gap=1, margin=1)
    assert grid.shape == (1 + 2 + 1 + 2 + 1, 1 + 3 + 1 + 3 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 30
    assert grid[0, 0, 0] == grid[4, 5, 0] == grid[1, 4, 0] == 255  # border, the empty cell, the gap
