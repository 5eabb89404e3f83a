"""The C++ step loops of the fused CPU kernel: used by default, optional, and equal to
the reference path. (Their numerics are also covered by every test of
``tests/test_kernels.py`` that takes the ``step_loops`` fixture.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from microcircuits import kernels
from microcircuits.cells import LSTMState
from microcircuits.cli import main
from microcircuits.kernels import cpu_fused, native
from tests.test_kernels import CELL_NAMES, LENGTHS, _layer, _run


class _Spy:
    """Wraps the compiled module and counts the calls of each loop."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.module, name)(*args)

        return call


@pytest.mark.parametrize("step_loops", ["native"], indirect=True)
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("packed", [False, True])
def test_the_fused_kernel_runs_its_steps_in_cpp_by_default(cell, packed, monkeypatch, step_loops):
    spy = _Spy(native.step_loops())
    monkeypatch.setattr(native, "step_loops", lambda: spy)
    kind, x, state, weights, mask = _layer(cell, dtype=torch.float32, mask=True)
    lengths = LENGTHS["unsorted"] if packed else None
    with kernels.use_kernel("cpu_fused"):
        out, _ = kernels.run_layer(kind, x, state, weights, lengths=lengths, update_mask=mask)
        out.sum().backward()
        with torch.no_grad():
            kernels.run_layer(kind, x, state, weights, lengths=lengths, update_mask=mask)
    backward = "backward_steps" if cell == "lstm" else "backward_subtractive"
    assert spy.calls == ["forward_steps", backward, "forward_steps"]


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_inference_in_several_chunks_equals_the_reference(cell, monkeypatch, step_loops):
    """Long inputs are projected chunk by chunk; the state must carry across chunks."""
    monkeypatch.setattr(cpu_fused, "_INFERENCE_CHUNK_BYTES", 1)  # one step per chunk
    kind, x, state, weights, mask = _layer(cell, T=7, dtype=torch.float32, mask=True)
    with torch.no_grad():
        want = _run_no_grad("reference", kind, x, state, weights, mask)
        got = _run_no_grad("cpu_fused", kind, x, state, weights, mask)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _run_no_grad(kernel, kind, x, state, weights, mask):
    with kernels.use_kernel(kernel):
        out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=mask)
    return out, h, c


def test_non_contiguous_initial_state_and_mask(step_loops):
    """The loops read h0 through ATen (any strides) and copy c0/the mask to rows."""
    kind, x, state, weights, mask = _layer("sublstm", mask=True)
    wide_h = torch.randn(state.h.shape[1], state.h.shape[0], dtype=x.dtype).t()
    wide_c = torch.randn(state.c.shape[1], state.c.shape[0], dtype=x.dtype).t()
    odd = LSTMState(wide_h.requires_grad_(), wide_c.requires_grad_())
    mask_t = mask.t().contiguous().t()
    ref_out, ref_grads = _run("reference", kind, x, odd, weights, mask_t)
    out, grads = _run("cpu_fused", kind, x, odd, weights, mask_t)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV_VAR, "0")
    native.step_loops.cache_clear()
    try:
        assert native.step_loops() is None
    finally:
        native.step_loops.cache_clear()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_extension

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    native.step_loops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
            assert native.step_loops() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.step_loops() is None  # remembered: no second attempt, no warning
        # the kernel still runs, on its Python loops
        kind, x, state, weights, _ = _layer("fix_sublstm")
        ref_out, _ = _run("reference", kind, x, state, weights)
        out, _ = _run("cpu_fused", kind, x, state, weights)
        for a, b in zip(ref_out, out):
            torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)
        native.step_loops.cache_clear()
        assert main(["build-native"]) == 0
        assert "not available" in capsys.readouterr().out
    finally:
        native.step_loops.cache_clear()


def test_build_directory_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    where = native.build_directory()
    assert where.parent == tmp_path / "native"
    assert where.name.startswith("microcircuits_step_loops_")


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_transposed_gradients_of_the_final_state(cell, step_loops):
    """Autograd may hand backward non-contiguous gradients (here of h_n.t(), c_n.t())."""
    kind, x, state, weights, mask = _layer(cell, mask=True)
    grads = {}
    for kernel in ("reference", "cpu_fused"):
        with kernels.use_kernel(kernel):
            out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=mask)
        probe = torch.arange(h.numel(), dtype=h.dtype).view(h.shape[1], h.shape[0])
        loss = (h.t() * probe).sum() + (c.t() * probe.flip(0)).sum() + out.sum()
        grads[kernel] = torch.autograd.grad(loss, [x, state.h, state.c, weights.weight_hh])
    for a, b in zip(grads["reference"], grads["cpu_fused"]):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_fake_tensors_keep_to_aten_ops(cell, step_loops):
    """Shape inference with fake tensors (a Python dispatch mode) must see every ATen op:
    the C++ loops would read data pointers fake tensors do not have, so they step aside."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    import microcircuits as mc

    model = mc.make_rnn(cell, 3, 4, num_layers=2, update_dropout=0.25)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(5, 2, 3, requires_grad=True)
        out, (h, c) = model(x)
        out.sum().backward()
    assert isinstance(out, FakeTensor) and out.shape == (5, 2, 4) and h.shape == (2, 2, 4)
