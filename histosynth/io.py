"""File I/O every stage shares (a leaf module: of histosynth it imports only `histosynth.errors`).

Outputs are written under a temporary name beside the target and renamed into place, so a reader - or a
resumed run after a kill - sees a file whole or not at all. The temporary name is ``.<name>.tmp-<tag>``:
hidden, and with a suffix no image or table reader takes for its own, so a torn leftover of a killed run is
never read as data (every folder scan in histosynth skips hidden files; torchvision's ImageFolder skips
unknown suffixes). `tag` defaults to the process id; concurrent writers of one folder (generation shards)
pass their own, so each can find and remove its leftovers (`stale_temporaries`).

Strict JSON has no NaN or infinity: `json_safe` / `write_json` write them as null (documented in
docs/evaluation.md), and numpy scalars as plain numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from histosynth.errors import InputError, RunError

TMP_MARK = ".tmp-"  # between a target's name and the writer's tag in a temporary name


def temporary_path(path: str | Path, tag: str = "") -> Path:
    """The temporary name beside `path` that `atomic_path` writes first: ``.<name>.tmp-<tag or pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{tag or os.getpid()}")


@contextmanager
def atomic_path(path: str | Path, *, tag: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` (parent folders are created); on success rename it to `path`,
    on error remove it.

    The temporary name does not end in `path`'s suffix: writers that infer a format from the name need it
    spelled out (``Image.save(tmp, format="PNG")``, ``np.save`` to an open file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, tag)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, *, tag: str = "", fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (parent folders are created).

    `fsync` flushes the data to disk before the rename, so even a power cut leaves the old file or the whole
    new one (generated datasets ask for it; logs and caches do not need the cost).
    """
    path = Path(path)
    with atomic_path(path, tag=tag) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def write_text(path: str | Path, text: str, *, tag: str = "", fsync: bool = False) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"), tag=tag, fsync=fsync)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]], *, line_end: str = "\r\n",
              fsync: bool = False) -> Path:
    """Write a CSV table (a header line, then `rows`) to `path` atomically; `line_end` as the csv module's."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=line_end)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue(), fsync=fsync)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None and numpy scalars as Python numbers, recursively.

    Strict JSON has no such numbers, and `json.dumps` cannot write numpy's.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None, fsync: bool = False) -> Path:
    """Write `data` as strict JSON (NaN/inf -> null, a final newline) to `path` atomically.

    `default` turns other objects into JSON values (`json.dumps`'s hook; e.g. `str` for paths).
    """
    text = json.dumps(json_safe(data), indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)
    return write_text(path, text + "\n", fsync=fsync)


def stale_temporaries(folder: str | Path, tag: str) -> list[Path]:
    """The temporary files writer `tag` left in `folder` (a killed run's torn files), for removal."""
    return sorted(Path(folder).glob(f".*{TMP_MARK}{tag}"))


def check_writable(folder: str | Path, option: str = "--out") -> None:
    """Fail early, before any model is loaded and creating nothing, if `folder` cannot be an output folder.

    A file where the folder or one of its parents should be is bad input (`InputError`, naming `option`); a
    folder that cannot be written is a `RunError`. The nearest existing folder gets a probe file, removed at
    once, because permission bits do not tell the whole story (read-only mounts, ACLs).
    """
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == Path(folder) else f" (in the way of {folder})"
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder{where}; choose a folder path")
    try:
        probe = existing / f".histosynth-write-test{TMP_MARK}{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output folder {folder} is not writable: {e.strerror or e}") from None
