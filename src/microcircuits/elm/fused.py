r"""Fused whole-sequence CPU path of the ELM neuron: no per-step autograd graph.

The reference loop (:meth:`microcircuits.elm.ELM.forward` over
:func:`~microcircuits.elm.equations.elm_state_step`) records a dozen autograd nodes per
step; on the published shapes (a Branch-ELM with 20 memory units and a batch of 8) the
recording and replaying of that graph, not the arithmetic, is most of the time
(measurements: ``benchmarks/NOTES.md``, "ELM neuron"). This path computes the same
function in three parts:

1. **Time-independent work, whole sequence at once, plain autograd ops.** The synaptic
   drive of every step (:func:`~microcircuits.elm.equations.synaptic_drive`), summed per
   branch; the branch part of the MLP's first layer for every step as one GEMM,
   ``pre_t = W_0[:, :N] b_t + b_0`` ``(T, B, H_0)``; after the loop the readout of all
   memories as one GEMM. In version 1 the trace is per synapse, but with one decay for
   all synapses (the only case the constructor makes) its branch sums follow the same
   recursion as the synapses, ``b_t = k b_{t-1} + sum_branch(w_s x_t)``, so only the branch
   trace runs step by step; the final per-synapse trace is the closed form
   ``s_T = k^T s_0 + sum_t k^{T-t} w_s x_t`` (one reduction over time).
2. **The branch trace** ``b_t = k_b b_{t-1} + d_t`` (:class:`_BranchTrace`): a linear
   scan, with the transposed scan ``g_t = dL/db_t + k_b g_{t+1}`` as its backward.
3. **The memory recursion** (:class:`_MemoryLoop`), the only nonlinear recurrence: per
   step ``a_0 = pre_t + W_0[:, N:] (k_m m_{t-1})``, the remaining MLP layers, and
   ``m_t = k_m m_{t-1} + gain * 1.7159 tanh(2/3 a_L)``. Forward saves the memories
   ``(T+1, B, M)``, the hidden pre-activations ``(T, B, H)`` and the tanh ``(T, B, M)``;
   the hand-written backward (BPTT) sweeps back through the memory and the MLP writing
   each layer's pre-activation gradient, and the weight gradients are then whole-sequence
   GEMMs (``dW_k = da_k^T h_{k-1}`` over all ``T B`` rows).

Both loops run in C++ (``csrc/elm_loops.cpp``, built with the other step loops by
:mod:`microcircuits.kernels.native`) and, without a compiler or with
``MICROCIRCUITS_NATIVE=0``, in the Python loops below (same arithmetic). Under
``torch.no_grad()`` the memory loop saves nothing.

The hand-written backward is first-order. Asked for a graph (``create_graph=True``),
:class:`_MemoryLoop` recomputes its part with differentiable torch ops and returns
autograd's gradients of that (:func:`_memory_loop_differentiable`); the trace's backward
is linear and is then run with differentiable ops.

:func:`unsupported_reason` says when the path does not apply (another device or dtype,
an empty sequence, ``torch.jit.trace``/ONNX export or ``torch.compile`` tracing, autocast,
functorch transforms, per-synapse trace decays that differ in version 1, the kernel
selection ``"reference"``); :class:`~microcircuits.elm.ELM` then runs the reference loop,
which stays the oracle of ``tests/test_elm_fused.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import _checks, cpu_products, get_kernel, native, recording_reason
from .equations import ACTIVATIONS, ELMState, ELMWeights, scaled_tanh, synaptic_drive

if TYPE_CHECKING:
    from .module import ELM

__all__ = ["elm_sequence_fused", "unsupported_reason"]

_DTYPES = (torch.float32, torch.float64)
_ACTIVATION_CODES = {"relu": 0, "silu": 1}
_TANH_SCALE = 1.7159
# With a routing, the branch drive is one GEMM with an (I, N) matrix when I N is at most
# this many times S (else the synapses are gathered, (T, B, S)): NeuronIO's 1278 x 45 is
# 12.8 S, and its GEMM took ~5 ms where the gather and products took ~600 ms (B=8, T=500).
_ROUTING_GEMM_RATIO = 32


def unsupported_reason(model: ELM, x: Tensor, state: ELMState, weights: ELMWeights) -> str | None:
    """Why the fused path cannot run this call (``x`` ``(T, B, I)``), or ``None``."""
    if get_kernel() == "reference":
        return "the kernel selection is 'reference'"
    recording = recording_reason()
    if recording is not None:
        return recording
    tensors = [x, *state, *(p for p in model.parameters()), *weights[:3]]
    reason = _checks.off_cpu_reason(tensors)
    reason = reason or _checks.common_unsupported_reason(x, tensors, None, None, _DTYPES)
    if reason is not None:
        return reason
    if weights.trace_decay.requires_grad:
        return "the trace decay requires grad"
    if model.version == 1 and model.num_synapse != model.num_branch:
        decay = weights.trace_decay
        if not bool((decay == decay[0]).all()):
            return "version 1 with synapse trace decays that differ"
    return None


def _native_ops():
    """``torch.ops.microcircuits_elm`` (``csrc/elm_loops.cpp``), or ``None`` without the
    C++ loops (turned off or not buildable)."""
    if native.step_loops() is None:
        return None
    return torch.ops.microcircuits_elm


# ------------------------------------------------------------------ the whole sequence


def elm_sequence_fused(
    model: ELM, x: Tensor, state: ELMState, weights: ELMWeights
) -> tuple[Tensor, ELMState]:
    """The ELM over a sequence ``x`` ``(T, B, I)`` from ``state``: ``(output (T, B, O),
    final state)``, equal to the reference loop (check :func:`unsupported_reason` first)."""
    num_branch = model.num_branch
    split = model.version == 1 and model.num_synapse != num_branch  # per-synapse trace
    first = weights.mlp_weights[0]
    branch_weight = first[:, :num_branch]  # (H_0, N)
    decay = weights.trace_decay
    if split:  # v1 with one decay for every synapse: the branch sums follow the same trace
        branch_decay = decay.unflatten(-1, (num_branch, -1))[:, 0]
        branch0 = state.trace.unflatten(-1, (num_branch, -1)).sum(-1)
    else:
        branch_decay, branch0 = decay, state.trace
    drive, branch_drive, folded = _branch_drive(model, x, branch_weight)

    if _project_first(branch_decay, first.shape[0]):
        # one decay k for all branches and fewer hidden units than branches: trace the
        # first layer's input instead, q_t = W b_t = k q_{t-1} + W d_t, q_0 = W b_0
        weight = branch_weight if folded is None else folded
        projected = _sequence_linear(branch_drive if folded is None else x, weight)
        init = branch0 @ branch_weight.t()
        traced = _BranchTrace.apply(projected, init, branch_decay[:1].expand(init.shape[-1]))
        pre = traced + weights.mlp_biases[0]  # (T, B, H_0)
        branch_last = None
    else:
        if branch_drive is None:
            branch_drive = synaptic_drive(x, model.effective_synapse_weight(), num_branch, 1)
        branch = _BranchTrace.apply(branch_drive.contiguous(), branch0.contiguous(), branch_decay)
        pre = F.linear(branch, branch_weight, weights.mlp_biases[0])  # (T, B, H_0)
        branch_last = branch[-1]
    trace = _final_trace(model, x, state.trace, decay, drive, branch_drive, branch_last, split)

    layers = [first[:, num_branch:], *weights.mlp_weights[1:]]
    memories = _memory_loop(
        pre,
        state.memory,
        weights.memory_decay,
        weights.memory_gain,
        layers,
        list(weights.mlp_biases[1:]),
        weights.activation,
    )  # (T, B, M)
    output = F.linear(memories, weights.readout_weight, weights.readout_bias)
    return output, ELMState(trace, memories[-1])


def _project_first(branch_decay: Tensor, hidden: int) -> bool:
    """Whether to trace the MLP's first-layer input (``H_0`` wide) instead of the branches
    (``N`` wide): needs one decay for all branches (a scalar times ``W`` commutes with the
    trace) and pays when ``H_0 < N`` (SHD: 200 against 700)."""
    return hidden < branch_decay.numel() and bool((branch_decay == branch_decay[0]).all())


def _branch_drive(
    model: ELM, x: Tensor, branch_weight: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The trace's input: ``(drive, branch_drive, folded)``. ``drive`` ``(T, B, K)`` is the
    per-synapse drive where it was formed, ``branch_drive`` ``(T, B, N)`` its branch sums;
    without routing and with one synapse per branch neither is formed (both ``None``) and
    ``folded`` is the first layer's branch weight times ``w_s``, ``(H_0, I)``, so that
    ``W d_t = folded x_t``."""
    num_branch = model.num_branch
    synapse_weight = model.effective_synapse_weight()
    index = model.synapse_input_index
    if index is None and model.num_synapse == num_branch:
        return None, None, branch_weight * synapse_weight
    if index is not None and model.input_size * num_branch <= _ROUTING_GEMM_RATIO * index.numel():
        # sum_branch(w_s * x[idx]) = x A with A[i, n] the summed weights of branch n's
        # synapses on input i: one GEMM instead of (T, B, S) gathers and products
        branch_of = torch.arange(index.numel(), device=x.device) // model.num_synapse_per_branch
        matrix = x.new_zeros(model.input_size, num_branch)
        matrix = matrix.index_put((index, branch_of), synapse_weight, accumulate=True)
        return None, _sequence_linear(x, matrix.t()), None
    routed = x if index is None else x.index_select(-1, index)
    drive = synaptic_drive(routed, synapse_weight, num_branch, model.version)  # (T, B, K)
    split = model.version == 1 and model.num_synapse != num_branch
    return drive, (drive.unflatten(-1, (num_branch, -1)).sum(-1) if split else drive), None


def _sequence_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x W^T`` for ``x`` ``(T, B, K)``, as a contiguous ``(T, B, H)``: one whole-sequence
    product (oneDNN where it is faster), in the memory order of ``x`` (a batch-first input
    is a transposed view: its product is transposed back, ``H < K`` values a row)."""
    if not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return cpu_products.linear(x.transpose(0, 1), weight).transpose(0, 1).contiguous()
    return cpu_products.linear(x.contiguous(), weight)


def _time_weighted_sum(weights: Tensor, x: Tensor) -> Tensor:
    """``sum_t weights[t] x[t]``, ``(T,) x (T, B, K) -> (B, K)``, as one product in the
    memory order of ``x`` (a batch-first input is a transposed view)."""
    if not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return torch.matmul(weights, x.transpose(0, 1))  # (B, T, K) -> (B, K)
    rows = x.contiguous()
    return torch.matmul(weights, rows.view(rows.shape[0], -1)).view(rows.shape[1:])


def _final_trace(
    model: ELM,
    x: Tensor,
    trace0: Tensor,
    decay: Tensor,
    drive: Tensor | None,
    branch_drive: Tensor | None,
    branch_last: Tensor | None,
    split: bool,
) -> Tensor:
    """The trace after the last step, ``(B, K)``: the branch trace's last row where it was
    formed, else the closed form ``s_T = k^T s_0 + sum_t k^(T-1-t) d_t`` (one reduction
    over time; ``k`` is one value here)."""
    if branch_last is not None and not split:
        return branch_last
    steps = x.shape[0]
    k = decay[0]
    powers = k ** torch.arange(steps - 1, -1, -1, device=x.device, dtype=x.dtype)
    if drive is not None:
        recent = _time_weighted_sum(powers, drive)
    elif branch_drive is not None and not split:
        recent = _time_weighted_sum(powers, branch_drive)
    else:  # the drive was not formed: w_s * (routed) x
        summed = _time_weighted_sum(powers, x)
        index = model.synapse_input_index
        recent = model.effective_synapse_weight() * (
            summed if index is None else summed.index_select(-1, index)
        )
    return k**steps * trace0 + recent


def _memory_loop(
    pre: Tensor,
    memory0: Tensor,
    decay: Tensor,
    gain: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str,
) -> Tensor:
    tensors = [pre, memory0, decay, gain, *weights, *biases]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _MemoryLoop.apply(activation, len(weights), *tensors)
    weights = [w.contiguous() for w in weights]
    return _memory_forward(
        pre.contiguous(), memory0, decay, gain, weights, biases, activation, False
    )[0]


# ------------------------------------------------------------------ the branch trace


class _BranchTrace(torch.autograd.Function):
    """``b_t = k b_{t-1} + d_t`` for all ``t``: drive ``(T, B, N)``, ``b_0`` ``(B, N)``, ``k``
    ``(N,)`` (no gradient) -> ``(T, B, N)``."""

    @staticmethod
    def forward(ctx, drive: Tensor, branch0: Tensor, decay: Tensor) -> Tensor:
        ctx.save_for_backward(decay)
        out = torch.empty_like(drive)
        loops = _native_ops()
        if loops is not None:
            loops.elm_trace_forward(drive, branch0, decay.contiguous(), out)
            return out
        previous = branch0
        for t in range(drive.shape[0]):
            previous = torch.addcmul(drive[t], decay, previous, out=out[t])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (decay,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops
            carry = torch.zeros_like(grad[0])
            grads = []
            for t in range(grad.shape[0] - 1, -1, -1):
                carry = grad[t] + decay * carry
                grads.append(carry)
            grad_drive = torch.stack(grads[::-1])
            return grad_drive, decay * grad_drive[0], None
        grad = grad.contiguous()
        grad_drive = torch.empty_like(grad)
        loops = _native_ops()
        if loops is not None:
            loops.elm_trace_backward(grad, decay.contiguous(), grad_drive)
        else:
            carry = grad[-1]
            grad_drive[-1] = carry
            for t in range(grad.shape[0] - 2, -1, -1):
                carry = torch.addcmul(grad[t], decay, carry, out=grad_drive[t])
        return grad_drive, decay * grad_drive[0], None


# ------------------------------------------------------------------ the memory loop


def _activate(a: Tensor, activation: str) -> Tensor:
    return ACTIVATIONS[activation](a)


def _activation_grad(a: Tensor, activation: str) -> Tensor:
    """``act'(a)``."""
    if activation == "relu":
        return (a > 0).to(a.dtype)
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _memory_forward(
    pre: Tensor,
    memory0: Tensor,
    decay: Tensor,
    gain: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Runs the recursion. Returns the memories: ``(T+1, B, M)`` with ``m_0`` first when
    ``save``, else ``(T, B, M)``; and when ``save`` the tanh ``(T, B, M)`` and the hidden
    layers' pre-activations ``(T, B, H)`` (else ``None``, ``[]``)."""
    steps, batch = pre.shape[0], pre.shape[1]
    size = memory0.shape[-1]
    offset = 1 if save else 0
    memories = pre.new_empty(steps + offset, batch, size)
    hidden = [pre.new_empty(steps, batch, w.shape[0]) for w in weights[:-1]] if save else []
    tanh = pre.new_empty(steps, batch, size) if save else None
    if save:
        memories[0] = memory0
    loops = _native_ops()
    if loops is not None:
        args = (
            pre,
            memory0.contiguous(),
            decay.contiguous(),
            gain.contiguous(),
            weights,
            [b.contiguous() for b in biases],
            _ACTIVATION_CODES[activation],
            memories.narrow(0, offset, steps),
            hidden,
            tanh if save else torch.Tensor(),
        )
        direct = cpu_products.direct_available(pre.dtype, native.step_loops())
        if not (direct and loops.elm_memory_forward_direct(*args)):
            loops.elm_memory_forward(*args)
        return memories, tanh, hidden
    previous = memory0
    for t in range(steps):
        decayed = decay * previous
        a = torch.addmm(pre[t], decayed, weights[0].t())
        for layer in range(1, len(weights)):
            if save:
                hidden[layer - 1][t] = a
            a = torch.addmm(biases[layer - 1], _activate(a, activation), weights[layer].t())
        u = torch.tanh(a * (2 / 3))
        if save:
            tanh[t] = u
        previous = torch.addcmul(decayed, gain, u * _TANH_SCALE, out=memories[t + offset])
    return memories, tanh, hidden


def _memory_loop_differentiable(
    pre: Tensor,
    memory0: Tensor,
    decay: Tensor,
    gain: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str,
) -> Tensor:
    """The recursion of :class:`_MemoryLoop` in differentiable torch ops (for
    ``create_graph``)."""
    previous = memory0
    memories = []
    for t in range(pre.shape[0]):
        decayed = decay * previous
        a = pre[t] + F.linear(decayed, weights[0])
        for layer in range(1, len(weights)):
            a = F.linear(_activate(a, activation), weights[layer], biases[layer - 1])
        previous = decayed + gain * scaled_tanh(a)
        memories.append(previous)
    return torch.stack(memories)


class _MemoryLoop(torch.autograd.Function):
    """The memory recursion over all steps: ``pre`` ``(T, B, H_0)`` (the first layer's
    branch part and bias), ``m_0`` ``(B, M)``, ``k_m``, ``gain`` ``(M,)``, the layers'
    weights (the first one's memory columns ``(H_0, M)`` first) and biases (from the
    second layer on) -> memories ``(T, B, M)``."""

    @staticmethod
    def forward(ctx, activation: str, num_layers: int, *tensors: Tensor) -> Tensor:
        pre, memory0, decay, gain = tensors[:4]
        weights = [w.contiguous() for w in tensors[4 : 4 + num_layers]]
        biases = list(tensors[4 + num_layers :])
        memories, tanh, hidden = _memory_forward(
            pre.contiguous(), memory0, decay, gain, weights, biases, activation, True
        )
        ctx.activation = activation
        ctx.num_layers = num_layers
        ctx.save_for_backward(*tensors, memories, tanh, *hidden)
        return memories[1:]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        num_layers, activation = ctx.num_layers, ctx.activation
        saved = ctx.saved_tensors
        count = 4 + 2 * num_layers - 1
        inputs, (memories, tanh), hidden = (
            saved[:count],
            saved[count : count + 2],
            saved[count + 2 :],
        )
        if torch.is_grad_enabled():  # create_graph: differentiate the recursion again
            # the saved inputs carry their graph here: differentiate the recursion again
            with torch.enable_grad():
                out = _memory_loop_differentiable(
                    inputs[0],
                    inputs[1],
                    inputs[2],
                    inputs[3],
                    list(inputs[4 : 4 + num_layers]),
                    list(inputs[4 + num_layers :]),
                    activation,
                )
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            found = torch.autograd.grad(
                out, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True
            )
            grads: list[Tensor | None] = [None] * len(inputs)
            for i, g in zip(wanted, found):
                grads[i] = g
            return None, None, *grads

        pre, memory0, decay, gain = inputs[:4]
        weights = [w.contiguous() for w in inputs[4 : 4 + num_layers]]
        grad = grad.contiguous()
        # da[k]: gradient of layer k's pre-activation at every step, (T, B, H_k)
        da = [torch.empty_like(pre), *(torch.empty_like(h) for h in hidden[1:])]
        if num_layers > 1:
            da.append(torch.empty_like(tanh))
        grad_memory0, grad_decay, grad_gain = _memory_backward(
            grad, memories, tanh, hidden, decay, gain, weights, activation, da
        )
        steps, batch = pre.shape[0], pre.shape[1]
        decayed = (decay * memories[:-1]).reshape(steps * batch, -1)
        grad_weights = [da[0].reshape(steps * batch, -1).t().mm(decayed)]
        grad_biases = []
        for layer in range(1, num_layers):
            rows = da[layer].reshape(steps * batch, -1)
            h = _activate(hidden[layer - 1], activation).reshape(steps * batch, -1)
            grad_weights.append(rows.t().mm(h))
            grad_biases.append(rows.sum(0))
        return (None, None, da[0], grad_memory0, grad_decay, grad_gain, *grad_weights, *grad_biases)


def _memory_backward(
    grad: Tensor,
    memories: Tensor,
    tanh: Tensor,
    hidden: tuple[Tensor, ...] | list[Tensor],
    decay: Tensor,
    gain: Tensor,
    weights: list[Tensor],
    activation: str,
    da: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The reverse sweep: writes ``da[k][t]`` for every layer and step; returns the
    gradients of ``m_0``, ``k_m`` and ``gain``."""
    loops = _native_ops()
    if loops is not None:
        args = (grad, memories, tanh, list(hidden), decay, gain, weights)
        args = (*args, _ACTIVATION_CODES[activation], da)
        result = []
        if cpu_products.direct_available(grad.dtype, native.step_loops()):
            result = loops.elm_memory_backward_direct(*args)
        return tuple(result or loops.elm_memory_backward(*args))
    steps = grad.shape[0]
    num_layers = len(weights)
    carry = torch.zeros_like(memories[0])
    grad_decay = torch.zeros_like(decay)
    grad_gain = torch.zeros_like(gain)
    for t in range(steps - 1, -1, -1):
        g = grad[t] + carry
        u = tanh[t]
        grad_gain += (g * u).sum(0) * _TANH_SCALE
        d = g * gain * (_TANH_SCALE * 2 / 3) * (1 - u * u)
        for layer in range(num_layers - 1, 0, -1):
            da[layer][t] = d
            d = d.mm(weights[layer]) * _activation_grad(hidden[layer - 1][t], activation)
        da[0][t] = d
        dd = torch.addmm(g, d, weights[0])
        grad_decay += (dd * memories[t]).sum(0)
        carry = dd * decay
    return carry, grad_decay, grad_gain
