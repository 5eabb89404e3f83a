"""Fused whole-sequence GPU kernel: cuBLAS GEMMs and one Triton pointwise launch per step.

One ``torch.autograd.Function`` per layer and direction, for the three cells, composed
exactly as the docstring of :mod:`microcircuits.kernels.triton_pointwise` lays out:

* forward: the input projection of the whole sequence is one GEMM (``gates = x W^T +
  b``, ``(T, B, G*H)``); each step adds ``h R^T`` to its slice in place (cuBLAS) and
  runs the cell's pointwise work in one kernel, which writes the gate activations over
  the step's pre-activations, the memory into ``cbuf[t+1]`` and the output into ``y[t]``.
  Saved: ``gates`` (now activations), ``cbuf`` ``(T+1, B, H)``, ``y``, the inputs: what
  cuDNN keeps in its reserve space, no per-step autograd graph.
* backward: one pointwise kernel per step (the paper's delta equations, writing the gate
  gradients over the saved activations) and one GEMM (``dh_{t-1} = dpre_t R``), then
  ``dx``, ``dW``, ``dR``, ``db`` as whole-sequence GEMMs/reductions and fix-subLSTM's
  ``d phi`` from the kernel's running accumulator. Over a copy of the activations when
  the graph is kept (``retain_graph``), so backward can run again.
* inference (``torch.no_grad``): no activations are stored; ``c`` is updated in place.

Variable lengths run left-aligned with a per-step ``active`` row mask (a finished
sequence's state is frozen and its output zero, as in
:mod:`microcircuits.kernels.reference`); ``reverse`` reverses each sequence within its
length outside the Function.

The per-step pointwise work runs on Triton's kernels (:func:`~.triton_pointwise.pointwise_forward`
and ``pointwise_backward``) when Triton can run on the tensors' device (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``), otherwise on their PyTorch twins, which have the
same signature and aliasing rules. The dispatcher (``"auto"``) only takes this kernel for
CUDA tensors with Triton installed; the twins make the same composition testable on any
machine (``run_layer_gpu_fused(..., pointwise="torch")``).

Performance notes (not measured: the sessions that wrote this had no GPU). Each step is
two launches forward and two backward, like cuDNN's non-persistent algorithm; the
whole-sequence GEMMs are as large as cuDNN's. Large layers (workload D) are GEMM-bound.
Small ones are launch-bound: the step loop validates its buffers once and then calls
``pointwise_*_unchecked``, whose Python side costs 8-12 us per step (measured with the
launch stubbed; the checked wrappers took 67-93 us, mostly in ``triton.cdiv`` and
``next_power_of_2`` called from Python), plus Triton's own launch. CUDA graphs over the
step loop are the next remedy if the benchmark shows launches dominate. Note TF32:
cuDNN's RNNs use TF32 by default, ``torch.mm`` does not; compare like for like
(``benchmarks/rnn.py --tf32``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._autograd import graph_kept
from ..cells import CellKind, CellWeights, LSTMState
from . import triton_pointwise as tp
from ._checks import call_tensors, common_unsupported_reason
from ._projection import combined_bias, input_projection
from .reference import reference_layer_gradients, reverse_within_lengths

__all__ = ["POINTWISE_IMPLS", "run_layer_gpu_fused", "unsupported_reason"]

POINTWISE_IMPLS = ("auto", "triton", "torch")
_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def unsupported_reason(
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None,
    update_mask: Tensor | None,
) -> str | None:
    """Why the dispatcher cannot give this call to the GPU kernel, or ``None`` if it can."""
    if not tp.TRITON_AVAILABLE:
        return "Triton is not installed (pip install triton)"
    tensors = call_tensors(x, state, weights, update_mask)
    for t in tensors:
        if t.device != x.device:
            return f"tensors on {t.device} and {x.device}"
    # the common checks first: under torch.compile they answer before Triton's own
    # environment lookups, which dynamo cannot trace (a graph break and a warning)
    reason = common_unsupported_reason(x, tensors, lengths, update_mask, _SUPPORTED_DTYPES)
    if reason is None and not tp.triton_available(x.device):
        reason = f"the input is on {x.device}, not a CUDA device (and TRITON_INTERPRET is off)"
    return reason


def _pointwise(device: torch.device, impl: str) -> tuple[Callable, Callable]:
    """The (forward, backward) step functions: Triton's kernels or their PyTorch twins."""
    if impl not in POINTWISE_IMPLS:
        raise ValueError(f"pointwise must be one of {list(POINTWISE_IMPLS)}, got {impl!r}")
    if impl == "triton" or (impl == "auto" and tp.triton_available(device)):
        # buffers are validated once per sequence (run_layer_gpu_fused), not per step
        tp._require_triton(device)
        return tp.pointwise_forward_unchecked, tp.pointwise_backward_unchecked
    return tp.pointwise_forward_torch, tp.pointwise_backward_torch


class _GPUFusedLayer(torch.autograd.Function):
    """One layer and direction over a whole left-aligned sequence (see module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        kind: CellKind,
        impl: str,
        active: Tensor | None,
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
        fwd, _ = _pointwise(x.device, impl)
        bias = combined_bias(CellWeights(weight_ih, weight_hh, bias_ih, bias_hh, phi))
        x2d = x.reshape(steps * batch, in_size)
        gates = input_projection(x2d, weight_ih, bias).view(steps, batch, -1)
        cbuf = x.new_empty(steps + 1, batch, hidden)
        cbuf[0] = c0
        y = x.new_empty(steps, batch, hidden)
        h = h0.detach().clone() if active is not None else h0.detach()
        h = _loop_forward(fwd, kind, gates, cbuf, y, h, weight_hh, phi, mask, active, True)
        ctx.kind, ctx.impl = kind, impl
        # the call's own inputs last: only a backward with a graph reads them (references)
        ctx.save_for_backward(
            x2d, h0, weight_ih, weight_hh, phi, mask, active, gates, cbuf, y,
            x, c0, bias_ih, bias_hh,
        )  # fmt: skip
        return y, h.clone(), cbuf[steps].clone()

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference path
            return _GPUFusedLayer._backward_with_graph(ctx, grad_y, grad_hn, grad_cn)
        return _GPUFusedLayer._backward_first_order(ctx, grad_y, grad_hn, grad_cn)

    @staticmethod
    def _backward_with_graph(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        """Gradients that carry a graph (second order), from the reference path."""
        saved = ctx.saved_tensors
        h0, weight_ih, weight_hh, phi, mask, active = saved[1:7]
        x, c0, bias_ih, bias_hh = saved[10:]
        grads = reference_layer_gradients(
            ctx.kind,
            x,
            LSTMState(h0, c0),
            CellWeights(weight_ih, weight_hh, bias_ih, bias_hh, phi),
            None if active is None else active.sum(0),
            mask,
            (grad_y, grad_hn, grad_cn),
            ctx.needs_input_grad[3:11],
        )
        return (None, None, None, *grads, None)

    @staticmethod
    @once_differentiable
    def _backward_first_order(ctx, grad_y: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        x2d, h0, weight_ih, weight_hh, phi, mask, active, gates, cbuf, y = ctx.saved_tensors[:10]
        kind: CellKind = ctx.kind
        _, bwd = _pointwise(gates.device, ctx.impl)
        steps, batch, gate_rows = gates.shape
        hidden = h0.shape[-1]
        needs = ctx.needs_input_grad
        work = gates.clone() if graph_kept() else gates  # becomes d pre, step by step
        dy = grad_y.contiguous()  # often an expanded view (e.g. of out.sum())
        dh, dc = grad_hn.clone(), grad_cn.clone()
        dphi = gates.new_zeros(batch, hidden) if kind.learned_decay else None
        w_hh = weight_hh.detach()
        for t in range(steps - 1, -1, -1):
            a_t = None if active is None else active[t]
            r = bwd(
                kind, work[t], cbuf[t], cbuf[t + 1], phi, mask, a_t, dh, dc,
                grad_out=dy[t], grad_pre=work[t], grad_c_prev=dc, grad_h_carry=dh,
                grad_phi_accum=dphi,
            )  # fmt: skip
            dc = r.grad_c_prev
            if a_t is None:
                dh = torch.mm(work[t], w_hh)
            else:
                dh = r.grad_h_carry.addmm_(work[t], w_hh)
        dpre = work.view(steps * batch, gate_rows)
        grad_x = torch.mm(dpre, weight_ih.detach()).view(steps, batch, -1) if needs[3] else None
        grad_w_ih = dpre.t().mm(x2d) if needs[6] else None
        grad_w_hh = None
        if needs[7]:
            h_prev = torch.cat([h0.detach()[None], y[:-1]]).view(steps * batch, hidden)
            grad_w_hh = dpre.t().mm(h_prev)
        grad_b = dpre.sum(0) if (needs[8] or needs[9]) else None
        grad_phi = dphi.sum(0) if (dphi is not None and needs[10]) else None
        return (
            None,
            None,
            None,
            grad_x,
            dh if needs[4] else None,
            dc if needs[5] else None,
            grad_w_ih,
            grad_w_hh,
            grad_b if needs[8] else None,
            grad_b if needs[9] else None,
            grad_phi,
            None,
        )


def _loop_forward(fwd, kind, gates, cbuf, y, h, weight_hh, phi, mask, active, store: bool):
    """The step loop of forward; returns the final ``h``.

    ``cbuf`` is ``(T+1, B, H)`` in training (every step's memory, kept for backward) or
    ``(1, B, H)`` in inference (one memory, updated in place).
    """
    r_t = weight_hh.detach().t()
    phi = None if phi is None else phi.detach()
    for t in range(gates.shape[0]):
        a_t = None if active is None else active[t]
        pre = gates[t].addmm_(h, r_t)
        c_prev, c_new = (cbuf[t], cbuf[t + 1]) if store else (cbuf[0], cbuf[0])
        r = fwd(
            kind, pre, c_prev, phi, mask, a_t,
            h_prev=h, act=pre if store else None, c=c_new, out=y[t],
            h=h if a_t is not None else y[t], store_act=store,
        )  # fmt: skip
        h = r.h
    return h


def run_layer_gpu_fused(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    reverse: bool = False,
    *,
    pointwise: str = "auto",
) -> tuple[Tensor, LSTMState]:
    """Same contract as :func:`microcircuits.kernels.run_layer`.

    Args:
        pointwise: ``"triton"`` (the fused kernels; CUDA, or CPU under
            ``TRITON_INTERPRET=1``), ``"torch"`` (their PyTorch twins, any device) or
            ``"auto"`` (Triton where it can run, else the twins).
    """
    fwd, _ = _pointwise(x.device, pointwise)  # also validates the name early
    steps, batch = x.shape[0], x.shape[1]
    active = None
    if lengths is not None:
        lens = lengths.detach().to(x.device, torch.int64).clamp(0, steps)
        if bool((lens == steps).all()):
            lengths = None
        else:
            active = torch.arange(steps, device=x.device)[:, None] < lens[None, :]  # (T, B)
            lengths = lens
    if reverse:
        x = reverse_within_lengths(x, lengths)
    # Once per sequence what the Triton wrappers would check per step: one device, last
    # dimensions contiguous (the buffers the Function allocates are contiguous already).
    for name, t in (("h0", state.h), ("c0", state.c), ("update_mask", update_mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the input on {x.device}")
    state = LSTMState(state.h.contiguous(), state.c.contiguous())
    update_mask = None if update_mask is None else update_mask.detach().contiguous()
    phi = weights.forget
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, state.h, state.c, *weights)
    )
    if needs_grad:
        out, h_n, c_n = _GPUFusedLayer.apply(
            kind, pointwise, active, x, state.h, state.c,
            weights.weight_ih, weights.weight_hh, weights.bias_ih, weights.bias_hh,
            phi, update_mask,
        )  # fmt: skip
    else:
        with torch.no_grad():
            x2d = x.reshape(steps * batch, x.shape[2])
            gates = input_projection(x2d, weights.weight_ih, combined_bias(weights))
            gates = gates.view(steps, batch, -1)
            cbuf = state.c.detach().clone()[None]
            out = x.new_empty(steps, batch, state.h.shape[-1])
            # with lengths h is the state buffer, updated in place; else only read
            h = state.h.detach().clone() if active is not None else state.h.detach()
            h = _loop_forward(
                fwd, kind, gates, cbuf, out, h, weights.weight_hh, phi, update_mask, active, False
            )
            h_n, c_n = h.clone(), cbuf[0]
    if reverse:
        out = reverse_within_lengths(out, lengths)
    return out, LSTMState(h_n, c_n)
