"""Multi-process training with ``torchrun``: the process group, data shards, and agreement.

``torchrun --nproc_per_node K -m microcircuits train ...`` starts K processes and tells
each its place through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`join_process_group` reads it and joins the
process group (NCCL when training on CUDA, one GPU per local rank; gloo on CPU), once
per process: later runs of the same process (``microcircuits compare`` trains three)
use the same group, which is left when the process exits. A plain ``python`` process
sees no such variables and trains alone.

How a run is split (data parallelism, :class:`torch.nn.parallel.DistributedDataParallel`):

- every rank draws the same *global* batch from the same data generator and keeps its
  own contiguous slice of the batch (:func:`shard_batch`): the ``batch_size`` sequences
  (language models: ``batch_size`` parallel text streams) are divided into K equal
  shards, so K ranks train on exactly the batch one process would;
- each rank's loss is the mean over its shard and DDP averages the gradients over the
  ranks: with equal shards that is the gradient of the mean over the global batch;
- rank 0 alone writes logs, metrics, checkpoints and results, evaluates, and sends what
  the others must agree on (validation metrics, the resumed checkpoint) to them
  (:func:`broadcast`, :func:`run_on_main`), so every rank takes the same decisions
  (learning-rate decay, early stopping, when to stop).

Batches are time-major, as everywhere in the package: a tensor with two or more
dimensions has the batch on dimension 1 (``(T, B, ...)``; recurrent states
``(layers, B, H)``), a one-dimensional tensor (targets) on dimension 0.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedContext",
    "all_gather",
    "batch_dim",
    "broadcast",
    "environment",
    "gather_batch",
    "join_process_group",
    "mean_over_ranks",
    "run_on_main",
    "shard_batch",
    "wrap_model",
]

T = TypeVar("T")

ENVIRONMENT_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""What torchrun (and other launchers of ``torch.distributed``) set for every process."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the processes of one run.

    Attributes:
        world_size: number of processes (1: training alone).
        rank: this process's index, 0 .. world_size - 1; rank 0 writes the run's files.
        local_rank: its index on this machine (selects the GPU).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when alone.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def _read_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def environment() -> DistributedContext:
    """The process's place from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (unset: alone).

    Raises:
        ValueError: a variable is not an integer, or the values are inconsistent.
    """
    world_size = _read_int("WORLD_SIZE", 1)
    rank = _read_int("RANK", 0)
    local_rank = _read_int("LOCAL_RANK", rank)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    return DistributedContext(world_size, rank, local_rank)


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def join_process_group(
    device: torch.device, *, timeout_s: float = 1800.0
) -> tuple[DistributedContext, torch.device]:
    """Join the process group the environment describes (once per process).

    Alone (no ``WORLD_SIZE`` > 1), returns a single-process context and ``device``
    unchanged. Under torchrun, a CUDA ``device`` becomes ``cuda:<LOCAL_RANK>`` with the
    NCCL backend, a CPU one uses gloo. A process group that already exists (set up by
    an earlier run, or by the caller) is used as it is. A group created here is left
    when the process exits: creating a second one in the same process would meet the
    first one's keys in torchrun's rendezvous store.

    Args:
        device: the device the run asked for (``cpu`` or ``cuda``).
        timeout_s: how long a collective waits for the slowest rank (rank 0 evaluates
            while the others wait, so this bounds an evaluation's length).

    Returns:
        ``(context, device)``: this process's place and the device to train on.

    Raises:
        ValueError: inconsistent environment, or a CUDA run with more local ranks
            than visible GPUs.
    """
    context = environment()
    if not context.is_distributed:
        return SINGLE_PROCESS, device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if context.local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={context.local_rank} but only {count} CUDA device(s) are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if dist.is_initialized():
        backend = dist.get_backend()
        if dist.get_world_size() != context.world_size or dist.get_rank() != context.rank:
            raise ValueError(
                f"the existing process group (rank {dist.get_rank()} of "
                f"{dist.get_world_size()}) disagrees with the environment (RANK="
                f"{context.rank}, WORLD_SIZE={context.world_size})"
            )
    else:
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if backend == "nccl" else {}),
        )
        atexit.register(_leave_process_group)
    return DistributedContext(context.world_size, context.rank, context.local_rank, backend), device


# -- the model --------------------------------------------------------------------------


def wrap_model(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``model`` in :class:`DistributedDataParallel` when distributed, else itself.

    Use the wrapper for training forward/backward passes (it averages the gradients)
    and the bare ``model`` for evaluation and ``state_dict`` (no ``module.`` prefix).
    """
    if not context.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# -- shards -----------------------------------------------------------------------------


def batch_dim(tensor: Tensor) -> int:
    """The batch dimension of a time-major tensor: 0 for 1-D targets, else 1."""
    return 0 if tensor.dim() <= 1 else 1


def _check_divisible(size: int, context: DistributedContext, what: str) -> None:
    if size % context.world_size:
        raise ValueError(
            f"{what} {size} cannot be split evenly over {context.world_size} processes; "
            f"use a batch size divisible by the number of processes"
        )


def shard_batch(batch: Sequence[Tensor], context: DistributedContext) -> tuple[Tensor, ...]:
    """This rank's contiguous slice of every tensor of a global batch.

    Args:
        batch: tensors ``(T, B, ...)`` or ``(B,)`` with the same ``B``.
        context: this process's place.

    Returns:
        The tensors with ``B / world_size`` entries, rank ``r`` holding entries
        ``[r * B / K, (r + 1) * B / K)``.

    Raises:
        ValueError: ``B`` is not divisible by the number of processes.
    """
    if not context.is_distributed:
        return tuple(batch)
    shards = []
    for tensor in batch:
        dim = batch_dim(tensor)
        _check_divisible(tensor.shape[dim], context, "batch size")
        size = tensor.shape[dim] // context.world_size
        shards.append(tensor.narrow(dim, context.rank * size, size).contiguous())
    return tuple(shards)


def gather_batch(shards: Sequence[Tensor], context: DistributedContext) -> tuple[Tensor, ...]:
    """The inverse of :func:`shard_batch`: every rank's slices joined in rank order.

    Collective: every rank must call it. Used for the recurrent state carried between
    language-model batches (``(layers, B / K, H)`` per rank), so that a checkpoint holds
    the state of the whole batch, as a single process would. The result is on the CPU.
    """
    local = [t.detach().cpu() for t in shards]
    if not context.is_distributed:
        return tuple(local)
    everyone = all_gather(local, context)
    return tuple(
        torch.cat([parts[i] for parts in everyone], dim=batch_dim(t)) for i, t in enumerate(local)
    )


# -- agreement --------------------------------------------------------------------------


def mean_over_ranks(tensor: Tensor, context: DistributedContext) -> Tensor:
    """The element-wise mean of ``tensor`` over the ranks (collective; a copy)."""
    if not context.is_distributed:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / context.world_size


def all_gather(value: T, context: DistributedContext) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order (collective)."""
    if not context.is_distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast(value: T, context: DistributedContext) -> T:
    """Rank 0's ``value`` on every rank (collective; the others' ``value`` is ignored)."""
    if not context.is_distributed:
        return value
    box: list[Any] = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(function: Callable[[], T], context: DistributedContext) -> T:
    """Call ``function`` on rank 0 only; every rank returns its result or raises its error.

    Collective. An exception raised on rank 0 is raised again, with the same type and
    message, on every rank, so that no rank waits for a partner that has given up.
    """
    if not context.is_distributed:
        return function()
    outcome: tuple[str, Any] = ("ok", None)
    if context.is_main:
        try:
            outcome = ("ok", function())
        except Exception as error:  # noqa: BLE001 - sent to the other ranks, then raised
            outcome = ("error", (type(error), str(error)))
            broadcast(outcome, context)
            raise
    kind, payload = broadcast(outcome, context)
    if kind == "error":
        error_type, message = payload
        try:
            error = error_type(message)
        except Exception:  # noqa: BLE001 - an exception class not built from a message
            error = RuntimeError(f"{error_type.__name__} on rank 0: {message}")
        raise error
    return payload
