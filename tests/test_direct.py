"""The direct path of the C++ step loops (``forward_direct``/``backward_direct`` in
``kernels/csrc/direct_steps.cpp``): the LSTM, subLSTM and fix-subLSTM in float32, a
brgemm product and one vectorised pass per step, the batch rows or the hidden units
split into blocks run on torch's OpenMP threads. It must agree with the reference path
(and with the ATen C++ loops) for every feature the fused kernel takes: variable
lengths, reversed direction, update masks, expanded or strided output gradients,
initial states, any number of row blocks, hidden sizes that are not multiples of the
vector width, and products long enough to be sliced along K."""

from __future__ import annotations

import pytest
import torch

from microcircuits import kernels
from microcircuits.kernels import cpu_fused, cpu_products, native
from tests.test_kernels import LENGTHS, _inputs, _layer, _run

CELLS = ["lstm", "sublstm", "fix_sublstm"]


@pytest.fixture
def direct():
    loops = native.step_loops()
    if loops is None or not loops.direct_available():
        pytest.skip("the direct path needs the C++ loops, oneDNN's brgemm and AVX-512")
    return loops


def _compare(kind, x, state, weights, mask=None, lengths=None, reverse=False, tol=1e-5):
    ref_out, ref_grads = _run("reference", kind, x, state, weights, mask, lengths, reverse)
    out, grads = _run("cpu_fused", kind, x, state, weights, mask, lengths, reverse)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("split,blocks", [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3)])
def test_direct_path_equals_the_reference(
    cell, lengths, reverse, mask, split, blocks, direct, monkeypatch
):
    """split 1: blocks of rows over threads; 2: blocks of hidden units (37 units: 16, 21
    or 16, 16, 5)."""
    monkeypatch.setattr(cpu_products, "_DIRECT_SPLIT", split)
    monkeypatch.setattr(cpu_products, "_DIRECT_BLOCKS", blocks)
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=mask, H=37)
    _compare(kind, x, state, weights, update_mask, LENGTHS[lengths], reverse)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("hidden", [1, 16, 33])
@pytest.mark.parametrize("split", [1, 2])
def test_direct_path_hidden_sizes(cell, hidden, split, direct, monkeypatch):
    """Vector tails (H not a multiple of 16), a single unit, more threads than unit blocks."""
    monkeypatch.setattr(cpu_products, "_DIRECT_SPLIT", split)
    monkeypatch.setattr(cpu_products, "_DIRECT_BLOCKS", 3)
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=True, H=hidden)
    _compare(kind, x, state, weights, update_mask, LENGTHS["unsorted"])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("split", [0, 1, 2])
def test_direct_path_long_products_in_slices(cell, split, direct, monkeypatch):
    """G*H > 1024: backward's products run in slices of K (split 0 chooses units here:
    3 rows for 2 threads)."""
    monkeypatch.setattr(cpu_products, "_DIRECT_SPLIT", split)
    monkeypatch.setattr(cpu_products, "_DIRECT_BLOCKS", 2)
    kind, x, state, weights, _ = _layer(cell, dtype=torch.float32, T=4, B=3, I=5, H=350)
    # float32 sums of 1050-1400 terms: the LSTM's gradients reach 40 here, and the ATen
    # loops differ from the reference by 2.4e-4 as the direct path does
    _compare(kind, x, state, weights, tol=1e-4 if cell != "lstm" else 4e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_direct_path_equals_the_aten_loops(cell, direct, monkeypatch):
    """The same numbers as the ATen C++ loops (the path it replaces), to float rounding."""
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=True, H=20)
    lengths = LENGTHS["unsorted"]
    got = _run("cpu_fused", kind, x, state, weights, update_mask, lengths)
    monkeypatch.setattr(cpu_products, "_DIRECT", False)
    want = _run("cpu_fused", kind, x, state, weights, update_mask, lengths)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("split", [1, 2])
def test_direct_path_strided_and_expanded_output_gradients(cell, split, direct, monkeypatch):
    monkeypatch.setattr(cpu_products, "_DIRECT_SPLIT", split)
    monkeypatch.setattr(cpu_products, "_DIRECT_BLOCKS", 2)
    kind, x, state, weights, _ = _layer(cell, dtype=torch.float32, H=19)
    grads = {}
    for kernel in ("reference", "cpu_fused"):
        with kernels.use_kernel(kernel):
            y, (h, c) = kernels.run_layer(kind, x, state, weights)
        probe = torch.arange(y.numel(), dtype=y.dtype).view(y.shape[2], y.shape[1], y.shape[0])
        strided = (y.transpose(0, 2) * probe / y.numel()).sum()  # grad_y: a transposed view
        grads[kernel] = [
            torch.autograd.grad(strided, _inputs(x, state, weights), retain_graph=True),
            torch.autograd.grad(y.sum() + c.sum(), _inputs(x, state, weights)),  # expanded
        ]
    for want, got in zip(grads["reference"], grads["cpu_fused"]):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("split", [1, 2])
def test_direct_path_inference_in_chunks(cell, split, direct, monkeypatch):
    """No-grad calls project the input chunk by chunk; the state carries across chunks."""
    monkeypatch.setattr(cpu_fused, "_INFERENCE_CHUNK_BYTES", 1)  # one step per chunk
    monkeypatch.setattr(cpu_products, "_DIRECT_SPLIT", split)
    monkeypatch.setattr(cpu_products, "_DIRECT_BLOCKS", 2)
    kind, x, state, weights, mask = _layer(cell, T=7, dtype=torch.float32, mask=True)
    for lengths in (None, LENGTHS["unsorted"]):
        outs = []
        for kernel in ("reference", "cpu_fused"):
            with torch.no_grad(), kernels.use_kernel(kernel):
                out, (h, c) = kernels.run_layer(
                    kind, x, state, weights, lengths=lengths, update_mask=mask
                )
            outs.append((out, h, c))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_direct_path_is_what_runs(direct, monkeypatch):
    """float32 cells take it; float64 keeps the ATen loops."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(direct, name)
            if not callable(attr) or name in ("direct_available", "transposed"):
                return attr

            def call(*args):
                calls.append(name)
                return attr(*args)

            return call

    monkeypatch.setattr(native, "step_loops", lambda: Spy())
    for cell, dtype, want in [
        ("sublstm", torch.float32, ["forward_direct", "backward_direct"]),
        ("fix_sublstm", torch.float32, ["forward_direct", "backward_direct"]),
        ("sublstm", torch.float64, ["forward_steps", "backward_subtractive"]),
        ("lstm", torch.float32, ["forward_direct", "backward_direct"]),
        ("lstm", torch.float64, ["forward_steps", "backward_steps"]),
    ]:
        calls.clear()
        kind, x, state, weights, mask = _layer(cell, dtype=dtype, mask=True)
        with kernels.use_kernel("cpu_fused"):
            out, _ = kernels.run_layer(kind, x, state, weights, update_mask=mask)
            out.sum().backward()
        assert calls == want, (cell, dtype)
    assert cpu_products.step_backend(torch.float32, 5, 7, 28) == "direct"
    assert cpu_fused.step_backend is cpu_products.step_backend  # (benchmarks.rnn's name)


def test_auto_trains_long_lstm_sequences_on_the_direct_path(direct, monkeypatch):
    """ "auto" runs an LSTM on ATen's LSTM, except training over sequences of at least
    _DIRECT_LSTM_MIN_STEPS, which goes to the fused kernel's direct path (faster there);
    either way the result equals torch.nn.LSTM's."""
    import microcircuits as mc

    chosen = []
    original = kernels.choose_kernel

    def spy(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(kernels, "choose_kernel", spy)
    monkeypatch.setattr(kernels, "_DIRECT_LSTM_MIN_STEPS", 20)
    torch.manual_seed(0)
    ours = mc.LSTM(3, 16, num_layers=2)
    theirs = torch.nn.LSTM(3, 16, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    for steps, grad, want in [(25, True, "cpu_fused"), (19, True, None), (25, False, None)]:
        chosen.clear()
        x = torch.randn(steps, 4, 3, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out, (h, c) = ours(x)
            ref, (h_ref, c_ref) = theirs(x)
        assert chosen == ([want] * 2 if want else []), (steps, grad, chosen)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
        if grad:
            got = torch.autograd.grad(out.sum() + c.sum(), [x, *ours.parameters()])
            expected = torch.autograd.grad(ref.sum() + c_ref.sum(), [x, *theirs.parameters()])
            for a, b in zip(expected, got):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
