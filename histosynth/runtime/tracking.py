"""What a training run tells the user: a JSONL metrics log and a rich progress bar, both rank 0 only."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from histosynth.io import write_text
from histosynth.runtime import dist


def _plain(value: Any) -> Any:
    # Tensors and numpy scalars become floats; NaN/inf become strings so every line stays valid JSON.
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Append one JSON object per line to `path` (``{"step", "split", "time", ...metrics}``), on rank 0.

    When a run resumes from step S, records with ``step > S`` (written after the last checkpoint by the
    interrupted run) are dropped first, so the log reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = dist.is_main()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (json.JSONDecodeError, ValueError, AttributeError):
                continue  # a line torn by a crash
        write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Write one record (a no-op off rank 0)."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL metrics log (optionally of one split)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if split is None or record.get("split") == split:
                out.append(record)
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM during a training loop (`kill`, a job scheduler, a session's end), raised like Ctrl-C so that the
    loop unwinds the same way and the train log says where the run stopped."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


class TrainProgress:
    """A rich progress bar over optimizer steps with ETA and the latest losses; silent off rank 0.

    Inside the `with`, SIGTERM raises `Terminated` (when the process had no SIGTERM handler of its own), so
    train.log records "terminated at step N" instead of ending without a word.

    Use as a context manager: ``with TrainProgress(total, start) as bar: bar.update(step, loss=...)``.
    """

    def __init__(self, total: int, start: int = 0, description: str = "training", *,
                 enabled: bool = True, console: Console | None = None, log_file: str | Path | None = None,
                 log_interval_s: float = 30.0) -> None:
        self.enabled = enabled and dist.is_main()
        self.total = total
        self.description = description
        # A plain-text log beside the bar (rank 0 only, whether or not the bar shows): a run in the background
        # or under a pipeline leaves a readable record of its progress, its speed and whether it resumed.
        self._log_file = Path(log_file) if log_file is not None and dist.is_main() else None
        self._log_interval = log_interval_s
        self._start_step = start
        self._started = time.monotonic()
        self._last_log = self._started
        self._last_step = start
        if self._log_file is not None:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            what = f"resumed at step {start} of {total}" if start > 0 else f"started, {total} steps"
            self._write(f"{description}: {what}")
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console or Console(stderr=True),
            disable=not self.enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, metrics="")

    def __enter__(self) -> TrainProgress:
        self._previous_sigterm = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self._log_file is not None:
            if exc_type is None:
                self._write(f"{self.description}: finished at step {self._last_step} of {self.total}")
            elif issubclass(exc_type, Terminated):
                self._write(f"{self.description}: terminated (SIGTERM) at step {self._last_step}; the newest "
                            "checkpoint is kept: rerun to resume")
            elif issubclass(exc_type, KeyboardInterrupt):
                self._write(f"{self.description}: interrupted at step {self._last_step}; rerun to resume")
            else:
                self._write(f"{self.description}: failed at step {self._last_step}: {exc_type.__name__}: {exc}")

    def _write(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._log_file.open("a", encoding="utf-8") as f:  # type: ignore[union-attr]
            f.write(f"{stamp}  {message}\n")

    def update(self, step: int, **metrics: float) -> None:
        """Show `step` done, with `metrics` (short names) formatted to 4 significant digits."""
        text = "  ".join(f"{k} {float(_plain(v)):.4g}" for k, v in metrics.items())
        self._progress.update(self._task, completed=step, **({"metrics": text} if metrics else {}))
        self._last_step = step
        if metrics:
            self._last_metrics = text
        now = time.monotonic()
        if self._log_file is not None and (now - self._last_log >= self._log_interval or step >= self.total):
            done = step - self._start_step
            rate = done / max(now - self._started, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 * 30 else "?"
            self._write(f"{self.description}: step {step}/{self.total} ({step / max(self.total, 1):.1%}), "
                        f"{rate:.2f} steps/s, eta {eta_text}  {getattr(self, '_last_metrics', '')}".rstrip())
            self._last_log = now
