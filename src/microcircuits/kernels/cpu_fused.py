r"""Fused whole-sequence CPU kernel: one ``torch.autograd.Function`` per layer and direction.

What it does
------------
For one layer and direction of any of the three cells (:data:`microcircuits.cells.CELLS`)

* **forward**: the input projection of the whole sequence is one GEMM
  (``gates = x W^T + b_ih + b_hh``, ``(T*B, G*H)``); each step then adds ``h R^T`` to
  its slice of ``gates`` (one GEMM per step) and applies the cell's equations (those of
  :mod:`microcircuits.cells`). Under ``torch.no_grad()`` (or when nothing needs a
  gradient) the Function is not used: only ``(h, c)`` and the output are kept, and the
  input is projected in chunks of at most ``_INFERENCE_CHUNK_BYTES``. In training the
  gate activations are written over the step's pre-activations and saved, with the
  memory ``(T+1, B, H)``, the output and the inputs; no per-step autograd graph.
* **backward**: written by hand from the paper's delta equations (Costa et al. 2017,
  section 3.1; the LSTM lines are the chain rule; also spelled out in
  :mod:`microcircuits.kernels.triton_pointwise`). Per step, from the saved activations:
  the read-out derivative ``S`` (``sigma(c)(1-sigma(c))``, with ``sigma(c_t) = h_t + o_t``
  for the subtractive cells; LSTM ``o(1-tanh(c)^2)``), ``dc = dc_next + dh S``,
  ``dpre = K * [dc, .., dc, dh]`` with the gate coefficients ``K`` (subLSTM ``-i(1-i)``,
  ``c_prev f(1-f)``, ``m z(1-z)``, ``-o(1-o)``), ``dc_next = dc f`` and one GEMM
  ``dh_{t-1} = dy_{t-1} + dpre_t R``. After the sweep the whole-sequence GEMMs
  ``dx = dpre W``, ``dW = dpre^T x``, ``dR = dpre^T h_prev``, ``db = sum dpre`` and
  fix-subLSTM's ``d phi = f(1-f) sum_t,b dc_t c_{t-1}``. Expanded output gradients (from
  ``y.sum()``) are never materialised; when the graph is not kept, ``dpre`` and the
  coefficients are written over the saved buffers instead of new ones.

Where the steps run
-------------------
* **The direct path** (float32, all three cells, x86 CPUs with AVX-512, the C++
  loops built): ``forward_direct``/``backward_direct`` in ``csrc/direct_steps.cpp``. A
  step is one call of oneDNN's brgemm micro-kernel, accumulating into the step's gate
  rows in place, and one vectorised pass for all of its pointwise work; the batch rows
  (or, for small batches, the hidden units) are split over torch's OpenMP threads, one
  team per layer call. ``step_backend`` tells whether a layer takes it;
  ``MICROCIRCUITS_DIRECT=0`` turns it off.
* **The ATen C++ loops** (the LSTM cell, float64, CPUs without AVX-512):
  ``forward_steps``, ``backward_steps`` and ``backward_subtractive``, a GEMM through ATen
  and a few plain loops per step.
* **The Python loops**: under ``torch.jit.trace``, a Python dispatch mode (fake
  tensors) or where no compiler built the C++ loops (:mod:`.native`). Every path is
  tested against the reference path.

GEMMs
-----
On AVX-512 CPUs every float32 product outside the direct path's steps runs on oneDNN
(MKL runs its AVX2 kernels on AMD CPUs), elsewhere on MKL (``torch.mm``) except large
per-step weights; weight gradients are computed as ``(x^T dpre)^T``. The choice, its
switches (``MICROCIRCUITS_ONEDNN_*``, ``MICROCIRCUITS_DIRECT``) and the products
themselves are in :mod:`.cpu_products`. oneDNN's RNN primitive (``torch.nn.LSTM``'s)
implements the LSTM equations only; the dispatcher uses it for
:class:`~microcircuits.LSTM` where the math is the same (:mod:`.aten_lstm`).

Threads
-------
On a shared machine every OpenMP parallel region risks a stall when another process
holds a core. The ATen loops therefore run their per-step pointwise ops on one thread
(``torch.set_num_threads(1)`` inside the loop) and only the GEMMs on all threads; the
direct path opens one parallel region per layer call, in which threads that split by
rows never wait for each other.

Memory and denormals
--------------------
Fresh buffers cost page faults, so backward reuses the saved buffers, inference reuses
one projection buffer (MKL's path) and ``grad_y`` is never materialised. Gradients
carried back through the memory decay like ``f^t`` and can spend many steps in the
float32 denormal range, where many x86 CPUs slow down by orders of magnitude: forward
and backward run under ``torch.set_flush_denormal(True)`` (restored after; the direct
path copies the mode to its worker threads), and float32 backward zeroes the carried
``dh`` and ``dc`` below ``_TINY`` (``1e-30``) so that denormals never chain.

Variable lengths: sequences are sorted by length (outside the Function, by
``index_select``, differentiable) so that step ``t`` runs on the first ``bs_t`` rows only
(as cuDNN/oneDNN do for packed sequences); a finished sequence's state is frozen and its
output is zero, as in :mod:`microcircuits.kernels.reference`.

Supported: float32 and float64 on CPU; gradients for the input, the initial state, both
weights, both biases (or none) and phi; ``update_mask`` ``(B, H)`` without gradient;
``lengths``; ``reverse``. :func:`unsupported_reason` says why a call does not qualify;
the dispatcher then falls back to the reference path. The hand-written backward is
first-order; asked for a graph (``create_graph=True``) the Function runs the layer again
on the reference path and returns autograd's gradients of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._autograd import graph_kept
from ..cells import CellKind, CellWeights, Gates, LSTMState, pointwise_inplace
from ._checks import call_tensors, common_unsupported_reason, off_cpu_reason
from ._projection import combined_bias
from .cpu_products import (
    Recurrent,
    direct_available,
    direct_blocking,
    gemm_backend,
    mm,
    native_loops,
    onednn_available,
    onednn_projection,
    projection,
    step_backend,
    weight_grad,
    whole_sequence_onednn,
)
from .reference import (
    lengths_of_batch_sizes,
    reference_layer_gradients,
    reverse_within_lengths,
)

__all__ = [
    "gemm_backend",
    "step_backend",
    "onednn_available",
    "run_layer_cpu_fused",
    "unsupported_reason",
]


_INFERENCE_CHUNK_BYTES = 16 << 20
_TINY = 1e-30  # float32 gradients below this are flushed to zero in backward
_SUPPORTED_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------- denormals

_PROBE = torch.tensor([1e-30], dtype=torch.float32)


def _flushing_denormals() -> bool:
    """Whether this thread flushes denormals now (1e-30 * 1e-10 is a float32 denormal)."""
    return bool((_PROBE * 1e-10).item() == 0.0)


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """``torch.set_flush_denormal(True)`` inside the block; the previous mode after."""
    was_on = _flushing_denormals()
    changed = False if was_on else torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


_sigmoid_bwd = torch.ops.aten.sigmoid_backward.grad_input
_tanh_bwd = torch.ops.aten.tanh_backward.grad_input


# ----------------------------------------------------------------- applicability


def unsupported_reason(
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None,
    update_mask: Tensor | None,
) -> str | None:
    """Why this kernel cannot run the call, or ``None`` when it can."""
    tensors = call_tensors(x, state, weights, update_mask)
    return off_cpu_reason(tensors) or common_unsupported_reason(
        x, tensors, lengths, update_mask, _SUPPORTED_DTYPES
    )


# ------------------------------------------------------------------ entry point


def run_layer_cpu_fused(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, LSTMState]:
    """Same contract as :func:`microcircuits.kernels.run_layer` (check
    :func:`unsupported_reason` first)."""
    steps, batch = x.shape[0], x.shape[1]
    batch_sizes: list[int] | None = None
    order = inverse = None
    if lengths is not None:
        lens = lengths.detach().to("cpu", torch.int64).clamp(0, steps)
        if bool((lens == steps).all()):
            lengths = None  # every sequence runs all steps
        else:
            if reverse:
                x = reverse_within_lengths(x, lens)
            sorted_lens, order = torch.sort(lens, descending=True, stable=True)
            if bool((order == torch.arange(batch)).all()):
                order = None
            else:
                inverse = torch.empty_like(order)
                inverse[order] = torch.arange(batch)
                x = x.index_select(1, order)
                state = LSTMState(state.h.index_select(0, order), state.c.index_select(0, order))
                if update_mask is not None:
                    update_mask = update_mask.index_select(0, order)
            counts = torch.bincount(sorted_lens, minlength=steps + 1)  # sequences per length
            alive = batch - torch.cumsum(counts, 0)  # alive[t] = #(len > t)
            batch_sizes = alive[:steps].tolist()
    if lengths is None and reverse:
        x = x.flip(0)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, state.h, state.c, *weights)
    )
    if needs_grad:
        out, h_n, c_n = _FusedLayer.apply(
            kind,
            batch_sizes,
            x,
            state.h,
            state.c,
            weights.weight_ih,
            weights.weight_hh,
            weights.bias_ih,
            weights.bias_hh,
            weights.forget,
            update_mask,
        )
    else:
        with torch.no_grad():
            out, h_n, c_n = _forward_inference(kind, batch_sizes, x, state, weights, update_mask)

    if lengths is None:
        if reverse:
            out = out.flip(0)
    else:
        if inverse is not None:
            out = out.index_select(1, inverse)
            h_n, c_n = h_n.index_select(0, inverse), c_n.index_select(0, inverse)
        if reverse:
            out = reverse_within_lengths(out, lengths.detach().to("cpu").clamp(0, steps))
    return out, LSTMState(h_n, c_n)


# ------------------------------------------------------------------- inference


def _forward_inference(
    kind: CellKind,
    batch_sizes: list[int] | None,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """No-grad forward: keeps ``(h, c)`` and the output only."""
    steps, batch, in_size = x.shape
    hidden = state.h.shape[-1]
    gate_rows = weights.weight_hh.shape[0]
    # fix-subLSTM's decay sigma(phi), once per sequence
    decay = None if weights.forget is None else torch.sigmoid(weights.forget.detach())
    bias = combined_bias(weights)
    chunk = max(1, _INFERENCE_CHUNK_BYTES // max(1, batch * gate_rows * x.element_size()))
    loops = native_loops(x, state.h, state.c, weights.weight_hh, mask)
    direct = direct_available(x.dtype, loops)
    rec = Recurrent(weights.weight_hh, batch, forward=True, backward=False, direct=direct)
    # the step works in place (cells.pointwise_inplace, or the C++ loops): c is a private
    # copy, and h is read from the output y[t] (Python loops, full batch) or kept in its
    # own buffer (packed sequences, the C++ loops)
    h, c = state.h.detach(), state.c.detach().clone(memory_format=torch.contiguous_format)
    if batch_sizes is None:
        y = x.new_empty(steps, batch, hidden)
    else:
        y = x.new_zeros(steps, batch, hidden)
    h_owned = batch_sizes is not None or loops is not None
    if h_owned:
        h = h.clone(memory_format=torch.contiguous_format)
    mask_rows = None if mask is None else mask.contiguous()
    chunk = min(chunk, steps)
    buffer = None  # MKL's projection: one buffer, reused (fresh pages cost page faults)
    if not onednn_projection(x.dtype, in_size):
        buffer = x.new_empty(chunk * batch, gate_rows)
    with _flush_denormals():
        for start in range(0, steps, chunk):
            stop = min(steps, start + chunk)
            n = stop - start
            gates = projection(
                x[start:stop].reshape(n * batch, in_size),
                weights.weight_ih,
                bias,
                out=None if buffer is None else buffer[: n * batch],
            ).view(n, batch, gate_rows)
            if direct:
                loops.forward_direct(
                    kind.code, gates, h, c, y[start:stop], rec.w_fwd, decay, mask_rows, False,
                    [] if batch_sizes is None else batch_sizes[start:stop],
                    *direct_blocking(),
                )  # fmt: skip
                continue
            if loops is not None:
                loops.forward_steps(
                    kind.code, gates, h, c, y[start:stop], rec.w_fwd, rec.onednn,
                    decay, mask_rows, False, rec.serial,
                    [] if batch_sizes is None else batch_sizes[start:stop],
                )  # fmt: skip
                continue
            with rec.loop():
                for t in range(start, stop):
                    if batch_sizes is None:
                        pre = rec.forward(h, gates[t - start])
                        pointwise_inplace(kind.name, pre, c, decay, mask, y[t])
                        h = y[t]
                        continue
                    bs = batch_sizes[t]
                    if bs == 0:
                        break
                    pre = rec.forward(h[:bs], gates[t - start, :bs])
                    m = None if mask is None else mask[:bs]
                    pointwise_inplace(kind.name, pre, c[:bs], decay, m, y[t, :bs])
                    h[:bs] = y[t, :bs]
    if not h_owned:
        h = h.clone()  # not a view of the output
    return y, h, c


# --------------------------------------------------------------------- training


def _gate_blocks(kind: CellKind, g: Gates) -> list[Tensor]:
    """The activations kept for backward, in the block order of the weights."""
    return [g.i, g.z, g.o] if kind.learned_decay else [g.i, g.f, g.z, g.o]


class _FusedLayer(torch.autograd.Function):
    """One layer and direction over a whole (left-aligned, length-sorted) sequence."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        kind: CellKind,
        batch_sizes: list[int] | None,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None,
        bias_hh: Tensor | None,
        phi: Tensor | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        steps, batch, in_size = x.shape
        hidden = h0.shape[-1]
        gate_rows = weight_hh.shape[0]
        weights = CellWeights(weight_ih, weight_hh, bias_ih, bias_hh, phi)
        x2d = x.reshape(steps * batch, in_size)
        loops = native_loops(x, h0, c0, weight_hh, phi, mask)
        direct = direct_available(x.dtype, loops)
        rec = Recurrent(weight_hh, batch, forward=True, backward=False, direct=direct)
        # pointwise's two halves, apart, so the activations are kept for backward
        activate, update = kind.activate, kind.update
        c_all = x.new_empty(steps + 1, batch, hidden)
        c_all[0] = c0
        with _flush_denormals():
            gates = projection(x2d, weight_ih, combined_bias(weights))
            gates = gates.view(steps, batch, gate_rows)
            act = gates.view(steps, batch, -1, hidden)  # pre-activations become activations
            with rec.loop(python=loops is None):
                if loops is not None:
                    if batch_sizes is None:
                        y = x.new_empty(steps, batch, hidden)
                    else:
                        y = x.new_zeros(steps, batch, hidden)
                    h_n = h0.detach().clone(memory_format=torch.contiguous_format)
                    decay = None if phi is None else torch.sigmoid(phi.detach())
                    mask_rows = None if mask is None else mask.contiguous()
                    sizes = [] if batch_sizes is None else batch_sizes
                    if direct:
                        loops.forward_direct(
                            kind.code, gates, h_n, c_all, y, rec.w_fwd, decay, mask_rows, True,
                            sizes, *direct_blocking(),
                        )  # fmt: skip
                    else:
                        loops.forward_steps(
                            kind.code, gates, h_n, c_all, y, rec.w_fwd, rec.onednn,
                            decay, mask_rows, True, rec.serial, sizes,
                        )  # fmt: skip
                    c_n = c_all[steps].clone()
                elif batch_sizes is None:
                    y = x.new_empty(steps, batch, hidden)
                    h, c = h0, c0
                    for t in range(steps):
                        g = activate(rec.forward(h, gates[t]), phi)
                        h, c = update(g, c, mask)
                        torch.stack(_gate_blocks(kind, g), dim=1, out=act[t])
                        y[t].copy_(h)
                        c_all[t + 1].copy_(c)
                    h_n, c_n = h, c
                else:
                    y = x.new_zeros(steps, batch, hidden)
                    h = h0.clone()
                    for t in range(steps):
                        bs = batch_sizes[t]
                        if bs == 0:
                            c_all[t + 1 :] = c_all[t]
                            break
                        g = activate(rec.forward(h[:bs], gates[t, :bs]), phi)
                        new_h, new_c = update(g, c_all[t, :bs], None if mask is None else mask[:bs])
                        torch.stack(_gate_blocks(kind, g), dim=1, out=act[t, :bs])
                        h[:bs] = new_h
                        y[t, :bs] = new_h
                        c_all[t + 1, :bs] = new_c
                        if bs < batch:
                            c_all[t + 1, bs:] = c_all[t, bs:]
                    h_n, c_n = h, c_all[steps].clone()
        ctx.kind = kind
        ctx.batch_sizes = batch_sizes
        # the call's own inputs last: only a backward with a graph reads them (references)
        ctx.save_for_backward(
            x2d, h0, weight_ih, weight_hh, phi, mask, gates, c_all, y, x, c0, bias_ih, bias_hh
        )
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference path
            return _FusedLayer._backward_with_graph(ctx, grad_y, grad_hn, grad_cn)
        return _FusedLayer._backward_first_order(ctx, grad_y, grad_hn, grad_cn)

    @staticmethod
    def _backward_with_graph(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        """Gradients that carry a graph (second order), from the reference path."""
        _, h0, weight_ih, weight_hh, phi, mask, _, _, _, x, c0, bias_ih, bias_hh = ctx.saved_tensors
        batch_sizes: list[int] | None = ctx.batch_sizes
        lengths = None
        if batch_sizes is not None:
            lengths = lengths_of_batch_sizes(batch_sizes, x.shape[1], x.device)
        grads = reference_layer_gradients(
            ctx.kind,
            x,
            LSTMState(h0, c0),
            CellWeights(weight_ih, weight_hh, bias_ih, bias_hh, phi),
            lengths,
            mask,
            (grad_y, grad_hn, grad_cn),
            ctx.needs_input_grad[2:10],
        )
        return (None, None, *grads, None)

    @staticmethod
    @once_differentiable
    def _backward_first_order(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        x2d, h0, weight_ih, weight_hh, phi, mask, act, c_all, y = ctx.saved_tensors[:9]
        kind: CellKind = ctx.kind
        batch_sizes: list[int] | None = ctx.batch_sizes
        steps, batch, gate_rows = act.shape
        hidden, in_size = h0.shape[-1], x2d.shape[-1]
        num_gates = gate_rows // hidden
        needs = ctx.needs_input_grad
        flush = act.dtype == torch.float32
        with _flush_denormals():
            in_place = not graph_kept()
            decay = None if phi is None else torch.sigmoid(phi)  # fix-subLSTM's f
            # the tensors the C++ loop reads, as forward checks them
            loops = native_loops(act, c_all, y, weight_hh, decay, mask, grad_y, grad_hn, grad_cn)
            direct = direct_available(act.dtype, loops) and grad_y.dtype == torch.float32
            if kind.name == "lstm" and not direct:
                loops = None  # backward_subtractive has the subtractive cells only
            rec = Recurrent(weight_hh, batch, forward=False, backward=True, direct=direct)
            phi_sum = dc_all = None
            if loops is not None:  # the subtractive cells' whole recurrence in C++
                dpre = act if in_place else act.clone()  # the activations become dpre
                # the carried dh and dc (dh0 and dc0 on exit); each row's output gradient
                # joins dh at its sequence's last step
                dh0 = grad_hn.clone(memory_format=torch.contiguous_format)
                dc0 = grad_cn.clone(memory_format=torch.contiguous_format)
                if needs[9]:
                    phi_sum = act.new_zeros(hidden, dtype=torch.float64)
                mask_rows = None if mask is None else mask.contiguous()
                sizes = [] if batch_sizes is None else batch_sizes
                if direct:
                    loops.backward_direct(
                        kind.code, dpre, c_all, y, decay, mask_rows, rec.w_bwd, grad_y, dh0,
                        dc0, phi_sum, needs[3], flush, _TINY, sizes, *direct_blocking(),
                    )  # fmt: skip
                else:
                    loops.backward_subtractive(
                        kind.code, dpre, c_all, y, decay, mask_rows, rec.w_bwd, rec.onednn,
                        grad_y, dh0, dc0, phi_sum, needs[3], flush, _TINY, rec.serial, sizes,
                    )  # fmt: skip
            else:
                coef, readout, forget = _backward_coefficients(
                    kind, act, c_all, mask, decay, in_place
                )
                dpre, dh0, dc0, dc_all = _reverse_sweep(
                    kind,
                    batch_sizes,
                    coef,
                    readout,
                    forget,
                    rec,
                    grad_y,  # often expanded (e.g. from .sum()): not materialised
                    grad_hn,
                    grad_cn,
                    need_dh0=needs[3],
                    flush=flush,
                )
                del coef
            if batch_sizes is not None:  # steps past a sequence's end: no gradient
                inactive = _inactive_mask(batch_sizes, batch, act.device)
                dpre.view(steps, batch, num_gates, hidden).masked_fill_(inactive[..., None], 0.0)
                if dc_all is not None:
                    dc_all.masked_fill_(inactive, 0.0)
            d2 = dpre.view(steps * batch, gate_rows)
            dnn = whole_sequence_onednn(d2.dtype)
            grad_x = None
            if needs[2]:
                grad_x = mm(d2, weight_ih.detach(), dnn).view(steps, batch, -1)
            need_b = needs[7] or needs[8]
            grad_w_ih = grad_b = None
            if needs[5] and need_b and in_size <= _FUSED_BIAS_MAX_INPUT:
                # db = dpre^T 1 rides along in the dW_ih product (one pass over dpre)
                ones = x2d.new_ones(steps * batch, 1)
                both = weight_grad(d2, torch.cat([x2d, ones], dim=1), onednn=dnn)
                grad_w_ih, grad_b = both[:, :in_size], both[:, in_size]
            elif needs[5]:
                grad_w_ih = weight_grad(d2, x2d, onednn=dnn)
            if need_b and grad_b is None:
                grad_b = d2.sum(0)
            grad_w_hh = None
            if needs[6]:  # h_{t-1} of every step: h0, then the outputs (see _inactive_mask)
                prev = y[:-1].reshape((steps - 1) * batch, hidden)
                grad_w_hh = weight_grad(dpre[0], h0, d2[batch:], prev, onednn=dnn)
            grad_phi = None
            if needs[9]:
                if phi_sum is not None:
                    total = phi_sum.to(phi.dtype)
                else:
                    total = (dc_all * c_all[:-1]).sum((0, 1))
                grad_phi = total * decay * (1 - decay)
        return (
            None,
            None,
            grad_x,
            dh0 if needs[3] else None,
            dc0 if needs[4] else None,
            grad_w_ih,
            grad_w_hh,
            grad_b if needs[7] else None,
            grad_b if needs[8] else None,
            grad_phi,
            None,
        )


_FUSED_BIAS_MAX_INPUT = 64  # up to this input size db joins the dW_ih product


def _inactive_mask(batch_sizes: list[int], batch: int, device: torch.device) -> Tensor:
    """``(T, B, 1)`` bool: step ``t`` is past the end of (sorted) sequence ``b``."""
    sizes = torch.tensor(batch_sizes, device=device)
    return (torch.arange(batch, device=device)[None, :] >= sizes[:, None]).unsqueeze(-1)


def _backward_coefficients(
    kind: CellKind,
    act: Tensor,
    c_all: Tensor,
    mask: Tensor | None,
    decay: Tensor | None,
    in_place: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Whole-sequence parts of backward (``decay``: fix-subLSTM's ``sigma(phi)``, else None).

    Returns ``K`` ``(T, B, G*H)`` with ``dpre = K * [dc, .., dc, dh]`` per gate block (the
    last block, o, takes ``dh``; the others ``dc``), ``S`` ``(T, B, H)`` with ``dc = dc_next
    + dh * S``, and the decay ``f`` (``(T, B, H)``, or ``(H,)`` for fix-subLSTM).

    With ``in_place`` (the graph is not kept after this backward) ``K`` is written over
    the saved activations and, for subLSTM, ``S`` over the saved memory, instead of into
    new buffers: fresh memory costs page faults (~0.5 ms per MB here), as much as the
    arithmetic on it.
    """
    steps, batch, gate_rows = act.shape
    hidden = c_all.shape[-1]
    a4 = act.view(steps, batch, -1, hidden)
    c_new, c_prev = c_all[1:], c_all[:-1]
    coef = act if in_place else torch.empty_like(act)
    k4 = coef.view(steps, batch, -1, hidden)
    one, minus_one = act.new_tensor(1.0), act.new_tensor(-1.0)
    # sigmoid_backward(g, y) = g y (1 - y), tanh_backward(g, y) = g (1 - y^2): one pass each
    if kind.name == "lstm":
        i, f, g, o = a4.unbind(2)
        k_i, k_f, k_z, k_o = k4.unbind(2)
        forget = f.clone() if in_place else f
        tanh_c = torch.tanh(c_new)
        readout = torch.ops.aten.tanh_backward(o, tanh_c)  # o (1 - tanh(c)^2)
        g_m = g * mask if mask is not None else (g.clone() if in_place else g)
        _tanh_bwd(i if mask is None else i * mask, g, grad_input=k_z)  # i m (1 - g^2)
        _sigmoid_bwd(g_m, i, grad_input=k_i)  # g m i (1 - i)
        _sigmoid_bwd(c_prev, f, grad_input=k_f)  # c_prev f (1 - f)
        _sigmoid_bwd(tanh_c, o, grad_input=k_o)  # tanh(c) o (1 - o)
        return coef, readout, forget
    sub = kind.name == "sublstm"
    if sub:  # blocks (i, f, z, o)
        forget = a4[:, :, 1].clone() if in_place else a4[:, :, 1]
        _sigmoid_bwd(c_prev, a4[:, :, 1], grad_input=k4[:, :, 1])  # f: c_prev f (1 - f)
    else:  # fix-subLSTM: blocks (i, z, o), f = sigma(phi) constant
        forget = decay
    z = 2 if sub else 1
    _sigmoid_bwd(minus_one, a4[:, :, 0], grad_input=k4[:, :, 0])  # i: -i (1 - i)
    _sigmoid_bwd(one if mask is None else mask, a4[:, :, z], grad_input=k4[:, :, z])  # m z(1-z)
    _sigmoid_bwd(minus_one, a4[:, :, -1], grad_input=k4[:, :, -1])  # o: -o (1 - o)
    # fix-subLSTM's phi gradient reads c after the sweep, so only subLSTM reuses c_all
    readout = torch.sigmoid(c_new, out=c_new) if (in_place and sub) else torch.sigmoid(c_new)
    _sigmoid_bwd(one, readout, grad_input=readout)  # sigma(c) (1 - sigma(c))
    return coef, readout, forget


def _reverse_sweep(
    kind: CellKind,
    batch_sizes: list[int] | None,
    coef: Tensor,
    readout: Tensor,
    forget: Tensor,
    rec: Recurrent,
    grad_y: Tensor,
    grad_hn: Tensor,
    grad_cn: Tensor,
    *,
    need_dh0: bool,
    flush: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The recurrent part of backward, one GEMM and a few pointwise ops per step.

    ``coef`` becomes ``dpre`` in place; ``readout`` becomes ``dc`` of every step in place
    (returned for fix-subLSTM's phi gradient, else ``None``).
    """
    steps, batch, gate_rows = coef.shape
    hidden = readout.shape[-1]
    k4 = coef.view(steps, batch, -1, hidden)
    per_step_forget = forget.dim() == 3
    # the carried dh (rows not reached yet keep grad_hn) and dc_next (already times f)
    dh = grad_hn.clone(memory_format=torch.contiguous_format)
    dc_carry = grad_cn.clone(memory_format=torch.contiguous_format)
    loops = rec.native(coef, readout, grad_y, grad_hn, grad_cn)
    with rec.loop(python=loops is None):
        if loops is not None:
            loops.backward_steps(
                coef, readout, forget if per_step_forget else forget.expand(steps, batch, hidden),
                rec.w_bwd, rec.onednn, grad_y, dh, dc_carry, need_dh0, flush, _TINY, rec.serial,
                [] if batch_sizes is None else batch_sizes,
            )  # fmt: skip
        elif batch_sizes is None:
            dh += grad_y[steps - 1]
            for t in range(steps - 1, -1, -1):
                dc = torch.addcmul(dc_carry, dh, readout[t], out=readout[t])
                k4[t, :, :-1].mul_(dc.unsqueeze(1))
                k4[t, :, -1].mul_(dh)
                dc_carry = dc * (forget[t] if per_step_forget else forget)
                if flush:
                    dc_carry = torch.hardshrink(dc_carry, _TINY)
                if t > 0 or need_dh0:
                    # dh no longer needed: the BLAS path may write the next one over it
                    dh = rec.backward(coef[t], grad_y[t - 1] if t > 0 else None, dh)
                    if flush:
                        dh = torch.hardshrink(dh, _TINY)
        else:
            prev_bs = 0  # rows active at step t + 1
            for t in range(steps - 1, -1, -1):
                bs = batch_sizes[t]
                if bs == 0:
                    continue
                if bs > prev_bs:  # sequences whose last step is t: their dy enters here
                    dh[prev_bs:bs] += grad_y[t, prev_bs:bs]
                dh_t, carry_t = dh[:bs], dc_carry[:bs]
                dc = torch.addcmul(carry_t, dh_t, readout[t, :bs], out=readout[t, :bs])
                k4[t, :bs, :-1].mul_(dc.unsqueeze(1))
                k4[t, :bs, -1].mul_(dh_t)
                torch.mul(dc, forget[t, :bs] if per_step_forget else forget, out=carry_t)
                if flush:
                    carry_t.copy_(torch.hardshrink(carry_t, _TINY))
                if t > 0 or need_dh0:
                    new = rec.backward(coef[t, :bs], grad_y[t - 1, :bs] if t > 0 else None, dh_t)
                    if flush:
                        new = torch.hardshrink(new, _TINY)
                    if new is not dh_t:
                        dh_t.copy_(new)
                prev_bs = bs
    dh0 = dh if need_dh0 else None
    dc_all = readout if kind.learned_decay else None
    return coef, dh0, dc_carry, dc_all
