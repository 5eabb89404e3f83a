"""What every task provides to the training loop: a model, batches, a loss and a metric.

A task is built from an :class:`~microcircuits.config.ExperimentConfig` and a device.
The loop in :mod:`microcircuits.train` knows nothing else about it.

Reproducible, resumable data order: :meth:`Task.train_batches` draws all of an epoch's
randomness from the ``torch.Generator`` it is given and nothing from torch's global
generator, lazily, batch by batch. So the loop can store the generator's state at the
start of an epoch and, on resume, restore it and skip the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Carry", "Evaluation", "Probe", "Task", "data_seed"]

Batch = tuple[Tensor, ...]
"""One training batch as the task produced it (already on the task's device)."""
Carry = tuple[Tensor, ...] | None
"""State carried from one training batch to the next within an epoch (LM: the detached
``(h, c)``); ``None`` at the start of an epoch and for tasks without carry."""

Probe = tuple[Tensor, Callable[[Tensor], Tensor]]
"""What the analyses need from a task: the recurrent stack's input ``(T, B, I)`` for a
test batch, and the loss of the stack's output ``(T, B, H)`` through the task's head."""


@dataclass(frozen=True)
class Evaluation:
    """Result of evaluating a model on one split.

    Attributes:
        loss: mean loss per prediction (MSE, cross-entropy per image or per token).
        metric: the task's metric (see :attr:`Task.metric`).
        count: number of predictions averaged (sequences, images or tokens).
    """

    loss: float
    metric: float
    count: int


@runtime_checkable
class Task(Protocol):
    """The interface between an experiment and the training loop.

    Attributes:
        name: the task's name (``"adding"``, ``"smnist"``, ...).
        metric: name of the metric reported (``"mse"``, ``"accuracy"``, ``"perplexity"``).
        higher_is_better: whether a larger metric is better (accuracy) or not.
    """

    name: str
    metric: str
    higher_is_better: bool

    def build_model(self) -> nn.Module:
        """A freshly initialised model (from torch's global generator) on the device."""
        ...

    def steps_per_epoch(self) -> int:
        """Number of batches :meth:`train_batches` yields."""
        ...

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """The batches of one epoch, drawing randomness only from ``generator``."""
        ...

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        """Mean training loss of ``batch`` (a scalar with grad) and the carry to pass on."""
        ...

    def gradient_scale(self, batch: Batch) -> float:
        """The factor between :meth:`train_loss` (logged) and the loss whose gradient is
        taken (e.g. the BPTT length for a loss summed over time); usually 1."""
        ...

    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        """Loss and metric on ``"valid"`` or ``"test"`` (in eval mode, without grad)."""
        ...

    def probe(self, model: nn.Module, size: int) -> Probe:
        """``size`` test sequences as the input of ``model.rnn`` and the loss of its output
        at the last step through the task's head (for the gradient/balance analyses)."""
        ...

    def artifacts(self) -> dict[str, Any]:
        """JSON-ready data to store with the run (e.g. the pixel permutation)."""
        ...


def data_seed(seed: int, stream: int = 0) -> int:
    """A seed for a data generator, decorrelated from ``seed`` used for the weights.

    ``torch.manual_seed(s)`` and ``torch.Generator().manual_seed(s)`` produce the same
    numbers, so a data stream seeded with the run's seed would repeat the numbers that
    initialised the weights. Mixing with a large odd constant avoids that.
    """
    return (seed * 0x9E3779B1 + 0x5EED + stream * 0x2545F491) % (2**63)


def check_split(split: str) -> str:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return split
