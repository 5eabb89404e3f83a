r"""Excitation/inhibition balance in subtractively gated networks (Costa et al. 2017).

The paper maps a subLSTM unit onto a cortical microcircuit: the excitatory candidate
:math:`z_t` onto layer-5 memory cells is balanced by basket-cell inhibition
:math:`i_t`, and the excitatory read-out :math:`\sigma(c_t)` by output inhibition
:math:`o_t`. A gate is *closed* when inhibition cancels excitation. Per unit and step
this module measures

- the net input to the memory :math:`z_t - i_t` and the net output
  :math:`\sigma(c_t) - o_t` (the unit's ``h_t``), as distributions;
- the fraction of (unit, step) pairs where each gate is closed,
  net :math:`\le` ``threshold`` (default 0: inhibition at least as strong as excitation);
- per unit, the Pearson correlation over time of excitatory and inhibitory drive
  (averaged over the batch's sequences): balanced inhibition tracks excitation;
- the memory decay per unit: fix-subLSTM's learned :math:`f = \sigma(\phi)`, and for a
  subLSTM its forget gate averaged over steps, with the memory time constant
  :math:`\tau = -1/\ln f` in steps.

Gate values come from :func:`microcircuits.analysis.recording.record_module`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FuncFormatter
from torch import Tensor

from ..cells import CELLS
from . import style
from ._models import Models, adding_inputs, initial_models, named_models
from .recording import eval_mode, module_cell, record_module

__all__ = [
    "BalanceData",
    "CellBalance",
    "excitation_inhibition_balance",
    "pearson_over_time",
    "plot_balance",
    "write_balance_csv",
]

DEFAULT_CELLS = tuple(name for name, kind in CELLS.items() if kind.subtractive)
TRACE_STEPS = 50
"""Panel f plots at most this many steps of the unit's traces (the CSV keeps them all):
longer windows (e.g. 100 words of a language model) are an unreadable tangle."""


@dataclass
class CellBalance:
    """Balance measurements of one model's chosen layer.

    Attributes:
        label: legend name.
        cell: registry name (colour).
        input_hist: density of ``z - i`` over ``BalanceData.bins`` ``(nbins,)``.
        output_hist: density of ``sigma(c) - o`` ``(nbins,)``.
        input_closed: fraction of (unit, step, sequence) with ``z - i <= threshold``.
        output_closed: the same for ``sigma(c) - o``.
        input_closed_per_unit: that fraction per unit ``(H,)``.
        output_closed_per_unit: ``(H,)``.
        input_correlation: per-unit correlation over time of ``z`` and ``i`` ``(H,)``.
        output_correlation: per-unit correlation of ``sigma(c)`` and ``o`` ``(H,)``.
        decay: memory decay ``f`` per unit ``(H,)``: learned constant (fix-subLSTM)
            or forget gate averaged over steps and sequences (subLSTM).
        timescale: ``-1 / ln f`` in steps ``(H,)``.
        learned_decay: whether ``decay`` is the learned constant.
        trace: example unit (sequence 0, the unit whose net input varies most):
            ``{"z", "i", "sigma_c", "o"}``, each ``(T,)``.
        trace_unit: that unit's index.
    """

    label: str
    cell: str
    input_hist: np.ndarray
    output_hist: np.ndarray
    input_closed: float
    output_closed: float
    input_closed_per_unit: np.ndarray
    output_closed_per_unit: np.ndarray
    input_correlation: np.ndarray
    output_correlation: np.ndarray
    decay: np.ndarray
    timescale: np.ndarray
    learned_decay: bool
    trace: dict[str, np.ndarray]
    trace_unit: int


@dataclass
class BalanceData:
    """Per-model balance and the shared histogram bin edges ``(nbins + 1,)``."""

    cells: list[CellBalance]
    bins: np.ndarray
    threshold: float
    layer: int


def pearson_over_time(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation over the time axis of ``(T, B, H)`` tensors, mean over ``B``.

    Returns ``(H,)``; NaN for a unit whose drive is constant in every sequence.
    """
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    denominator = (a.pow(2).sum(dim=0) * b.pow(2).sum(dim=0)).sqrt()  # (B, H)
    r = (a * b).sum(dim=0) / denominator
    r = torch.where(denominator > 0, r, torch.full_like(r, float("nan")))
    return r.nanmean(dim=0)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _histogram(values: Tensor, bins: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(_numpy(values).ravel(), bins=bins, density=True)
    return counts


def _measure(label, module, x, bins, threshold, layer) -> CellBalance:
    kind = module_cell(module)
    if kind.name == "lstm":
        raise ValueError(
            f"balance needs a subtractively gated module (subLSTM, fix-subLSTM); {label!r} "
            "is an LSTM, whose gates multiply"
        )
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer must be in [0, {module.num_layers}) for {label}, got {layer}")
    directions = 2 if module.bidirectional else 1
    with eval_mode(module), torch.no_grad():
        record = record_module(module, x)[layer * directions]
    read_out = torch.sigmoid(record.c)
    input_net = record.z - record.i  # (T, B, H)
    output_net = read_out - record.o  # equals record.h
    decay = record.f.mean(dim=(0, 1))  # (H,); exact for fix-subLSTM (constant)
    unit = int(input_net[:, 0].var(dim=0).argmax()) if x.shape[0] > 1 else 0
    return CellBalance(
        label=label,
        cell=kind.name,
        input_hist=_histogram(input_net, bins),
        output_hist=_histogram(output_net, bins),
        input_closed=float((input_net <= threshold).double().mean()),
        output_closed=float((output_net <= threshold).double().mean()),
        input_closed_per_unit=_numpy((input_net <= threshold).double().mean(dim=(0, 1))),
        output_closed_per_unit=_numpy((output_net <= threshold).double().mean(dim=(0, 1))),
        input_correlation=_numpy(pearson_over_time(record.z, record.i)),
        output_correlation=_numpy(pearson_over_time(read_out, record.o)),
        decay=_numpy(decay),
        timescale=_numpy(-1.0 / torch.log(decay)),
        learned_decay=kind.learned_decay,
        trace={
            name: _numpy(v[:, 0, unit])
            for name, v in (
                ("z", record.z),
                ("i", record.i),
                ("sigma_c", read_out),
                ("o", record.o),
            )
        },
        trace_unit=unit,
    )


def excitation_inhibition_balance(
    models: Models | None = None,
    inputs: Tensor | None = None,
    *,
    threshold: float = 0.0,
    bins: int | Sequence[float] = 40,
    cells: Sequence[str] = DEFAULT_CELLS,
    hidden_size: int = 32,
    seq_len: int = 100,
    batch: int = 32,
    layer: int = 0,
    seed: int = 0,
) -> BalanceData:
    """Measure E/I balance of subtractively gated models on an input batch.

    Args:
        models: ``{label: module}`` or a list of SubLSTM/FixSubLSTM modules (trained
            ones from checkpoints); ``None``: one freshly initialised module per cell
            of ``cells``, seeded by ``seed``.
        inputs: time-major ``(T, B, I)``; ``None``: a delayed-addition batch.
        threshold: a gate counts as closed where net (excitation - inhibition) <= this.
        bins: number of histogram bins over [-1, 1] (both nets lie in (-1, 1)), or edges.
        cells, hidden_size: the default models.
        seq_len, batch: size of the default input.
        layer: the layer measured (forward direction).
        seed: seeds the default models and input.
    """
    if inputs is None:
        inputs, _ = adding_inputs(batch, seq_len, seed)
    if inputs.dim() != 3:
        raise ValueError(f"inputs must be time-major (T, B, I), got shape {tuple(inputs.shape)}")
    edges = np.linspace(-1.0, 1.0, bins + 1) if isinstance(bins, int) else np.asarray(bins, float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bins must be a positive int or increasing edges")
    if models is None:
        models = initial_models(cells, inputs.shape[-1], hidden_size, seed, inputs)
    results = []
    for label, module in named_models(models):
        parameter = next(module.parameters())
        x = inputs.to(dtype=parameter.dtype, device=parameter.device)
        results.append(_measure(label, module, x, edges, float(threshold), layer))
    return BalanceData(cells=results, bins=edges, threshold=float(threshold), layer=layer)


@style.styled
def plot_balance(data: BalanceData):
    """Six panels: net input and output distributions, closed fractions, E-I
    correlations, memory time constants, and one unit's drives over
    time (its first ``TRACE_STEPS`` steps)."""
    fig, axes = style.new_figure(3, 2, width=7.2, height=2.4)
    (ax_in, ax_out, ax_closed), (ax_corr, ax_tau, ax_trace) = axes
    # models of one cell share a colour; the repeat (e.g. trained after initial) is dashed
    repeats = style.repeat_index([c.cell for c in data.cells])
    dashes = [style.LINE_STYLES[k % len(style.LINE_STYLES)] for k in repeats]

    for ax, key, xlabel, title in (
        (ax_in, "input_hist", "net input to memory $z - i$", "input gate"),
        (ax_out, "output_hist", r"net output $\sigma(c) - o$", "output gate"),
    ):
        for cell, dash in zip(data.cells, dashes):
            ax.stairs(
                getattr(cell, key),
                data.bins,
                color=style.cell_color(cell.cell),
                linestyle=dash,
                label=cell.label,
            )
        ax.axvline(data.threshold, color=style.COLORS["net"], linewidth=0.6, linestyle=":")
        ax.set_ylim(0, 1.3 * ax.get_ylim()[1])  # room for the legend
        ax.set_xlabel(xlabel + " (a.u.)")
        ax.set_ylabel("density")
        ax.set_title(f"{title}: E - I")
    ax_in.legend(loc="upper left")

    width = 0.8 / max(len(data.cells), 1)
    positions = np.arange(2)
    for k, cell in enumerate(data.cells):
        ax_closed.bar(
            positions + (k - (len(data.cells) - 1) / 2) * width,
            [cell.input_closed, cell.output_closed],
            width,
            color=style.cell_color(cell.cell),
            hatch=style.HATCHES[repeats[k] % len(style.HATCHES)],
            edgecolor="white",
            label=cell.label,
        )
    ax_closed.set_xticks(positions, ["input gate\n$z - i$", r"output gate" "\n" r"$\sigma(c) - o$"])
    ax_closed.set_ylim(0, 1)
    ax_closed.set_ylabel("fraction closed")
    ax_closed.set_title(f"closed: net ≤ {data.threshold:g}")

    # One dot per unit, input-gate drives left, output-gate drives right; bar: median.
    jitter = np.random.default_rng(0)
    for k, cell in enumerate(data.cells):
        color = style.cell_color(cell.cell)
        offset = (k - (len(data.cells) - 1) / 2) * width
        for position, values in zip(positions, (cell.input_correlation, cell.output_correlation)):
            finite = values[np.isfinite(values)]
            if not finite.size:
                continue
            x = position + offset + jitter.uniform(-0.3, 0.3, finite.size) * width
            marker = "o" if repeats[k] == 0 else "^"
            ax_corr.scatter(x, finite, s=4, color=color, alpha=0.7, linewidths=0, marker=marker)
            ax_corr.hlines(
                np.median(finite),
                position + offset - 0.4 * width,
                position + offset + 0.4 * width,
                color=color,
                linewidth=1.5,
            )
    ax_corr.axhline(0.0, color=style.COLORS["net"], linewidth=0.5)
    ax_corr.set_xticks(positions, ["$z$ vs $i$", r"$\sigma(c)$ vs $o$"])
    ax_corr.set_ylim(-1.05, 1.05)
    ax_corr.set_ylabel("per-unit correlation over time")
    ax_corr.set_title("E-I co-variation (bar: median)")

    finite_tau = np.concatenate([c.timescale[np.isfinite(c.timescale)] for c in data.cells])
    if finite_tau.size:
        low, high = max(finite_tau.min(), 1e-2), max(finite_tau.max(), 1e-2)
        tau_bins = np.geomspace(low / 1.2, high * 1.2, 21)
        for cell, dash in zip(data.cells, dashes):
            what = "learned f" if cell.learned_decay else "mean forget gate"
            ax_tau.hist(
                cell.timescale[np.isfinite(cell.timescale)],
                bins=tau_bins,
                histtype="step",
                linestyle=dash,
                color=style.cell_color(cell.cell),
                label=f"{cell.label} ({what})",
            )
        ax_tau.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax_tau.xaxis.set_major_formatter(plain)
        if high / low < 10:  # under a decade the major ticks alone are too few
            ax_tau.xaxis.set_minor_formatter(plain)
    ax_tau.set_xlabel(r"memory time constant $\tau = -1/\ln f$ (steps)")
    ax_tau.set_ylabel("units")
    ax_tau.set_title("memory timescales")
    ax_tau.set_ylim(0, 1.3 * ax_tau.get_ylim()[1])
    ax_tau.legend(loc="upper left")

    if data.cells:
        cell = data.cells[-1]  # the last model given (the trained one, when both are)
        total = cell.trace["z"].size
        trace = {name: values[:TRACE_STEPS] for name, values in cell.trace.items()}
        steps = np.arange(trace["z"].size)
        ax_trace.plot(steps, trace["z"], color=style.COLORS["excitation"], label="E: z")
        ax_trace.plot(steps, trace["i"], color=style.COLORS["inhibition"], label="I: i")
        ax_trace.plot(
            steps,
            trace["sigma_c"],
            color=style.COLORS["excitation"],
            linestyle="--",
            label=r"E: $\sigma(c)$",
        )
        ax_trace.plot(
            steps, trace["o"], color=style.COLORS["inhibition"], linestyle="--", label="I: o"
        )
        ax_trace.set_title(f"{cell.label}: unit {cell.trace_unit}", fontsize="small")
        if total > steps.size:
            ax_trace.set_xlabel(f"time step (first {steps.size} of {total})")
        low, high = ax_trace.get_ylim()
        ax_trace.set_ylim(low, high + 0.45 * (high - low))
        ax_trace.legend(loc="upper center", ncols=4, columnspacing=0.8, handlelength=1.5)
    if not ax_trace.get_xlabel():
        ax_trace.set_xlabel("time step")
    ax_trace.set_ylabel("activation (a.u.)")
    for ax, letter in zip(axes.ravel(), "abcdef"):
        style.panel_label(ax, letter)
    return fig


def write_balance_csv(data: BalanceData, path: Path) -> Path:
    """Tidy CSV: ``model, cell, quantity, index, value``.

    ``index`` is the bin centre for histograms (``*_net_density``), the unit for
    per-unit quantities, the step for the example trace, empty for summaries.
    """
    centers = 0.5 * (data.bins[1:] + data.bins[:-1])

    def rows():
        for c in data.cells:
            head = (c.label, c.cell)
            for name, values in (
                ("input_net_density", c.input_hist),
                ("output_net_density", c.output_hist),
            ):
                for x, v in zip(centers, values):
                    yield (*head, name, x, v)
            yield (*head, "input_closed_fraction", "", c.input_closed)
            yield (*head, "output_closed_fraction", "", c.output_closed)
            for name in (
                "input_closed_per_unit",
                "output_closed_per_unit",
                "input_correlation",
                "output_correlation",
                "decay",
                "timescale",
            ):
                for unit, v in enumerate(getattr(c, name)):
                    yield (*head, name, unit, v)
            for name, values in c.trace.items():
                for step, v in enumerate(values):
                    yield (*head, f"trace_unit{c.trace_unit}_{name}", step, v)
        yield ("", "", "threshold", "", data.threshold)

    return style.write_csv(path, ("model", "cell", "quantity", "index", "value"), rows())
