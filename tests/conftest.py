"""Shared fixtures: the real H&E data beside the checkout, and thread limits for a 2-core CI."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

# One intra-op thread: test models are tiny, and OpenMP threads spinning on a busy 2-core machine made
# them up to 80x slower (measured: 40 s vs 0.5 s for one tiny generate run).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (see its README); tests that need real tiles fail loudly if it is missing."""
    if not (SHARED_DATA / "pcam" / "train").is_dir():
        pytest.fail(f"real H&E data not found at {SHARED_DATA}; CI lays it beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pcam_tiles(shared_data: Path) -> list[Path]:
    """The first 48 PCam training tiles (sorted), for stage tests on real data."""
    return sorted((shared_data / "pcam" / "train").glob("*.jpg"))[:48]


def _copy_tiles(tiles: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in tiles:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="session")
def copy_tiles() -> Callable[[list[Path], Path], Path]:
    """`copy_tiles(tiles, folder)`: copy real tiles into `folder` (created) for a stage that reads a folder."""
    return _copy_tiles


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory, pcam_tiles: list[Path]) -> Path:
    """A folder of 24 real tiles, shared by a module's tests (a test module may define its own `tiles`)."""
    return _copy_tiles(pcam_tiles[:24], tmp_path_factory.mktemp("tiles"))
