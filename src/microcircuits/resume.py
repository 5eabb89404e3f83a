"""What a run's ``last.safetensors`` holds, and how a resumed run gets it all back.

Exact resume: the checkpoint holds the model, the optimiser, the plateau schedule's state,
the position (epoch, step in epoch, global step), torch's RNG state (dropout masks), the
data generator's state at the start of the epoch and the state carried between batches
(the LM's hidden state). Restoring all of it and replaying the data generator to the
same batch makes a resumed run end, on CPU, with the same numbers as an uninterrupted
one. Under torchrun the checkpoint has the same contents as a single process's (the
whole batch's carried state, plus every rank's random-number state), so a run resumes
the same way with any number of processes that divides the batch.

The keys of the payload are a file format: checkpoints of running experiments are
resumed by later versions, so keys are only ever added (and read with a default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import ExperimentConfig
from .distributed import DistributedContext, all_gather, gather_batch, shard_batch
from .tasks import data_seed

__all__ = ["Position", "checkpoint_payload", "restore_rng", "restore_training_state"]

logger = logging.getLogger(__name__)


@dataclass
class Position:
    """Where the loop is, and what must survive a resume to continue exactly."""

    epoch: int = 0  # index of the current epoch (= epochs completed)
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_generator_state: Tensor | None = None
    carry: tuple[Tensor, ...] | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    wall_time: float = 0.0


def checkpoint_payload(
    *,
    config: ExperimentConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    data_generator: torch.Generator,
    plateau: dict[str, Any],
    metrics_records: int,
    wall_time: float,
    context: DistributedContext,
    device: torch.device,
) -> dict[str, Any] | None:
    """What ``last.safetensors`` holds (collective under torchrun; ``None`` off rank 0).

    ``plateau``: the schedule's state dict; ``metrics_records``: lines of
    ``metrics.jsonl`` written so far; ``wall_time``: training time up to now.
    """
    pos = position
    carry = None if pos.carry is None else list(pos.carry)
    extra: dict[str, Any] = {"world_size": context.world_size}
    if context.is_distributed:
        # The carried state of the whole batch (as one process would hold it), and
        # every rank's generators, so that dropout continues exactly on resume.
        if carry is not None:
            carry = list(gather_batch(carry, context))
        cuda = device.type == "cuda"
        cuda_state = torch.cuda.get_rng_state(device) if cuda else None
        extra["rank_rng_states"] = all_gather(
            {"torch": torch.get_rng_state(), "cuda": cuda_state}, context
        )
        if not context.is_main:
            return None
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    return {
        **extra,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        "epoch_generator_state": pos.epoch_generator_state,
        "data_generator_state": data_generator.get_state(),
        "carry": carry,
        "epoch_loss": [pos.epoch_loss_sum, pos.epoch_loss_count],
        "wall_time": wall_time,
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": cuda_rng,
        "plateau": plateau,
        "metrics_records": metrics_records,
    }


def restore_training_state(
    payload: dict[str, Any],
    *,
    config: ExperimentConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    data_generator: torch.Generator,
    context: DistributedContext,
    device: torch.device,
) -> None:
    """Load the model, optimiser, position and data generator of a checkpoint (the
    plateau state and the RNG are restored separately: ``payload["plateau"]``,
    :func:`restore_rng`)."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    for group in optimizer.param_groups:  # checkpoints of versions whose optimiser
        group["weight_decay"] = 0.0  # applied the decay: the loop adds it now
    saved_lr = payload["config"].get("lr", config.lr)
    if saved_lr != config.lr:  # resumed with --set lr=...: it replaces the schedule's
        current = optimizer.param_groups[0]["lr"]
        logger.info("lr changed on resume: %.3g -> %.3g", current, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = config.lr
    pos = position
    pos.epoch = payload["epoch"]
    pos.step_in_epoch = payload["step_in_epoch"]
    pos.global_step = payload["global_step"]
    pos.epoch_generator_state = payload["epoch_generator_state"]
    data_generator.set_state(payload["data_generator_state"])
    carry = payload["carry"]
    if carry is not None:
        pos.carry = shard_batch([t.to(device) for t in carry], context)
    pos.epoch_loss_sum, pos.epoch_loss_count = payload["epoch_loss"]
    pos.wall_time = payload["wall_time"]


def restore_rng(
    payload: dict[str, Any], *, seed: int, context: DistributedContext, device: torch.device
) -> None:
    """Restore torch's (and CUDA's) random-number state of this rank from a checkpoint.

    A checkpoint written by another number of processes restores rank 0's state and
    reseeds the other ranks: the run goes on, with other dropout masks.
    """
    cuda = device.type == "cuda"
    saved_world = payload.get("world_size", 1)
    if context.is_distributed and saved_world == context.world_size:
        state = payload["rank_rng_states"][context.rank]
        torch.set_rng_state(state["torch"].cpu())
        if cuda and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"].cpu(), device)
        return
    if saved_world != context.world_size and context.is_main:
        logger.warning(
            "the checkpoint was written by %d process(es), this run has %d: training "
            "goes on with the same global batch, but dropout masks differ from those "
            "of an uninterrupted run", saved_world, context.world_size,
        )  # fmt: skip
    if context.rank > 0:
        torch.manual_seed(data_seed(seed, stream=1000 + context.rank) + payload["global_step"])
        return
    torch.set_rng_state(payload["torch_rng_state"].cpu())
    if payload["cuda_rng_state"] is not None and cuda:
        if context.is_distributed:
            torch.cuda.set_rng_state(payload["cuda_rng_state"][0].cpu(), device)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng_state"]])
