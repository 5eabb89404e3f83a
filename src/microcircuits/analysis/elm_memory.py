"""What a trained ELM neuron remembers: its memory timescales and its memory over time.

The ELM neuron (Spieler et al., ICLR 2024) keeps ``d_m`` memory units, each a leaky
variable with its own time constant ``tau_m`` (log-spaced from ``elm_memory_tau_min`` to
``elm_memory_tau_max`` at initialisation; fixed, or learned when
``elm_learn_memory_tau``): ``m_t = k_m m_{t-1} + gain * g(MLP([b_t, k_m m_{t-1}]))`` with
``k_m = exp(-1 / tau_m)``. A unit with a short ``tau_m`` follows the input; one with a
long ``tau_m`` holds what came long before, as a slow dendritic or somatic process
would. For a trained ``elm`` (or ``branch_elm``) run this shows

- (a) every unit's ``tau_m``, sorted, on a log scale, at initialisation and trained
  (one set when they are fixed), beside the sequence length;
- (b, ...) for a few test inputs of the run's task, the input over time above the memory
  ``m_t`` of every unit (a heatmap, units sorted by ``tau_m``, fastest at the bottom).

``m_t`` is computed with the model's own step equations
(:func:`~microcircuits.elm.equations.elm_state_step`) from a zero state, on the task's
test inputs (:meth:`~microcircuits.tasks.Task.probe`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from ..elm import ELM
from ..elm.equations import elm_state_step, synaptic_drive
from ..model_registry import model_kind
from . import style
from .one_run import load_one_run

__all__ = ["ELMMemory", "elm_memory", "plot_elm_memory", "record_memory", "write_elm_memory_csv"]

ELM_FAMILY = "elm"


@dataclass
class ELMMemory:
    """Memory timescales of a trained ELM and its memory over a few test inputs.

    Attributes:
        run: the run's directory name.
        label: the model's label (``"ELM"``, ``"Branch-ELM"``).
        cell: its registry name (``"elm"``), for the colour.
        task: the run's task.
        learned: whether the time constants were trained.
        tau_initial: ``(M,)`` each unit's ``tau_m`` at initialisation, in steps.
        tau_trained: ``(M,)`` each unit's ``tau_m`` in the checkpoint, in steps.
        order: ``(M,)`` the units sorted by trained ``tau_m``, fastest first.
        test_index: ``(N,)`` each input's index among the task's test inputs.
        inputs: ``(N, T, I)`` the inputs.
        memory: ``(N, T, M)`` the memory ``m_t`` after each step, units in model order.
        outputs: ``(N, O)`` the model's output at the last step.
    """

    run: str
    label: str
    cell: str
    task: str
    learned: bool
    tau_initial: np.ndarray
    tau_trained: np.ndarray
    order: np.ndarray
    test_index: np.ndarray
    inputs: np.ndarray
    memory: np.ndarray
    outputs: np.ndarray


def find_elm(model: nn.Module) -> ELM:
    """The :class:`~microcircuits.elm.ELM` of a task's model (itself, or its ``elm``)."""
    elm = model if isinstance(model, ELM) else getattr(model, "elm", None)
    if not isinstance(elm, ELM):
        raise ValueError(f"{type(model).__name__} holds no ELM neuron")
    return elm


@torch.no_grad()
def record_memory(elm: ELM, x: Tensor) -> Tensor:
    """The memory ``m_t`` ``(T, B, M)`` of ``elm`` after each step of ``x`` ``(T, B, I)``
    (``(B, T, I)`` if the ELM is ``batch_first``), from a zero state."""
    if elm.batch_first:
        x = x.transpose(0, 1)
    weights = elm.step_weights()
    synapse_weight = elm.synapse_weight
    if elm.synapse_mask is not None:
        synapse_weight = synapse_weight * elm.synapse_mask
    routed = x if elm.synapse_input_index is None else x.index_select(-1, elm.synapse_input_index)
    drive = synaptic_drive(routed, synapse_weight, elm.num_branch, elm.version)
    state = elm.initial_state(x.shape[1])
    memories = []
    for drive_t in drive.unbind(0):
        state = elm_state_step(drive_t, state, weights)
        memories.append(state.memory)
    return torch.stack(memories) if memories else x.new_zeros(0, x.shape[1], elm.num_memory)


def _initial_tau(elm: ELM) -> Tensor:
    """``tau_m`` of ``elm`` as initialised (the log-spaced grid over its bounds)."""
    fresh = copy.deepcopy(elm)
    with torch.random.fork_rng(devices=[]):
        fresh.reset_parameters()
    return fresh.memory_tau.detach()


def elm_memory(
    runs: Sequence[str | os.PathLike[str]] = (),
    *,
    checkpoint: str = "best",
    samples: Sequence[int] = (0, 1),
) -> ELMMemory:
    """The memory timescales of a trained ELM run and its memory over test inputs.

    Args:
        runs: one run directory of ``--cell elm`` or ``branch_elm``.
        checkpoint: ``"best"`` or ``"last"`` (a run still training may only have
            ``last``).
        samples: which test inputs of the run's task to show (indices into its test set,
            in the task's order; for SHD-Adding, its fixed test pairs).

    Raises:
        ValueError: no run, several, a run of another model (named), or bad ``samples``.
    """
    samples = [int(s) for s in samples]
    if not samples or min(samples) < 0:
        raise ValueError(f"samples must be test indices >= 0, at least one, got {samples}")
    run = load_one_run(
        runs,
        checkpoint,
        figure="elm-memory",
        family=ELM_FAMILY,
        wanted="shows one trained ELM run",
        shows="shows the memory of a trained ELM neuron",
        cells="--cell elm or branch_elm",
    )
    elm = find_elm(run.model)
    x, _ = run.task.probe(run.model, max(samples) + 1)  # (T, B, I), the task's test inputs
    if x.shape[1] <= max(samples):
        raise ValueError(f"samples: the test set has only {x.shape[1]} inputs, got {samples}")
    x = x[:, samples].detach()
    with torch.no_grad():
        memory = record_memory(elm, x)  # (T, N, M)
        outputs = run.model(x).float()  # (N, O)
    tau = elm.memory_tau.detach()
    return ELMMemory(
        run=Path(runs[0]).name,
        label=model_kind(run.config.cell).label,
        cell=run.config.cell,
        task=run.config.task,
        learned=bool(elm.learn_memory_tau),
        tau_initial=_initial_tau(elm).double().cpu().numpy(),
        tau_trained=tau.double().cpu().numpy(),
        order=np.argsort(tau.cpu().numpy(), kind="stable"),
        test_index=np.array(samples),
        inputs=x.transpose(0, 1).double().cpu().numpy(),
        memory=memory.transpose(0, 1).double().cpu().numpy(),
        outputs=outputs.double().cpu().numpy(),
    )


def _output_text(output: np.ndarray) -> str:
    if output.shape[-1] == 1:
        return f"output {output[0]:.3g}"
    return f"predicted class {int(output.argmax())}"


def _tau_text(tau: float) -> str:
    return f"{tau:.0f}" if tau >= 100 else f"{tau:.3g}"


def _plot_input(ax, inputs: np.ndarray) -> None:
    """A few channels as lines; many (e.g. SHD's 700) as a raster."""
    steps, channels = inputs.shape
    if channels <= 4:
        colors = style.level_colors(channels)
        for c in range(channels):
            ax.plot(np.arange(steps), inputs[:, c], color=colors[c], lw=0.8, label=f"x{c}")
        if channels > 1:
            ax.legend(loc="upper right", ncols=channels, fontsize=6, frameon=True, framealpha=0.8)
    else:  # a raster: a dot per (step, channel) with input, e.g. SHD's spike counts
        step, channel = np.nonzero(inputs)
        ax.scatter(step, channel, s=1.0, marker=".", linewidths=0, color="black", rasterized=True)
        ax.set_ylim(-0.5, channels - 0.5)
        ax.set_ylabel("channel")
    ax.set_xlim(-0.5, steps - 0.5)


@style.styled
def plot_elm_memory(data: ELMMemory):
    """Timescales (a) beside, per test input, its input above its memory heatmap."""
    count, steps, units = data.memory.shape
    fig = Figure(figsize=(2.4 + 3.0 * count, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1 + count, height_ratios=(1, 3), width_ratios=(1.2,) + (2,) * count)
    color = style.cell_color(data.cell)

    ax = fig.add_subplot(grid[:, 0])
    rank = np.arange(units)
    if data.learned:
        ax.plot(rank, data.tau_initial[data.order], "o", mfc="none", color=style.COLORS["net"],
                ms=3, label="initial")  # fmt: skip
        ax.plot(rank, data.tau_trained[data.order], "o", color=color, ms=3, label="trained")
    else:
        ax.plot(rank, data.tau_trained[data.order], "o", color=color, ms=3, label="fixed")
    ax.axhline(steps, color=style.COLORS["net"], ls="--", lw=0.8, label=f"sequence ({steps})")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("memory unit (sorted by $\\tau_m$)")
    ax.set_ylabel("$\\tau_m$ (steps)")
    ax.set_title("memory timescales")
    ax.legend(loc="lower right")
    style.panel_label(ax, "a")

    limit = float(np.abs(data.memory).max()) or 1.0
    ticks = np.unique(np.linspace(0, units - 1, min(units, 5)).round().astype(int))
    image, heatmaps = None, []
    for n in range(count):
        ax_in = fig.add_subplot(grid[0, 1 + n])
        _plot_input(ax_in, data.inputs[n])
        ax_in.set_title(f"test input {data.test_index[n]} ({_output_text(data.outputs[n])})")
        ax_in.tick_params(labelbottom=False)
        style.panel_label(ax_in, "bcdefghij"[n % 9])
        ax_m = fig.add_subplot(grid[1, 1 + n], sharex=ax_in)
        image = ax_m.imshow(
            data.memory[n][:, data.order].T, aspect="auto", origin="lower", cmap="RdBu_r",
            vmin=-limit, vmax=limit, interpolation="nearest",
            extent=(-0.5, steps - 0.5, -0.5, units - 0.5),
        )  # fmt: skip
        heatmaps.append(ax_m)
        ax_m.set_xlabel("step")
        ax_m.set_yticks(ticks, [_tau_text(data.tau_trained[data.order][k]) for k in ticks])
        if n == 0:
            ax_m.set_ylabel("memory unit, by its $\\tau_m$ (steps)")
    if image is not None:
        fig.colorbar(image, ax=heatmaps, label="memory $m_t$", shrink=0.9)
    fig.suptitle(
        f"{data.label} ({data.run}, {data.task}): {units} memory units, "
        f"time constants {'learned' if data.learned else 'fixed'}",
        fontsize=9,
    )
    return fig


def write_elm_memory_csv(data: ELMMemory, path: Path) -> Path:
    """Tidy CSV: ``kind, test_index, step, unit, rank, tau_initial, tau_trained, memory``.

    ``kind = tau``: one row per unit (``test_index``, ``step`` and ``memory`` empty);
    ``kind = memory``: one row per input, step and unit, ``memory`` = ``m_t`` after that
    step (0-based). ``rank`` is the unit's place when sorted by trained ``tau_m``.
    """
    count, steps, units = data.memory.shape
    rank_of = np.empty(units, dtype=np.int64)
    rank_of[data.order] = np.arange(units)

    def rows():
        for unit in range(units):
            yield (
                "tau", "", "", unit, int(rank_of[unit]),
                float(data.tau_initial[unit]), float(data.tau_trained[unit]), "",
            )  # fmt: skip
        for n in range(count):
            for step in range(steps):
                for unit in data.order:
                    yield (
                        "memory", int(data.test_index[n]), step, int(unit), int(rank_of[unit]),
                        float(data.tau_initial[unit]), float(data.tau_trained[unit]),
                        float(data.memory[n, step, unit]),
                    )  # fmt: skip

    header = ("kind", "test_index", "step", "unit", "rank", "tau_initial", "tau_trained", "memory")
    return style.write_csv(path, header, rows())
