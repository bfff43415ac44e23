"""Sharding long jobs over processes the torchrun way (torch.distributed, no own launcher).

``context()`` reads torchrun's environment and joins the process group once (gloo on CPU; on a
CUDA machine gloo for CPU tensors plus NCCL for GPU tensors); without torchrun it is a
one-process context and touches nothing. Work is split by position (``shard_indices``) and the
noise of the core is seeded by input index, so K processes give exactly the results of one.
Multi-node runs use torchrun's rendezvous endpoint (``--rdzv-endpoint host:port``).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rsrouter.errors import UsageError
from rsrouter.runtime import resolve_device

# Ranks wait at the final barrier for the slowest rank (a resumed rank may have much more left
# to do than the others), so the wait is long; a crashed rank still ends the job via torchrun.
DEFAULT_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its rank among ``world`` and its GPU slot."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that merges shards and prints summaries."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here; a no-op for a single process."""
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()

    def device(self, requested: str | None = None) -> torch.device:
        """``requested`` (or auto) for this rank; CUDA is pinned to cuda:local_rank."""
        device = resolve_device(requested)
        if device.type != "cuda":
            return device
        if device.index is not None and device.index != self.local_rank and self.world > 1:
            raise UsageError(
                f"device {requested!r} conflicts with this rank's GPU cuda:{self.local_rank}; "
                "under torchrun pass --device cuda and each rank takes its own GPU."
            )
        index = self.local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"rank {self.rank} needs cuda:{index}, but this node has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node."
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)


_CONTEXT: DistContext | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise UsageError(f"environment variable {name}={value!r} is not a whole number.") from exc


def _default_backend() -> str:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def context(backend: str | None = None, *, timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """This process's DistContext; joins torchrun's process group on first call when world > 1.

    ``backend`` overrides the default (gloo on CPU, gloo + NCCL on a CUDA machine).
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise UsageError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    if world > 1:
        if not dist.is_available():
            raise UsageError("this PyTorch build has no torch.distributed support.")
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise UsageError(
                    "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are unset; launch with torchrun."
                )
            dist.init_process_group(backend or _default_backend(), timeout=timeout)
            atexit.register(_shutdown)
        rank, world = dist.get_rank(), dist.get_world_size()
    _CONTEXT = DistContext(rank=rank, world=world, local_rank=local_rank)
    return _CONTEXT


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def job_id() -> str:
    """Names the job this process belongs to, the same on every rank of one torchrun job (its
    run id and rendezvous address; two jobs on one machine cannot share a master port) and
    this process's own otherwise. Read from the environment: no process group is joined."""
    if _env_int("WORLD_SIZE", 1) > 1:
        parts = [
            os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
        ]
        return "torchrun:" + ":".join(parts)
    return f"pid:{os.getpid()}"


def shard_indices(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """The entries of ``indices`` at positions i with i % world == rank (round-robin shards).

    Every entry lands on exactly one rank, and the shards of consecutive ranks interleave, so
    they stay balanced even when the work per entry drifts along the list.
    """
    return [int(i) for i in list(indices)[ctx.rank :: ctx.world]]
