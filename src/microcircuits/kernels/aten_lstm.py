"""LSTM layers on ATen's own LSTM (``torch.lstm``), where the math is exactly ``torch.nn.LSTM``'s.

:class:`microcircuits.LSTM` has ``torch.nn.LSTM``'s equations and gate order (i, f, z, o),
so without update dropout and variable lengths a layer is what ``torch.nn.LSTM`` computes,
and ATen's kernel (oneDNN's RNN primitive on CPU for float32) runs it as fast as
``torch.nn.LSTM`` itself. The subLSTM and fix-subLSTM equations are not among oneDNN's
RNN cells, so they always take :mod:`microcircuits.kernels.cpu_fused`.

Projected hidden states (``proj_size > 0``: a ``weight_hr`` per layer and direction) are
ATen's too: ``torch.lstm`` takes each layer's parameters as ``w_ih, w_hh[, b_ih, b_hh],
w_hr`` and recognises the projection by ``h_0`` being narrower than ``c_0``, exactly as
``torch.nn.LSTM(proj_size=...)`` calls it.

(While ``torch.onnx.export`` records, projected layers take the reference path instead:
neither ONNX exporter translates ``torch.lstm`` with projections.)

Only CPU tensors qualify: on CUDA, ``torch.lstm`` runs cuDNN, which wants the
parameters of all gates in one flat buffer (``flatten_parameters``) and otherwise copies
them on every call with a warning; the GPU path is the GPU kernel's business.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import CellKind, CellWeights, LSTMState
from ._checks import call_tensors, common_unsupported_reason, off_cpu_reason

__all__ = ["run_layer_aten_lstm", "run_stack_aten_lstm", "unsupported_reason"]

_LSTM = getattr(torch, "lstm", None)


def unsupported_reason(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None,
    update_mask: Tensor | None,
    weight_hr: Tensor | None = None,
) -> str | None:
    """Why ATen's LSTM cannot run the call, or ``None`` when it can.

    ``weight_hr`` is the layer's projection ``(P, H)`` (``proj_size > 0``), or ``None``.
    """
    if _LSTM is None:  # pragma: no cover - every torch we support has it
        return "torch.lstm is missing"
    if kind.name != "lstm":
        return f"ATen's LSTM does not compute {kind.label}"
    if update_mask is not None:
        return "update dropout is not an ATen LSTM feature"
    if lengths is not None:
        return "variable lengths go to the fused kernel"
    if (weights.bias_ih is None) != (weights.bias_hh is None):
        return "only one of the two biases is given"
    tensors = call_tensors(x, state, weights, None)
    if weight_hr is not None:
        if weight_hr.dim() != 2 or weight_hr.shape[0] >= weight_hr.shape[1]:
            # ATen tells a projection by h_0 being narrower than c_0 (P < H)
            return f"projection weight_hr of shape {tuple(weight_hr.shape)} is not (P, H), P < H"
        if torch.onnx.is_in_onnx_export():
            # neither ONNX exporter translates torch.lstm with projections (torch 2.13:
            # one refuses, the other writes a broken graph); plain ops export
            return "torch.onnx cannot export ATen's LSTM with projections"
        tensors.append(weight_hr)
    return off_cpu_reason(tensors) or common_unsupported_reason(
        x, tensors, None, None, (torch.float32, torch.float64), traceable=True
    )


def _train_flag(x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor]) -> bool:
    """``torch.lstm``'s ``train``: keep what backward needs only when a gradient may be asked.

    Under ``torch.jit.trace`` grad mode is left out: the flag becomes a constant of the
    recorded graph, which must not depend on whether it was recorded (or checked, which
    ``trace`` does under ``no_grad``) with gradients on, and must allow backward later.
    """
    wants_grad = any(t.requires_grad for t in (x, h0, c0, *params))
    return wants_grad and (torch.is_grad_enabled() or torch.jit.is_tracing())


def _layer_params(weights: CellWeights, weight_hr: Tensor | None) -> list[Tensor]:
    """One layer's entries of ``torch.lstm``'s flat parameter list, in ``nn.LSTM``'s order."""
    params = [weights.weight_ih, weights.weight_hh]
    if weights.bias_ih is not None:
        params += [weights.bias_ih, weights.bias_hh]
    return params if weight_hr is None else [*params, weight_hr]


def run_layer_aten_lstm(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    reverse: bool = False,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, LSTMState]:
    """One LSTM layer and direction through ``torch.lstm`` (check :func:`unsupported_reason`).

    With ``weight_hr`` ``(P, H)`` the hidden state is projected (``state.h`` ``(B, P)``).
    """
    del kind
    has_bias = weights.bias_ih is not None
    params = _layer_params(weights, weight_hr)
    train = _train_flag(x, state.h, state.c, params)
    if reverse:
        x = x.flip(0)
    hx = (state.h.unsqueeze(0), state.c.unsqueeze(0))
    out, h_n, c_n = _LSTM(x, hx, params, has_bias, 1, 0.0, train, False, False)
    if reverse:
        out = out.flip(0)
    return out, LSTMState(h_n[0], c_n[0])


def run_stack_aten_lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    layers: list[CellWeights],
    num_layers: int,
    bidirectional: bool,
    projections: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM stack in one ``torch.lstm`` call, as ``torch.nn.LSTM`` makes it.

    One call instead of one per layer and direction saves the per-call overhead (~5% of
    a 2-layer LM-200 inference). No dropout between layers (the caller checks).

    Args:
        x: ``(T, B, I)``; ``h0`` ``(L*D, B, P)``, ``c0`` ``(L*D, B, H)`` (``P = H``
            without projections).
        layers: the weights of each layer and direction, in ``nn.LSTM``'s order
            (layer-major, forward before reverse); each must pass :func:`unsupported_reason`.
        projections: the ``weight_hr`` ``(P, H)`` of each layer and direction, in the
            same order, or ``None`` without projections.

    Returns:
        ``output`` ``(T, B, D*P)``, ``h_n`` ``(L*D, B, P)`` and ``c_n`` ``(L*D, B, H)``.
    """
    has_bias = layers[0].bias_ih is not None
    hr = [None] * len(layers) if projections is None else projections
    params = [p for w, w_hr in zip(layers, hr) for p in _layer_params(w, w_hr)]
    train = _train_flag(x, h0, c0, params)
    return _LSTM(x, (h0, c0), params, has_bias, num_layers, 0.0, train, bidirectional, False)
