"""Whole-layer kernels behind one dispatcher.

``run_layer`` runs one layer and one direction over a whole sequence. It picks the
fastest kernel that applies to the inputs and falls back to the reference path of
:mod:`microcircuits.kernels.reference` (the step functions of ``cells.py``), which is
also the oracle the fast kernels are tested against.

Kernels (:data:`KERNELS`):

``"auto"`` (default)
    the first of ``aten_lstm``, ``cpu_fused``, ``gpu_fused`` that applies, else
    ``reference``.
``"reference"``
    the step functions of ``cells.py``, differentiated by autograd.
``"cpu_fused"``
    :mod:`~microcircuits.kernels.cpu_fused`: one hand-differentiated
    ``torch.autograd.Function`` per layer and direction, all three cells (CPU, float32
    and float64).
``"gpu_fused"``
    :mod:`~microcircuits.kernels.gpu_fused`: the same whole-sequence design for CUDA,
    cuBLAS GEMMs plus one fused Triton pointwise kernel per step (all three cells,
    float32 and float64; needs the ``triton`` package, else ``auto`` falls back).
``"aten_lstm"``
    :mod:`~microcircuits.kernels.aten_lstm`: ATen's LSTM (oneDNN's RNN primitive, what
    ``torch.nn.LSTM`` runs), for the LSTM cell where its math is exactly ``torch.nn.LSTM``'s
    (no update mask, no variable lengths; CPU).

``run_stack`` runs a whole stack of layers in one call where a kernel can (ATen's LSTM,
as ``torch.nn.LSTM`` does, saving the per-call overhead of each layer and direction),
and otherwise returns ``None`` so the caller goes layer by layer through ``run_layer``.

Projected hidden states (``proj_size > 0``; a ``weight_hr`` ``(P, H)`` per layer and
direction, passed beside the :class:`~microcircuits.cells.CellWeights`): ``aten_lstm``
takes them where it takes the call anyway (the LSTM cell without update dropout or
variable lengths: ``torch.nn.LSTM``'s own path); everything else runs on the reference
path -- the slow path, a few torch ops per step. The fused kernels do not project, and
forcing one for a projected call raises.

While a graph is recorded -- ``torch.jit.trace``, ``torch.onnx.export`` (either
exporter) -- ``"auto"`` takes only kernels that are single ATen ops (``aten_lstm``, which
records as ``aten::lstm`` and so keeps the sequence length free), else the reference
path, whose plain torch ops record and export as they are (unrolled over the traced
steps). The fused kernels are Python loops around hand-written backwards that a
recorded graph would capture wrongly; under ``torch.compile`` they step aside the same
way under ``torch.export``. Under ``torch.compile`` (not exporting) each layer, or the
whole stack, runs eagerly between compiled graphs -- a graph break, the one
``torch.nn.LSTM`` takes too -- so the fast kernels run as they are and the sequence
length stays out of the compiled graphs. Their backwards
are first-order; asked for a graph (``create_graph=True``) they recompute the layer on
the reference path and differentiate that (see ``reference_layer_gradients``).

One switch forces the reference path everywhere: ``set_kernel("reference")``, the
context manager ``use_kernel("reference")``, or the environment variable
``MICROCIRCUITS_KERNEL=reference``. Naming a fast kernel the same way forces it, and a
call it cannot run then raises ``ValueError`` saying why (``"auto"`` falls back
silently instead). :func:`choose_kernel` and :func:`choose_stack_kernel` tell which kernel
a call would take.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

from ..cells import CellKind, CellWeights, LSTMState
from . import aten_lstm, cpu_fused, gpu_fused
from .reference import reverse_within_lengths, run_layer_reference

__all__ = [
    "KERNELS",
    "choose_kernel",
    "choose_stack_kernel",
    "get_kernel",
    "run_layer",
    "run_stack",
    "set_kernel",
    "use_kernel",
]

KERNELS = ("auto", "reference", "cpu_fused", "gpu_fused", "aten_lstm")
# Fast kernels in the order "auto" tries them.
_AUTO_ORDER = ("aten_lstm", "cpu_fused", "gpu_fused")
# Kernels that are one ATen op: jit.trace and the ONNX exporters record them as they are.
_RECORDABLE = ("aten_lstm",)
_T = TypeVar("_T")
_selected: str | None = None  # None: read MICROCIRCUITS_KERNEL, default "auto"


def _check_kernel_name(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {list(KERNELS)}")
    return name


def get_kernel() -> str:
    """The kernel selection now in force (``"auto"`` unless set otherwise)."""
    if _selected is not None:
        return _selected
    return _check_kernel_name(os.environ.get("MICROCIRCUITS_KERNEL", "auto").strip().lower())


def set_kernel(name: str) -> None:
    """Select the kernel for all later calls: ``"auto"`` (fastest that applies),
    ``"reference"``, or one fast kernel by name (see :data:`KERNELS`)."""
    global _selected
    _selected = _check_kernel_name(name)


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Select a kernel inside a ``with`` block and restore the previous choice after."""
    global _selected
    previous = _selected
    set_kernel(name)
    try:
        yield
    finally:
        _selected = previous


def _compiling_outside_export() -> bool:
    """Whether ``torch.compile`` (and not ``torch.export``) is tracing now."""
    compiler = torch.compiler
    return compiler.is_compiling() and not compiler.is_exporting()


def _eagerly(function: Callable[..., _T]) -> Callable[..., _T]:
    """``function`` run outside ``torch.compile``'s graph. Made where dynamo traces it (not
    at import, which would load dynamo), so it costs nothing once compiled."""
    return torch.compiler.disable(function, recursive=True)


def run_layer(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    *,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    reverse: bool = False,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, LSTMState]:
    """Run one layer and direction over a whole sequence.

    Args:
        kind: which cell (:data:`microcircuits.cells.CELLS`).
        x: input ``(T, B, I)``.
        state: initial ``(h, c)``, ``(B, P)`` and ``(B, H)`` (``P = H`` without a
            projection).
        weights: the layer's parameters.
        lengths: valid length of each sequence ``(B,)`` (int64, on CPU or ``x``'s
            device), or ``None`` when all have length ``T``.
        update_mask: update-dropout mask ``(B, H)`` (scaled), fixed over time, or ``None``.
        reverse: run each sequence from its last valid step back to its first
            (the backward direction of a bidirectional layer).
        weight_hr: the projection ``(P, H)`` of the hidden state (``torch.nn.LSTM``'s
            ``weight_hr_l{k}``, ``proj_size > 0``), or ``None``. Only ``aten_lstm`` and
            the reference path take it.

    Returns:
        ``output`` ``(T, B, P)`` (zero at padding steps), and the final state, taken
        at each sequence's last processed step.
    """
    if _compiling_outside_export():  # a graph break: ATen's LSTM and the fused kernels
        # fail inside inductor's graph or trace into it step by step
        return _eagerly(run_layer)(
            kind,
            x,
            state,
            weights,
            lengths=lengths,
            update_mask=update_mask,
            reverse=reverse,
            weight_hr=weight_hr,
        )
    name = choose_kernel(
        kind, x, state, weights, lengths=lengths, update_mask=update_mask, weight_hr=weight_hr
    )
    if name == "cpu_fused":
        return cpu_fused.run_layer_cpu_fused(
            kind, x, state, weights, lengths, update_mask, reverse=reverse
        )
    if name == "gpu_fused":
        return gpu_fused.run_layer_gpu_fused(
            kind, x, state, weights, lengths, update_mask, reverse=reverse
        )
    if name == "aten_lstm":
        return aten_lstm.run_layer_aten_lstm(
            kind, x, state, weights, reverse=reverse, weight_hr=weight_hr
        )
    if reverse:
        x = reverse_within_lengths(x, lengths)
    output, final = run_layer_reference(kind, x, state, weights, lengths, update_mask, weight_hr)
    if reverse:
        output = reverse_within_lengths(output, lengths)
    return output, final


def recording_reason() -> str | None:
    """What is recording a graph of torch ops now (``torch.jit.trace``, ONNX export), or
    ``None``; then only the kernels of ``_RECORDABLE`` and the reference path may run."""
    if torch.jit.is_tracing():  # also the TorchScript-based ONNX exporter
        return "torch.jit.trace is recording a graph"
    if torch.onnx.is_in_onnx_export():  # the torch.export-based ONNX exporter
        return "torch.onnx.export is recording a graph"
    return None


def _unsupported_reason(
    name: str,
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None,
    update_mask: Tensor | None,
    weight_hr: Tensor | None = None,
) -> str | None:
    if weight_hr is not None and name in ("cpu_fused", "gpu_fused"):
        return (
            "projections (proj_size > 0) are not among its features (the reference path runs them)"
        )
    if name not in _RECORDABLE:
        recording = recording_reason()
        if recording is not None:
            return f"{recording} (the reference path records as plain torch ops)"
    if name == "cpu_fused":
        return cpu_fused.unsupported_reason(x, state, weights, lengths, update_mask)
    if name == "gpu_fused":
        return gpu_fused.unsupported_reason(x, state, weights, lengths, update_mask)
    if name == "aten_lstm":
        return aten_lstm.unsupported_reason(
            kind, x, state, weights, lengths, update_mask, weight_hr
        )
    return None


def choose_kernel(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    *,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    weight_hr: Tensor | None = None,
) -> str:
    """The kernel :func:`run_layer` takes for these arguments under the current selection.

    Raises:
        ValueError: a fast kernel was forced by name and cannot run this call.
    """
    selected = get_kernel()
    if selected == "reference":
        return "reference"
    if selected == "auto":
        order = _AUTO_ORDER
        if _long_lstm_training(kind, x, state, weights):
            order = ("cpu_fused", *(k for k in _AUTO_ORDER if k != "cpu_fused"))
        for name in order:
            reason = _unsupported_reason(
                name, kind, x, state, weights, lengths, update_mask, weight_hr
            )
            if reason is None:
                return name
        return "reference"
    reason = _unsupported_reason(selected, kind, x, state, weights, lengths, update_mask, weight_hr)
    if reason is not None:
        raise ValueError(
            f"kernel {selected!r} cannot run this call: {reason} "
            "(select 'auto' to fall back to the reference path)"
        )
    return selected


# Training an LSTM over sequences at least this long, "auto" prefers the fused kernel's
# direct path (float32, AVX-512, the C++ loops) to ATen's LSTM: 0.65-0.69x nn.LSTM's time
# on sMNIST's shape (T 784, B 128, H 100) on 1 and 2 threads, against 0.91-1.12x on the
# language models' (T 35), where ATen's stays (benchmarks/NOTES.md, "The LSTM on the
# direct path").
_DIRECT_LSTM_MIN_STEPS = 128


def _long_lstm_training(kind: CellKind, x: Tensor, state: LSTMState, weights: CellWeights) -> bool:
    """Whether ``auto`` should run this LSTM call on the fused kernel's direct path."""
    if kind.name != "lstm" or x.device.type != "cpu" or x.dim() != 3:
        return False
    if x.shape[0] < _DIRECT_LSTM_MIN_STEPS:
        return False
    tensors = [x, state.h, state.c, *(w for w in weights if w is not None)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    return cpu_fused.direct_available(x.dtype, cpu_fused.native_loops(*tensors))


def choose_stack_kernel(
    kind: CellKind,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    layers: Sequence[CellWeights],
    *,
    lengths: Tensor | None = None,
    projections: Sequence[Tensor | None] | None = None,
) -> str | None:
    """The kernel that runs the whole stack in one call (:func:`run_stack`), or ``None``.

    Only ``aten_lstm`` takes whole stacks, where the selection allows it and it would
    run every layer and direction on its own (never raises: a forced kernel that cannot
    run the stack is left to :func:`run_layer` to report).
    """
    if get_kernel() not in ("auto", "aten_lstm"):
        return None
    if get_kernel() == "auto" and _long_lstm_training(kind, x, LSTMState(h0[0], c0[0]), layers[0]):
        return None  # layer by layer, on the fused kernel's direct path
    hr = _projections(projections, len(layers))
    if hr is None:
        return None
    # x stands in for every layer's input: the checks read its dtype, device and rank
    for index, weights in enumerate(layers):
        state = LSTMState(h0[index], c0[index])
        reason = aten_lstm.unsupported_reason(kind, x, state, weights, lengths, None, hr[index])
        if reason is not None:
            return None
    return "aten_lstm"


def _projections(
    projections: Sequence[Tensor | None] | None, count: int
) -> list[Tensor | None] | None:
    """``projections`` as a list of ``count`` entries, or ``None`` where one stack call
    cannot take them (a different count, or some layers projected and others not)."""
    if projections is None:
        return [None] * count
    hr = list(projections)
    if len(hr) != count or len({w is None for w in hr}) > 1:
        return None
    return hr


def run_stack(
    kind: CellKind,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    layers: Sequence[CellWeights],
    *,
    bidirectional: bool = False,
    lengths: Tensor | None = None,
    projections: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Run a whole stack in one kernel call where one applies; else ``None``.

    Nothing may act between the layers (no dropout between layers, no update dropout):
    the caller checks that, and on ``None`` runs the layers one by one with
    :func:`run_layer`.

    Args:
        kind: which cell.
        x: input ``(T, B, I)``.
        h0, c0: initial state, ``(L*D, B, P)`` and ``(L*D, B, H)``, ``D`` 2 if
            bidirectional else 1 (``P = H`` without projections).
        layers: the weights of each layer and direction in ``torch.nn.LSTM``'s order
            (layer-major, forward before reverse), ``L*D`` of them.
        bidirectional: whether each layer has a reverse direction.
        lengths: valid length of each sequence ``(B,)``, or ``None`` when all are ``T``.
        projections: the ``weight_hr`` ``(P, H)`` of each layer and direction, in the
            order of ``layers`` (``proj_size > 0``), or ``None``.

    Returns:
        ``output`` ``(T, B, D*P)`` of the last layer, ``h_n`` ``(L*D, B, P)`` and
        ``c_n`` ``(L*D, B, H)``; or ``None`` when no kernel takes the stack.
    """
    if _compiling_outside_export():  # a graph break, as in run_layer
        return _eagerly(run_stack)(
            kind,
            x,
            h0,
            c0,
            layers,
            bidirectional=bidirectional,
            lengths=lengths,
            projections=projections,
        )
    chosen = choose_stack_kernel(kind, x, h0, c0, layers, lengths=lengths, projections=projections)
    if chosen is None:
        return None
    num_directions = 2 if bidirectional else 1
    hr = None if projections is None or projections[0] is None else list(projections)
    return aten_lstm.run_stack_aten_lstm(
        x, h0, c0, list(layers), len(layers) // num_directions, bidirectional, hr
    )
