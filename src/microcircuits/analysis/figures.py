"""The figure registry: one name -> compute the data, plot it, write PNG + PDF + CSV."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import balance, gating, gradients, phase, plasticity
from .elm_memory import elm_memory, plot_elm_memory, write_elm_memory_csv
from .rhythm import plot_rhythm, rhythm, write_rhythm_csv
from .style import save_figure

__all__ = ["FIGURES", "make_figure"]


@dataclass(frozen=True)
class _Figure:
    description: str
    compute: Callable[..., Any]
    plot: Callable[[Any], Any]
    write_csv: Callable[[Any, Path], Path]


_REGISTRY: dict[str, _Figure] = {
    "gating": _Figure(
        "Figure 1 (bottom): noisy LIF rate under subtractive inhibition with the paper's "
        "rate approximation; sigmoid with subtractive vs multiplicative gating",
        gating.gating_curves,
        gating.plot_gating,
        gating.write_gating_csv,
    ),
    "gradients": _Figure(
        "Section 3.1 measured: ||dL/dx_t|| and the depth-only terms of eq. 2 (LSTM) and "
        "eq. 3 (subLSTM) against distance in time",
        gradients.gradient_flow,
        gradients.plot_gradients,
        gradients.write_gradients_csv,
    ),
    "balance": _Figure(
        "E/I balance of subLSTM and fix-subLSTM units: net drives, closed-gate fractions, "
        "E-I correlations, memory timescales",
        balance.excitation_inhibition_balance,
        balance.plot_balance,
        balance.write_balance_csv,
    ),
    "inhibitory-plasticity": _Figure(
        "Inhibitory plasticity (Vogels et al. 2011): output settles at r0 and inhibition "
        "mirrors excitatory tuning",
        plasticity.inhibitory_plasticity,
        plasticity.plot_inhibitory_plasticity,
        plasticity.write_plasticity_csv,
    ),
    "cmc-phase": _Figure(
        "Trajectories of a trained CMC node's four populations (voltages and phase planes) "
        "for test images of different digits; needs --runs RUN_DIR of --cell cmc",
        phase.cmc_phase,
        phase.plot_cmc_phase,
        phase.write_cmc_phase_csv,
    ),
    "elm-memory": _Figure(
        "What a trained ELM neuron remembers: each memory unit's time constant (initial "
        "and trained) and its memory over a few test inputs, units sorted by timescale; "
        "needs --runs RUN_DIR of --cell elm or branch_elm",
        elm_memory,
        plot_elm_memory,
        write_elm_memory_csv,
    ),
    "rhythm": _Figure(
        "Autonomous rhythms and a time code in trained LSTM-family runs: h_t for an "
        "all-zero input and test sequences, per-unit spectra and oscillating units, a "
        "linear decoder of the step from h_t; needs --runs RUN_DIR ... of lstm, sublstm "
        "or fix_sublstm",
        rhythm,
        plot_rhythm,
        write_rhythm_csv,
    ),
}

FIGURES: dict[str, str] = {name: figure.description for name, figure in _REGISTRY.items()}
"""Figure name -> one-line description (for the CLI's help)."""


def make_figure(name: str, out_dir: Path | str, **options: Any) -> list[Path]:
    """Compute one figure's data, plot it and write ``NAME.png``, ``NAME.pdf``, ``NAME.csv``.

    Args:
        name: one of :data:`FIGURES`.
        out_dir: directory for the files (created if missing).
        **options: keyword arguments of the figure's data function (e.g.
            ``trials=2`` for ``gating``, ``models=...`` for ``gradients``).

    Returns:
        The paths written: PNG, PDF, CSV.

    Raises:
        ValueError: for an unknown figure name or option, naming the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown figure {name!r}; choose one of {sorted(_REGISTRY)}")
    figure = _REGISTRY[name]
    accepted = inspect.signature(figure.compute).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for figure {name!r}; valid: {sorted(accepted)}"
        )
    data = figure.compute(**options)
    out_dir = Path(out_dir)
    paths = save_figure(figure.plot(data), out_dir, name)
    paths.append(figure.write_csv(data, out_dir / f"{name}.csv"))
    return paths
