"""Former home of the output writers; they live in `histosynth.io` (atomic files, `check_writable`) and
`histosynth.imageops` (`encode_image`). These names stay importable for code written against this module."""

from __future__ import annotations

from pathlib import Path

from histosynth.imageops import encode_image
from histosynth.io import TMP_MARK, check_writable, write_bytes

__all__ = ["TMP_MARK", "check_writable", "encode_image", "write_atomic"]


def write_atomic(path: Path, data: bytes, tag: str = "") -> None:
    """`histosynth.io.write_bytes` with fsync (what this module's writer did)."""
    write_bytes(path, data, tag=tag, fsync=True)
