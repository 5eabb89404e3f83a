"""Tasks of the paper's experiments: each builds its model, batches, loss and metric.

``make_task(config, device)`` picks the task named by ``config.task``; the names, titles
and metrics of all tasks are the table :data:`TASK_KINDS`
(:mod:`microcircuits.task_registry`):

============  ====================================  ============  ===========
task          model                                 loss          metric
============  ====================================  ============  ===========
adding        RNN -> linear readout of last step    MSE           MSE
smnist        RNN over 784 pixels -> 10 classes     cross-entr.   accuracy
psmnist       same, pixels in a fixed random order  cross-entr.   accuracy
mnist         image -> CMC or MLP -> 10 classes      cross-entr.   accuracy
ptb           embedding -> RNN -> decoder           cross-entr.   perplexity
wikitext2     same                                  cross-entr.   perplexity
shd           RNN over 700 spike channels -> 20     cross-entr.   accuracy
shd_adding    same, two digits -> their sum (19)    cross-entr.   accuracy
============  ====================================  ============  ===========

"RNN" is the model of ``config.cell``: an LSTM-family stack, or on the last-step tasks
(adding, smnist, psmnist, shd, shd_adding) the ELM neuron
(:func:`~.models.make_last_step_model`). The image task (mnist) classifies whole images
with a canonical microcircuit or an MLP (:func:`~.models.make_image_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..config import ExperimentConfig
from ..task_registry import TASK_KINDS, TaskKind, task_kind
from .adding import AddingTask
from .base import Batch, Carry, Evaluation, Task, data_seed
from .images import MNISTTask
from .language import LanguageModelTask
from .mnist import SequentialMNISTTask
from .models import (
    ELMLastStep,
    LanguageModel,
    LastStepReadout,
    MLPClassifier,
    make_image_model,
    make_last_step_model,
    make_recurrent_stack,
)
from .shd import SHDAddingTask, SHDTask

__all__ = [
    "AddingTask",
    "Batch",
    "Carry",
    "ELMLastStep",
    "Evaluation",
    "LanguageModel",
    "LanguageModelTask",
    "LastStepReadout",
    "MLPClassifier",
    "MNISTTask",
    "SHDAddingTask",
    "SHDTask",
    "SequentialMNISTTask",
    "TASK_KINDS",
    "Task",
    "TaskKind",
    "data_seed",
    "make_image_model",
    "make_last_step_model",
    "make_recurrent_stack",
    "make_task",
    "task_kind",
]


# The class that implements each task of TASK_KINDS.
_TASK_CLASSES: dict[str, Callable[[ExperimentConfig, torch.device], Task]] = {
    "adding": AddingTask,
    "smnist": SequentialMNISTTask,
    "psmnist": partial(SequentialMNISTTask, permuted=True),
    "mnist": MNISTTask,
    "ptb": LanguageModelTask,
    "wikitext2": LanguageModelTask,
    "shd": SHDTask,
    "shd_adding": SHDAddingTask,
}


def make_task(config: ExperimentConfig, device: torch.device | str = "cpu") -> Task:
    """The task of ``config.task``, its data loaded and placed on ``device``."""
    device = torch.device(device)
    if config.task not in TASK_KINDS:
        raise ValueError(f"task must be one of {list(TASK_KINDS)}, got {config.task!r}")
    return _TASK_CLASSES[config.task](config, device)
