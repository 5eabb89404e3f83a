r"""The matrix products of the fused CPU kernel (:mod:`.cpu_fused`) and what runs them.

A layer call's products are the input projection of the whole sequence, one product
with the recurrent weight ``R`` per step (forward and backward) and, after backward's
sweep, ``dx`` and the weight gradients. This module chooses the library for each
(:func:`step_backend`, :func:`gemm_backend`, :func:`whole_sequence_onednn`), holds the
switches that steer the choice, and runs the products the Python side makes
(:class:`Recurrent` for the per-step ones, :func:`projection`, :func:`mm`,
:func:`weight_grad`). Whether a call may use the C++ loops at all, and their direct
path, is decided here too (:func:`native_loops`, :func:`direct_available`): the direct path
runs its per-step products itself, with oneDNN's brgemm.

GEMMs
-----
MKL (``torch.mm``) runs its AVX2 kernels on AMD CPUs while oneDNN JITs AVX-512 ones, so
on AVX-512 CPUs every float32 product outside the direct path's steps goes to oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU backend uses): the input
projection, ``dx`` and the weight gradients, and the ATen loops' per-step products with
the recurrent weight packed once per call (``_reorder_linear_weight``; the ``.binary``
variant fuses the ``+ gates_t``). Elsewhere MKL, except per-step products with a weight
of at least ``_ONEDNN_MIN_WEIGHT_BYTES`` (1.5 MiB, env
``MICROCIRCUITS_ONEDNN_MIN_BYTES``), which MKL would repack on every call. Weight
gradients are computed as ``(x^T dpre)^T``, the faster layout. oneDNN's RNN primitive
(``torch.nn.LSTM``'s) implements the LSTM equations only; the dispatcher uses it for
:class:`~microcircuits.LSTM` where the math is the same (:mod:`.aten_lstm`).

Switches (read once, at import): ``MICROCIRCUITS_ONEDNN_MIN_BYTES`` (the per-step
threshold above), ``MICROCIRCUITS_ONEDNN_WHOLE=0`` (the whole-sequence products on MKL
on AVX-512 CPUs too), ``MICROCIRCUITS_DIRECT=0`` (no direct path).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import native
from ._projection import input_projection

__all__ = [
    "Recurrent",
    "direct_available",
    "direct_blocking",
    "gemm_backend",
    "linear",
    "mm",
    "native_loops",
    "onednn_available",
    "onednn_projection",
    "projection",
    "step_backend",
    "weight_grad",
    "whole_sequence_onednn",
]


def _cpu_has_avx512() -> bool:
    """Whether ATen runs AVX-512 kernels here (then so do oneDNN's JIT kernels)."""
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except Exception:  # pragma: no cover - older torch
        return False


# oneDNN for every float32 product on AVX-512 CPUs, else for per-step weights >= 1.5 MiB
# (see "GEMMs" above); MICROCIRCUITS_ONEDNN_MIN_BYTES overrides the per-step threshold.
_AVX512 = _cpu_has_avx512()
_ONEDNN_MIN_WEIGHT_BYTES = int(
    os.environ.get("MICROCIRCUITS_ONEDNN_MIN_BYTES", 0 if _AVX512 else 3 << 19)
)
_ONEDNN_WHOLE_SEQUENCE = _AVX512 and os.environ.get("MICROCIRCUITS_ONEDNN_WHOLE", "1") != "0"
# the direct path of the C++ loops (see direct_available); MICROCIRCUITS_DIRECT=0 turns it off
_DIRECT = os.environ.get("MICROCIRCUITS_DIRECT", "1") != "0"
# how the direct path splits a layer call over threads: 0 by rows where each thread gets
# two or more, else by hidden units; 1 by rows; 2 by units (see csrc/direct_steps.cpp).
# _DIRECT_BLOCKS: threads, 0 for torch's number
_DIRECT_SPLIT = 0
_DIRECT_BLOCKS = 0
_ONEDNN_MIN_INPUT = 16  # smaller inputs: the projection is a copy, MKL into a reused buffer
_SERIAL_POINTWISE_MAX = 1 << 18  # per-step pointwise ops on up to this many elements: 1 thread
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _python_dispatch_active() -> bool:
    """Whether a Python dispatch mode (``TorchDispatchMode``, e.g. ``FakeTensorMode``) is on."""
    stack_length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(stack_length is not None and stack_length() > 0)


# --------------------------------------------------------------------------- GEMMs


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether oneDNN's packed-weight linear ops exist and agree with ``torch.mm`` (probed once)."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(12, 5, generator=gen)
        x = torch.randn(3, 5, generator=gen)
        other = torch.randn(3, 12, generator=gen)
        packed = ops._reorder_linear_weight(w, 3)
        got = ops._linear_pointwise.binary(x, other, packed, None, "add")
        got_rows = ops._linear_pointwise.binary(x[:2], other[:2], packed, None, "add")
        want = torch.addmm(other, x, w.t())
        return bool(
            torch.allclose(got, want, atol=1e-5) and torch.allclose(got_rows, want[:2], atol=1e-5)
        )
    except Exception:  # pragma: no cover - depends on the torch build
        return False


def whole_sequence_onednn(dtype: torch.dtype) -> bool:
    """Whether the whole-sequence products (input projection, backward's ``dx``, ``dW``)
    run on oneDNN (float32 on AVX-512 CPUs) rather than ``torch.mm`` (MKL)."""
    return (
        dtype == torch.float32
        and _ONEDNN_WHOLE_SEQUENCE
        and onednn_available()
        and not _aten_only()
    )


def _aten_only() -> bool:
    """Whether only plain ATen ops may run (``torch.jit.trace`` records them; a Python
    dispatch mode such as fake tensors implements them, not oneDNN's ops)."""
    return torch.jit.is_tracing() or _python_dispatch_active()


def mm(a: Tensor, b: Tensor, onednn: bool) -> Tensor:
    """``a @ b``; on oneDNN as ``linear(a, W = b^T)`` (any strides: oneDNN reorders)."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


def onednn_projection(dtype: torch.dtype, in_size: int) -> bool:
    """Whether :func:`projection` of inputs of ``in_size`` features runs on oneDNN (else
    MKL, into a buffer the caller may reuse)."""
    return whole_sequence_onednn(dtype) and in_size >= _ONEDNN_MIN_INPUT


def projection(
    x2d: Tensor, weight_ih: Tensor, bias: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """``x W^T + b`` of the whole sequence (or a chunk), ``(N, I) -> (N, G*H)``: one oneDNN
    product where :func:`whole_sequence_onednn` (then ``out`` is ignored), else
    :func:`~._projection.input_projection` (MKL)."""
    if onednn_projection(x2d.dtype, x2d.shape[-1]):
        return torch.ops.mkldnn._linear_pointwise(x2d, weight_ih.detach(), bias, "none", [], "")
    return input_projection(x2d, weight_ih.detach(), bias, out=out)


def gemm_backend(dtype: torch.dtype, batch: int, hidden: int, gate_rows: int) -> str:
    """Which library runs the per-step products of a layer: ``"onednn"`` or ``"blas"``."""
    del batch  # the crossover measured here depends on the weight size only
    weight_bytes = gate_rows * hidden * 4
    if (
        dtype == torch.float32
        and weight_bytes >= _ONEDNN_MIN_WEIGHT_BYTES
        and onednn_available()
        and not _aten_only()
    ):
        return "onednn"
    return "blas"


def native_loops(*tensors: Tensor | None):
    """The C++ step loops (:mod:`.native`) for a call on ``tensors``, or ``None``
    where they are not built, or where ATen ops must stay visible to Python: under
    ``torch.jit.trace`` (which records them), a Python dispatch mode (e.g. fake
    tensors for shape inference) or with tensor subclasses (their ``__torch_dispatch__``
    would be bypassed, and C++ reads data pointers they may not have)."""
    if torch.jit.is_tracing() or _python_dispatch_active():
        return None
    if any(t is not None and type(t) not in _PLAIN_TENSORS for t in tensors):
        return None
    return native.step_loops()


def direct_available(dtype: torch.dtype, loops) -> bool:
    """Whether the C++ loops' direct paths (oneDNN's brgemm and AVX-512, float32) run
    here and are not switched off: every cell's layer calls (``forward_direct``,
    ``backward_direct`` in ``csrc/direct_steps.cpp``) and the ELM's memory loop."""
    if loops is None or not _DIRECT or dtype != torch.float32:
        return False
    available = getattr(loops, "direct_available", None)
    return available is not None and bool(available())


def direct_blocking() -> tuple[int, int]:
    """How the direct path splits a layer call over threads, as ``forward_direct`` and
    ``backward_direct`` take it: ``(split, blocks)``, see ``_DIRECT_SPLIT``."""
    return _DIRECT_SPLIT, _DIRECT_BLOCKS


def step_backend(dtype: torch.dtype, batch: int, hidden: int, gate_rows: int) -> str:
    """What runs a layer's per-step products, for any cell: ``"direct"`` (brgemm in the
    C++ loops), ``"onednn"`` or ``"blas"`` (ATen ops)."""
    if direct_available(dtype, native_loops()):
        return "direct"
    return gemm_backend(dtype, batch, hidden, gate_rows)


class Recurrent:
    """The per-step products with ``R`` (``weight_hh``, ``(G*H, H)``) of one layer call.

    ``forward(h, gates_t)`` returns ``gates_t + h R^T`` (``gates_t`` itself, updated in
    place, on the BLAS path; a new tensor on the oneDNN path). ``backward(dpre, add,
    out)`` returns ``add + dpre R`` (``add`` may be ``None``), in ``out`` on the BLAS path.

    Inside ``with rec.loop():`` the small pointwise ops between the products run on one
    thread and only the products use all of torch's threads (see "Threads" in
    :mod:`.cpu_fused`).
    """

    def __init__(
        self,
        weight_hh: Tensor,
        batch: int,
        *,
        forward: bool,
        backward: bool,
        direct: bool = False,
    ):
        gate_rows, hidden = weight_hh.shape
        self.backend = (
            "direct" if direct else gemm_backend(weight_hh.dtype, batch, hidden, gate_rows)
        )
        self.onednn = self.backend == "onednn"
        self._threads = torch.get_num_threads()
        self.serial = self._threads > 1 and batch * gate_rows <= _SERIAL_POINTWISE_MAX
        self._in_loop = False
        w = weight_hh.detach()
        if self.backend == "onednn":
            ops = torch.ops.mkldnn
            self._linear = ops._linear_pointwise.default
            self._linear_add = ops._linear_pointwise.binary
            pack = ops._reorder_linear_weight
            self.w_fwd = pack(w.contiguous(), batch) if forward else None  # W = R
            self.w_bwd = pack(w.t().contiguous(), batch) if backward else None  # W = R^T
        elif self.backend == "direct":  # R itself: forward_direct transposes it
            self.w_fwd = w.contiguous() if forward else None  # (G*H, H)
            self.w_bwd = w.contiguous() if backward else None
        else:
            self.w_fwd = w.t().contiguous() if forward else None  # (H, G*H)
            self.w_bwd = w.contiguous() if backward else None  # (G*H, H)

    def native(self, *tensors: Tensor | None):
        """:func:`native_loops` (kept as a method for the callers of the ATen loops)."""
        return native_loops(*tensors)

    @contextmanager
    def loop(self, python: bool = True) -> Iterator[None]:
        """The step loop's thread setting; ``python=False``: the C++ loops run the steps
        and switch threads themselves, so nothing changes here."""
        if not self.serial or not python:
            yield
            return
        torch.set_num_threads(1)
        self._in_loop = True
        try:
            yield
        finally:
            self._in_loop = False
            torch.set_num_threads(self._threads)

    def forward(self, h: Tensor, gates_t: Tensor) -> Tensor:
        if self._in_loop:
            torch.set_num_threads(self._threads)
        if self.backend == "onednn":
            out = self._linear_add(h, gates_t, self.w_fwd, None, "add")
        else:
            out = gates_t.addmm_(h, self.w_fwd)
        if self._in_loop:
            torch.set_num_threads(1)
        return out

    def backward(self, dpre: Tensor, add: Tensor | None, out: Tensor) -> Tensor:
        if self._in_loop:
            torch.set_num_threads(self._threads)
        if self.backend == "onednn":
            if add is None:
                out = self._linear(dpre, self.w_bwd, None, "none", [], "")
            else:
                out = self._linear_add(dpre, add.contiguous(), self.w_bwd, None, "add")
        elif add is None:
            out = torch.mm(dpre, self.w_bwd, out=out)
        else:
            out = torch.addmm(add, dpre, self.w_bwd, out=out)
        if self._in_loop:
            torch.set_num_threads(1)
        return out


_TRANSPOSED_WEIGHT_GRAD = True


def weight_grad(
    dpre: Tensor,
    inp: Tensor,
    dpre2: Tensor | None = None,
    inp2: Tensor | None = None,
    onednn: bool = False,
) -> Tensor:
    """``dpre^T inp (+ dpre2^T inp2)``, ``(G*H, K)``, for ``dpre`` ``(N, G*H)``, ``inp`` ``(N, K)``.

    Computed as ``(inp^T dpre)^T`` (a transposed view): MKL runs that product up to
    ~1.4x faster here than ``dpre^T inp``, more than the transposing copy autograd makes
    when it stores the gradient (see the module docstring); so does oneDNN.
    """
    if onednn:  # oneDNN copies a strided input, ATen a transposed gradient: do both fast
        out = mm(_transposed(inp), dpre, True)
        if dpre2 is not None and dpre2.shape[0] > 0:
            out = torch.ops.mkldnn._linear_pointwise.binary(
                _transposed(inp2), out, dpre2.t(), None, "add"
            )
        return _transposed(out)
    if _TRANSPOSED_WEIGHT_GRAD:
        out = torch.mm(inp.t(), dpre)
        if dpre2 is not None and dpre2.shape[0] > 0:
            out.addmm_(inp2.t(), dpre2)
        return out.t()
    out = torch.mm(dpre.t(), inp)
    if dpre2 is not None and dpre2.shape[0] > 0:
        out.addmm_(dpre2.t(), inp2)
    return out


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T + b`` with oneDNN products forward and backward (``dx``, ``dW``)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2d, weight = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if torch.is_grad_enabled():  # create_graph: differentiable ATen products
            return grad.mm(weight), grad.t().mm(x2d), grad_bias
        grad = grad.contiguous()
        grad_x = mm(grad, weight, True) if ctx.needs_input_grad[0] else None
        grad_weight = weight_grad(grad, x2d, onednn=True) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` of a whole sequence, ``(..., K) -> (..., N)``: on oneDNN forward and
    backward where :func:`whole_sequence_onednn` (2x MKL's time on AVX-512 AMD CPUs for
    ``(3200, 700) @ (700, 200)``, see the module docstring), else ``F.linear``."""
    if not (whole_sequence_onednn(x.dtype) and x.device.type == "cpu" and x.numel() > 0):
        return torch.nn.functional.linear(x, weight, bias)
    # a strided weight (a column slice) sends oneDNN to a slow generic kernel: 80 ms
    # against 0.5 for (4000, 45) @ (45, 40)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _transposed(t: Tensor) -> Tensor:
    """``t.t()`` as a new contiguous tensor (the C++ loops' tiled transpose where built)."""
    loops = native_loops(t)
    if loops is not None and hasattr(loops, "transposed"):
        return loops.transposed(t.contiguous())
    return t.t().contiguous()
