"""Data-parallel processes: the launcher's environment, the process group and its collectives.

``torchrun`` (and SLURM scripts that call it, or any launcher that sets the same variables)
starts one process per device with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` set. ``setup_distributed`` joins those processes into one process group;
without those variables (or with ``WORLD_SIZE=1``) it returns ``SINGLE_PROCESS`` and nothing
about a run changes. Every collective here is a no-op for a single process.

A collective that fails because another rank died, raised or stopped answering within
``distributed_timeout_s`` becomes ``PeerFailure``, naming this rank and what to do.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from beartype import beartype
from jaxtyping import Float, Shaped, jaxtyped

logger = logging.getLogger(__name__)

Backend = Literal["auto", "nccl", "gloo"]

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailure(RuntimeError):
    """Another rank of the run failed, was killed, or did not answer within the timeout."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run's process group."""

    rank: int
    """This process' index among all processes (0: the one that writes files)."""
    world_size: int
    """Processes in the run (1: no process group)."""
    local_rank: int
    """This process' index on its node (its GPU with nccl)."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (checkpoints, export, logs)."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0)


def launcher_context() -> DistributedContext:
    """Rank, world size and local rank from a launcher's environment (``SINGLE_PROCESS`` if none)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return SINGLE_PROCESS
    missing = [name for name in _LAUNCHER_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: start the run with "
            "torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process)."
        )
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return DistributedContext(rank=rank, world_size=int(world), local_rank=local)


def resolve_backend(backend: Backend, device: str) -> str:
    """``distributed_backend`` for ``device``: "auto" is nccl on CUDA, gloo otherwise."""
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(
            f"distributed_backend={backend!r} is not a backend; use 'auto', 'nccl' or 'gloo'."
        )
    on_cuda = torch.device(device).type == "cuda"
    if backend == "nccl" and not on_cuda:
        raise ValueError(
            f"distributed_backend='nccl' needs device='cuda', got device={device!r}; "
            "use distributed_backend='gloo' (or 'auto') on CPUs."
        )
    if backend == "auto":
        return "nccl" if on_cuda else "gloo"
    return backend


def setup_distributed(backend: Backend, timeout_s: float, device: str) -> DistributedContext:
    """Join the launcher's process group (once per process); ``SINGLE_PROCESS`` without one.

    A process group that already exists (a script that called ``init_process_group`` itself,
    or several runs in one process) is used as it is.
    """
    if not timeout_s > 0:
        raise ValueError(
            f"distributed_timeout_s must be a number of seconds > 0, got {timeout_s!r}; "
            "e.g. 600 (longer than the slowest evaluation or checkpoint)."
        )
    if dist.is_available() and dist.is_initialized():
        return _context_of_current_group()
    context = launcher_context()
    if not context.is_distributed:
        return context
    name = resolve_backend(backend, device)
    if name == "nccl":
        if torch.device(device).index is not None:
            raise ValueError(
                f"device={device!r} puts every rank on one GPU; use device='cuda' (each rank "
                "then uses cuda:<LOCAL_RANK>)."
            )
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(
        backend=name,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=context.rank,
        world_size=context.world_size,
    )
    logger.info(
        f"rank {context.rank} of {context.world_size} joined the process group ({name}, "
        f"timeout {timeout_s:g} s)"
    )
    return context


def _context_of_current_group() -> DistributedContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistributedContext(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def shutdown(context: DistributedContext) -> None:
    """Leave the process group (after the last collective of the process)."""
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def collectives(context: DistributedContext, what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, raised or timed out) into ``PeerFailure``."""
    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        if isinstance(error, PeerFailure) or not context.is_distributed:
            raise
        raise PeerFailure(
            f"rank {context.rank} of {context.world_size}: {what} failed because another rank "
            f"failed, was killed or did not answer within distributed_timeout_s "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
            "See the other ranks' logs for the cause; resume from the last checkpoint."
        ) from error


def barrier(context: DistributedContext, what: str) -> None:
    """Wait until every rank reaches this point (``what`` names it in a failure)."""
    if context.is_distributed:
        with collectives(context, f"waiting for every rank ({what})"):
            dist.barrier()


def check_shardable(sequences_per_batch: int, context: DistributedContext) -> None:
    """Refuse a global batch that the ranks cannot share in whole sequences."""
    if sequences_per_batch % context.world_size:
        raise ValueError(
            f"train_batch_size_tokens holds {sequences_per_batch} sequences per step, which "
            f"{context.world_size} processes cannot share in whole sequences. Set "
            "train_batch_size_tokens to a multiple of context_size × the number of processes, "
            "or start a number of processes that divides the sequences per step."
        )


@jaxtyped(typechecker=beartype)
def rank_share(
    batch: Shaped[torch.Tensor, "batch ..."], context: DistributedContext
) -> Shaped[torch.Tensor, "share ..."]:
    """This rank's consecutive share of a global batch (token sequences, activation rows)."""
    if not context.is_distributed:
        return batch
    check_shardable(batch.shape[0], context)
    share = batch.shape[0] // context.world_size
    return batch[context.rank * share : (context.rank + 1) * share]


def all_reduce(
    tensor: torch.Tensor, context: DistributedContext, op: dist.ReduceOp.RedOpType, what: str
) -> torch.Tensor:
    """``tensor`` reduced over every rank with ``op``, in place (returned for chaining)."""
    if context.is_distributed:
        with collectives(context, what):
            dist.all_reduce(tensor, op=op)
    return tensor


def mean_over_ranks(value: torch.Tensor, context: DistributedContext, what: str) -> torch.Tensor:
    """The mean of a (detached) tensor over the ranks, as float32 for an exact-enough sum."""
    if not context.is_distributed:
        return value
    total = all_reduce(value.detach().float().clone(), context, dist.ReduceOp.SUM, what)
    return (total / context.world_size).to(value.dtype)


def broadcast_from_main(tensors: list[torch.Tensor], context: DistributedContext) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's (in place)."""
    if not context.is_distributed:
        return
    with collectives(context, "copying rank 0's SAE to every rank"):
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def from_main(value: Any, context: DistributedContext, what: str) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not context.is_distributed:
        return value
    box = [value]
    with collectives(context, what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


@jaxtyped(typechecker=beartype)
def gather_values(
    values: Float[torch.Tensor, " n"], context: DistributedContext, what: str
) -> Float[torch.Tensor, " total"]:
    """Every rank's ``values`` concatenated (ranks may hold different counts)."""
    if not context.is_distributed:
        return values
    with collectives(context, what):
        counts = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in _ranks(context)]
        dist.all_gather(counts, torch.tensor([values.numel()], device=values.device))
        longest = int(max(int(c) for c in counts))
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in _ranks(context)]
        dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)])


def _ranks(context: DistributedContext) -> range:
    return range(context.world_size)
