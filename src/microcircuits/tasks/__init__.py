"""Tasks of the paper's experiments: each builds its model, batches, loss and metric.

``make_task(config, device)`` picks the task named by ``config.task``:

============  ====================================  ============  ===========
task          model                                 loss          metric
============  ====================================  ============  ===========
adding        RNN -> linear readout of last step    MSE           MSE
smnist        RNN over 784 pixels -> 10 classes     cross-entr.   accuracy
psmnist       same, pixels in a fixed random order  cross-entr.   accuracy
ptb           embedding -> RNN -> decoder           cross-entr.   perplexity
wikitext2     same                                  cross-entr.   perplexity
============  ====================================  ============  ===========
"""

from __future__ import annotations

import torch

from ..config import ExperimentConfig
from .adding import AddingTask
from .base import Batch, Carry, Evaluation, Task, data_seed
from .language import LanguageModelTask
from .mnist import SequentialMNISTTask
from .models import LanguageModel, LastStepReadout, make_recurrent_stack

__all__ = [
    "AddingTask",
    "Batch",
    "Carry",
    "Evaluation",
    "LanguageModel",
    "LanguageModelTask",
    "LastStepReadout",
    "SequentialMNISTTask",
    "Task",
    "data_seed",
    "make_recurrent_stack",
    "make_task",
]


def make_task(config: ExperimentConfig, device: torch.device | str = "cpu") -> Task:
    """The task of ``config.task``, its data loaded and placed on ``device``."""
    device = torch.device(device)
    if config.task == "adding":
        return AddingTask(config, device)
    if config.task in ("smnist", "psmnist"):
        return SequentialMNISTTask(config, device, permuted=config.task == "psmnist")
    if config.task in ("ptb", "wikitext2"):
        return LanguageModelTask(config, device)
    raise ValueError(
        f"task must be one of ['adding', 'smnist', 'psmnist', 'ptb', 'wikitext2'], "
        f"got {config.task!r}"
    )
