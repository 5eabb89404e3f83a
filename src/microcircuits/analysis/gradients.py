r"""Gradient flow through time, measured (Costa et al. 2017, section 3.1).

For a loss on the last step of a sequence, how much error reaches the input ``x_t``
of step ``t``, as a function of the distance ``T - 1 - t``? Measured by autograd
through the module itself: :math:`\lVert \partial L / \partial x_t \rVert`, averaged
over the batch.

Beside it, the paper's *depth-only* contribution of step ``t`` to the gradient of the
candidate's input weights :math:`W_z`: the path from :math:`h_t` through
:math:`c_t` to :math:`\bar z_t` of the same step, leaving out the memory's path back
in time (:math:`\delta c_{t+1} \odot f_{t+1}`),

.. math::
    \text{LSTM (eq. 2):}\quad (\delta W_z)_t = (\Delta_t \odot o_t \odot \tanh'(c_t)
        \odot i_t \odot \tanh'(\bar z_t))\, x_t^\top

    \text{subLSTM, fix-subLSTM (eq. 3):}\quad (\delta W_z)_t =
        (\Delta_t \odot \sigma'(c_t) \odot \sigma'(\bar z_t))\, x_t^\top

The multiplicative gates ``i`` and ``o`` scale the LSTM's term and shut it when
closed; the subtractive gates do not appear in eq. 3. The gate values come from
re-running the layer step by step (:mod:`microcircuits.analysis.recording`). We take
:math:`\Delta_t` as the total error at :math:`h_t`, :math:`dL/dh_t`, as autograd gives
it (from the layer above and back through the recurrent weights), and report the
Frobenius norm :math:`\lVert(\delta W_z)_t\rVert = \lVert\Delta_t \odot
\text{factor}_t\rVert\,\lVert x_t\rVert`, averaged over the batch; and, free of
:math:`\Delta`, the mean magnitude of the gate factor itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..cells import CELLS, CellKind
from . import style
from ._models import Models, adding_inputs, initial_models, named_models
from .recording import GateRecord, eval_mode, module_cell, record_module

__all__ = [
    "GradientCurve",
    "GradientData",
    "depth_only_factor",
    "gradient_flow",
    "plot_gradients",
    "write_gradients_csv",
]

LossFn = Callable[[Tensor], Tensor]
DEFAULT_CELLS = tuple(CELLS)


def depth_only_factor(kind: CellKind, gates: GateRecord) -> Tensor:
    r"""The gate factor of the depth-only term, elementwise: shape of ``gates.c``.

    LSTM (eq. 2): :math:`o \odot \tanh'(c) \odot i \odot \tanh'(\bar z)`;
    subLSTM and fix-subLSTM (eq. 3): :math:`\sigma'(c) \odot \sigma'(\bar z)`.
    Equals :math:`\partial h_t / \partial \bar z_t` of one step with ``c_{t-1}`` held.
    Only ``i``, ``o``, ``z`` (the activation, not the pre-activation) and ``c`` of
    ``gates`` are read: :math:`\tanh'(\bar z) = 1 - z^2`, :math:`\sigma'(\bar z) = z(1 - z)`.
    """
    if kind.name == "lstm":
        return gates.o * (1 - torch.tanh(gates.c) ** 2) * gates.i * (1 - gates.z**2)
    read_out = torch.sigmoid(gates.c)
    return read_out * (1 - read_out) * gates.z * (1 - gates.z)


@dataclass
class GradientCurve:
    """One model's measurements, each ``(T,)``, indexed by distance ``T - 1 - t``.

    Attributes:
        label: legend name.
        cell: registry name of the cell (for its colour).
        distance: ``T - 1 - t`` for ``t = T-1, ..., 0`` (0, 1, ..., T-1).
        input_grad: batch mean of ``||dL/dx_t||``.
        depth_only: batch mean of ``||(delta W_z)_t||`` (Frobenius) of the chosen layer.
        gate_factor: mean over batch and units of ``|factor_t|`` (eq. 2 or 3 without Delta).
    """

    label: str
    cell: str
    distance: np.ndarray
    input_grad: np.ndarray
    depth_only: np.ndarray
    gate_factor: np.ndarray


@dataclass
class GradientData:
    """Curves of all models; ``layer`` is the layer whose depth-only term is shown."""

    curves: list[GradientCurve]
    layer: int
    seq_len: int
    batch: int


def _run_time_major(module: nn.Module, x: Tensor) -> Tensor:
    """The module's output ``(T, B, D*H)`` for a time-major ``x``."""
    batch_first = getattr(module, "batch_first", False)
    output, _ = module(x.transpose(0, 1) if batch_first else x)
    return output.transpose(0, 1) if batch_first else output


def _default_loss(output_size: int, target: Tensor | None, seed: int, like: Tensor) -> LossFn:
    """Squared error of a fixed random linear read-out of ``h_T`` (against 0 if no target)."""
    generator = torch.Generator().manual_seed(seed + 1)
    readout = torch.randn(output_size, generator=generator) / output_size**0.5
    readout = readout.to(dtype=like.dtype, device=like.device)

    def loss(output: Tensor) -> Tensor:
        prediction = output[-1] @ readout  # (B,)
        goal = torch.zeros_like(prediction) if target is None else target.to(prediction)
        return 0.5 * ((prediction - goal) ** 2).mean()

    return loss


def _measure(
    label: str, module: nn.Module, x: Tensor, loss_fn: LossFn, layer: int
) -> GradientCurve:
    kind = module_cell(module)
    directions = 2 if module.bidirectional else 1
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer must be in [0, {module.num_layers}) for {label}, got {layer}")
    with eval_mode(module):
        # The module's own forward (fast kernels included): error reaching each input.
        x_leaf = x.detach().clone().requires_grad_()
        (input_grad,) = torch.autograd.grad(loss_fn(_run_time_major(module, x_leaf)), x_leaf)
        input_grad = input_grad.norm(dim=-1).mean(dim=1)  # (T,)

        # Step-by-step re-run with zero probes on h: their gradient is dL/dh_t.
        index = layer * directions  # forward direction of the chosen layer
        probe = x.new_zeros(x.shape[0], x.shape[1], module.hidden_size, requires_grad=True)
        records = record_module(module, x.detach(), h_probes={index: probe})
        last = records[-directions:]
        output = last[0].h if directions == 1 else torch.cat([r.h for r in last], dim=-1)
        (delta,) = torch.autograd.grad(loss_fn(output), probe)
    gates = GateRecord(*(g.detach() for g in records[index]))
    factor = depth_only_factor(kind, gates)  # (T, B, H)
    layer_input = x if layer == 0 else _layer_input(records, layer, directions)
    depth = (delta * factor).norm(dim=-1) * layer_input.detach().norm(dim=-1)  # (T, B)
    steps = x.shape[0]
    # Reverse the time axis: entry d is distance d = T - 1 - t from the loss.
    return GradientCurve(
        label=label,
        cell=kind.name,
        distance=np.arange(steps),
        input_grad=input_grad.flip(0).detach().cpu().double().numpy(),
        depth_only=depth.mean(dim=1).flip(0).detach().cpu().double().numpy(),
        gate_factor=factor.abs().mean(dim=(1, 2)).flip(0).cpu().double().numpy(),
    )


def _layer_input(records: list[GateRecord], layer: int, directions: int) -> Tensor:
    below = records[(layer - 1) * directions : layer * directions]
    return torch.cat([r.h for r in below], dim=-1)


def gradient_flow(
    models: Models | None = None,
    inputs: Tensor | None = None,
    *,
    target: Tensor | None = None,
    loss_fn: LossFn | None = None,
    cells: Sequence[str] = DEFAULT_CELLS,
    hidden_size: int = 32,
    seq_len: int = 100,
    batch: int = 32,
    layer: int = 0,
    seed: int = 0,
) -> GradientData:
    """Measure gradient flow through time for several recurrent models.

    Args:
        models: modules to measure, as ``{label: module}`` or a list (labelled by
            cell); LSTM/SubLSTM/FixSubLSTM or ``torch.nn.LSTM``. Pass trained ones
            here (for a figure at initialisation and after training, pass both; the
            first model of each cell is drawn solid, later ones dashed). ``None``:
            one freshly initialised module of each of ``cells`` (seeded by ``seed``).
        inputs: time-major ``(T, B, I)`` batch; ``None``: a delayed-addition batch of
            ``batch`` sequences of length ``seq_len`` (:func:`adding_inputs`).
        target: targets for the default loss ``(B,)``; from the adding batch when
            ``inputs`` is ``None``.
        loss_fn: maps a module's time-major output ``(T, B, D*H)`` to a scalar (for a
            trained model: its task head and loss). Default: half the mean squared
            error of a fixed random linear read-out of ``h_T`` (seeded) against
            ``target`` (or 0).
        cells: the cells built when ``models`` is ``None``.
        hidden_size: their hidden size.
        seq_len, batch: size of the default input.
        layer: the layer whose depth-only term is reported (its forward direction).
        seed: seeds the default models, input and read-out.

    Returns:
        :class:`GradientData` with one :class:`GradientCurve` per model.
    """
    if inputs is None:
        inputs, default_target = adding_inputs(batch, seq_len, seed)
        target = default_target if target is None else target
    if inputs.dim() != 3:
        raise ValueError(f"inputs must be time-major (T, B, I), got shape {tuple(inputs.shape)}")
    if models is None:
        models = initial_models(cells, inputs.shape[-1], hidden_size, seed, inputs)
    curves = []
    for label, module in named_models(models):
        parameter = next(module.parameters())
        x = inputs.to(dtype=parameter.dtype, device=parameter.device)
        output_size = module.hidden_size * (2 if module.bidirectional else 1)
        loss = loss_fn or _default_loss(output_size, target, seed, parameter)
        curves.append(_measure(label, module, x, loss, layer))
    return GradientData(curves=curves, layer=layer, seq_len=inputs.shape[0], batch=inputs.shape[1])


def _line_styles(curves: list[GradientCurve]) -> list[str]:
    return [
        style.LINE_STYLES[k % len(style.LINE_STYLES)]
        for k in style.repeat_index([c.cell for c in curves])
    ]


@style.styled
def plot_gradients(data: GradientData):
    """(a) ``||dL/dx_t||``, (b) depth-only ``||(dW_z)_t||``, (c) gate factor, vs ``T - 1 - t``."""
    fig, axes = style.new_figure(3, width=7.2, height=2.5)
    panels = (
        ("input_grad", r"$\|\partial L / \partial x_t\|$", "error reaching the input"),
        (
            "depth_only",
            r"$\|(\delta W_z)_t\|$ (depth-only)",
            f"depth-only term, layer {data.layer}",
        ),
        ("gate_factor", "mean |gate factor|", "gate factor of eq. 2 / eq. 3"),
    )
    line_styles = _line_styles(data.curves)
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        for curve, line_style in zip(data.curves, line_styles):
            values = getattr(curve, key)
            positive = values > 0  # a log axis cannot show exact zeros
            ax.plot(
                curve.distance[positive],
                values[positive],
                color=style.cell_color(curve.cell),
                linestyle=line_style,
                label=curve.label,
            )
        ax.set_yscale("log")
        ax.set_xlabel("distance from the loss $T - 1 - t$ (steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    # below the panels: inside, six entries covered the curves of panel a
    handles, labels = axes[0, 0].get_legend_handles_labels()
    cells = len({c.cell for c in data.curves})
    fig.legend(handles, labels, loc="outside lower center", ncols=max(cells, 1))
    for ax, letter in zip(axes[0], "abc"):
        style.panel_label(ax, letter)
    return fig


def write_gradients_csv(data: GradientData, path: Path) -> Path:
    """Tidy CSV: ``model, cell, distance, input_grad_norm, depth_only_norm, gate_factor_mean``."""

    def rows():
        for curve in data.curves:
            for d, g, w, f in zip(
                curve.distance, curve.input_grad, curve.depth_only, curve.gate_factor
            ):
                yield (curve.label, curve.cell, int(d), g, w, f)

    header = ("model", "cell", "distance", "input_grad_norm", "depth_only_norm", "gate_factor_mean")
    return style.write_csv(path, header, rows())
