r"""The pointwise half of one recurrent step, forward and backward, and its PyTorch form.

One time step of a recurrent layer is a GEMM (``pre = pre_x[t] + h @ R^T``, ``(B, G*H)``)
followed by pointwise work: gate nonlinearities, the memory update and the read-out. This
module holds what the Triton kernels (:mod:`microcircuits.kernels.triton_pointwise`) and
their PyTorch twins (:func:`pointwise_forward_torch`, :func:`pointwise_backward_torch`,
usable on any device, against which the kernels are tested) share: the equations, the
result types and the argument checks. Neither implementation is differentiable by
autograd: they are the insides of a hand-written ``torch.autograd.Function``
(:mod:`microcircuits.kernels.gpu_fused`).

Equations (single source of truth)
----------------------------------
The arithmetic is written once, in the plain functions ``_lstm_memory``,
``_sub_memory``, ``_lstm_readout``, ``_sub_readout``, ``_lstm_grads`` and
``_sub_grads`` below. They use only ``+ - *``, so the *same* Python function runs on
torch tensors (the twins call it directly) and inside a Triton kernel (wrapped by
``triton.jit`` and handed to the kernel as a ``tl.constexpr`` argument). Only the
elementwise nonlinearities (``sigmoid``, ``tanh``) are applied outside them.

With ``m`` the update-dropout mask (1 when absent), ``dh`` the gradient reaching the
step's ``h`` and ``dc_next`` the one reaching its ``c`` from later steps (the paper's
:math:`\delta c_{t+1} \odot f_{t+1}` term, already multiplied), the backward is (Costa
et al. 2017, section 3.1, plus the mask):

subLSTM / fix-subLSTM (``h = sigma(c) - o``, ``c = f*c_prev + z*m - i``)::

    dc      = dh * sigma(c) * (1 - sigma(c)) + dc_next
    d pre_o = -dh * o * (1 - o)
    d pre_i = -dc * i * (1 - i)
    d pre_z =  dc * m * z * (1 - z)
    d pre_f =  dc * c_prev * f * (1 - f)     (fix-subLSTM: the per-step part of d phi)
    dc_prev =  dc * f

LSTM (``h = tanh(c) * o``, ``c = f*c_prev + g*m*i`` with ``g = tanh(pre_z)``)::

    dc      = dh * o * (1 - tanh(c)^2) + dc_next
    d pre_o = dh * tanh(c) * o * (1 - o)
    d pre_i = dc * g * m * i * (1 - i)
    d pre_z = dc * i * m * (1 - g^2)
    d pre_f = dc * c_prev * f * (1 - f)
    dc_prev = dc * f

(The paper prints the LSTM lines with :math:`h_t` where :math:`\delta h_t` is meant; the
lines above are the chain rule, checked against autograd in the tests.)

Saved activations ``act`` ``(B, G*H)``, block order as the gates: LSTM ``(i, f, g, o)``
with ``g = tanh(pre_z)`` *before* the mask; subLSTM ``(i, f, z, o)``; fix-subLSTM
``(i, z, o)`` (``f = sigmoid(phi)`` is recomputed from ``phi``).

Variable lengths
----------------
``active`` ``(B,)`` bool marks the sequences that still run at this step (``t <
lengths[b]``). For an inactive row the step is the identity on the state, as in
:mod:`microcircuits.kernels.reference`: ``h``/``c`` keep ``h_prev``/``c_prev`` and the
step's *output* ``out`` is zero (what ``pad_packed_sequence`` gives). Forward therefore
returns ``out`` separately from the state ``h``; with ``active=None`` they are one
tensor. In backward an inactive row gets ``grad_pre = 0``, ``grad_c_prev = grad_c`` and
passes ``grad_h`` on unchanged in ``grad_h_carry``; the caller adds the recurrent GEMM
to it (``grad_h_prev = grad_h_carry + grad_pre @ R``, i.e. ``carry.addmm_(grad_pre,
R)``).

In place
--------
Outputs may alias inputs of the same shape: ``act`` may be ``pre`` (the gate buffer
becomes the activation buffer), ``h``/``c`` may be ``h_prev``/``c_prev`` (inference),
``grad_pre`` may be ``act`` (the saved activations become the gate gradients),
``grad_c_prev`` may be ``grad_c``, ``grad_h_carry`` may be ``grad_h``. Partially
overlapping views are not supported.

The twins compute in the inputs' dtype, upcasting float16/bfloat16 to float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells import CELLS, CellKind, cell_kind

try:  # Triton's interpreter runs a jitted function only with triton.language in its globals
    import triton.language as tl  # noqa: F401 - the equations below are jitted
except Exception:  # pragma: no cover - Triton is optional: the GPU path only
    tl = None

__all__ = [
    "EQUATIONS",
    "PointwiseBackward",
    "PointwiseForward",
    "check_2d",
    "check_common",
    "kind_name",
    "num_gates",
    "out_or_new",
    "pointwise_backward_torch",
    "pointwise_forward_torch",
]


class PointwiseForward(NamedTuple):
    """Result of one forward step.

    Attributes:
        h: new hidden state ``(B, H)`` (``h_prev`` at inactive rows).
        c: new memory ``(B, H)`` (``c_prev`` at inactive rows).
        act: saved activations ``(B, G*H)`` for backward, or ``None`` (``store_act=False``).
        out: the step's output ``(B, H)``: ``h`` with inactive rows zeroed; the same
            tensor as ``h`` when ``active`` is ``None`` and no separate ``out`` was given.
    """

    h: Tensor
    c: Tensor
    act: Tensor | None
    out: Tensor


class PointwiseBackward(NamedTuple):
    """Result of one backward step.

    Attributes:
        grad_pre: gradient of the gate pre-activations ``(B, G*H)`` (zero at inactive rows).
        grad_c_prev: gradient of ``c_prev`` ``(B, H)``.
        grad_h_carry: ``(B, H)``, ``grad_h`` at inactive rows and zero elsewhere, when
            ``active`` is given, else ``None``. ``grad_h_prev = grad_h_carry + grad_pre @ R``.
        grad_phi: fix-subLSTM only: this step's ``d phi`` per row ``(B, H)`` (sum it over
            the batch), or the accumulator ``grad_phi_accum`` it was added to; else ``None``.
    """

    grad_pre: Tensor
    grad_c_prev: Tensor
    grad_h_carry: Tensor | None
    grad_phi: Tensor | None


# -- the equations: plain + - * only, shared by the twins and the kernels ------------------
# No annotations on purpose: Triton reads annotations as types.


def _lstm_memory(i, f, g, c_prev, m):
    """LSTM memory update ``c = f*c_prev + g*m*i`` (``g = tanh(pre_z)``)."""
    return f * c_prev + g * m * i


def _lstm_readout(tanh_c, o):
    """LSTM output ``h = tanh(c) * o``."""
    return tanh_c * o


def _sub_memory(i, f, z, c_prev, m):
    """subLSTM memory update ``c = f*c_prev + z*m - i``."""
    return f * c_prev + z * m - i


def _sub_readout(sigma_c, o):
    """subLSTM output ``h = sigma(c) - o``."""
    return sigma_c - o


def _lstm_grads(dh, dc_next, i, f, g, o, tanh_c, c_prev, m):
    """LSTM step backward -> ``(d pre_i, d pre_f, d pre_z, d pre_o, dc_prev)``."""
    d_o = dh * tanh_c * o * (1.0 - o)
    dc = dh * o * (1.0 - tanh_c * tanh_c) + dc_next
    d_i = dc * g * m * i * (1.0 - i)
    d_g = dc * i * m * (1.0 - g * g)
    d_f = dc * c_prev * f * (1.0 - f)
    return d_i, d_f, d_g, d_o, dc * f


def _sub_grads(dh, dc_next, i, f, z, o, sigma_c, c_prev, m):
    """subLSTM / fix-subLSTM step backward -> ``(d pre_i, d pre_f, d pre_z, d pre_o, dc_prev)``.

    For fix-subLSTM ``d pre_f`` is the step's contribution to ``d phi``.
    """
    d_o = -dh * o * (1.0 - o)
    dc = dh * sigma_c * (1.0 - sigma_c) + dc_next
    d_i = -dc * i * (1.0 - i)
    d_z = dc * m * z * (1.0 - z)
    d_f = dc * c_prev * f * (1.0 - f)
    return d_i, d_f, d_z, d_o, dc * f


# cell name -> (memory, readout, grads); the kernels' KIND is the cell's CellKind.code
EQUATIONS = {
    name: (_sub_memory, _sub_readout, _sub_grads)
    if kind.subtractive
    else (_lstm_memory, _lstm_readout, _lstm_grads)
    for name, kind in CELLS.items()
}


# -- argument handling shared by both implementations --------------------------------------


def kind_name(kind: str | CellKind) -> str:
    return kind.name if isinstance(kind, CellKind) else cell_kind(kind).name


def num_gates(name: str) -> int:
    return CELLS[name].num_gates


def check_2d(name: str, x: Tensor, rows: int, cols: int) -> None:
    if x.dim() != 2 or x.shape[0] != rows or x.shape[1] != cols:
        raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(x.shape)}")


def check_common(
    name: str,
    pre_like: Tensor,
    c_prev: Tensor,
    forget_phi: Tensor | None,
    update_mask: Tensor | None,
    active: Tensor | None,
    pre_name: str,
) -> tuple[int, int]:
    if c_prev.dim() != 2:
        raise ValueError(f"c_prev must be (B, H), got {tuple(c_prev.shape)}")
    batch, hidden = c_prev.shape
    check_2d(pre_name, pre_like, batch, num_gates(name) * hidden)
    if name == "fix_sublstm":
        if forget_phi is None:
            raise ValueError("fix_sublstm needs forget_phi (phi, shape (H,)); got None")
        if forget_phi.shape != (hidden,):
            raise ValueError(
                f"forget_phi must have shape ({hidden},), got {tuple(forget_phi.shape)}"
            )
    elif forget_phi is not None:
        raise ValueError(f"{name} has no learned decay: forget_phi must be None")
    if update_mask is not None:
        check_2d("update_mask", update_mask, batch, hidden)
    if active is not None:
        if active.shape != (batch,):
            raise ValueError(f"active must have shape ({batch},), got {tuple(active.shape)}")
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got {active.dtype}")
    return batch, hidden


def out_or_new(buf: Tensor | None, name: str, like: Tensor, rows: int, cols: int) -> Tensor:
    if buf is None:
        return torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    check_2d(name, buf, rows, cols)
    return buf


# -- PyTorch twins ---------------------------------------------------------------------------


def _twin_dtype(*xs: Tensor | None) -> torch.dtype:
    """Promoted floating dtype of the inputs, float16/bfloat16 computed in float32."""
    dtype = torch.float32
    floats = [x.dtype for x in xs if x is not None and x.is_floating_point()]
    if floats:
        dtype = floats[0]
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _store(buf: Tensor | None, value: Tensor) -> Tensor:
    """``value`` itself, or copied into the preallocated ``buf``."""
    if buf is None:
        return value
    if value is not buf:
        buf.copy_(value)
    return buf


def _gate_blocks(name: str, act: Tensor, hidden: int, forget_phi: Tensor | None, dtype):
    """(i, f, z, o) views of ``act`` (``f = sigmoid(phi)`` for fix-subLSTM)."""
    if name == "fix_sublstm":
        i, z, o = act.split(hidden, dim=1)
        f = torch.sigmoid(forget_phi.to(dtype))
    else:
        i, f, z, o = act.split(hidden, dim=1)
    return i, f, z, o


def pointwise_forward_torch(
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
    """PyTorch twin of :func:`pointwise_forward`: same arguments, same results."""
    name = kind_name(kind)
    batch, hidden = check_common(name, pre, c_prev, forget_phi, update_mask, active, "pre")
    if active is not None and h_prev is None:
        raise ValueError("active needs h_prev: inactive rows keep the previous state")
    dtype = _twin_dtype(pre, c_prev, h_prev, update_mask, forget_phi)
    memory, readout, _ = EQUATIONS[name]

    if store_act and act is not None:
        check_2d("act", act, batch, pre.shape[1])
    if store_act and act is not None and act.dtype == dtype:
        a = act  # activations computed in the output buffer (which may be ``pre`` itself)
        if act.data_ptr() != pre.data_ptr():
            act.copy_(pre)
    else:
        a = pre.to(dtype, copy=True)
    if name == "lstm":
        a[:, : 2 * hidden].sigmoid_()
        a[:, 2 * hidden : 3 * hidden].tanh_()
        a[:, 3 * hidden :].sigmoid_()
    else:
        a.sigmoid_()
    i, f, z, o = _gate_blocks(name, a, hidden, forget_phi, dtype)
    cp = c_prev.to(dtype)
    m = 1.0 if update_mask is None else update_mask.to(dtype)
    c_new = memory(i, f, z, cp, m)
    h_new = readout(torch.tanh(c_new) if name == "lstm" else torch.sigmoid(c_new), o)
    if active is not None:
        keep = active.unsqueeze(1)
        out_new = torch.where(keep, h_new, torch.zeros((), dtype=dtype, device=h_new.device))
        h_new = torch.where(keep, h_new, h_prev.to(dtype))
        c_new = torch.where(keep, c_new, cp)
    else:
        out_new = h_new

    act_res = None
    if store_act:
        act_res = _store(act, a) if act is not None else a.to(pre.dtype)
    state_dtype = c_prev.dtype
    if out is not None and h is None and active is None:
        h = out
    h_res = _store(h, h_new.to(state_dtype))
    c_res = _store(c, c_new.to(state_dtype))
    if active is None and (out is None or out is h_res):
        out_res = h_res
    else:
        out_res = _store(out, out_new.to(state_dtype))
    return PointwiseForward(h_res, c_res, act_res, out_res)


def pointwise_backward_torch(
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
    """PyTorch twin of :func:`pointwise_backward`: same arguments, same results."""
    name = kind_name(kind)
    batch, hidden = check_common(name, act, c_prev, forget_phi, update_mask, active, "act")
    check_2d("c", c, batch, hidden)
    for label, g in (("grad_h", grad_h), ("grad_c", grad_c), ("grad_out", grad_out)):
        if g is not None:
            check_2d(label, g, batch, hidden)
    dtype = _twin_dtype(act, c_prev, c, update_mask, forget_phi, grad_h, grad_c, grad_out)
    _, _, grads = EQUATIONS[name]

    a = act.to(dtype)
    i, f, z, o = _gate_blocks(name, a, hidden, forget_phi, dtype)
    cc = c.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=act.device)
    gh = zero if grad_h is None else grad_h.to(dtype)
    dh = gh if grad_out is None else gh + grad_out.to(dtype)
    dc_next = zero if grad_c is None else grad_c.to(dtype)
    m = 1.0 if update_mask is None else update_mask.to(dtype)
    nonlin_c = torch.tanh(cc) if name == "lstm" else torch.sigmoid(cc)
    d_i, d_f, d_z, d_o, dc_prev = grads(dh, dc_next, i, f, z, o, nonlin_c, c_prev.to(dtype), m)
    d_f = d_f.expand(batch, hidden)
    blocks = [d_i, d_z, d_o] if name == "fix_sublstm" else [d_i, d_f, d_z, d_o]
    d_pre = torch.cat([b.expand(batch, hidden) for b in blocks], dim=1)
    carry = None
    if active is not None:
        keep = active.unsqueeze(1)
        d_pre = torch.where(keep, d_pre, zero)
        dc_prev = torch.where(keep, dc_prev, dc_next)
        d_f = torch.where(keep, d_f, zero)
        carry = torch.where(keep, zero, gh).expand(batch, hidden)
    dc_prev = dc_prev.expand(batch, hidden)

    grad_pre_res = _store(grad_pre, d_pre.to(act.dtype if grad_pre is None else grad_pre.dtype))
    grad_c_prev_res = _store(grad_c_prev, dc_prev.to(c_prev.dtype))
    carry_res = None
    if carry is not None:
        carry_dtype = (grad_h if grad_h is not None else c_prev).dtype
        carry_res = _store(grad_h_carry, carry.to(carry_dtype).contiguous())
    phi_res = None
    if name == "fix_sublstm":
        if grad_phi_accum is not None:
            check_2d("grad_phi_accum", grad_phi_accum, batch, hidden)
            grad_phi_accum.add_(d_f.to(grad_phi_accum.dtype))
            phi_res = grad_phi_accum
        else:
            phi_res = d_f.to(forget_phi.dtype).contiguous()
    return PointwiseBackward(grad_pre_res, grad_c_prev_res, carry_res, phi_res)
