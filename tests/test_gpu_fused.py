"""The whole-sequence GPU kernel (``kernels/gpu_fused.py``) against the reference path.

The composition (projection GEMM, per-step GEMM + pointwise step, hand-written
backward) is checked on every machine with the PyTorch twins of the Triton kernels;
with Triton installed, also with the Triton kernels themselves in Triton's CPU
interpreter, through the dispatcher and the ``nn`` modules. On a CUDA machine
(``-m gpu``) the same on the GPU. The reference (``cells.py`` step functions under
autograd) is the oracle throughout.
"""

from __future__ import annotations

import pytest
import torch

import microcircuits as mc
from microcircuits import kernels
from microcircuits.cells import CELLS, CellWeights, LSTMState
from microcircuits.kernels import gpu_fused
from microcircuits.kernels import triton_pointwise as tp

from .test_kernels import LENGTHS, _inputs, _layer, _run, _with_grads

CELL_NAMES = list(CELLS)

needs_triton = pytest.mark.skipif(
    not tp.TRITON_AVAILABLE, reason="triton is not installed (optional; CI does not install it)"
)


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter on for this test: the kernels run on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tp.interpret_mode()


def _run_gpu_fused(pointwise, kind, x, state, weights, update_mask=None, lengths=None,
                   reverse=False):  # fmt: skip
    """As ``test_kernels._run``, through ``run_layer_gpu_fused`` with the given pointwise."""
    out, (h, c) = gpu_fused.run_layer_gpu_fused(
        kind, x, state, weights, lengths, update_mask, reverse, pointwise=pointwise
    )
    return _with_grads((out, h, c), x, state, weights)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask,bias", [(False, True), (True, True), (True, False)])
def test_twin_composition_matches_reference_float64(cell, lengths, reverse, mask, bias):
    kind, x, state, weights, update_mask = _layer(cell, mask=mask, bias=bias)
    args = (kind, x, state, weights, update_mask, LENGTHS[lengths], reverse)
    ref_out, ref_grads = _run("reference", *args)
    out, grads = _run_gpu_fused("torch", *args)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_twin_composition_gradcheck(cell):
    kind, x, state, weights, update_mask = _layer(cell, T=3, B=3, I=2, H=3, mask=True)
    lengths = torch.tensor([3, 1, 2])

    def f(*inputs):
        x, h, c, *ws = inputs
        it = iter(ws)
        w = CellWeights(*[next(it) if v is not None else None for v in weights])
        out, (hn, cn) = gpu_fused.run_layer_gpu_fused(
            kind, x, LSTMState(h, c), w, lengths, update_mask, pointwise="torch"
        )
        return out, hn, cn

    assert torch.autograd.gradcheck(f, _inputs(x, state, weights))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_backward_twice_with_retain_graph(cell):
    kind, x, state, weights, update_mask = _layer(cell, mask=True)
    out, (h, c) = gpu_fused.run_layer_gpu_fused(
        kind, x, state, weights, LENGTHS["unsorted"], update_mask, pointwise="torch"
    )
    loss = out.pow(2).sum() + h.sum() + c.sum()
    first = torch.autograd.grad(loss, _inputs(x, state, weights), retain_graph=True)
    second = torch.autograd.grad(loss, _inputs(x, state, weights))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", ["full", "unsorted"])
def test_inference_equals_training_forward_and_keeps_no_graph(cell, lengths):
    kind, x, state, weights, update_mask = _layer(cell, mask=True)
    args = (kind, x, state, weights, LENGTHS[lengths], update_mask)
    train_out = gpu_fused.run_layer_gpu_fused(*args, pointwise="torch")
    with torch.no_grad():
        infer_out = gpu_fused.run_layer_gpu_fused(*args, pointwise="torch")
    y, (h, c) = infer_out
    assert y.grad_fn is None and h.grad_fn is None
    for a, b in zip((train_out[0], *train_out[1]), (y, h, c)):
        torch.testing.assert_close(b, a.detach(), atol=1e-12, rtol=1e-12)


def test_partial_requires_grad_and_unknown_pointwise():
    kind, x, state, weights, _ = _layer("sublstm")
    x = x.detach()
    out, _ = gpu_fused.run_layer_gpu_fused(kind, x, state, weights, pointwise="torch")
    (g,) = torch.autograd.grad(out.sum(), weights.weight_hh)
    ref, _ = kernels.run_layer(kind, x, state, weights)
    (g_ref,) = torch.autograd.grad(ref.sum(), weights.weight_hh)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="pointwise must be one of"):
        gpu_fused.run_layer_gpu_fused(kind, x, state, weights, pointwise="cuda")


# -- dispatch -------------------------------------------------------------------------


def test_auto_never_takes_the_gpu_kernel_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    assert kernels.choose_kernel(kind, x, state, weights) == "cpu_fused"
    reason = gpu_fused.unsupported_reason(x, state, weights, None, None)
    assert reason is not None and ("CUDA" in reason or "Triton is not installed" in reason)
    with kernels.use_kernel("gpu_fused"), pytest.raises(ValueError, match="cannot run"):
        kernels.run_layer(kind, x, state, weights)


def test_unsupported_reasons_name_the_problem(monkeypatch):
    monkeypatch.setattr(tp, "TRITON_AVAILABLE", False)
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    assert "Triton is not installed" in gpu_fused.unsupported_reason(x, state, weights, None, None)
    monkeypatch.setattr(tp, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(tp, "triton_available", lambda device: True)
    assert gpu_fused.unsupported_reason(x, state, weights, None, None) is None
    assert "dtype" in gpu_fused.unsupported_reason(x.half(), *_halves(state, weights))
    assert "mixed" in gpu_fused.unsupported_reason(x.double(), state, weights, None, None)
    assert "integers" in gpu_fused.unsupported_reason(
        x, state, weights, torch.tensor([1.0] * 5), None
    )
    mask = torch.ones(5, 7, requires_grad=True)
    assert "requires grad" in gpu_fused.unsupported_reason(x, state, weights, None, mask)


def _halves(state, weights):
    h = LSTMState(state.h.half(), state.c.half())
    w = CellWeights(*[None if t is None else t.half() for t in weights])
    return h, w, None, None


# -- the Triton kernels, in Triton's CPU interpreter ----------------------------------


@needs_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths,reverse,mask", [("full", False, False), ("unsorted", True, True)])
def test_triton_composition_matches_reference(cell, lengths, reverse, mask, interpret):
    kind, x, state, weights, update_mask = _layer(cell, T=4, B=5, mask=mask)
    lens = None if LENGTHS[lengths] is None else LENGTHS[lengths].clamp(max=4)
    args = (kind, x, state, weights, update_mask, lens, reverse)
    ref_out, ref_grads = _run("reference", *args)
    with kernels.use_kernel("gpu_fused"):  # on CPU tensors: allowed in interpreter mode
        out, grads = _run("gpu_fused", *args)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


@needs_triton
def test_triton_kernel_runs_a_bidirectional_module(interpret):
    torch.manual_seed(0)
    model = mc.SubLSTM(3, 4, num_layers=2, bidirectional=True, update_dropout=0.3)
    x = torch.randn(5, 2, 3)
    torch.manual_seed(1)
    with kernels.use_kernel("reference"):
        ref, (h_ref, _) = model(x)
    torch.manual_seed(1)
    with kernels.use_kernel("gpu_fused"):
        out, (h, _) = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


# -- on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cuda_modules_take_the_gpu_kernel_and_match_reference(cell, monkeypatch):
    if not (torch.cuda.is_available() and tp.TRITON_AVAILABLE):
        pytest.skip("needs a CUDA device and triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float64, mask=True)
    move = [t.detach().cuda().requires_grad_() for t in _inputs(x, state, weights)]
    cx, cstate = move[0], LSTMState(move[1], move[2])
    cw = CellWeights(*move[3:7], move[7] if kind.learned_decay else None)
    assert kernels.choose_kernel(kind, cx, cstate, cw) == "gpu_fused"
    lengths = LENGTHS["unsorted"]
    args = (kind, cx, cstate, cw, update_mask.cuda(), lengths, True)
    ref_out, ref_grads = _run("reference", *args)
    out, grads = _run("gpu_fused", *args)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_a_state_on_another_device_is_named():
    kind, x, state, weights, _ = _layer("sublstm")
    moved = LSTMState(state.h.detach().to("meta"), state.c)
    with pytest.raises(ValueError, match="h0 is on meta"):
        gpu_fused.run_layer_gpu_fused(kind, x, moved, weights, pointwise="torch")


def test_higher_order_gradients_recompute_on_the_reference_path_too():
    """(Checked against the reference path in test_kernels.py.)"""
    kind, x, state, weights, _ = _layer("fix_sublstm")
    out, _ = gpu_fused.run_layer_gpu_fused(kind, x, state, weights, pointwise="torch")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    assert grad.requires_grad
