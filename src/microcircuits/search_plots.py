"""The figures of a study: its optimisation history and its parameter importances (PNG)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = ["plot_history", "plot_importances"]

logger = logging.getLogger(__name__)


def _save_png(fig: Any, path: Path) -> Path:
    from .analysis.style import PNG_DPI

    temp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temp, dpi=PNG_DPI)
    os.replace(temp, path)  # a reader never sees half a file
    return path


def plot_history(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Each finished trial's value against its number, and the best value so far."""
    from matplotlib.ticker import MaxNLocator

    from .analysis.style import new_figure, styled

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not done and not pruned:
        return []
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    metric = study.user_attrs.get("metric", "objective")

    @styled
    def plot() -> list[Path]:
        fig, axes = new_figure(1, width=4.5, height=3.0)
        ax = axes[0, 0]
        if done:
            ax.plot([t.number for t in done], [t.value for t in done], "o", color="#0072B2",
                    label="completed")  # fmt: skip
            best, running = [], None
            for t in done:
                better = running is None or (t.value > running if maximise else t.value < running)
                running = t.value if better else running
                best.append(running)
            ax.step(
                [t.number for t in done], best, where="post", color="#D55E00", label="best so far"
            )
        if pruned:
            last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
            ax.plot([t.number for t in pruned], last, "x", color="grey",
                    label="pruned (last report)")  # fmt: skip
        ax.set(xlabel="trial", ylabel=f"validation {metric}", title=study.study_name)
        if metric in ("perplexity", "mse"):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        return _save_png(fig, out_dir / "optimization_history.png")

    return [plot()]


def plot_importances(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's parameter importances as bars; needs >= 2 completed trials."""
    from .analysis.style import new_figure, styled

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2:
        logger.info("parameter importances need >= 2 completed trials, have %d", len(completed))
        return []
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:  # e.g. no parameter varied
        logger.info("no parameter importances: %s", error)
        return []
    if not importances:
        return []

    @styled
    def plot() -> list[Path]:
        names = list(importances)[::-1]  # most important on top
        fig, axes = new_figure(1, width=4.5, height=0.4 * len(names) + 1.0)
        ax = axes[0, 0]
        ax.barh(names, [importances[n] for n in names], color="#0072B2")
        ax.set(xlabel="importance (share of the objective's variation)",
               title=f"{study.study_name}: {len(completed)} completed trials")  # fmt: skip
        return _save_png(fig, out_dir / "param_importances.png")

    return [plot()]
