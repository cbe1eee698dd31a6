"""Checkpoints as safetensors files that carry their own config: never a pickle.

A checkpoint is one ``.safetensors`` file. Its tensors are the module's ``state_dict``; its string
metadata holds

- ``format``: ``"histosynth-checkpoint"``, ``format_version``: ``"1"``;
- ``config``: the network's config as JSON (e.g. ``to_dict(VQGANConfig(...))``), so the module is rebuilt
  without the training code (nanoGPT's habit, without pickle);
- ``extra``: any other JSON-able facts the trainer wants to keep (step, epoch, ``latent_scale``, data,
  losses, ``kind``: ``"vqgan"`` / ``"unet"`` ...).

Checkpoints and bundles may come from strangers, so only safetensors is read here; a pickled ``.pt``/``.ckpt``
is refused with an `InputError` rather than opened with ``torch.load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from histosynth.errors import InputError, RunError
from histosynth.io import atomic_path
from histosynth.runtime import dist

FORMAT = "histosynth-checkpoint"
FORMAT_VERSION = 1


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns; unpacks as ``state_dict, config, extra = load_checkpoint(p)``."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    extra: dict[str, Any]


def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views); a contiguous CPU copy of each
    # is always accepted and costs one model's worth of host memory for the moment of saving.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    module: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``module``'s weights (or a ready ``state_dict``) with ``config`` and ``extra`` as JSON metadata.

    The file is written under a temporary name and renamed, so a crash never leaves a torn checkpoint.
    ``config`` and ``extra`` must be JSON-serialisable (use ``histosynth.configio.to_dict`` on dataclasses).
    """
    path = Path(path)
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(dict(config), sort_keys=True),
            "extra": json.dumps(dict(extra or {}), sort_keys=True),
        }
    except TypeError as e:
        raise InputError(f"{path}: checkpoint config/extra must be JSON-serialisable: {e}") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(_sorted_metadata(save(_plain_tensors(state), metadata=metadata)))
    return path


def _sorted_metadata(blob: bytes) -> bytes:
    """The safetensors file `blob` with its string metadata in key order.

    safetensors writes the metadata from a Rust HashMap, in an order that changes from call to call, so the same
    weights got another file hash on each export (and a bundle manifest churned). Tensors and their offsets are
    already in a fixed order; only the header is rewritten, padded with spaces to 8 bytes as the format requires.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def save_export(
    module: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    dtype: Literal["float16", "float32"] = "float16",
) -> Path | None:
    """Write the small export checkpoint (weights only, floats cast to `dtype`) of a module or state dict on rank 0.

    It is this module's format, so `load_checkpoint` and the bundle builder read it; load it into an fp32
    network for further training or encoding (`load_state_dict` casts). Training runs write their EMA
    weights with it.
    """
    if not dist.is_main():
        return None
    torch_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    source = dist.unwrap(module).state_dict() if isinstance(module, torch.nn.Module) else module
    state = {
        k: v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()
        for k, v in source.items()
    }
    return save_checkpoint(state, path, config, {**dict(extra or {}), "dtype": dtype})


def _json_field(path: Path, metadata: Mapping[str, str], key: str, required: bool) -> dict[str, Any]:
    if key not in metadata:
        if required:
            raise InputError(f"{path}: not a histosynth checkpoint (metadata has no {key!r} entry)")
        return {}
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: checkpoint metadata {key!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: checkpoint metadata {key!r} must be a JSON object")
    return value


def read_checkpoint_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, extra)`` of a checkpoint without loading its tensors (cheap; for `info`/export checks)."""
    path = Path(path)
    metadata = _open_metadata(path)
    _check_format(path, metadata)
    return _json_field(path, metadata, "config", True), _json_field(path, metadata, "extra", False)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`: ``(state_dict, config, extra)``.

    Missing files, non-safetensors files (pickles included: they are never unpickled) and files without
    histosynth metadata are `InputError`s naming the file.
    """
    path = Path(path)
    metadata = _open_metadata(path)
    _check_format(path, metadata)
    config = _json_field(path, metadata, "config", True)
    extra = _json_field(path, metadata, "extra", False)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InputError(f"{path}: cannot read the checkpoint's tensors (truncated or corrupt?): {e}") from None
    return Checkpoint(state, config, extra)


def load_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(strict=True)`` with a mismatch reported as a `RunError` naming ``source``."""
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RunError(
            f"{source}: weights do not fit the network built from its config: {' '.join(first[:3])}"
        ) from None


def _open_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file{_pickle_hint(path)}: {e}") from None


def _pickle_hint(path: Path) -> str:
    # torch.save writes a zip (PK..) or a bare pickle (0x80 protocol byte); say why we will not open it.
    with path.open("rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (it looks like a torch pickle; histosynth never unpickles weights, save them with save_checkpoint)"
    return " (truncated or corrupt?)"


def _check_format(path: Path, metadata: Mapping[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not a histosynth checkpoint (metadata 'format' is {metadata.get('format')!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise InputError(f"{path}: checkpoint 'format_version' is not an integer") from None
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {version} is newer than this histosynth reads "
            f"({FORMAT_VERSION}); upgrade histosynth"
        )
