"""The gradient and balance figures for trained runs, beside the same networks at
initialisation.

Each run directory (``microcircuits train``) is loaded with its best checkpoint; its
task supplies a test batch as the recurrent stack's input and the loss through the
trained head (:meth:`microcircuits.tasks.Task.probe`). The network at initialisation
is rebuilt from the run's seed and measured on the same input through the same head.
``cmc-phase`` and ``elm-memory`` show one trained run alone, ``rhythm`` trained runs
without their initialisation; they read the runs themselves.

``--runs`` takes run directories or folders holding them (:func:`resolve_runs`), as
``microcircuits report`` does: ``--runs runs/compare-adding-<time>`` finds the runs that
``microcircuits compare`` wrote there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cells import cell_kind
from ..model_registry import LSTM_FAMILY, model_kind
from ..runs import load_run
from .figures import _REGISTRY
from .style import save_figure

__all__ = ["TRAINED_FIGURES", "resolve_runs", "trained_figure"]

logger = logging.getLogger(__name__)

TRAINED_FIGURES = ("gradients", "balance", "cmc-phase", "elm-memory", "rhythm")
# Figures of trained runs alone (no network at initialisation beside them); their data
# function reads the run directories itself.
_RUN_ONLY_FIGURES = ("cmc-phase", "elm-memory", "rhythm")


def resolve_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The run directories that ``--runs`` names, as ``microcircuits report`` reads them.

    Each path is a run directory (it holds ``config.json``): that run; or a folder
    holding run directories at any depth (e.g. the ``runs/compare-adding-<time>`` of
    ``microcircuits compare``, beside its CSV and PNG files): each of them, sorted.
    Files are ignored, so a shell glob over such a folder works too. Runs come in the
    order the paths are given, each once.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no run directory was found at all.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"--runs: {path} does not exist")
        if not path.is_dir():
            continue  # a table or plot beside the runs
        if (path / "config.json").is_file():
            runs = [path]
        else:
            runs = sorted(p.parent for p in path.rglob("config.json") if p.is_file())
        found.extend(run for run in runs if run not in found)
    if not found:
        raise ValueError(
            f"--runs: no run directory (a folder holding config.json) in or under "
            f"{[str(p) for p in paths]}; give run directories of `microcircuits train` or "
            "folders holding them (e.g. runs/compare-adding-<time>)"
        )
    return found


def _measure(
    name: str,
    run_dirs: Sequence[str | os.PathLike[str]],
    checkpoint: str,
    batch: int,
    include_init: bool,
    options: dict[str, Any],
) -> Any:
    compute = _REGISTRY[name].compute
    parts = []
    for run_dir in run_dirs:
        model = model_kind(json.loads((Path(run_dir) / "config.json").read_text())["cell"])
        if model.family != LSTM_FAMILY:
            raise ValueError(
                f"the {name!r} figure measures the gates of LSTM-family cells; {run_dir} "
                f"trained cell {model.name!r} ({model.label}), which has none"
            )
        run = load_run(run_dir, checkpoint)
        kind = cell_kind(run.config.cell)
        label = kind.label
        if name == "balance" and not kind.subtractive:
            logger.info("balance: skipping %s (%s has no subtractive gates)", run_dir, label)
            continue
        inputs, loss = run.task.probe(run.model, batch)
        models = {}
        if include_init:
            torch.manual_seed(run.config.seed)  # the run's own initialisation
            models[f"{label}, initial"] = run.task.build_model().eval().rnn
        models[f"{label}, trained"] = run.model.rnn
        if name == "gradients":
            parts.append(compute(models, inputs.detach(), loss_fn=loss, **options))
        else:
            parts.append(compute(models, inputs.detach(), **options))
    if not parts:
        raise ValueError(f"none of the runs {list(map(str, run_dirs))} can be used for {name!r}")
    field = "curves" if name == "gradients" else "cells"
    merged = [item for part in parts for item in getattr(part, field)]
    return dataclasses.replace(parts[0], **{field: merged})


def trained_figure(
    name: str,
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    batch: int = 32,
    include_init: bool = True,
    stem: str | None = None,
    **options: Any,
) -> list[Path]:
    """Write figure ``name`` (``gradients``, ``balance``, ``cmc-phase``, ``elm-memory`` or
    ``rhythm``) for trained runs.

    Args:
        name: one of :data:`TRAINED_FIGURES`.
        run_dirs: run directories, or folders holding them (:func:`resolve_runs`): one
            per cell, same task, for a comparison; ``cmc-phase``: one CMC run;
            ``elm-memory``: one ELM run; ``rhythm``: LSTM-family runs of one task.
        out_dir: where PNG, PDF and CSV go.
        checkpoint: ``"best"`` or ``"last"``.
        batch: test sequences measured per run (not used by ``cmc-phase``, which takes
            one test image per class of its ``classes`` option, nor by ``elm-memory``,
            which takes the test inputs of its ``samples`` option, nor by ``rhythm``,
            which records its ``sequences`` option's count, default 200).
        include_init: also measure each network at its initialisation (not
            ``cmc-phase`` nor ``rhythm``; ``elm-memory`` shows the initial time constants
            anyway).
        stem: file name stem (default ``NAME-trained``; ``cmc-phase``, ``elm-memory`` and
            ``rhythm``: ``NAME``).
        **options: further options of the analysis (e.g. ``threshold`` for balance).

    Returns:
        The paths written: PNG, PDF, CSV.
    """
    if name not in TRAINED_FIGURES:
        raise ValueError(f"figure {name!r} takes no runs; runs work with {list(TRAINED_FIGURES)}")
    if not run_dirs:
        raise ValueError("run_dirs is empty: give at least one run directory")
    run_dirs = resolve_runs(run_dirs)
    figure = _REGISTRY[name]
    if name in _RUN_ONLY_FIGURES:
        data = figure.compute(list(run_dirs), checkpoint=checkpoint, **options)
        stem = stem or name
    else:
        data = _measure(name, run_dirs, checkpoint, batch, include_init, options)
        stem = stem or f"{name}-trained"
    out_dir = Path(out_dir)
    paths = save_figure(figure.plot(data), out_dir, stem)
    paths.append(figure.write_csv(data, out_dir / f"{stem}.csv"))
    return paths
