"""File I/O every stage shares (a leaf module: imports nothing of histosynth).

Outputs are written under a temporary name beside the target and renamed into place, so a reader - or a
resumed run after a kill - sees a file whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error remove it.

    The temporary name keeps the suffix, so writers that infer a format from it (PIL, numpy) still work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (strict JSON has no such numbers), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any, *, indent: int = 2) -> Path:
    """Write `data` as strict JSON (NaN/inf -> null) to `path` atomically."""
    return write_text(path, json.dumps(json_safe(data), indent=indent, sort_keys=False) + "\n")
