"""Distributed data parallel (DDP) helpers: one code path for one process and for `torchrun`.

Every training stage calls `init_distributed()` first. Without torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it returns a single-process `DistInfo` and
touches no process group, so the same loop runs unchanged on a laptop. Under
``torchrun --nproc_per_node N`` it joins the group: gloo on CPU, NCCL on CUDA (one GPU per local rank).

Only rank 0 writes checkpoints, logs and images (`is_main`); collectives here are no-ops when single.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from histosynth.errors import InputError, RunError
from histosynth.runtime.devices import resolve_device

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size` processes and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group if its environment is set, else describe a single process.

    `device` is the user's choice (`auto|cpu|cuda|cuda:N`, see `resolve_device`). Under torchrun a CUDA
    choice becomes ``cuda:LOCAL_RANK`` (one GPU per process, NCCL); a CPU choice uses gloo. Calling it
    again in an initialised process returns the same description without re-initialising.
    """
    resolved = resolve_device(device)
    if not all(k in os.environ for k in _ENV_KEYS) or _env_int("WORLD_SIZE") <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolved)

    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                "use --nproc_per_node <= the number of GPUs or --device cpu"
            )
        resolved = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(resolved)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        except (RuntimeError, ValueError) as e:
            raise RunError(f"cannot join the process group ({backend}, rank {rank}/{world_size}): {e}") from None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when single)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when single)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op when single."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives want their tensors: this rank's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor on `x`'s device; `x` itself is left alone)."""
    if not is_distributed():
        return x.detach().clone()
    out = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of `x` over ranks (a float becomes a float64 tensor on the CPU; gloo and NCCL both take it)."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    return all_reduce_sum(t) / get_world_size()


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank, so every rank takes the same branch (a collective when distributed)."""
    return bool(all_reduce_sum(torch.tensor(float(flag))) > 0)


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `x` in place with rank `src`'s value; a no-op when single."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x


def all_gather_tensor(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on all ranks), in rank order; ``[x]`` when single."""
    if not is_distributed():
        return [x]
    y = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(y) for _ in range(get_world_size())]
    dist.all_gather(parts, y)
    return [p.to(x.device) for p in parts]


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can start part-way through an epoch.

    The order of an epoch is a pure function of ``(seed, epoch)`` (as in `DistributedSampler`), so a
    resumed run skips the batches already seen with `set_start` instead of loading and discarding them.
    """

    def __init__(self, dataset: Dataset, info: DistInfo, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._start = 0

    def set_start(self, index: int) -> None:
        """Skip the first `index` samples of this rank's share of the next epoch (one-shot)."""
        if index < 0:
            raise ValueError(f"start index must be >= 0, got {index}")
        self._start = index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples - self._start


def make_sampler(dataset: Dataset, info: DistInfo, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> ResumableSampler:
    """The sampler for a stage's `DataLoader`: each rank gets a disjoint share, reshuffled per epoch.

    Call ``sampler.set_epoch(epoch)`` before each epoch (as with `DistributedSampler`). With one process
    the share is the whole dataset.
    """
    if isinstance(dataset, Sized) and len(dataset) < info.world_size:
        raise InputError(f"the dataset has {len(dataset)} tiles, fewer than the {info.world_size} processes")
    return ResumableSampler(dataset, info, shuffle=shuffle, seed=seed, drop_last=drop_last)


def wrap_ddp(module: torch.nn.Module, info: DistInfo, **kwargs) -> torch.nn.Module:
    """`module` in `DistributedDataParallel` when distributed (moved to `info.device` first), else as is."""
    module = module.to(info.device)
    if not info.is_distributed:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def cleanup() -> None:
    """Leave the process group (if joined); safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
