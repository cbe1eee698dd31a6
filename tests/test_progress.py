"""Every long command shows done/total, a rate in items/s, elapsed time and an ETA (histosynth.progress)."""

from __future__ import annotations

import importlib
import inspect
import io
import re
import time

import pytest
from rich.console import Console
from rich.progress import TimeRemainingColumn

from histosynth.progress import RateColumn, progress_bar


def render(bar) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(bar.make_tasks_table(bar.tasks))
    return console.export_text()


def test_the_bar_shows_count_rate_elapsed_and_eta() -> None:
    bar = progress_bar(console=Console(file=io.StringIO()))
    task = bar.add_task("features (real)", total=100)
    assert "- tiles/s" in render(bar)  # no rate before the first update
    for _ in range(3):
        time.sleep(0.02)
        bar.advance(task, 10)
    text = render(bar)
    assert "features (real)" in text and "30/100" in text and "eta" in text
    rate = float(re.search(r"([\d.]+) tiles/s", text).group(1))
    assert 50 < rate < 2000  # ~10 tiles per 20 ms, on a busy machine
    assert re.search(r"\d:\d\d:\d\d", text)  # elapsed / remaining clocks
    bar.update(task, completed=100)
    assert re.search(r"100/100 .*[\d.]+ tiles/s", render(bar))  # the overall rate stays once finished


def test_a_task_can_count_other_things() -> None:
    bar = progress_bar("tiles", console=Console(file=io.StringIO()))
    bar.add_task("sources", total=3, unit="sources")
    assert "sources/s" in render(bar) and "tiles/s" not in render(bar)


@pytest.mark.parametrize("factory", ["histosynth.cli.evaluate:_progress", "histosynth.tiles.dataset:_progress"])
def test_shared_bar_factories(factory: str) -> None:
    module, name = factory.split(":")
    fn = getattr(importlib.import_module(module), name)
    bar = fn(True) if "dataset" in module else fn()
    kinds = {type(c) for c in bar.columns}
    assert RateColumn in kinds and TimeRemainingColumn in kinds


@pytest.mark.parametrize("module", ["histosynth.cli.generate", "histosynth.autoencoder.latents",
                                    "histosynth.tiles.tiler", "histosynth.cli.evaluate"])
def test_long_commands_build_their_bars_from_the_shared_one(module: str) -> None:
    """generate, train encode, tile and evaluate fid/recon/control: no hand-made bar without a rate or ETA."""
    source = inspect.getsource(importlib.import_module(module))
    assert "progress_bar(" in source
    if module != "histosynth.cli.evaluate":  # evaluate's downstream/memorization bars show their own rates
        assert "Progress(" not in source
