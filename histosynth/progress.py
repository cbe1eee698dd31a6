"""The one progress bar of every long command: done/total, items per second, elapsed time and ETA.

`evaluate fid` on 2 x 1,450 tiles runs for many minutes on two busy cores; a bar without a rate or an ETA
does not tell the user whether to wait or to stop. Training loops have their own bar over optimizer steps
(`runtime.tracking.TrainProgress`); everything that walks tiles uses this one.
"""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. `41.2 tiles/s`; a task's `unit` field overrides the bar's unit."""

    def __init__(self, unit: str = "tiles") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", self.unit)
        # A moving window over recent updates while running; once finished, the mean over the whole task
        # (rich keeps `finished_speed` only for tasks finished by `advance`).
        speed = task.speed
        if task.finished:
            speed = task.finished_speed or (task.completed / task.finished_time if task.finished_time else None)
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        digits = ".0f" if speed >= 100 else ".3g"
        return Text(f"{speed:{digits}} {unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "tiles", *, console: Optional[Console] = None, transient: bool = False,
                 disable: bool = False) -> Progress:
    """A rich `Progress` with description, bar, done/total, `<rate> <unit>/s`, elapsed and ETA.

    Prints to stderr unless `console` is given, so a command's results on stdout stay clean. Tasks may set a
    field `unit` (`bar.add_task("sources", total=n, unit="sources")`) when one bar counts different things.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=transient,
        disable=disable,
    )
