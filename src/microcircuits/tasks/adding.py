"""The delayed-addition task: regress the sum of the two marked values of a sequence.

Training data is generated on the fly from the run's data generator; the validation and
test sets are fixed (drawn from their own constant seeds, the same for every run and
cell) so that results of different runs are comparable. Metric: mean squared error; a
model that always predicts 1 scores :data:`~microcircuits.data.ADDING_BASELINE_MSE`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..data import ADDING_BASELINE_MSE, adding_batch
from ..task_registry import TASK_KINDS
from .base import Batch, Carry, Evaluation, Probe, check_split
from .models import make_last_step_model

__all__ = ["AddingTask"]

_SPLIT_SEEDS = {"valid": 0xADD_0001, "test": 0xADD_0002}


class AddingTask:
    """Delayed addition with ``config.seq_len`` steps, 2 input channels, 1 output."""

    name = "adding"
    metric = TASK_KINDS[name].metric
    higher_is_better = TASK_KINDS[name].higher_is_better

    def __init__(self, config: ExperimentConfig, device: torch.device) -> None:
        if config.steps_per_epoch is None:
            raise ValueError("steps_per_epoch must be set for the adding task, got None")
        self.config = config
        self.device = device
        self._fixed: dict[str, tuple[Tensor, Tensor]] = {}

    def build_model(self) -> nn.Module:
        return make_last_step_model(self.config, input_size=2, out_features=1).to(self.device)

    def steps_per_epoch(self) -> int:
        return self.config.steps_per_epoch

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch()):
            x, y = adding_batch(self.config.batch_size, self.config.seq_len, generator=generator)
            yield x.to(self.device), y.to(self.device)

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        x, y = batch  # (T, B, 2), (B,)
        prediction = model(x).squeeze(-1)  # (B,)
        return F.mse_loss(prediction.float(), y), None

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self._fixed:
            size = self.config.valid_size if split == "valid" else self.config.test_size
            generator = torch.Generator().manual_seed(_SPLIT_SEEDS[split])
            self._fixed[split] = adding_batch(size, self.config.seq_len, generator=generator)
        return self._fixed[split]

    def probe(self, model: nn.Module, size: int) -> Probe:
        x, y = (t[..., :size] if t.dim() == 1 else t[:, :size] for t in self._split("test"))
        x, y = x.to(self.device), y.to(self.device)
        return x, lambda output: F.mse_loss(model.readout(output[-1]).squeeze(-1), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        x_all, y_all = self._split(check_split(split))
        model.eval()
        total, count = 0.0, 0
        for start in range(0, y_all.numel(), self.config.eval_batch_size):
            stop = start + self.config.eval_batch_size
            x = x_all[:, start:stop].to(self.device)
            y = y_all[start:stop].to(self.device)
            prediction = model(x).squeeze(-1).float()
            total += F.mse_loss(prediction, y, reduction="sum").item()
            count += y.numel()
        mse = total / count
        return Evaluation(loss=mse, metric=mse, count=count)

    def artifacts(self) -> dict[str, Any]:
        return {"baseline_mse": ADDING_BASELINE_MSE, "split_seeds": dict(_SPLIT_SEEDS)}
