"""MNIST as static images: classify a digit from its whole 28x28 picture at once.

The models of this task (:func:`~.models.make_image_model`) see an image ``(B, 28, 28)``
with pixels scaled to [0, 1] and return 10 logits: the canonical microcircuit
(Douglas, arXiv:2508.06501) and an MLP baseline. The data and splits are those of
sequential MNIST (:mod:`.mnist`): the verified MNIST files, the last 5,000 training
images held out for validation, the model trained on the first 55,000.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..task_registry import TASK_KINDS
from .base import Probe
from .mnist import CLASSES, VALIDATION_SIZE, MNISTClassification
from .models import make_image_model

__all__ = ["IMAGE_SHAPE", "MNISTTask"]

IMAGE_SHAPE = (28, 28)


class MNISTTask(MNISTClassification):
    """Whole-image MNIST classification (task ``mnist``)."""

    name = "mnist"
    metric = TASK_KINDS["mnist"].metric
    higher_is_better = TASK_KINDS["mnist"].higher_is_better

    def __init__(self, config: ExperimentConfig, device: torch.device) -> None:
        super().__init__(config, device, flat=False)  # uint8 (N, 28, 28)

    @staticmethod
    def inputs(pixels: Tensor) -> Tensor:
        """uint8 images ``(B, 28, 28)`` -> float ``(B, 28, 28)`` in [0, 1]."""
        return pixels.float() / 255.0

    def model_input(self, pixels: Tensor) -> Tensor:
        return self.inputs(pixels)

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

    def artifacts(self) -> dict[str, Any]:
        return {"validation": f"last {VALIDATION_SIZE} training images"}
