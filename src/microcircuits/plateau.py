"""The plateau schedule: after each validation, keep the learning rate, decay it, or stop.

The paper's recipe (and ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s): a validation
that does not improve the best metric by more than ``lr_decay_threshold`` (a fraction of
the best) counts towards ``lr_decay_patience``; when the count is reached the learning
rate is multiplied by ``lr_decay_factor`` (never below ``min_lr``) and the count starts
again. Early stopping counts validations that do not improve the best at all, and stops
after ``early_stop_patience`` of them. The best itself is any strict improvement.

The schedule decides; the training loop acts (saves the best model, sets the
optimiser's learning rate, stops). Its state is a checkpoint's ``"plateau"`` entry
(:meth:`PlateauSchedule.state_dict`, the fields of :class:`PlateauState`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import ExperimentConfig

__all__ = ["PlateauDecision", "PlateauSchedule", "PlateauState"]


@dataclass
class PlateauState:
    """Best validation so far, and the counters of plateau decay and early stopping."""

    best: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    since_decay: int = 0  # validations without improvement since the last decay/best
    since_best: int = 0  # validations without improvement since the best
    decays: int = 0


@dataclass(frozen=True)
class PlateauDecision:
    """What one validation calls for.

    Attributes:
        best: the metric is the best so far (save the model as the best checkpoint).
        lr: the decayed learning rate to set, or ``None``: keep the current one.
        stop: early stopping's patience ran out.
    """

    best: bool
    lr: float | None
    stop: bool


class PlateauSchedule:
    """Best-so-far tracking, plateau learning-rate decay and early stopping.

    Args:
        higher_is_better: the direction of the validation metric.
        decay_factor: multiply the learning rate by this on a plateau (``1``: never decay).
        decay_patience: validations without a significant improvement before a decay.
        decay_threshold: an improvement is significant when it beats the best by more
            than this fraction of it (``0``: any improvement).
        min_lr: the decay never goes below this.
        early_stop_patience: stop after this many validations without a new best
            (``None``: never).
    """

    def __init__(
        self,
        higher_is_better: bool,
        *,
        decay_factor: float = 1.0,
        decay_patience: int = 1,
        decay_threshold: float = 0.0,
        min_lr: float = 0.0,
        early_stop_patience: int | None = None,
    ) -> None:
        self.higher_is_better = higher_is_better
        self.decay_factor = decay_factor
        self.decay_patience = decay_patience
        self.decay_threshold = decay_threshold
        self.min_lr = min_lr
        self.early_stop_patience = early_stop_patience
        self.state = PlateauState()

    @classmethod
    def from_config(cls, config: ExperimentConfig, higher_is_better: bool) -> PlateauSchedule:
        """The schedule of ``config`` (its ``lr_decay_*``, ``min_lr``, ``early_stop_patience``)."""
        return cls(
            higher_is_better,
            decay_factor=config.lr_decay_factor,
            decay_patience=config.lr_decay_patience,
            decay_threshold=config.lr_decay_threshold,
            min_lr=config.min_lr,
            early_stop_patience=config.early_stop_patience,
        )

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint: the fields of :class:`PlateauState`."""
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = PlateauState(**state)

    @property
    def exhausted(self) -> bool:
        """Whether early stopping's patience has run out (e.g. of a resumed run)."""
        patience = self.early_stop_patience
        return patience is not None and self.state.since_best >= patience

    def improves(self, value: float, threshold: float = 0.0) -> bool:
        """Whether ``value`` beats the best by more than ``threshold`` (a fraction of it)."""
        best = self.state.best
        if best is None:
            return math.isfinite(value)
        gain = value - best if self.higher_is_better else best - value
        return gain > threshold * abs(best) if threshold > 0 else gain > 0

    def observe(
        self, metric: float, loss: float, *, lr: float, step: int, epoch: float
    ) -> PlateauDecision:
        """Take one validation (its ``metric`` and ``loss``, at ``step``/``epoch``, trained
        with learning rate ``lr``) into account; say what the loop should do."""
        state = self.state
        # decided against the previous best, before it is updated
        significant = self.improves(metric, self.decay_threshold)
        best = self.improves(metric)
        if best:
            state.best, state.best_loss = metric, loss
            state.best_step, state.best_epoch = step, epoch
            state.since_best = 0
        else:
            state.since_best += 1
        new_lr = None
        if significant:
            state.since_decay = 0
        else:
            state.since_decay += 1
            if self.decay_factor < 1.0 and state.since_decay >= self.decay_patience:
                state.since_decay = 0
                decayed = max(lr * self.decay_factor, self.min_lr)
                if decayed < lr:
                    state.decays += 1
                    new_lr = decayed
        return PlateauDecision(best=best, lr=new_lr, stop=self.exhausted)
