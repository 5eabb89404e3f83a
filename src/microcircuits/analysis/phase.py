"""Phase space of a trained canonical microcircuit: how test images of different classes
drive the column's four populations along different trajectories.

Douglas (arXiv:2508.06501) reports "distinct dynamical trajectories for different input
classes". For a trained ``cmc`` (or ``cmc_hierarchy``) run this takes the first test image
of each of a few classes, integrates the trained model on a fine time grid over its
integration window and keeps one column's (node's) voltages ``v_ss, v_sp, v_ii, v_dp``:
the column whose trajectories differ most between the images (ours), unless one is
named. Panels: the four voltages against time, and two phase planes (``v_sp`` against
``v_dp``, the output pyramidal cells; ``v_ss`` against ``v_ii``, the input layer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

from ..cmc.dynamics import POPULATIONS
from ..model_registry import model_kind
from . import style
from .one_run import load_one_run

__all__ = ["CMCPhase", "cmc_phase", "plot_cmc_phase", "write_cmc_phase_csv"]

CMC_FAMILY = "cmc"


@dataclass
class CMCPhase:
    """Trajectories of one column of a trained CMC model for a few test images.

    Attributes:
        run: the run's directory name.
        label: the model's label (``"CMC node"``).
        column: the column (node, for a hierarchy) shown.
        times: ``(T,)`` seconds from the image's onset.
        voltages: ``(N, T, 4)`` the column's voltages (ss, sp, ii, dp) per image.
        labels: ``(N,)`` each image's class.
        predictions: ``(N,)`` the model's class for each image.
        test_index: ``(N,)`` each image's index in the test set.
    """

    run: str
    label: str
    column: int
    times: np.ndarray
    voltages: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    test_index: np.ndarray


def cmc_phase(
    runs: Sequence[str | os.PathLike[str]] = (),
    *,
    checkpoint: str = "best",
    classes: Sequence[int] = (0, 1, 3, 4, 7),
    column: int | None = None,
    points: int | None = None,
) -> CMCPhase:
    """Integrate a trained CMC run on test images of ``classes``.

    Args:
        runs: one run directory of ``--cell cmc`` or ``cmc_hierarchy``.
        checkpoint: ``"best"`` or ``"last"``.
        classes: the digits shown, the first test image of each.
        column: the column (hierarchy: node) to show; ``None``: the one whose voltage
            trajectories vary most across the images.
        points: time points over the integration window (including its start);
            ``None``: one per solver step of a fixed-step solver (between steps the
            solver interpolates linearly), else 201.

    Raises:
        ValueError: no run, several, or a run of another model (named).
    """
    if points is not None and points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    run = load_one_run(
        runs,
        checkpoint,
        figure="cmc-phase",
        family=CMC_FAMILY,
        wanted="plots one trained CMC run",
        shows="plots the populations of a trained canonical microcircuit",
        cells="--cell cmc or cmc_hierarchy",
    )
    model = run.model
    if points is None:
        steps = None if model.step_size is None else model.integration_time / model.step_size
        points = 201 if steps is None else round(steps) + 1
    pixels, targets = run.task.split("test")
    index = []
    for digit in classes:
        (found,) = torch.nonzero(targets == int(digit), as_tuple=True)
        if found.numel() == 0:
            raise ValueError(f"classes: no test image of class {digit}")
        index.append(int(found[0]))
    index_t = torch.tensor(index)
    images = run.task.inputs(pixels[index_t])  # (N, 28, 28)
    times = torch.linspace(0.0, model.integration_time, points)
    with torch.no_grad():
        states = model.trajectory(images, times)  # (T, N, K, 8)
        predictions = model(images).argmax(dim=-1)
    voltages = states[..., 0::2].movedim(0, 1)  # (N, T, K, 4)
    if column is None:
        # spread across images, summed over time and populations, per column
        column = int(voltages.var(dim=0).sum(dim=(0, 2)).argmax())
    elif not 0 <= column < voltages.shape[2]:
        raise ValueError(f"column must be in [0, {voltages.shape[2] - 1}], got {column}")
    return CMCPhase(
        run=Path(runs[0]).name,
        label=model_kind(run.config.cell).label,
        column=column,
        times=times.numpy(),
        voltages=voltages[:, :, column].double().numpy(),
        labels=targets[index_t].numpy(),
        predictions=predictions.numpy(),
        test_index=index_t.numpy(),
    )


def _class_colors(count: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(k % 10) for k in range(count)]


@style.styled
def plot_cmc_phase(data: CMCPhase):
    """Six panels: the four voltages against time, then v_sp vs v_dp and v_ss vs v_ii."""
    fig, axes = style.new_figure(3, 2, width=7.2, height=2.3)
    colors = _class_colors(len(data.labels))
    milliseconds = 1000.0 * data.times
    for p, population in enumerate(POPULATIONS):
        ax = axes.flat[p]
        for n, digit in enumerate(data.labels):
            ax.plot(milliseconds, data.voltages[n, :, p], color=colors[n], label=str(digit))
        ax.set_xlabel("time (ms)")
        ax.set_ylabel(f"$v_{{{population}}}$")
        ax.set_title(f"{population} population")
        style.panel_label(ax, "abcd"[p])
    fig.legend(*axes.flat[0].get_legend_handles_labels(), title="digit", loc="outside right upper")
    for k, (x, y) in enumerate((("sp", "dp"), ("ss", "ii"))):
        ax = axes.flat[4 + k]
        i, j = POPULATIONS.index(x), POPULATIONS.index(y)
        for n in range(len(data.labels)):
            ax.plot(data.voltages[n, :, i], data.voltages[n, :, j], color=colors[n])
            ax.plot(data.voltages[n, -1, i], data.voltages[n, -1, j], "o", color=colors[n], ms=3)
        ax.plot(0.0, 0.0, "x", color=style.COLORS["net"], ms=4)  # rest, the start
        ax.set_xlabel(f"$v_{{{x}}}$")
        ax.set_ylabel(f"$v_{{{y}}}$")
        ax.set_title(f"phase plane {x}-{y}")
        style.panel_label(ax, "ef"[k])
    correct = int((data.labels == data.predictions).sum())
    fig.suptitle(
        f"{data.label} ({data.run}), column {data.column}: one test image per digit "
        f"({correct}/{len(data.labels)} classified correctly)",
        fontsize=9,
    )
    return fig


def write_cmc_phase_csv(data: CMCPhase, path: Path) -> Path:
    """Tidy CSV: ``test_index, label, prediction, column, time_s, v_ss, v_sp, v_ii, v_dp``."""

    def rows():
        for n in range(len(data.labels)):
            for t, time in enumerate(data.times):
                yield (
                    int(data.test_index[n]),
                    int(data.labels[n]),
                    int(data.predictions[n]),
                    data.column,
                    float(time),
                    *(float(v) for v in data.voltages[n, t]),
                )

    header = ("test_index", "label", "prediction", "column", "time_s") + tuple(
        f"v_{p}" for p in POPULATIONS
    )
    return style.write_csv(path, header, rows())
