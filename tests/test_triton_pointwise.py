"""The fused per-step pointwise kernels of ``kernels/triton_pointwise.py``.

* The PyTorch twins against the reference equations of ``cells.py`` (forward) and
  autograd through them (backward), float64, for all three cells, with update mask and
  finished (inactive) rows.
* The Triton kernels against the twins on CPU tensors in Triton's interpreter
  (``TRITON_INTERPRET=1``); skipped when triton is not installed (CI does not install it).
* The whole-sequence composition the module docstring describes, built from either
  implementation, against autograd through the reference layer.
* The kernels compile for sm_90 without a GPU (Triton's own compiler, no launch).
* On a CUDA machine (``-m gpu``): the compiled kernels against the twins.
* The module imports and refuses cleanly without triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from microcircuits.cells import CELLS, CellWeights, LSTMState
from microcircuits.kernels import triton_pointwise as tp
from microcircuits.kernels.reference import run_layer_reference

CELL_NAMES = ["lstm", "sublstm", "fix_sublstm"]
SRC = Path(__file__).resolve().parents[1] / "src"

needs_triton = pytest.mark.skipif(
    not tp.TRITON_AVAILABLE, reason="triton is not installed (optional; CI does not install it)"
)
needs_cuda_triton = pytest.mark.skipif(
    not (tp.TRITON_AVAILABLE and torch.cuda.is_available()),
    reason="needs triton and a CUDA device",
)


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter on for this test (kernels are built per mode, lazily)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tp.interpret_mode()


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _inputs(cell, batch, hidden, dtype=torch.float64, device="cpu", mask=True, active=True):
    g = CELLS[cell].num_gates
    kw = dict(dtype=dtype, device=device)
    pre = torch.randn(batch, g * hidden, **kw) * 2
    c_prev = torch.randn(batch, hidden, **kw)
    h_prev = torch.randn(batch, hidden, **kw)
    phi = torch.randn(hidden, **kw) if cell == "fix_sublstm" else None
    upd = (torch.rand(batch, hidden, device=device) > 0.3).to(dtype) / 0.7 if mask else None
    act = None
    if active:
        act = torch.arange(batch, device=device) % 3 != 1  # some rows finished
    return pre, c_prev, h_prev, phi, upd, act


def _expected_forward(cell, pre, c_prev, h_prev, phi, upd, act):
    ref = CELLS[cell].pointwise(pre, c_prev, phi, upd)
    if act is None:
        return ref.h, ref.c, ref.h
    keep = act.unsqueeze(1)
    return (
        torch.where(keep, ref.h, h_prev),
        torch.where(keep, ref.c, c_prev),
        torch.where(keep, ref.h, torch.zeros_like(ref.h)),
    )


def _expected_act(cell, pre):
    hidden = pre.shape[1] // CELLS[cell].num_gates
    act = torch.sigmoid(pre)
    if cell == "lstm":
        act[:, 2 * hidden : 3 * hidden] = torch.tanh(pre[:, 2 * hidden : 3 * hidden])
    return act


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- the twins against cells.py --------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "mask,active", [(False, False), (True, False), (False, True), (True, True)]
)
def test_twin_forward_equals_cell_equations(cell, mask, active):
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, 7, 5, mask=mask, active=active)
    r = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    h, c, out = _expected_forward(cell, pre, c_prev, h_prev, phi, upd, act)
    _close(r.h, h, 1e-14)
    _close(r.c, c, 1e-14)
    _close(r.out, out, 1e-14)
    _close(r.act, _expected_act(cell, pre), 1e-14)
    if act is None:
        assert r.out is r.h
    else:
        assert (r.out[~act] == 0).all()


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("mask,active", [(False, False), (True, True), (True, False)])
def test_twin_backward_equals_autograd(cell, mask, active):
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, 7, 5, mask=mask, active=active)
    leaves = [pre, c_prev, h_prev] + ([phi] if phi is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    h, c, out = _expected_forward(cell, pre, c_prev, h_prev, phi, upd, act)
    gh, gc, go = (torch.randn_like(h) for _ in range(3))
    loss = (gh * h).sum() + (gc * c).sum() + (go * out).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    with torch.no_grad():
        f = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
        b = tp.pointwise_backward_torch(
            cell, f.act, c_prev, f.c, phi, upd, act, gh, gc, grad_out=go
        )
    _close(b.grad_pre, grads[0], 1e-12)
    _close(b.grad_c_prev, grads[1], 1e-12)
    if act is None:
        assert b.grad_h_carry is None and grads[2] is None
    else:
        _close(b.grad_h_carry, grads[2], 1e-12)
    if cell == "fix_sublstm":
        _close(b.grad_phi.sum(0), grads[3], 1e-12)
    else:
        assert b.grad_phi is None


def test_twin_backward_sublstm_matches_paper_delta_equations():
    """Section 3.1 of the paper, written out: delta o, c, f, i, z of one subLSTM step."""
    pre, c_prev, *_ = _inputs("sublstm", 4, 3, mask=False, active=False)
    f = tp.pointwise_forward_torch("sublstm", pre, c_prev)
    i, fg, z, o = f.act.chunk(4, dim=1)
    dh, dc_next = torch.randn_like(c_prev), torch.randn_like(c_prev)
    b = tp.pointwise_backward_torch("sublstm", f.act, c_prev, f.c, grad_h=dh, grad_c=dc_next)
    sig_c = torch.sigmoid(f.c)
    dc = dh * sig_c * (1 - sig_c) + dc_next
    expected = torch.cat(
        [-dc * i * (1 - i), dc * c_prev * fg * (1 - fg), dc * z * (1 - z), -dh * o * (1 - o)], 1
    )
    _close(b.grad_pre, expected, 1e-14)
    _close(b.grad_c_prev, dc * fg, 1e-14)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_twin_in_place_buffers(cell):
    """act may be pre, h/c may be h_prev/c_prev, grads may overwrite their inputs."""
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, 6, 4)
    want = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    gh, gc, go = (torch.randn_like(c_prev) for _ in range(3))
    want_b = tp.pointwise_backward_torch(cell, want.act, c_prev, want.c, phi, upd, act, gh, gc,
                                         grad_out=go)  # fmt: skip

    p, cp, hp = pre.clone(), c_prev.clone(), h_prev.clone()
    cs = c_prev.clone()
    r = tp.pointwise_forward_torch(cell, p, cs, phi, upd, act, h_prev=hp, act=p, h=hp, c=cs)
    assert r.act is p and r.h is hp and r.c is cs
    _close(p, want.act, 0)
    _close(hp, want.h, 0)
    _close(cs, want.c, 0)
    g_h, g_c = gh.clone(), gc.clone()
    rb = tp.pointwise_backward_torch(cell, p, cp, cs, phi, upd, act, g_h, g_c, grad_out=go,
                                     grad_pre=p, grad_c_prev=g_c, grad_h_carry=g_h)  # fmt: skip
    assert rb.grad_pre is p and rb.grad_c_prev is g_c and rb.grad_h_carry is g_h
    _close(p, want_b.grad_pre, 0)
    _close(g_c, want_b.grad_c_prev, 0)
    _close(g_h, want_b.grad_h_carry, 0)


def test_twin_half_precision_computes_in_float32():
    pre, c_prev, *_ = _inputs("sublstm", 4, 3, dtype=torch.float32, mask=False, active=False)
    r = tp.pointwise_forward_torch("sublstm", pre.bfloat16(), c_prev.bfloat16())
    want = tp.pointwise_forward_torch("sublstm", pre.bfloat16().float(), c_prev.bfloat16().float())
    assert r.h.dtype == torch.bfloat16 and r.act.dtype == torch.bfloat16
    _close(r.h.float(), want.h.bfloat16().float(), 0)


def test_twin_inference_stores_no_activations():
    pre, c_prev, *_ = _inputs("lstm", 4, 3, mask=False, active=False)
    r = tp.pointwise_forward_torch("lstm", pre, c_prev, store_act=False)
    assert r.act is None
    _close(r.h, CELLS["lstm"].pointwise(pre, c_prev).h, 1e-14)


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: tp.pointwise_forward_torch("fix_sublstm", torch.zeros(2, 6), torch.zeros(2, 2)),
         ValueError, "forget_phi"),
        (lambda: tp.pointwise_forward_torch("lstm", torch.zeros(2, 6), torch.zeros(2, 2)),
         ValueError, r"pre must have shape \(2, 8\)"),
        (lambda: tp.pointwise_forward_torch("lstm", torch.zeros(2, 8), torch.zeros(2, 2),
                                            active=torch.ones(2, dtype=torch.bool)),
         ValueError, "h_prev"),
        (lambda: tp.pointwise_forward_torch("lstm", torch.zeros(2, 8), torch.zeros(2, 2),
                                            active=torch.ones(2), h_prev=torch.zeros(2, 2)),
         TypeError, "bool"),
        (lambda: tp.pointwise_forward_torch("lstm", torch.zeros(2, 8), torch.zeros(2, 2),
                                            forget_phi=torch.zeros(2)),
         ValueError, "no learned decay"),
        (lambda: tp.pointwise_forward_torch("gru", torch.zeros(2, 8), torch.zeros(2, 2)),
         ValueError, "unknown cell"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# -- the whole-sequence recipe of the module docstring -----------------------------------------


def _weights(cell, inp, hidden, dtype, device):
    g = CELLS[cell].num_gates
    kw = dict(dtype=dtype, device=device)
    return CellWeights(
        torch.randn(g * hidden, inp, **kw) * 0.5,
        torch.randn(g * hidden, hidden, **kw) * 0.5,
        torch.randn(g * hidden, **kw) * 0.1,
        torch.randn(g * hidden, **kw) * 0.1,
        torch.randn(hidden, **kw) if cell == "fix_sublstm" else None,
    )


def _sequence(fwd, bwd, cell, x, h0, c0, w, lengths, mask, dy, dhn, dcn):
    """Forward and backward of one layer, exactly as the module docstring composes them."""
    steps, batch, inp = x.shape
    hidden = h0.shape[1]
    g = CELLS[cell].num_gates
    gates = torch.addmm(w.bias_ih + w.bias_hh, x.reshape(steps * batch, inp), w.weight_ih.t())
    gates = gates.view(steps, batch, g * hidden)
    cbuf = x.new_empty(steps + 1, batch, hidden)
    cbuf[0] = c0
    y = x.new_empty(steps, batch, hidden)
    active = None
    if lengths is not None:
        active = torch.arange(steps, device=x.device)[:, None] < lengths.to(x.device)[None, :]
    h = h0.clone()
    for t in range(steps):
        a_t = None if active is None else active[t]
        gates[t].addmm_(h, w.weight_hh.t())
        r = fwd(cell, gates[t], cbuf[t], w.forget, mask, a_t, h_prev=h, act=gates[t],
                c=cbuf[t + 1], out=y[t], h=h if a_t is not None else y[t])  # fmt: skip
        h = r.h
    hn, cn = h.clone(), cbuf[steps].clone()

    dh, dc = dhn.clone(), dcn.clone()
    dphi = x.new_zeros(batch, hidden) if cell == "fix_sublstm" else None
    for t in reversed(range(steps)):
        a_t = None if active is None else active[t]
        r = bwd(cell, gates[t], cbuf[t], cbuf[t + 1], w.forget, mask, a_t, dh, dc,
                grad_out=dy[t], grad_pre=gates[t], grad_c_prev=dc, grad_h_carry=dh,
                grad_phi_accum=dphi)  # fmt: skip
        if a_t is None:
            dh = torch.mm(gates[t], w.weight_hh)
        else:
            dh = r.grad_h_carry.addmm_(gates[t], w.weight_hh)
    dpre = gates.view(steps * batch, g * hidden)
    h_prev_all = torch.cat([h0[None], y[:-1]]).view(steps * batch, hidden)
    grads = {
        "x": (dpre @ w.weight_ih).view(steps, batch, inp),
        "h0": dh,
        "c0": dc,
        "weight_ih": dpre.t() @ x.reshape(steps * batch, inp),
        "weight_hh": dpre.t() @ h_prev_all,
        "bias_ih": dpre.sum(0),
        "bias_hh": dpre.sum(0),
    }
    if dphi is not None:
        grads["forget"] = dphi.sum(0)
    return y, hn, cn, grads


def _reference_sequence(cell, x, h0, c0, w, lengths, mask, dy, dhn, dcn):
    leaves = {"x": x, "h0": h0, "c0": c0, **{k: v for k, v in w._asdict().items() if v is not None}}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    weights = CellWeights(**{k: leaves.get(k) for k in CellWeights._fields})
    y, (hn, cn) = run_layer_reference(
        CELLS[cell], leaves["x"], LSTMState(leaves["h0"], leaves["c0"]), weights, lengths, mask
    )
    loss = (y * dy).sum() + (hn * dhn).sum() + (cn * dcn).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return y.detach(), hn.detach(), cn.detach(), grads


def _check_sequence(fwd, bwd, cell, dtype, device, tol, steps=4, batch=5, inp=3, hidden=6,
                    packed=True, mask=True):  # fmt: skip
    kw = dict(dtype=dtype, device=device)
    x = torch.randn(steps, batch, inp, **kw)
    h0, c0 = torch.randn(batch, hidden, **kw), torch.randn(batch, hidden, **kw)
    w = _weights(cell, inp, hidden, dtype, device)
    lengths = None
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
    upd = (torch.rand(batch, hidden, device=device) > 0.25).to(dtype) / 0.75 if mask else None
    dy = torch.randn(steps, batch, hidden, **kw)
    dhn, dcn = torch.randn(batch, hidden, **kw), torch.randn(batch, hidden, **kw)
    args = (cell, x, h0, c0, w, lengths, upd, dy, dhn, dcn)
    y, hn, cn, grads = _sequence(fwd, bwd, *args)
    y_r, hn_r, cn_r, grads_r = _reference_sequence(*args)
    _close(y, y_r, tol)
    _close(hn, hn_r, tol)
    _close(cn, cn_r, tol)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        _close(grads[name], grads_r[name], tol)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("packed,mask", [(False, False), (True, True)])
def test_twin_sequence_recipe_equals_reference_autograd(cell, packed, mask):
    fwd, bwd = tp.pointwise_forward_torch, tp.pointwise_backward_torch
    _check_sequence(fwd, bwd, cell, torch.float64, "cpu", 1e-10, packed=packed, mask=mask)


# -- Triton kernels in the interpreter, against the twins ----------------------------------------


def _kernel_vs_twin(cell, batch, hidden, dtype, device, tol, mask, active, accum=False):
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, batch, hidden, dtype, device, mask, active)
    want = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    got = tp.pointwise_forward(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    for a, b in zip(got, want):
        _close(a, b, tol)
    assert (got.out is got.h) == (act is None)
    gh, gc, go = (torch.randn_like(c_prev) for _ in range(3))
    acc_w = acc_g = None
    if accum and cell == "fix_sublstm":
        acc_w = torch.randn_like(c_prev)
        acc_g = acc_w.clone()
    want_b = tp.pointwise_backward_torch(cell, want.act, c_prev, want.c, phi, upd, act, gh, gc,
                                         grad_out=go, grad_phi_accum=acc_w)  # fmt: skip
    got_b = tp.pointwise_backward(cell, got.act, c_prev, got.c, phi, upd, act, gh, gc,
                                  grad_out=go, grad_phi_accum=acc_g)  # fmt: skip
    for a, b in zip(got_b, want_b):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, tol)


@needs_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("mask,active", [(False, False), (True, True)])
def test_kernels_equal_twins_in_interpreter(interpret, cell, dtype, tol, mask, active):
    # B=9, H=130: two column tiles (BLOCK_H=128) and ragged edges in both directions.
    _kernel_vs_twin(cell, 9, 130, dtype, "cpu", tol, mask, active, accum=True)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, by design
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_kernels_handle_none_gradients_and_saturation(interpret, cell):
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, 3, 4, torch.float32)
    pre = pre * 40  # saturated gates: no inf/nan from sigmoid or tanh
    got = tp.pointwise_forward(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    want = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        _close(a, b, 2e-6)
    for gh, gc, go in [(None, None, None), (torch.randn_like(c_prev), None, None)]:
        kw = dict(grad_out=go)
        got_b = tp.pointwise_backward(cell, got.act, c_prev, got.c, phi, upd, act, gh, gc, **kw)
        want_b = tp.pointwise_backward_torch(cell, want.act, c_prev, want.c, phi, upd, act, gh, gc,
                                             **kw)  # fmt: skip
        for a, b in zip(got_b, want_b):
            if a is not None:
                _close(a, b, 2e-6)


@needs_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_kernels_strided_rows_and_in_place(interpret, cell):
    """Row-strided views (buffer[t], column slices) and aliased outputs, as the recipe uses."""
    pre, c_prev, h_prev, phi, upd, act = _inputs(cell, 5, 6, torch.float32)
    want = tp.pointwise_forward_torch(cell, pre, c_prev, phi, upd, act, h_prev=h_prev)
    wide = torch.zeros(5, pre.shape[1] + 7)
    wide[:, : pre.shape[1]] = pre
    p = wide[:, : pre.shape[1]]  # row stride > row length
    hp, cs = h_prev.clone(), c_prev.clone()
    r = tp.pointwise_forward(cell, p, cs, phi, upd, act, h_prev=hp, act=p, h=hp, c=cs)
    assert r.act is p and r.h is hp and r.c is cs
    for a, b in zip((p, hp, cs, r.out), (want.act, want.h, want.c, want.out)):
        _close(a, b, 2e-6)
    assert (wide[:, pre.shape[1] :] == 0).all()  # nothing written past the view
    gh, gc = torch.randn_like(c_prev), torch.randn_like(c_prev)
    want_b = tp.pointwise_backward_torch(cell, want.act, c_prev, want.c, phi, upd, act, gh, gc)
    r = tp.pointwise_backward(cell, p, c_prev, cs, phi, upd, act, gh, gc,
                              grad_pre=p, grad_c_prev=gc, grad_h_carry=gh)  # fmt: skip
    assert r.grad_pre is p and r.grad_c_prev is gc and r.grad_h_carry is gh
    for a, b in zip(r[:3], want_b[:3]):
        _close(a, b, 2e-6)


@needs_triton
def test_kernels_half_precision_storage(interpret):
    pre, c_prev, h_prev, phi, upd, act = _inputs("lstm", 4, 5, torch.float32)
    args = (pre.bfloat16(), c_prev.bfloat16(), phi, upd, act)
    got = tp.pointwise_forward("lstm", *args, h_prev=h_prev.bfloat16())
    want = tp.pointwise_forward_torch("lstm", *args, h_prev=h_prev.bfloat16())
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        _close(a.float(), b.float(), 1e-2)  # both compute in float32; rounding may differ by 1 ulp


@needs_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_kernel_sequence_recipe_equals_reference_autograd(interpret, cell):
    fwd, bwd = tp.pointwise_forward, tp.pointwise_backward
    _check_sequence(fwd, bwd, cell, torch.float64, "cpu", 1e-10, steps=3, batch=4, hidden=5)


@needs_triton
def test_triton_available_reports_device_and_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tp.triton_available(torch.device("cpu"))
    assert tp.triton_available(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tp.pointwise_forward("lstm", torch.zeros(2, 8), torch.zeros(2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tp.triton_available(torch.device("cpu"))


@needs_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_kernels_compile_for_sm90_without_gpu(cell):
    """The real (non-interpreted) compiler accepts the kernels: TTIR -> PTX -> cubin."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - other Triton versions
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {exc}")
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ns = tp._kernels()
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    memory, readout, grads = ns.equations[cell]
    code = CELLS[cell].code
    common = dict(KIND=code, HAS_MASK=True, HAS_ACTIVE=True, CDT=tl.float32, BLOCK_B=4,
                  BLOCK_H=128)  # fmt: skip
    variants = [
        (ns.forward, dict(common, MEMORY=memory, READOUT=readout, STORE_ACT=True, WRITE_OUT=True)),
        (ns.backward, dict(common, GRADS=grads, HAS_GH=True, HAS_GOUT=True, HAS_GC=True,
                           ACCUM_PHI=True)),
    ]  # fmt: skip
    for kernel, consts in variants:
        sig = {}
        for n in kernel.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n == "active_ptr":
                sig[n] = "*u8"
            else:
                sig[n] = "*fp32" if n.endswith("_ptr") else "i32"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 4})  # fmt: skip
            except RuntimeError as exc:  # e.g. a wheel without the NVIDIA backend tools
                if "ptxas" in str(exc) or "backend" in str(exc).lower():
                    pytest.skip(f"no CUDA compiler backend in this triton: {exc}")
                raise
        assert len(k.asm["cubin"]) > 0


# -- without triton ------------------------------------------------------------------------------


def test_flag_off_refuses_with_clear_error(monkeypatch):
    monkeypatch.setattr(tp, "TRITON_AVAILABLE", False)
    monkeypatch.setattr(tp, "_TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    assert not tp.triton_available(torch.device("cuda"))
    assert not tp.interpret_mode()
    pre, c_prev, *_ = _inputs("lstm", 2, 3, mask=False, active=False)
    with pytest.raises(RuntimeError, match="'triton' package"):
        tp.pointwise_forward("lstm", pre, c_prev)
    f = tp.pointwise_forward_torch("lstm", pre, c_prev)
    with pytest.raises(RuntimeError, match="'triton' package"):
        tp.pointwise_backward("lstm", f.act, c_prev, f.c)


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from microcircuits.kernels import triton_pointwise as tp\n"
        "assert tp.TRITON_AVAILABLE is False and tp.triton_available('cuda') is False\n"
        "pre, c = torch.randn(2, 12), torch.randn(2, 3)\n"
        "tp.pointwise_forward_torch('sublstm', pre, c)\n"
        "try:\n"
        "    tp.pointwise_forward('sublstm', pre, c)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("batch,hidden", [(3, 5), (20, 650), (256, 1024)])
def test_gpu_kernels_equal_twins(compiled, cell, dtype, tol, batch, hidden):
    _kernel_vs_twin(cell, batch, hidden, dtype, "cuda", tol, True, True, accum=True)
    _kernel_vs_twin(cell, batch, hidden, dtype, "cuda", tol, False, False)


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_gpu_kernel_sequence_recipe_equals_reference(compiled, monkeypatch, cell, dtype, tol):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fwd, bwd = tp.pointwise_forward, tp.pointwise_backward
    _check_sequence(fwd, bwd, cell, dtype, "cuda", tol, steps=6, batch=8, inp=7, hidden=33)
