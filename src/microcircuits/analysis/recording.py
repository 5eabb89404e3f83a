"""Record every gate of a recurrent layer at every step.

The analyses need what the fused kernels never keep: the gate activations ``i``, ``f``,
``z``, ``o`` and the state ``c``, ``h`` per unit and step. :func:`record_layer` re-runs a
layer step by step with the functions of :mod:`microcircuits.cells` (the pre-activations
``W x + R h + b`` and the cell's own nonlinearity for ``c`` and ``h``), so the recorded
``h`` is the module's output.

Works with :class:`microcircuits.LSTM`, :class:`~microcircuits.SubLSTM`,
:class:`~microcircuits.FixSubLSTM` and ``torch.nn.LSTM`` (read as an LSTM; without
``proj_size``). All inputs and records here are time-major, ``(T, B, ...)``, whatever
the module's ``batch_first``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..cells import CELLS, CellKind, CellWeights, LSTMState, gate_preactivations

__all__ = [
    "GateRecord",
    "eval_mode",
    "gate_activations",
    "module_cell",
    "module_layer_weights",
    "record_layer",
    "record_module",
]


class GateRecord(NamedTuple):
    """Per-step activations of one layer and direction, each ``(T, B, H)``.

    Attributes:
        i: input gate (inhibition onto the memory in a subLSTM).
        f: forget gate; fix-subLSTM: its constant decay ``sigma(phi)``, broadcast.
        z: candidate input (excitation onto the memory); ``tanh`` in an LSTM.
        o: output gate (inhibition of the read-out in a subLSTM).
        c: memory after the step.
        h: output after the step.
    """

    i: Tensor
    f: Tensor
    z: Tensor
    o: Tensor
    c: Tensor
    h: Tensor


def module_cell(module: nn.Module) -> CellKind:
    """The :class:`~microcircuits.cells.CellKind` a sequence module runs.

    Raises:
        TypeError: for a module that is neither one of ours nor ``torch.nn.LSTM``.
        ValueError: for a module with ``proj_size > 0`` (the analyses read h as the
            layer's hidden units).
    """
    if getattr(module, "proj_size", 0):
        raise ValueError(
            f"{type(module).__name__} with proj_size > 0 is not supported by the analyses"
        )
    kind = getattr(module, "cell", None)
    if isinstance(kind, CellKind):
        return kind
    if isinstance(module, nn.LSTM):
        return CELLS["lstm"]
    raise TypeError(
        "expected a microcircuits LSTM/SubLSTM/FixSubLSTM or torch.nn.LSTM, "
        f"got {type(module).__name__}"
    )


def module_layer_weights(module: nn.Module, layer: int, reverse: bool = False) -> CellWeights:
    """One layer's parameters as :class:`~microcircuits.cells.CellWeights`.

    Uses ``module.layer_weights`` where the module has it, else reads the parameters by
    their ``torch.nn.LSTM`` names (``weight_ih_l{k}`` ... and ``forget_l{k}``).
    """
    if hasattr(module, "layer_weights"):
        return module.layer_weights(layer, reverse=reverse)
    module_cell(module)  # refuses unknown modules
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer must be in [0, {module.num_layers}), got {layer}")
    if reverse and not module.bidirectional:
        raise ValueError("reverse=True needs a bidirectional module")
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return CellWeights(
        getattr(module, f"weight_ih{suffix}"),
        getattr(module, f"weight_hh{suffix}"),
        getattr(module, f"bias_ih{suffix}", None),
        getattr(module, f"bias_hh{suffix}", None),
        getattr(module, f"forget{suffix}", None),
    )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Switch dropout off inside the block and restore the module's mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def gate_activations(
    kind: CellKind, preactivations: Tensor, forget: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gate values ``(i, f, z, o)`` from pre-activations ``(B, G*H)``, each ``(B, H)``.

    The cell's own gate function from :mod:`microcircuits.cells` (``kind.activate``);
    fix-subLSTM's ``f = sigma(phi)`` comes broadcast to ``(B, H)``.
    """
    return tuple(kind.activate(preactivations, forget))


def record_layer(
    kind: CellKind,
    weights: CellWeights,
    x: Tensor,
    state: LSTMState | None = None,
    *,
    reverse: bool = False,
    h_probe: Tensor | None = None,
) -> GateRecord:
    """Run one layer over ``x`` ``(T, B, I)`` and keep every gate at every step.

    Args:
        kind: the cell.
        weights: the layer's parameters.
        x: input sequence, time-major ``(T, B, I)``.
        state: initial ``(h, c)``, each ``(B, H)``; zeros if ``None``.
        reverse: run from the last step to the first (backward direction); the record
            is still indexed by input time.
        h_probe: optional ``(T, B, H)`` tensor added to ``h`` after every step, before
            it goes anywhere. Pass zeros that require grad: the gradient of a loss with
            respect to the probe is the total error ``dL/dh_t`` arriving at each step
            (from the layers above and back through the recurrence).

    Returns:
        A :class:`GateRecord` of ``(T, B, H)`` tensors. Differentiable: gradients flow
        to ``x`` and the weights.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be time-major (T, B, I), got shape {tuple(x.shape)}")
    hidden = weights.weight_hh.shape[1]
    if state is None:
        zeros = x.new_zeros(x.shape[1], hidden)
        state = LSTMState(zeros, zeros)
    steps = x.flip(0) if reverse else x
    if h_probe is not None:
        if h_probe.shape != (x.shape[0], x.shape[1], hidden):
            raise ValueError(
                f"h_probe must have shape {(x.shape[0], x.shape[1], hidden)}, "
                f"got {tuple(h_probe.shape)}"
            )
        probes = (h_probe.flip(0) if reverse else h_probe).unbind(0)
    record: list[list[Tensor]] = [[] for _ in GateRecord._fields]
    for t, x_t in enumerate(steps.unbind(0)):
        pre = gate_preactivations(x_t, state.h, weights)
        gates = gate_activations(kind, pre, weights.forget)
        state = kind.pointwise(pre, state.c, weights.forget, None)
        if h_probe is not None:
            state = LSTMState(state.h + probes[t], state.c)
        for store, value in zip(record, (*gates, state.c, state.h)):
            store.append(value)
    stacked = (torch.stack(values) for values in record)
    if reverse:
        stacked = (values.flip(0) for values in stacked)
    return GateRecord(*stacked)


def record_module(
    module: nn.Module,
    x: Tensor,
    hx: tuple[Tensor, Tensor] | None = None,
    *,
    h_probes: dict[int, Tensor] | None = None,
) -> list[GateRecord]:
    """Record every layer and direction of a sequence module, without dropout.

    The module's dropouts are not applied (the record is of the module in eval mode).

    Args:
        module: an LSTM/SubLSTM/FixSubLSTM or ``torch.nn.LSTM``.
        x: time-major input ``(T, B, I)`` (also for ``batch_first`` modules).
        hx: optional ``(h_0, c_0)``, each ``(num_layers * D, B, H)``.
        h_probes: optional probes (see :func:`record_layer`) keyed by the index
            ``layer * D + direction``.

    Returns:
        One :class:`GateRecord` per layer and direction, in the order of ``h_n``
        (``layer * D + direction``).
    """
    kind = module_cell(module)
    if x.dim() != 3 or x.shape[-1] != module.input_size:
        raise ValueError(
            f"x must be time-major (T, B, {module.input_size}), got shape {tuple(x.shape)}"
        )
    directions = 2 if module.bidirectional else 1
    records: list[GateRecord] = []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            state = None if hx is None else LSTMState(hx[0][index], hx[1][index])
            weights = module_layer_weights(module, layer, reverse=direction == 1)
            probe = None if h_probes is None else h_probes.get(index)
            rec = record_layer(
                kind, weights, layer_input, state, reverse=direction == 1, h_probe=probe
            )
            records.append(rec)
            outputs.append(rec.h)
        layer_input = torch.cat(outputs, dim=-1)
    return records
