"""Resumable training checkpoints: one safetensors file per save, written by rank 0, atomically.

A *resume* checkpoint holds everything needed to continue a run bit-for-bit: the fp32 weights of every
module, every optimizer's state, the `TrainState` (step, epoch, position in the epoch) and each rank's
random-number-generator states. It is ``<dir>/step-00001000.safetensors``:

- tensors ``module/<name>/<key>`` (state dicts), ``optim/<name>/<param index>/<key>`` (optimizer tensors),
  ``rng/<rank>/<generator>`` (RNG states as integer tensors) and ``extra/<key>`` (trainer tensors such
  as non-persistent buffers);
- string metadata ``histosynth-resume`` with JSON: the train state, the optimizers' param groups and
  non-tensor state, the run config and trainer facts.

Nothing is pickled (optimizer state is split into tensors and JSON), so a checkpoint from a stranger is
as safe to open as its weights. Files are written to a temporary name and renamed, so a crash never
leaves a torn checkpoint, and only the newest `keep` are kept.

The small *export* checkpoint (weights only, optionally fp16) is `histosynth.runtime.weights`'s format.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from histosynth.errors import InputError, RunError
from histosynth.io import atomic_path
from histosynth.runtime import dist

RESUME_FORMAT = "histosynth-resume"
RESUME_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, epoch, and samples of this epoch already seen (per rank)."""

    step: int = 0
    epoch: int = 0
    epoch_position: int = 0  # samples of the current epoch this rank has consumed
    rng: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # filled on load (this rank)


@dataclass(frozen=True)
class SampleCount:
    """Training samples seen, across rounds and resumes (the model card's compute ledger): `base` samples by step
    `base_step` of this run, then steps x batch x processes at the run's *current* batch and process count.

    Every resume checkpoint records the count it stands at (`record`), so a run resumed with another batch size
    or number of processes goes on from the right number instead of recounting its past steps at the new rate.
    """

    base: int
    base_step: int = 0

    def at(self, step: int, batch: int, world_size: int) -> int:
        """The count at `step`, each step since `base_step` worth `batch` samples on each of `world_size`."""
        return self.base + (step - self.base_step) * batch * world_size

    def record(self, meta: dict[str, Any], step: int, batch: int, world_size: int) -> None:
        """Write the count at `step` into a resume checkpoint's `meta`."""
        meta["samples_seen"], meta["samples_step"] = self.at(step, batch, world_size), step

    @classmethod
    def resumed(cls, meta: Mapping[str, Any], prior: int) -> SampleCount:
        """The count a resumed run goes on from: its checkpoint's record, else (older checkpoints) the count its
        run started from (`prior_samples`, or `prior`: init_from's) plus every step at the current rate."""
        if "samples_seen" in meta and "samples_step" in meta:
            return cls(int(meta["samples_seen"]), int(meta["samples_step"]))
        return cls(int(meta.get("prior_samples", prior)))


# --------------------------------------------------------------------------------------------------
# RNG states as plain integer tensors (so they fit safetensors and can be gathered across ranks)


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as tensors."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else 1.0, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([int(np_pos), int(np_has_gauss), *np_keys.astype(np.int64)], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_gauss)], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if np_kind != "MT19937":  # np.random's legacy global state is always MT19937; guard the assumption
        raise RunError(f"unexpected NumPy RNG kind {np_kind!r}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss if has_gauss else None))
    np_state = state["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.asarray(np_state[2:], dtype=np.uint32), int(np_state[0]), int(np_state[1]),
         float(state["numpy_gauss"].item()))
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


def _gather_rng() -> dict[str, torch.Tensor]:
    """Every rank's RNG state, keyed ``rng/<rank>/<generator>`` (a collective under DDP)."""
    mine = capture_rng_state()
    out: dict[str, torch.Tensor] = {}
    for name in sorted(mine):
        for rank, part in enumerate(dist.all_gather_tensor(mine[name])):
            out[f"rng/{rank}/{name}"] = part.cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Optimizer state without pickle


def _optimizer_split(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _optimizer_join(name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, sub = key[len(prefix):].split("/", 1)
            state.setdefault(int(index), {})[sub] = value
    for index, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------------------------------
# Saving and loading


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/step-<step, 8 digits>.safetensors``."""
    return Path(directory) / f"step-{step:08d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Resume checkpoints in `directory`, oldest first (by step)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest resume checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_resume_checkpoint(
    directory: str | Path,
    state: TrainState,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> Path | None:
    """Write a resume checkpoint for `state.step`; returns its path on rank 0 (None elsewhere).

    Call it on *every* rank: the RNG states are gathered from all of them (a collective). Only rank 0
    writes; the others wait for it at a barrier so no rank runs ahead of a half-written file.
    Modules are saved unwrapped from DDP. `meta` must be JSON-able (the run config, data facts).
    """
    rng = _gather_rng()
    path = None
    if dist.is_main():
        tensors: dict[str, torch.Tensor] = dict(rng)
        for name, module in modules.items():
            for key, value in dist.unwrap(module).state_dict().items():
                tensors[f"module/{name}/{key}"] = value
        optim_meta = {}
        for name, optimizer in optimizers.items():
            t, m = _optimizer_split(name, optimizer)
            tensors.update(t)
            optim_meta[name] = m
        for key, value in (extra_tensors or {}).items():
            tensors[f"extra/{key}"] = value
        header = {
            "format_version": RESUME_VERSION,
            "state": {k: v for k, v in asdict(state).items() if k != "rng"},
            "world_size": dist.get_world_size(),
            "modules": sorted(modules),
            "optimizers": optim_meta,
            "meta": dict(meta or {}),
        }
        try:
            text = json.dumps(header, sort_keys=True)
        except TypeError as e:
            raise RunError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
        path = checkpoint_path(directory, state.step)
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(plain, str(tmp), metadata={RESUME_FORMAT: text})
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
    dist.barrier()
    return path


@dataclass
class ResumeCheckpoint:
    """What `load_resume_checkpoint` read besides the weights it loaded in place."""

    state: TrainState
    extra_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    world_size: int


def read_resume_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a resume checkpoint (cheap: no tensors are read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not a readable resume checkpoint: {e}") from None
    if RESUME_FORMAT not in metadata:
        raise InputError(f"{path}: not a histosynth resume checkpoint (no {RESUME_FORMAT!r} metadata)")
    header = json.loads(metadata[RESUME_FORMAT])
    if int(header.get("format_version", 0)) > RESUME_VERSION:
        raise InputError(f"{path}: resume checkpoint version {header['format_version']} is newer than this "
                         f"histosynth reads ({RESUME_VERSION})")
    return header


def load_resume_checkpoint(
    path: str | Path,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    *,
    restore_rng: bool = True,
) -> ResumeCheckpoint:
    """Load weights and optimizer states in place and return the train state, extra tensors and meta.

    This rank's RNG states are restored when the checkpoint was written by a run with the same number
    of processes (`restore_rng`); otherwise the caller should re-seed
    (`runtime.seeding.seed_everything(seed, rank, step)`).
    """
    path = Path(path)
    header = read_resume_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InputError(f"{path}: cannot read the checkpoint's tensors (truncated or corrupt?): {e}") from None
    saved_modules = set(header["modules"])
    if saved_modules != set(modules):
        raise RunError(f"{path}: holds modules {sorted(saved_modules)}, this run has {sorted(modules)}")
    for name, module in modules.items():
        prefix = f"module/{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            dist.unwrap(module).load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RunError(f"{path}: weights of {name!r} do not fit this run's network: "
                           f"{' '.join(str(e).splitlines()[:2])}") from None
    for name, optimizer in optimizers.items():
        if name not in header["optimizers"]:
            raise RunError(f"{path}: has no state for optimizer {name!r}")
        try:
            optimizer.load_state_dict(_optimizer_join(name, tensors, header["optimizers"][name]))
        except (ValueError, KeyError) as e:
            raise RunError(f"{path}: optimizer {name!r} state does not fit: {e}") from None
    state = TrainState(**header["state"])
    world_size = int(header.get("world_size", 1))
    prefix = f"rng/{dist.get_rank()}/"
    state.rng = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if restore_rng and world_size == dist.get_world_size() and state.rng:
        restore_rng_state(state.rng)
    extra = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
    return ResumeCheckpoint(state=state, extra_tensors=extra, meta=header.get("meta", {}), world_size=world_size)
