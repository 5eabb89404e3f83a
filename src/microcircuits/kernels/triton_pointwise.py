r"""Fused per-step pointwise kernels (Triton) for the GPU path.

The pointwise half of one recurrent step (gate nonlinearities, memory update, read-out;
see :mod:`microcircuits.kernels.pointwise` for the equations, the ``active``/``out``
semantics of variable lengths and the aliasing rules), forward and backward, for the
three cells of :mod:`microcircuits.cells`, as Triton kernels
(:func:`pointwise_forward`, :func:`pointwise_backward`): one program per ``(batch,
hidden)`` tile, every gate block of a tile loaded once, all stores after all loads, so
outputs may alias inputs. Their PyTorch twins (:func:`pointwise_forward_torch`,
:func:`pointwise_backward_torch`) take the same arguments and give the same results.

The kernels apply ``sigmoid`` as ``1/(1+exp(-x))`` and ``tanh`` as ``2*sigmoid(2x)-1``:
Triton 3 has no portable ``tanh`` (``libdevice.tanh`` is CUDA-only and absent from the
interpreter), and ``tl.sigmoid`` is itself a ``triton.jit`` function fixed at ``import
triton`` time, which would tie interpreter mode to the environment at that moment.

Dtypes: float32 and float64 (GPU and interpreter), float16/bfloat16 storage on GPU; the
kernels compute in float32 (float64 if any input is float64) and store in each output's
dtype. Tensors must share a device; the last dimension of every 2-D tensor must be
contiguous (rows may be strided, e.g. ``buffer[t]`` of a ``(T, B, G*H)`` buffer); other
layouts are copied.

Composing a whole-sequence GPU Function
---------------------------------------
One ``torch.autograd.Function`` per layer and direction (``reverse`` handled outside by
``reverse_within_lengths``, so sequences are left-aligned)::

    # forward (training)
    gates = torch.addmm(b_ih + b_hh, x.view(T*B, I), W_ih.t()).view(T, B, G*H)  # 1 GEMM
    cbuf = empty(T+1, B, H); cbuf[0] = c0; y = empty(T, B, H)
    h = h0.clone() if lengths is not None else h0   # state buffer, updated in place
    active = arange(T)[:, None] < lengths[None, :]          # (T, B) once, or None
    for t in range(T):
        gates[t].addmm_(h, W_hh.t())                          # cuBLAS, in place
        r = pointwise_forward(kind, gates[t], cbuf[t], phi, mask, active_t,
                              h_prev=h, act=gates[t], c=cbuf[t+1], out=y[t],
                              h=(y[t] if active is None else h))
        h = r.h
    save x, y, gates (now act), cbuf, h0, W_ih, W_hh, phi, mask, active

    # backward
    dh = grad_hn (or zeros); dc = grad_cn (or zeros); dphi = zeros(B, H) for fix
    for t in reversed(range(T)):
        r = pointwise_backward(kind, gates[t], cbuf[t], cbuf[t+1], phi, mask, active_t,
                               dh, dc, grad_out=dy[t], grad_pre=gates[t],  # in place
                               grad_c_prev=dc, grad_h_carry=dh, grad_phi_accum=dphi)
        dh = (r.grad_h_carry.addmm_(gates[t], W_hh) if active is not None
              else torch.mm(gates[t], W_hh))                  # cuBLAS
    dpre = gates.view(T*B, G*H)
    h_prev_all = cat([h0[None], y[:-1]]).view(T*B, H)   # output rows = state rows
    dW_ih = dpre.t() @ x.view(T*B, I); dW_hh = dpre.t() @ h_prev_all   # 2 big GEMMs
    db = dpre.sum(0) (both biases); dx = (dpre @ W_ih).view(T, B, I)   # 1 big GEMM
    dphi = dphi.sum(0); dh0 = dh; dc0 = dc

Using ``y[t-1]`` for ``h_{t-1}`` in ``dW_hh`` is exact: a row whose output was zeroed
(finished sequence) has ``dpre = 0`` at every later step. ``dy`` must be contiguous in
its last dimension (``.contiguous()`` it once). Memory: ``gates`` ``(T,B,G*H)`` +
``cbuf`` ``((T+1),B,H)`` + ``y``, like cuDNN's reserve space. Inference
(``torch.no_grad``): ``store_act=False``, one ``(B, H)`` ``c`` updated in place
(``c=c_prev``), ``h=y[t]`` (or the state buffer in place with lengths): besides ``y``
only the hoisted input projection is sequence-sized; no per-step activations are kept.
``tests/test_triton_pointwise.py::_sequence`` is this recipe, run and checked against
autograd through the reference layer (both implementations, packed, masked, float64).
:mod:`microcircuits.kernels.gpu_fused` implements it.
"""

from __future__ import annotations

import functools
import os
import types

import torch
from torch import Tensor

from ..cells import CELLS, CellKind
from .pointwise import (
    EQUATIONS,
    PointwiseBackward,
    PointwiseForward,
    check_2d,
    check_common,
    kind_name,
    num_gates,
    out_or_new,
    pointwise_backward_torch,
    pointwise_forward_torch,
)

try:  # Triton is optional: the GPU path only.
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False
    _TRITON_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    TRITON_AVAILABLE = True
    _TRITON_IMPORT_ERROR = None

__all__ = [
    "TRITON_AVAILABLE",
    "PointwiseBackward",
    "PointwiseForward",
    "interpret_mode",
    "pointwise_backward",
    "pointwise_backward_torch",
    "pointwise_backward_unchecked",
    "pointwise_forward",
    "pointwise_forward_unchecked",
    "pointwise_forward_torch",
    "triton_available",
]


# -- Triton kernels ----------------------------------------------------------------------------
# Raw functions; decorated lazily by _kernels() so that interpreter mode (TRITON_INTERPRET=1,
# read by triton.jit at decoration time) can be switched on after this module is imported.


def _forward_kernel(
    pre_ptr, cp_ptr, hp_ptr, phi_ptr, mask_ptr, active_ptr,
    h_ptr, c_ptr, act_ptr, out_ptr,
    B, H,
    s_pre, s_cp, s_hp, s_mask, s_h, s_c, s_act, s_out,
    KIND: tl.constexpr, MEMORY: tl.constexpr, READOUT: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    STORE_ACT: tl.constexpr, WRITE_OUT: tl.constexpr,
    CDT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    cmask = cols < H
    tile = rmask[:, None] & cmask[None, :]
    r = rows.to(tl.int64)[:, None]
    k = cols[None, :]

    # -- all loads first (outputs may alias inputs) --
    p = pre_ptr + r * s_pre + k
    # sigmoid(x) is spelled 1 / (1 + exp(-x)) and tanh(x) 2 * sigmoid(2x) - 1 (module docstring)
    if KIND == 2:  # fix-subLSTM: blocks (i, z, o), f = sigmoid(phi)
        i = tl.load(p, mask=tile, other=0.0).to(CDT)
        z = tl.load(p + H, mask=tile, other=0.0).to(CDT)
        o = tl.load(p + 2 * H, mask=tile, other=0.0).to(CDT)
        phi = tl.load(phi_ptr + cols, mask=cmask, other=0.0).to(CDT)
        f = (1.0 / (1.0 + tl.exp(-phi)))[None, :]
    else:
        i = tl.load(p, mask=tile, other=0.0).to(CDT)
        f = tl.load(p + H, mask=tile, other=0.0).to(CDT)
        z = tl.load(p + 2 * H, mask=tile, other=0.0).to(CDT)
        o = tl.load(p + 3 * H, mask=tile, other=0.0).to(CDT)
        f = 1.0 / (1.0 + tl.exp(-f))
    i = 1.0 / (1.0 + tl.exp(-i))
    o = 1.0 / (1.0 + tl.exp(-o))
    if KIND == 0:
        z = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
    else:
        z = 1.0 / (1.0 + tl.exp(-z))
    c_prev = tl.load(cp_ptr + r * s_cp + k, mask=tile, other=0.0).to(CDT)
    if HAS_MASK:
        m = tl.load(mask_ptr + r * s_mask + k, mask=tile, other=0.0).to(CDT)
    else:
        m = 1.0
    if HAS_ACTIVE:
        h_prev = tl.load(hp_ptr + r * s_hp + k, mask=tile, other=0.0).to(CDT)
        keep = (tl.load(active_ptr + rows, mask=rmask, other=0) != 0)[:, None]

    # -- the step --
    c = MEMORY(i, f, z, c_prev, m)
    if KIND == 0:
        nonlin_c = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0  # tanh
    else:
        nonlin_c = 1.0 / (1.0 + tl.exp(-c))
    h = READOUT(nonlin_c, o)
    if HAS_ACTIVE:
        out = tl.where(keep, h, 0.0)
        h = tl.where(keep, h, h_prev)
        c = tl.where(keep, c, c_prev)
    else:
        out = h

    # -- stores --
    if STORE_ACT:
        q = act_ptr + r * s_act + k
        if KIND == 2:
            tl.store(q, i, mask=tile)
            tl.store(q + H, z, mask=tile)
            tl.store(q + 2 * H, o, mask=tile)
        else:
            tl.store(q, i, mask=tile)
            tl.store(q + H, f, mask=tile)
            tl.store(q + 2 * H, z, mask=tile)
            tl.store(q + 3 * H, o, mask=tile)
    tl.store(h_ptr + r * s_h + k, h, mask=tile)
    tl.store(c_ptr + r * s_c + k, c, mask=tile)
    if WRITE_OUT:
        tl.store(out_ptr + r * s_out + k, out, mask=tile)


def _backward_kernel(
    act_ptr, cp_ptr, c_ptr, phi_ptr, mask_ptr, active_ptr,
    gh_ptr, gout_ptr, gc_ptr,
    gpre_ptr, gcp_ptr, carry_ptr, gphi_ptr,
    B, H,
    s_act, s_cp, s_c, s_mask, s_gh, s_gout, s_gc, s_gpre, s_gcp, s_carry, s_gphi,
    KIND: tl.constexpr, GRADS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    HAS_GH: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_GC: tl.constexpr,
    ACCUM_PHI: tl.constexpr,
    CDT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    cmask = cols < H
    tile = rmask[:, None] & cmask[None, :]
    r = rows.to(tl.int64)[:, None]
    k = cols[None, :]

    # -- all loads first (outputs may alias inputs) --
    p = act_ptr + r * s_act + k
    if KIND == 2:
        i = tl.load(p, mask=tile, other=0.0).to(CDT)
        z = tl.load(p + H, mask=tile, other=0.0).to(CDT)
        o = tl.load(p + 2 * H, mask=tile, other=0.0).to(CDT)
        phi = tl.load(phi_ptr + cols, mask=cmask, other=0.0).to(CDT)
        f = (1.0 / (1.0 + tl.exp(-phi)))[None, :]
    else:
        i = tl.load(p, mask=tile, other=0.0).to(CDT)
        f = tl.load(p + H, mask=tile, other=0.0).to(CDT)
        z = tl.load(p + 2 * H, mask=tile, other=0.0).to(CDT)
        o = tl.load(p + 3 * H, mask=tile, other=0.0).to(CDT)
    c_prev = tl.load(cp_ptr + r * s_cp + k, mask=tile, other=0.0).to(CDT)
    c = tl.load(c_ptr + r * s_c + k, mask=tile, other=0.0).to(CDT)
    if HAS_MASK:
        m = tl.load(mask_ptr + r * s_mask + k, mask=tile, other=0.0).to(CDT)
    else:
        m = 1.0
    if HAS_GH:
        gh = tl.load(gh_ptr + r * s_gh + k, mask=tile, other=0.0).to(CDT)
    else:
        gh = tl.full((BLOCK_B, BLOCK_H), 0.0, CDT)
    if HAS_GOUT:
        dh = gh + tl.load(gout_ptr + r * s_gout + k, mask=tile, other=0.0).to(CDT)
    else:
        dh = gh
    if HAS_GC:
        dc_next = tl.load(gc_ptr + r * s_gc + k, mask=tile, other=0.0).to(CDT)
    else:
        dc_next = tl.full((BLOCK_B, BLOCK_H), 0.0, CDT)
    if ACCUM_PHI:
        phi_acc = tl.load(gphi_ptr + r * s_gphi + k, mask=tile, other=0.0).to(CDT)
    if HAS_ACTIVE:
        keep = (tl.load(active_ptr + rows, mask=rmask, other=0) != 0)[:, None]

    # -- the step --
    if KIND == 0:
        nonlin_c = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0  # tanh
    else:
        nonlin_c = 1.0 / (1.0 + tl.exp(-c))
    d_i, d_f, d_z, d_o, dc_prev = GRADS(dh, dc_next, i, f, z, o, nonlin_c, c_prev, m)
    if HAS_ACTIVE:
        d_i = tl.where(keep, d_i, 0.0)
        d_f = tl.where(keep, d_f, 0.0)
        d_z = tl.where(keep, d_z, 0.0)
        d_o = tl.where(keep, d_o, 0.0)
        dc_prev = tl.where(keep, dc_prev, dc_next)
        carry = tl.where(keep, 0.0, gh)

    # -- stores --
    q = gpre_ptr + r * s_gpre + k
    if KIND == 2:
        tl.store(q, d_i, mask=tile)
        tl.store(q + H, d_z, mask=tile)
        tl.store(q + 2 * H, d_o, mask=tile)
        if ACCUM_PHI:
            tl.store(gphi_ptr + r * s_gphi + k, phi_acc + d_f, mask=tile)
        else:
            tl.store(gphi_ptr + r * s_gphi + k, d_f, mask=tile)
    else:
        tl.store(q, d_i, mask=tile)
        tl.store(q + H, d_f, mask=tile)
        tl.store(q + 2 * H, d_z, mask=tile)
        tl.store(q + 3 * H, d_o, mask=tile)
    tl.store(gcp_ptr + r * s_gcp + k, dc_prev, mask=tile)
    if HAS_ACTIVE:
        tl.store(carry_ptr + r * s_carry + k, carry, mask=tile)


def interpret_mode() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    if not TRITON_AVAILABLE:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``.

    True when Triton imports and ``device`` is CUDA (ROCm included), or Triton's
    interpreter is on (``TRITON_INTERPRET=1``, for tests on CPU tensors).
    """
    if not TRITON_AVAILABLE:
        return False
    return torch.device(device).type == "cuda" or interpret_mode()


_KERNEL_CACHE: dict[bool, types.SimpleNamespace] = {}


def _kernels() -> types.SimpleNamespace:
    """The jitted kernels and equation helpers for the current mode (compiled or interpreted)."""
    mode = interpret_mode()
    ns = _KERNEL_CACHE.get(mode)
    if ns is None:
        # triton.jit picks InterpretedFunction or JITFunction from TRITON_INTERPRET now.
        plain = {fn for fns in EQUATIONS.values() for fn in fns}
        helpers = {fn: triton.jit(fn) for fn in plain}
        ns = types.SimpleNamespace(
            forward=triton.jit(_forward_kernel),
            backward=triton.jit(_backward_kernel),
            equations={name: tuple(helpers[fn] for fn in fns) for name, fns in EQUATIONS.items()},
        )
        _KERNEL_CACHE[mode] = ns
    return ns


def _require_triton(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "the Triton pointwise kernels need the 'triton' package, which is not installed "
            f"({_TRITON_IMPORT_ERROR}); install it (pip install triton) or use the PyTorch "
            "twins pointwise_forward_torch / pointwise_backward_torch"
        )
    if not triton_available(device):
        raise RuntimeError(
            f"the Triton pointwise kernels run on CUDA tensors (got {device}); set "
            "TRITON_INTERPRET=1 to run them on CPU tensors in Triton's interpreter"
        )


_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _prep(x: Tensor | None, device: torch.device) -> Tensor | None:
    """Same device, supported dtype, last dimension contiguous (copies otherwise)."""
    if x is None:
        return None
    if x.device != device:
        raise ValueError(f"all tensors must be on {device}, got one on {x.device}")
    if x.is_floating_point() and x.dtype not in _SUPPORTED:
        raise TypeError(f"unsupported dtype {x.dtype}; use one of {list(_SUPPORTED)}")
    if (x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1) or (
        x.dim() == 1 and x.shape[0] > 1 and x.stride(0) != 1
    ):
        x = x.contiguous()
    return x


def _check_out(x: Tensor | None, name: str) -> None:
    if x is not None and x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _compute_dtype(*xs: Tensor | None):
    return tl.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else tl.float32


@functools.lru_cache(maxsize=64)
def _launch(batch: int, hidden: int) -> tuple[tuple[int, int], int, int, int]:
    """Grid, block sizes and warps for a ``(batch, hidden)`` step (cached: it runs every
    step, and ``triton.cdiv``/``next_power_of_2`` are slow to call from Python)."""

    def next_pow2(n: int) -> int:
        return 1 << (max(n, 1) - 1).bit_length()

    block_h = min(128, next_pow2(hidden))
    block_b = max(1, min(next_pow2(batch), 1024 // block_h))
    grid = (-(-batch // block_b), -(-hidden // block_h))
    return grid, block_b, block_h, 4


def _row_stride(x: Tensor | None) -> int:
    return 0 if x is None else x.stride(0)


def pointwise_forward(
    kind: str | CellKind,
    pre: Tensor,
    c_prev: Tensor,
    forget_phi: Tensor | None = None,
    update_mask: Tensor | None = None,
    active: Tensor | None = None,
    *,
    h_prev: Tensor | None = None,
    h: Tensor | None = None,
    c: Tensor | None = None,
    act: Tensor | None = None,
    out: Tensor | None = None,
    store_act: bool = True,
) -> PointwiseForward:
    """One step's pointwise forward, fused in one Triton kernel.

    Args:
        kind: cell name (``"lstm"``, ``"sublstm"``, ``"fix_sublstm"``) or a ``CellKind``.
        pre: gate pre-activations ``(B, G*H)``, blocks ``(i, f, z, o)`` or ``(i, z, o)``.
        c_prev: previous memory ``(B, H)``.
        forget_phi: fix-subLSTM's ``phi`` ``(H,)``; ``None`` for the others.
        update_mask: update-dropout mask on ``z`` ``(B, H)`` (scaled), or ``None``.
        active: ``(B,)`` bool, rows whose sequence runs at this step, or ``None`` (all).
        h_prev: previous hidden state ``(B, H)``; required when ``active`` is given.
        h, c, act, out: optional preallocated outputs (may alias inputs, see module
            docstring); allocated when ``None``.
        store_act: write the activations backward needs (``False`` for inference).

    Returns:
        :class:`PointwiseForward` ``(h, c, act, out)``.

    Raises:
        RuntimeError: Triton is not installed, or ``pre`` is not on CUDA and the
            interpreter is off.
    """
    _require_triton(pre.device)
    name = kind_name(kind)
    batch, hidden = check_common(name, pre, c_prev, forget_phi, update_mask, active, "pre")
    if active is not None and h_prev is None:
        raise ValueError("active needs h_prev: inactive rows keep the previous state")
    dev = pre.device
    pre, c_prev, h_prev, forget_phi, update_mask, active = (
        _prep(x, dev) for x in (pre, c_prev, h_prev, forget_phi, update_mask, active)
    )
    if h_prev is not None:
        check_2d("h_prev", h_prev, batch, hidden)
    g = num_gates(name)
    act = out_or_new(act, "act", pre, batch, g * hidden) if store_act else None
    if out is not None and h is None and active is None:
        h = out
    h = out_or_new(h, "h", c_prev, batch, hidden)
    c = out_or_new(c, "c", c_prev, batch, hidden)
    write_out = active is not None or (out is not None and out is not h)
    if write_out:
        out = out_or_new(out, "out", c_prev, batch, hidden)
    else:
        out = h
    for label, x in (("act", act), ("h", h), ("c", c), ("out", out)):
        _check_out(x, label)
        if x is not None and x.device != dev:
            raise ValueError(f"{label} must be on {dev}, got {x.device}")

    _launch_forward(name, pre, c_prev, h_prev, forget_phi, update_mask, active, h, c, act, out,
                    write_out)  # fmt: skip
    return PointwiseForward(h, c, act, out)


def pointwise_backward(
    kind: str | CellKind,
    act: Tensor,
    c_prev: Tensor,
    c: Tensor,
    forget_phi: Tensor | None = None,
    update_mask: Tensor | None = None,
    active: Tensor | None = None,
    grad_h: Tensor | None = None,
    grad_c: Tensor | None = None,
    *,
    grad_out: Tensor | None = None,
    grad_pre: Tensor | None = None,
    grad_c_prev: Tensor | None = None,
    grad_h_carry: Tensor | None = None,
    grad_phi_accum: Tensor | None = None,
) -> PointwiseBackward:
    """One step's pointwise backward, fused in one Triton kernel.

    Args:
        kind: cell name or ``CellKind``.
        act: the activations :func:`pointwise_forward` saved ``(B, G*H)``.
        c_prev: memory before the step ``(B, H)``.
        c: memory after the step ``(B, H)`` (the forward's ``c``).
        forget_phi, update_mask, active: as in the forward.
        grad_h: gradient reaching the step's state ``h`` from later steps and the final
            state ``(B, H)``, or ``None`` (zero).
        grad_c: gradient reaching the step's ``c`` ``(B, H)``, or ``None`` (zero).
        grad_out: gradient of the step's output ``out`` ``(B, H)``, or ``None``; added
            to ``grad_h`` at active rows (an inactive row's output was a constant zero).
        grad_pre, grad_c_prev, grad_h_carry: optional preallocated outputs (may alias
            ``act``, ``grad_c``, ``grad_h``).
        grad_phi_accum: fix-subLSTM only: a ``(B, H)`` buffer the step's ``d phi`` is
            added to (summed over steps; sum over rows at the end), or ``None``.

    Returns:
        :class:`PointwiseBackward` ``(grad_pre, grad_c_prev, grad_h_carry, grad_phi)``.
    """
    _require_triton(act.device)
    name = kind_name(kind)
    batch, hidden = check_common(name, act, c_prev, forget_phi, update_mask, active, "act")
    dev = act.device
    act, c_prev, c, forget_phi, update_mask, active, grad_h, grad_c, grad_out = (
        _prep(x, dev)
        for x in (act, c_prev, c, forget_phi, update_mask, active, grad_h, grad_c, grad_out)
    )
    for label, x in (("c", c), ("grad_h", grad_h), ("grad_c", grad_c), ("grad_out", grad_out)):
        if x is not None:
            check_2d(label, x, batch, hidden)
    g = num_gates(name)
    grad_pre = out_or_new(grad_pre, "grad_pre", act, batch, g * hidden)
    grad_c_prev = out_or_new(grad_c_prev, "grad_c_prev", c_prev, batch, hidden)
    carry = None
    if active is not None:
        like = grad_h if grad_h is not None else c_prev
        carry = out_or_new(grad_h_carry, "grad_h_carry", like, batch, hidden)
    gphi = None
    accum = False
    if name == "fix_sublstm":
        if grad_phi_accum is not None:
            check_2d("grad_phi_accum", grad_phi_accum, batch, hidden)
            gphi, accum = grad_phi_accum, True
        else:
            gphi = torch.empty(batch, hidden, dtype=forget_phi.dtype, device=dev)
    for label, x in (
        ("grad_pre", grad_pre), ("grad_c_prev", grad_c_prev), ("grad_h_carry", carry),
        ("grad_phi_accum", gphi),
    ):  # fmt: skip
        _check_out(x, label)
        if x is not None and x.device != dev:
            raise ValueError(f"{label} must be on {dev}, got {x.device}")

    _launch_backward(name, act, c_prev, c, forget_phi, update_mask, active, grad_h, grad_c,
                     grad_out, grad_pre, grad_c_prev, carry, gphi, accum)  # fmt: skip
    return PointwiseBackward(grad_pre, grad_c_prev, carry, gphi)


# -- launching: the checked entry points above and the per-sequence fast path ---------------


def _launch_forward(name, pre, c_prev, h_prev, forget_phi, update_mask, active, h, c, act, out,
                    write_out):  # fmt: skip
    """Launch the forward kernel on prepared tensors (no checks)."""
    batch, hidden = c_prev.shape
    ns = _kernels()
    memory, readout, _ = ns.equations[name]
    grid, block_b, block_h, num_warps = _launch(batch, hidden)
    dummy = c_prev  # stands in for absent pointers (never dereferenced)
    ns.forward[grid](
        pre, c_prev, dummy if h_prev is None else h_prev,
        dummy if forget_phi is None else forget_phi,
        dummy if update_mask is None else update_mask,
        dummy if active is None else active.view(torch.uint8),
        h, c, dummy if act is None else act, out,
        batch, hidden,
        pre.stride(0), c_prev.stride(0), _row_stride(h_prev), _row_stride(update_mask),
        h.stride(0), c.stride(0), _row_stride(act), out.stride(0),
        KIND=CELLS[name].code, MEMORY=memory, READOUT=readout,
        HAS_MASK=update_mask is not None, HAS_ACTIVE=active is not None,
        STORE_ACT=act is not None, WRITE_OUT=write_out,
        CDT=_compute_dtype(pre, c_prev, h_prev, update_mask, forget_phi),
        BLOCK_B=block_b, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip


def _launch_backward(name, act, c_prev, c, forget_phi, update_mask, active, grad_h, grad_c,
                     grad_out, grad_pre, grad_c_prev, carry, gphi, accum):  # fmt: skip
    """Launch the backward kernel on prepared tensors (no checks)."""
    batch, hidden = c_prev.shape
    ns = _kernels()
    _, _, grads = ns.equations[name]
    grid, block_b, block_h, num_warps = _launch(batch, hidden)
    dummy = c_prev
    ns.backward[grid](
        act, c_prev, c,
        dummy if forget_phi is None else forget_phi,
        dummy if update_mask is None else update_mask,
        dummy if active is None else active.view(torch.uint8),
        dummy if grad_h is None else grad_h,
        dummy if grad_out is None else grad_out,
        dummy if grad_c is None else grad_c,
        grad_pre, grad_c_prev, dummy if carry is None else carry,
        dummy if gphi is None else gphi,
        batch, hidden,
        act.stride(0), c_prev.stride(0), c.stride(0), _row_stride(update_mask),
        _row_stride(grad_h), _row_stride(grad_out), _row_stride(grad_c),
        grad_pre.stride(0), grad_c_prev.stride(0), _row_stride(carry), _row_stride(gphi),
        KIND=CELLS[name].code, GRADS=grads,
        HAS_MASK=update_mask is not None, HAS_ACTIVE=active is not None,
        HAS_GH=grad_h is not None, HAS_GOUT=grad_out is not None, HAS_GC=grad_c is not None,
        ACCUM_PHI=accum,
        CDT=_compute_dtype(act, c_prev, c, update_mask, forget_phi, grad_h, grad_c, grad_out),
        BLOCK_B=block_b, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip


def pointwise_forward_unchecked(
    kind: CellKind,
    pre: Tensor,
    c_prev: Tensor,
    forget_phi: Tensor | None,
    update_mask: Tensor | None,
    active: Tensor | None,
    *,
    h_prev: Tensor,
    h: Tensor,
    c: Tensor,
    act: Tensor | None,
    out: Tensor,
    store_act: bool = True,
) -> PointwiseForward:
    """:func:`pointwise_forward` without its per-call checks and allocations, for a step
    loop that validated its buffers once (``kernels/gpu_fused.py``): every output given,
    all tensors on one Triton-capable device, last dimensions contiguous, shapes right.
    Saves ~0.1 ms of Python per step, which on long sequences is the step's whole cost."""
    write_out = active is not None or out is not h
    _launch_forward(kind.name, pre, c_prev, h_prev, forget_phi, update_mask, active, h, c,
                    act if store_act else None, out, write_out)  # fmt: skip
    return PointwiseForward(h, c, act if store_act else None, out)


def pointwise_backward_unchecked(
    kind: CellKind,
    act: Tensor,
    c_prev: Tensor,
    c: Tensor,
    forget_phi: Tensor | None,
    update_mask: Tensor | None,
    active: Tensor | None,
    grad_h: Tensor,
    grad_c: Tensor,
    *,
    grad_out: Tensor | None,
    grad_pre: Tensor,
    grad_c_prev: Tensor,
    grad_h_carry: Tensor,
    grad_phi_accum: Tensor | None,
) -> PointwiseBackward:
    """:func:`pointwise_backward` without its per-call checks (see
    :func:`pointwise_forward_unchecked`); fix-subLSTM needs ``grad_phi_accum``."""
    carry = grad_h_carry if active is not None else None
    _launch_backward(kind.name, act, c_prev, c, forget_phi, update_mask, active, grad_h, grad_c,
                     grad_out, grad_pre, grad_c_prev, carry, grad_phi_accum,
                     grad_phi_accum is not None)  # fmt: skip
    return PointwiseBackward(grad_pre, grad_c_prev, carry, grad_phi_accum)
