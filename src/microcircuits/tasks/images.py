"""MNIST as static images: classify a digit from its whole 28x28 picture at once.

The models of this task (:func:`~.models.make_image_model`) see an image ``(B, 28, 28)``
with pixels scaled to [0, 1] and return 10 logits: the canonical microcircuit
(Douglas, arXiv:2508.06501) and an MLP baseline. The data and splits are those of
sequential MNIST (:mod:`.mnist`): the verified MNIST files, the last 5,000 training
images held out for validation, the model trained on the first 55,000.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..data import load_mnist
from ..task_registry import TASK_KINDS
from .base import Batch, Carry, Evaluation, Probe, check_split
from .mnist import CLASSES, VALIDATION_SIZE
from .models import make_image_model

__all__ = ["IMAGE_SHAPE", "MNISTTask"]

IMAGE_SHAPE = (28, 28)


class MNISTTask:
    """Whole-image MNIST classification (task ``mnist``)."""

    name = "mnist"
    metric = TASK_KINDS["mnist"].metric
    higher_is_better = TASK_KINDS["mnist"].higher_is_better

    def __init__(self, config: ExperimentConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        images, labels = load_mnist("train", config.data_dir, download=config.download)
        test_images, test_labels = load_mnist("test", config.data_dir, download=config.download)
        cut = images.shape[0] - VALIDATION_SIZE
        # uint8 (N, 28, 28) on the device, moved once; scaled per batch.
        self._splits = {
            "train": (images[:cut].to(device), labels[:cut].to(device)),
            "valid": (images[cut:].to(device), labels[cut:].to(device)),
            "test": (test_images.to(device), test_labels.to(device)),
        }

    @staticmethod
    def inputs(pixels: Tensor) -> Tensor:
        """uint8 images ``(B, 28, 28)`` -> float ``(B, 28, 28)`` in [0, 1]."""
        return pixels.float() / 255.0

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The uint8 images ``(N, 28, 28)`` and labels ``(N,)`` of ``"train"``,
        ``"valid"`` or ``"test"``."""
        if name not in self._splits:
            raise ValueError(f"split must be one of {list(self._splits)}, got {name!r}")
        return self._splits[name]

    def probe(self, model: nn.Module, size: int) -> Probe:
        pixels, labels = self._splits["test"]
        x, y = self.inputs(pixels[:size]), labels[:size]
        return x, lambda output: F.cross_entropy(output, y)

    def build_model(self) -> nn.Module:
        size = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
        return make_image_model(self.config, size, CLASSES).to(self.device)

    def steps_per_epoch(self) -> int:
        full = self._splits["train"][1].numel() // self.config.batch_size  # drop the tail
        cap = self.config.steps_per_epoch
        return full if cap is None else min(full, cap)

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        pixels, labels = self._splits["train"]
        order = torch.randperm(labels.numel(), generator=generator).to(self.device)
        size = self.config.batch_size
        for step in range(self.steps_per_epoch()):
            index = order[step * size : (step + 1) * size]
            yield self.inputs(pixels[index]), labels[index]

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        x, y = batch  # (B, 28, 28), (B,)
        return F.cross_entropy(model(x).float(), y), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        pixels, labels = self._splits[check_split(split)]
        model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, labels.numel(), self.config.eval_batch_size):
            stop = start + self.config.eval_batch_size
            logits = model(self.inputs(pixels[start:stop])).float()  # (B, 10)
            y = labels[start:stop]
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
        count = labels.numel()
        return Evaluation(loss=total_loss / count, metric=correct / count, count=count)

    def artifacts(self) -> dict[str, Any]:
        return {"validation": f"last {VALIDATION_SIZE} training images"}
