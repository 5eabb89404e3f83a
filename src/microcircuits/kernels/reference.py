"""Reference path: a whole layer run step by step with the functions of ``cells.py``.

Readable, differentiable by autograd, and the oracle every fast kernel is tested
against. Variable lengths are handled by freezing a sequence's state after its last
step (its output there is zero, as ``pad_packed_sequence`` gives for padding).

It is also the one path for projected hidden states (``proj_size > 0``, ``weight_hr``)
where ATen's LSTM cannot take the call (the subtractive cells, update dropout, variable
lengths): correct, differentiable to any order, and slow (a few torch ops per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..cells import CellKind, CellWeights, LSTMState


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``x`` ``(T, B, ...)`` in time within its own length.

    Padding steps (``t >= lengths[b]``) stay where they are. The map is its own
    inverse, so the same call undoes it.
    """
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    t = torch.arange(steps, device=x.device).unsqueeze(1)  # (T, 1)
    lens = lengths.to(x.device).unsqueeze(0)  # (1, B)
    index = torch.where(t < lens, lens - 1 - t, t)  # (T, B)
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(0, index)


def run_layer_reference(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, LSTMState]:
    """Run one layer and direction forward in time.

    Args:
        kind: which cell.
        x: input ``(T, B, I)``.
        state: initial ``(h, c)``, ``(B, P)`` and ``(B, H)`` (``P = H`` without a
            projection).
        weights: the layer's parameters (``weight_hh`` ``(G*H, P)``).
        lengths: optional valid length of each sequence ``(B,)``; ``None`` means all ``T``.
        update_mask: optional update-dropout mask ``(B, H)``, fixed over time.
        weight_hr: optional projection ``(P, H)`` of the hidden state, as
            ``torch.nn.LSTM``'s ``weight_hr_l{k}`` (``proj_size > 0``): each step's
            ``h`` (the cell's read-out) becomes ``weight_hr @ h``, which is the output and
            the ``h`` fed back.

    Returns:
        ``output`` ``(T, B, P)`` and the state after each sequence's last valid step.
    """
    outputs = []
    active_at = None
    if lengths is not None:
        # (T, B, 1) booleans: is step t inside sequence b?
        steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        active_at = (steps < lengths.to(x.device).unsqueeze(0)).unsqueeze(-1)
    for t, x_t in enumerate(x.unbind(0)):  # unbind, not x[t]: keeps backward linear in T
        h, new = kind.step(x_t, state, weights, update_mask)
        if weight_hr is not None:
            h = torch.nn.functional.linear(h, weight_hr)
            new = LSTMState(h, new.c)
        if active_at is not None:
            active = active_at[t]
            new = LSTMState(
                torch.where(active, new.h, state.h), torch.where(active, new.c, state.c)
            )
            h = torch.where(active, h, torch.zeros_like(h))
        state = new
        outputs.append(h)
    if not outputs:
        return x.new_zeros(x.shape[:2] + (state.h.shape[-1],)), state
    return torch.stack(outputs), state


def reference_layer_gradients(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None,
    update_mask: Tensor | None,
    grads: tuple[Tensor, Tensor, Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Gradients of one layer call, recomputed on this path with a graph of their own.

    For the hand-written backwards of the fused kernels when the autograd engine asks for
    a graph (``create_graph=True``: Hessian-vector products, gradient penalties): the
    layer runs again from the call's own inputs (connected to their graph) and autograd
    differentiates the step functions, so the gradients returned are differentiable
    again. The first-order backwards never come here.

    Args:
        kind, x, state, weights, lengths, update_mask: the layer call, as
            :func:`run_layer_reference` takes it (``x`` in the order it was run).
        grads: gradients of ``output`` ``(T, B, H)``, ``h_n`` and ``c_n`` ``(B, H)``.
        needs: whether each of ``x``, ``h0``, ``c0``, ``weight_ih``, ``weight_hh``,
            ``bias_ih``, ``bias_hh``, ``forget`` wants a gradient.

    Returns:
        One gradient (or ``None``) per entry of ``needs``.
    """
    inputs = [x, state.h, state.c, *weights]
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    result: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return result
    with torch.enable_grad():
        output, final = run_layer_reference(kind, x, state, weights, lengths, update_mask)
        got = torch.autograd.grad(
            (output, final.h, final.c),
            [inputs[i] for i in wanted],
            grads,
            create_graph=True,
            allow_unused=True,
        )
    for i, grad in zip(wanted, got):
        result[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return result


def lengths_of_batch_sizes(batch_sizes: Sequence[int], batch: int, device: torch.device) -> Tensor:
    """Lengths ``(B,)`` of length-sorted sequences from the rows alive at each step."""
    sizes = torch.tensor(list(batch_sizes), device=device)  # (T,)
    return (sizes[:, None] > torch.arange(batch, device=device)[None, :]).sum(0)
