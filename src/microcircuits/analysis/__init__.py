"""Analyses that make the biology of the paper visible, as data and as figures.

Each analysis is one function returning its data and one plotting function:

- ``gating``: :func:`gating_curves`, :func:`plot_gating`
- ``gradients``: :func:`gradient_flow`, :func:`plot_gradients`
- ``balance``: :func:`excitation_inhibition_balance`, :func:`plot_balance`
- ``inhibitory-plasticity``: :func:`inhibitory_plasticity`,
  :func:`plot_inhibitory_plasticity`
- ``cmc-phase`` (of a trained ``--cell cmc`` run): :func:`cmc_phase`,
  :func:`plot_cmc_phase`
- ``elm-memory`` (of a trained ``--cell elm`` run): :func:`elm_memory`,
  :func:`plot_elm_memory`
- ``rhythm`` (of trained LSTM-family runs): :func:`rhythm`, :func:`plot_rhythm`

:func:`make_figure` runs one by name and writes PNG, PDF and the data as CSV;
:data:`FIGURES` lists the names with a description. Plots use matplotlib's Agg canvas
(no display needed); colours live in :mod:`microcircuits.analysis.style`.
"""

from .balance import BalanceData, excitation_inhibition_balance, plot_balance
from .elm_memory import ELMMemory, elm_memory, plot_elm_memory
from .figures import FIGURES, make_figure
from .gating import (
    GatingData,
    LIFParameters,
    gating_curves,
    lif_rate_approximation,
    plot_gating,
    simulate_lif_rate,
)
from .gradients import GradientData, depth_only_factor, gradient_flow, plot_gradients
from .phase import CMCPhase, cmc_phase, plot_cmc_phase
from .plasticity import PlasticityData, inhibitory_plasticity, plot_inhibitory_plasticity
from .recording import GateRecord, record_layer, record_module
from .rhythm import RhythmData, plot_rhythm, rhythm

__all__ = [
    "FIGURES",
    "BalanceData",
    "CMCPhase",
    "ELMMemory",
    "GateRecord",
    "GatingData",
    "GradientData",
    "LIFParameters",
    "PlasticityData",
    "RhythmData",
    "cmc_phase",
    "depth_only_factor",
    "elm_memory",
    "excitation_inhibition_balance",
    "gating_curves",
    "gradient_flow",
    "inhibitory_plasticity",
    "lif_rate_approximation",
    "make_figure",
    "plot_balance",
    "plot_cmc_phase",
    "plot_elm_memory",
    "plot_gating",
    "plot_gradients",
    "plot_inhibitory_plasticity",
    "plot_rhythm",
    "record_layer",
    "record_module",
    "rhythm",
    "simulate_lif_rate",
]
