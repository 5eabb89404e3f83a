"""Sequential MNIST: classify a digit from its 784 pixels presented one per step.

``smnist`` presents the pixels in raster order, ``psmnist`` in one fixed random order
(drawn from the run's seed, the same for all epochs, and stored with the run). Pixels
are scaled to [0, 1]; the class is read out linearly from the last step's hidden state.
The last 5,000 training images form the validation split (a deterministic hold-out);
the model trains on the first 55,000.
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
from .base import Batch, Carry, Evaluation, Probe, check_split, data_seed
from .models import make_last_step_model

__all__ = ["MNISTClassification", "SequentialMNISTTask", "VALIDATION_SIZE"]

VALIDATION_SIZE = 5000
PIXELS = 28 * 28
CLASSES = 10


class MNISTClassification:
    """What the MNIST tasks share: the verified files, the hold-out split, batches in a
    seeded order, the cross-entropy loss and accuracy. A subclass says how uint8 pixels
    become the model's input (:meth:`model_input`) and which model reads it."""

    def __init__(self, config: ExperimentConfig, device: torch.device, *, flat: bool) -> None:
        self.config = config
        self.device = device
        images, labels = load_mnist("train", config.data_dir, download=config.download)
        test_images, test_labels = load_mnist("test", config.data_dir, download=config.download)
        if flat:  # (N, 784)
            images, test_images = images.reshape(-1, PIXELS), test_images.reshape(-1, PIXELS)
        cut = images.shape[0] - VALIDATION_SIZE
        # uint8 on the device (47 MB for the training set), moved once; scaled per batch.
        self._splits = {
            "train": (images[:cut].to(device), labels[:cut].to(device)),
            "valid": (images[cut:].to(device), labels[cut:].to(device)),
            "test": (test_images.to(device), test_labels.to(device)),
        }

    def model_input(self, pixels: Tensor) -> Tensor:
        """uint8 pixels of a batch -> what the model takes."""
        raise NotImplementedError

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
            yield self.model_input(pixels[index]), labels[index]

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        x, y = batch  # the model's input, (B,)
        return F.cross_entropy(model(x).float(), y), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        pixels, labels = self._splits[check_split(split)]
        model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, labels.numel(), self.config.eval_batch_size):
            stop = start + self.config.eval_batch_size
            logits = model(self.model_input(pixels[start:stop])).float()  # (B, 10)
            y = labels[start:stop]
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
        count = labels.numel()
        return Evaluation(loss=total_loss / count, metric=correct / count, count=count)


class SequentialMNISTTask(MNISTClassification):
    """Pixel-by-pixel MNIST (``permuted=True``: in one fixed random pixel order)."""

    metric = TASK_KINDS["smnist"].metric  # and psmnist's, the same
    higher_is_better = TASK_KINDS["smnist"].higher_is_better

    def __init__(
        self, config: ExperimentConfig, device: torch.device, *, permuted: bool = False
    ) -> None:
        super().__init__(config, device, flat=True)
        self.name = "psmnist" if permuted else "smnist"
        self.permutation: Tensor | None = None
        if permuted:
            generator = torch.Generator().manual_seed(data_seed(config.seed, stream=1))
            self.permutation = torch.randperm(PIXELS, generator=generator)

    def sequences(self, pixels: Tensor) -> Tensor:
        """Turn uint8 images ``(B, 784)`` into float inputs ``(784, B, 1)`` in [0, 1]."""
        if self.permutation is not None:
            pixels = pixels[:, self.permutation.to(pixels.device)]
        return (pixels.t().unsqueeze(-1).float() / 255.0).contiguous()

    def model_input(self, pixels: Tensor) -> Tensor:
        return self.sequences(pixels)

    def probe(self, model: nn.Module, size: int) -> Probe:
        pixels, labels = self._splits["test"]
        x, y = self.sequences(pixels[:size]), labels[:size]
        return x, lambda output: F.cross_entropy(model.readout(output[-1]), y)

    def build_model(self) -> nn.Module:
        return make_last_step_model(self.config, input_size=1, out_features=CLASSES).to(self.device)

    def artifacts(self) -> dict[str, Any]:
        info: dict[str, Any] = {"validation": f"last {VALIDATION_SIZE} training images"}
        if self.permutation is not None:
            info["permutation"] = self.permutation.tolist()
        return info
