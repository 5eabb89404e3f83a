"""Finished (or running) training runs back as objects, for analyses and figures.

A run directory written by :func:`microcircuits.train.train` (or one committed under
``results/TASK/``) holds ``config.json`` and ``checkpoints/{best,last}.safetensors``;
:func:`load_run` rebuilds its task and model from them (safetensors + JSON: no code from
the file runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import checkpoint_file, load_checkpoint
from .config import ExperimentConfig
from .tasks import Task, make_task

__all__ = ["TrainedRun", "load_run"]

CHECKPOINTS = ("best", "last")


@dataclass
class TrainedRun:
    """A run's config, task and model (in eval mode, weights from a checkpoint).

    Attributes:
        run_dir: the run directory.
        config: the run's resolved config.
        task: the task built from it (data loaded).
        model: the task's whole model (recurrent stack at ``model.rnn``, plus its head).
        checkpoint: which checkpoint the weights came from.
    """

    run_dir: Path
    config: ExperimentConfig
    task: Task
    model: nn.Module
    checkpoint: str

    @property
    def label(self) -> str:
        from .model_registry import model_kind

        return f"{model_kind(self.config.cell).label} ({self.config.task}, trained)"


def load_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    *,
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
) -> TrainedRun:
    """Rebuild the task and the trained model of a run directory.

    Args:
        run_dir: a directory written by ``microcircuits train``.
        checkpoint: ``"best"`` (best validation) or ``"last"``.
        device: where to put the model.
        data_dir: dataset directory if it moved since training (default: the run's,
            else ``$MICROCIRCUITS_DATA``).

    Raises:
        FileNotFoundError: no ``config.json`` or no such checkpoint in ``run_dir``.
        ValueError: ``checkpoint`` is not one of ``best``/``last``.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {list(CHECKPOINTS)}, got {checkpoint!r}")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
    path = checkpoint_file(run_dir / "checkpoints", checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"run {run_dir} has no {checkpoint} checkpoint ({path})")
    config = ExperimentConfig.from_dict(json.loads(config_path.read_text()))
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    elif config.data_dir is not None and not Path(config.data_dir).is_dir():
        config = config.replace(data_dir=None)
    task = make_task(config, device)
    model = task.build_model()
    model.load_state_dict(load_checkpoint(path)["model"])
    model.eval()
    return TrainedRun(run_dir, config, task, model, checkpoint)
