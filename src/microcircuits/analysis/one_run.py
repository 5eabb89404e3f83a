"""Loading the trained runs that ``cmc-phase``, ``elm-memory`` (one run) and ``rhythm``
show, with the errors a user needs when given no run, several, or a run of another
model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..model_registry import model_kind

__all__ = ["check_run_family", "load_one_run"]


def load_one_run(
    runs: Sequence[str | os.PathLike[str]],
    checkpoint: str,
    *,
    figure: str,
    family: str,
    wanted: str,
    shows: str,
    cells: str,
) -> Any:
    """The :class:`~microcircuits.runs.LoadedRun` of ``runs[0]`` at ``checkpoint``.

    Args:
        runs: exactly one run directory.
        figure: the figure's name, for messages (``"cmc-phase"``).
        family: the model family the run must have trained (``model_kind(...).family``).
        wanted: what the figure needs, for the count message (``"one trained CMC run"``).
        shows: what the figure shows, for the wrong-model message.
        cells: the ``--cell`` values that train such a model, for the same message.

    Raises:
        ValueError: no run or several (listed), or a run of another model (named).
        FileNotFoundError: the directory holds no ``config.json``.
    """
    from ..runs import load_run

    if len(runs) != 1:
        listed = f" ({', '.join(str(r) for r in runs)})" if runs else ""
        raise ValueError(f"{figure} {wanted}: give --runs RUN_DIR, got {len(runs)} runs{listed}")
    run_dir = check_run_family(runs[0], figure=figure, family=family, shows=shows, cells=cells)
    return load_run(run_dir, checkpoint)


def check_run_family(
    run_dir: str | os.PathLike[str], *, figure: str, family: str, shows: str, cells: str
) -> Path:
    """``run_dir`` as a path, after checking from its ``config.json`` alone (no weights
    loaded) that it trained a model of ``family``; arguments as :func:`load_one_run`'s.

    Raises:
        FileNotFoundError: the directory holds no ``config.json``.
        ValueError: a run of another model family (named).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
    model = model_kind(json.loads(config_path.read_text())["cell"])
    if model.family != family:
        raise ValueError(
            f"{figure} {shows}; {run_dir} trained cell {model.name!r} ({model.label}); "
            f"give a run of {cells}"
        )
    return run_dir
