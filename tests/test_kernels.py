"""Fast kernels against the reference path, and the dispatcher that chooses between them.

The reference path (step functions of ``cells.py`` differentiated by autograd) is the
oracle: every fast kernel must give the same outputs, final states and gradients, for
all three cells, with variable lengths, update masks, no bias, reversed direction and
initial states. Speed is measured by ``python -m benchmarks.rnn``, not here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import microcircuits as mc
from microcircuits import kernels
from microcircuits.cells import CELLS, CellWeights, LSTMState
from microcircuits.kernels import aten_lstm, cpu_fused, cpu_products

CELL_NAMES = list(CELLS)


def _layer(cell, T=6, B=5, I=4, H=7, dtype=torch.float64, bias=True, mask=False, seed=0):
    """Random inputs, state and weights of one layer, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    kind = CELLS[cell]
    G = kind.num_gates

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    weights = CellWeights(
        rand(G * H, I, scale=0.5),
        rand(G * H, H, scale=0.5),
        rand(G * H, scale=0.5) if bias else None,
        rand(G * H, scale=0.5) if bias else None,
        rand(H) if kind.learned_decay else None,
    )
    x = rand(T, B, I)
    state = LSTMState(rand(B, H, scale=0.5), rand(B, H, scale=0.5))
    update_mask = None
    if mask:
        update_mask = (torch.rand(B, H, generator=gen, dtype=dtype) > 0.3).to(dtype) / 0.7
    return kind, x, state, weights, update_mask


def _inputs(x, state, weights):
    return [x, state.h, state.c] + [w for w in weights if w is not None]


def _with_grads(outputs, x, state, weights):
    """``outputs`` and the gradients of a fixed random projection of them (seeded)."""
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outputs)
    grads = torch.autograd.grad(loss, _inputs(x, state, weights))
    return list(outputs), list(grads)


def _run(kernel, kind, x, state, weights, update_mask=None, lengths=None, reverse=False):
    """Outputs, final state and the gradients of a random projection of all three."""
    with kernels.use_kernel(kernel):
        out, (h, c) = kernels.run_layer(
            kind, x, state, weights, lengths=lengths, update_mask=update_mask, reverse=reverse
        )
    return _with_grads((out, h, c), x, state, weights)


LENGTHS = {
    "full": None,
    "sorted": torch.tensor([6, 6, 4, 2, 1]),
    "unsorted": torch.tensor([3, 6, 0, 5, 2]),
}


# -- equivalence with the reference ---------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_cpu_fused_forward_float32(cell, lengths, reverse, mask, step_loops):
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=mask)
    args = (kind, x, state, weights, update_mask, LENGTHS[lengths], reverse)
    ref, _ = _run("reference", *args)
    got, _ = _run("cpu_fused", *args)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask,bias", [(False, True), (True, True), (False, False)])
def test_cpu_fused_gradients_float64(cell, lengths, reverse, mask, bias, step_loops):
    kind, x, state, weights, update_mask = _layer(cell, mask=mask, bias=bias)
    args = (kind, x, state, weights, update_mask, LENGTHS[lengths], reverse)
    ref_out, ref_grads = _run("reference", *args)
    out, grads = _run("cpu_fused", *args)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cpu_fused_onednn_gemm_path_float32(cell, monkeypatch, step_loops):
    """The oneDNN per-step products (used for large weights) agree with the reference."""
    if not cpu_products.onednn_available():
        pytest.skip("oneDNN packed linear ops are not available in this torch build")
    monkeypatch.setattr(cpu_products, "_ONEDNN_MIN_WEIGHT_BYTES", 0)
    assert cpu_products.gemm_backend(torch.float32, 5, 7, 28) == "onednn"
    for lengths in (None, LENGTHS["unsorted"]):
        kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=True)
        args = (kind, x, state, weights, update_mask, lengths, False)
        ref_out, ref_grads = _run("reference", *args)
        out, grads = _run("cpu_fused", *args)
        for a, b in zip(ref_out + ref_grads, out + grads):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        # an expanded output gradient (from .sum()) is used without materialising it
        sums = []
        for kernel in ("reference", "cpu_fused"):
            with kernels.use_kernel(kernel):
                y, _ = kernels.run_layer(kind, x, state, weights, lengths=lengths)
            sums.append(torch.autograd.grad(y.sum(), _inputs(x, state, weights)))
        for a, b in zip(*sums):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("input_size", [1, 70])
def test_cpu_fused_gradients_input_sizes(cell, input_size, step_loops):
    """Small inputs fold the bias gradient into the dW_ih product; large ones do not."""
    kind, x, state, weights, _ = _layer(cell, I=input_size, T=4, B=3, H=5)
    ref_out, ref_grads = _run("reference", kind, x, state, weights)
    out, grads = _run("cpu_fused", kind, x, state, weights)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "lengths,mask,reverse",
    [(None, False, False), (torch.tensor([3, 1]), True, False), (torch.tensor([2, 3]), True, True)],
)
def test_cpu_fused_gradcheck(cell, lengths, mask, reverse, step_loops):
    kind, x, state, weights, update_mask = _layer(cell, T=3, B=2, I=2, H=3, mask=mask)

    def f(*inputs):
        x, h, c, *ws = inputs
        full = iter(ws)
        w = CellWeights(*[next(full) if v is not None else None for v in weights])
        with kernels.use_kernel("cpu_fused"):
            out, (hn, cn) = kernels.run_layer(
                kind,
                x,
                LSTMState(h, c),
                w,
                lengths=lengths,
                update_mask=update_mask,
                reverse=reverse,
            )
        return out, hn, cn

    assert torch.autograd.gradcheck(f, _inputs(x, state, weights))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cpu_fused_partial_requires_grad(cell, step_loops):
    """Only some inputs need gradients (e.g. a first layer with a plain input tensor)."""
    kind, x, state, weights, _ = _layer(cell)
    x = x.detach()
    state = LSTMState(state.h.detach(), state.c.detach())
    for kernel in ("reference", "cpu_fused"):
        with kernels.use_kernel(kernel):
            out, _ = kernels.run_layer(kind, x, state, weights)
        grads = torch.autograd.grad(out.sum(), weights.weight_hh)
        if kernel == "reference":
            want = grads
    torch.testing.assert_close(grads, want)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", [None, LENGTHS["unsorted"]])
def test_cpu_fused_backward_twice_with_retain_graph(cell, lengths, step_loops):
    """Backward reuses saved buffers in place only when the graph is not kept."""
    kind, x, state, weights, update_mask = _layer(cell, mask=True)
    grads = {}
    for kernel in ("reference", "cpu_fused"):
        with kernels.use_kernel(kernel):
            out, (h, c) = kernels.run_layer(
                kind, x, state, weights, lengths=lengths, update_mask=update_mask
            )
        loss = out.pow(2).sum() + h.sum() + c.sum()
        first = torch.autograd.grad(loss, _inputs(x, state, weights), retain_graph=True)
        second = torch.autograd.grad(loss, _inputs(x, state, weights))
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        grads[kernel] = first
    for a, b in zip(grads["reference"], grads["cpu_fused"]):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


def test_cpu_fused_long_sequence_last_step_loss_float32(step_loops):
    """784 steps with a loss on the last step only: the carried gradient decays through
    the denormal range. It must agree with float64 and leave the flush mode as it was."""
    kind, x64, state64, weights64, _ = _layer("sublstm", T=784, B=3, I=1, H=8)

    def single(t):
        return None if t is None else t.detach().float().requires_grad_()

    x, state = single(x64), LSTMState(single(state64.h), single(state64.c))
    weights = CellWeights(*[single(w) for w in weights64])
    before = cpu_fused._flushing_denormals()
    with kernels.use_kernel("cpu_fused"):
        out, _ = kernels.run_layer(kind, x, state, weights)
    (grad,) = torch.autograd.grad(out[-1].sum(), weights.weight_hh)
    assert cpu_fused._flushing_denormals() == before
    with kernels.use_kernel("reference"):
        out64, _ = kernels.run_layer(kind, x64, state64, weights64)
    (grad64,) = torch.autograd.grad(out64[-1].sum(), weights64.weight_hh)
    torch.testing.assert_close(grad, grad64.float(), atol=1e-4, rtol=1e-3)


def test_thread_count_is_restored(step_loops):
    """The step loops run pointwise ops on one thread and must give the count back."""
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.use_kernel("cpu_fused"):
            out, _ = kernels.run_layer(kind, x, state, weights)
            assert torch.get_num_threads() == 2
            out.sum().backward()
            assert torch.get_num_threads() == 2
            with torch.no_grad():
                kernels.run_layer(kind, x, state, weights)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_flush_denormal_mode_is_restored_when_already_on(step_loops):
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        with kernels.use_kernel("cpu_fused"):
            out, _ = kernels.run_layer(kind, x, state, weights)
        out.sum().backward()
        assert cpu_fused._flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    assert not cpu_fused._flushing_denormals()


# -- inference keeps nothing ----------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", [None, LENGTHS["unsorted"]])
def test_inference_does_not_use_the_autograd_function(cell, lengths, monkeypatch, step_loops):
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=True)
    with kernels.use_kernel("reference"), torch.no_grad():
        want = kernels.run_layer(kind, x, state, weights, lengths=lengths, update_mask=update_mask)

    def refuse(*args, **kwargs):
        raise AssertionError("the training Function ran under no_grad")

    monkeypatch.setattr(cpu_fused._FusedLayer, "apply", refuse)
    with kernels.use_kernel("cpu_fused"):
        with torch.no_grad():
            got = kernels.run_layer(
                kind, x, state, weights, lengths=lengths, update_mask=update_mask
            )
        plain = [t.detach() for t in (x, *state)]
        frozen = CellWeights(*[None if w is None else w.detach() for w in weights])
        got_plain = kernels.run_layer(
            kind,
            plain[0],
            LSTMState(*plain[1:]),
            frozen,
            lengths=lengths,
            update_mask=update_mask,
        )
    for a, b, c in zip(
        want[:1] + tuple(want[1]), got[:1] + tuple(got[1]), got_plain[:1] + tuple(got_plain[1])
    ):
        assert not b.requires_grad and b.grad_fn is None
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["sublstm", "fix_sublstm"])
def test_training_saves_only_gates_memory_and_output(cell):
    """One graph node for the whole sequence, saving activations, c, y and the inputs."""
    T, B, I, H = 9, 4, 3, 5
    kind, x, state, weights, _ = _layer(cell, T=T, B=B, I=I, H=H, dtype=torch.float32)
    with kernels.use_kernel("cpu_fused"):
        out, _ = kernels.run_layer(kind, x, state, weights)
    node = out.grad_fn
    assert type(node).__name__ == "_FusedLayerBackward"
    # memory held, each storage once (x is saved as given and as a (T*B, I) view of it)
    storages = {}
    for t in node.saved_tensors:
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
    G = kind.num_gates
    activations = T * B * G * H + (T + 1) * B * H + T * B * H  # gates, c, output
    # x, h0, c0 (c0 for the create_graph recomputation), W, R, both biases, phi
    inputs = T * B * I + 2 * B * H + G * H * (I + H + 2) + (H if kind.learned_decay else 0)
    assert sum(storages.values()) <= activations + inputs


# -- ATen's LSTM for the LSTM cell ------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_aten_lstm_matches_reference(reverse, bias):
    kind, x, state, weights, _ = _layer("lstm", bias=bias)
    ref_out, ref_grads = _run("reference", kind, x, state, weights, reverse=reverse)
    out, grads = _run("aten_lstm", kind, x, state, weights, reverse=reverse)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)
    kind, x, state, weights, _ = _layer("lstm", bias=bias, dtype=torch.float32)
    ref_out, _ = _run("reference", kind, x, state, weights, reverse=reverse)
    out, _ = _run("aten_lstm", kind, x, state, weights, reverse=reverse)
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# -- the dispatcher -------------------------------------------------------------------


def _choose(cell, dtype=torch.float32, mask=False, lengths=None, **kw):
    kind, x, state, weights, update_mask = _layer(cell, dtype=dtype, mask=mask, **kw)
    return kernels.choose_kernel(kind, x, state, weights, lengths=lengths, update_mask=update_mask)


def test_dispatcher_defaults_to_the_fast_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv("MICROCIRCUITS_KERNEL", raising=False)
    assert kernels.get_kernel() == "auto"
    assert _choose("sublstm") == "cpu_fused"
    assert _choose("fix_sublstm", dtype=torch.float64) == "cpu_fused"
    assert _choose("lstm") == "aten_lstm"
    assert _choose("lstm", mask=True) == "cpu_fused"
    assert _choose("lstm", lengths=torch.tensor([6, 5, 4, 3, 2])) == "cpu_fused"


def test_reference_forced_by_context_manager_setter_and_env(monkeypatch):
    monkeypatch.delenv("MICROCIRCUITS_KERNEL", raising=False)
    with kernels.use_kernel("reference"):
        assert kernels.get_kernel() == "reference"
        assert _choose("sublstm") == "reference"
        assert _choose("lstm") == "reference"
    assert _choose("sublstm") == "cpu_fused"
    monkeypatch.setenv("MICROCIRCUITS_KERNEL", "reference")
    assert _choose("sublstm") == "reference"
    monkeypatch.setenv("MICROCIRCUITS_KERNEL", "cpu_fused")
    assert _choose("lstm") == "cpu_fused"
    monkeypatch.setenv("MICROCIRCUITS_KERNEL", "no-such-kernel")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.get_kernel()
    monkeypatch.delenv("MICROCIRCUITS_KERNEL")
    mc.set_kernel("reference")
    try:
        assert _choose("fix_sublstm") == "reference"
    finally:
        mc.set_kernel("auto")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.set_kernel("fastest")


def test_auto_falls_back_to_reference_where_the_kernel_does_not_apply():
    # bfloat16 is not supported by the fused kernel; the reference path runs it
    assert _choose("sublstm", dtype=torch.bfloat16) == "reference"
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    mask = torch.ones(x.shape[1], state.h.shape[1], requires_grad=True)
    assert kernels.choose_kernel(kind, x, state, weights, update_mask=mask) == "reference"
    out, _ = kernels.run_layer(kind, x, state, weights, update_mask=mask)
    (grad,) = torch.autograd.grad(out.sum(), mask)  # the reference differentiates the mask
    assert grad.shape == mask.shape
    # an empty sequence
    assert kernels.choose_kernel(kind, x[:0], state, weights) == "reference"
    out, (h, c) = kernels.run_layer(kind, x[:0], state, weights)
    assert out.shape == (0, x.shape[1], state.h.shape[1])


def test_forcing_a_kernel_that_does_not_apply_raises():
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.bfloat16)
    with kernels.use_kernel("cpu_fused"), pytest.raises(ValueError, match="cannot run"):
        kernels.run_layer(kind, x, state, weights)
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    with kernels.use_kernel("aten_lstm"), pytest.raises(ValueError, match="subLSTM"):
        kernels.run_layer(kind, x, state, weights)


def test_unsupported_reasons_name_the_problem():
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    assert cpu_fused.unsupported_reason(x, state, weights, None, None) is None
    assert "dtype" in cpu_fused.unsupported_reason(x.half(), state, weights, None, None)
    assert "mixed" in cpu_fused.unsupported_reason(x.double(), state, weights, None, None)
    assert "integers" in cpu_fused.unsupported_reason(
        x, state, weights, torch.tensor([1.0] * 5), None
    )
    assert "update dropout" in aten_lstm.unsupported_reason(
        CELLS["lstm"], x, state, weights, None, torch.ones(5, 7)
    )


@pytest.mark.parametrize("kernel", ["cpu_fused", "aten_lstm"])
def test_cpu_kernels_name_a_tensor_off_the_cpu(kernel):
    kind, x, state, weights, _ = _layer("lstm", dtype=torch.float32)
    off = CellWeights(weights.weight_ih.to("meta"), *weights[1:])
    if kernel == "cpu_fused":
        reason = cpu_fused.unsupported_reason(x, state, off, None, None)
    else:
        reason = aten_lstm.unsupported_reason(kind, x, state, off, None, None)
    assert reason == "a tensor is on meta, not the CPU"


@pytest.mark.gpu
def test_cpu_fused_refuses_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kind, x, state, weights, _ = _layer("sublstm", dtype=torch.float32)
    move = [t.detach().cuda().requires_grad_() for t in _inputs(x, state, weights)]
    cw = CellWeights(*move[3:], None)
    assert "cuda" in cpu_fused.unsupported_reason(
        move[0], LSTMState(move[1], move[2]), cw, None, None
    )


# -- whole modules: training ends in the same place with either path ------------------


def _train(model, batches, kernel, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(123)  # dropout masks: same draws on both paths
    with kernels.use_kernel(kernel):
        for x, _target in itertools.islice(itertools.cycle(batches), steps):
            opt.zero_grad()
            out, (h, c) = model(x)
            if isinstance(out, torch.nn.utils.rnn.PackedSequence):
                out = out.data
            loss = (out.sum(-1) - 0.1).pow(2).mean() + h.pow(2).mean() + 0.1 * c.pow(2).mean()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("packed,update_dropout", [(False, 0.0), (False, 0.25), (True, 0.25)])
def test_training_a_few_steps_ends_with_the_same_parameters(
    cell, packed, update_dropout, step_loops
):
    I, H = 3, 5
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        x = torch.randn(6, 4, I, generator=gen, dtype=torch.float64)
        if packed:
            x = pack_padded_sequence(x, torch.tensor([6, 2, 5, 3]), enforce_sorted=False)
        batches.append((x, None))
    torch.manual_seed(0)
    model = mc.make_rnn(
        cell,
        I,
        H,
        num_layers=2,
        bidirectional=True,
        dropout=0.2,
        update_dropout=0.25,
    ).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fast = _train(model, batches, "auto")
    model.load_state_dict(start)
    ref = _train(model, batches, "reference")
    for k in ref:
        assert not torch.equal(ref[k], start[k]), k  # training moved every parameter
        torch.testing.assert_close(fast[k], ref[k], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_module_float32_matches_reference(cell, step_loops):
    torch.manual_seed(0)
    model = mc.make_rnn(cell, 4, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 7, 4, requires_grad=True)
    results = []
    for kernel in ("reference", "auto"):
        with kernels.use_kernel(kernel):
            out, (h, c) = model(x)
        grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), [x, *model.parameters()])
        results.append([out, h, c, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_an_lstm_stack_runs_as_one_aten_call_like_nn_lstm(bias, monkeypatch):
    """Where every layer would take aten_lstm, the stack is one torch.lstm call; it
    equals torch.nn.LSTM with the same weights (outputs, states and gradients)."""
    calls = []
    original = aten_lstm.run_stack_aten_lstm
    monkeypatch.setattr(
        aten_lstm, "run_stack_aten_lstm", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    torch.manual_seed(0)
    ours = mc.LSTM(4, 6, num_layers=3, bidirectional=True, bias=bias, dtype=torch.float64)
    ref = torch.nn.LSTM(4, 6, num_layers=3, bidirectional=True, bias=bias, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(6, 2, 6, dtype=torch.float64)
    results = []
    for model in (ours, ref):
        out, (h, c) = model(x, (h0, h0.cos()))
        grads = torch.autograd.grad(
            (out.sin().sum() + h.sum() + c.pow(2).sum()), [x, *model.parameters()]
        )
        results.append([out, h, c, *grads])
    assert calls == [1]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_an_lstm_stack_with_active_dropouts_or_lengths_runs_layer_by_layer(monkeypatch):
    calls = []
    original = aten_lstm.run_stack_aten_lstm
    monkeypatch.setattr(
        aten_lstm, "run_stack_aten_lstm", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x = torch.randn(5, 2, 4)
    for model in (mc.LSTM(4, 6, num_layers=2, update_dropout=0.2),
                  mc.LSTM(4, 6, num_layers=2, dropout=0.3)):  # fmt: skip
        model.train()
        model(x)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    mc.LSTM(4, 6, num_layers=2)(packed)
    with kernels.use_kernel("reference"):
        mc.LSTM(4, 6, num_layers=2)(x)
    assert calls == []
    mc.LSTM(4, 6, num_layers=2, update_dropout=0.2, dropout=0.3).eval()(x)  # inactive in eval
    assert calls == [1]


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("mask", [False, True])
def test_pointwise_inplace_equals_the_cells_pointwise(cell, mask):
    """The in-place step of the inference loops against the definition in cells.py."""
    kind = CELLS[cell]
    gen = torch.Generator().manual_seed(3)
    B, H = 5, 7
    pre = torch.randn(B, kind.num_gates * H, generator=gen, dtype=torch.float64) * 2
    c = torch.randn(B, H, generator=gen, dtype=torch.float64)
    phi = torch.randn(H, generator=gen, dtype=torch.float64) if kind.learned_decay else None
    update_mask = (torch.rand(B, H, generator=gen) > 0.4).double() / 0.6 if mask else None
    want_h, want_c = kind.pointwise(pre, c, phi, update_mask)
    gates, c_new, h_out = pre.clone(), c.clone(), torch.empty(B, H, dtype=torch.float64)
    decay = None if phi is None else torch.sigmoid(phi)
    from microcircuits.cells import pointwise_inplace

    pointwise_inplace(cell, gates, c_new, decay, update_mask, h_out)
    torch.testing.assert_close(h_out, want_h, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(c_new, want_c, atol=1e-14, rtol=1e-13)
    if update_mask is None and cell != "lstm":  # (with a mask the z block holds z * mask)
        torch.testing.assert_close(gates, torch.cat(_gate_values(kind, pre, phi), dim=1))


def _gate_values(kind, pre, phi):
    g = kind.activate(pre, phi)
    return [g.i, g.z, g.o] if kind.learned_decay else [g.i, g.f, g.z, g.o]


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_inference_leaves_the_callers_state_untouched(cell, step_loops):
    kind, x, state, weights, update_mask = _layer(cell, dtype=torch.float32, mask=True)
    h0, c0 = state.h.detach().clone(), state.c.detach().clone()
    with torch.no_grad(), kernels.use_kernel("cpu_fused"):
        out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=update_mask)
    assert torch.equal(state.h, h0) and torch.equal(state.c, c0)
    out[-1].zero_()
    assert h.abs().sum() > 0  # h_n is not a view of the output


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_autocast_takes_the_reference_path_and_trains(cell):
    """Under autocast the fused kernels step aside (their GEMMs would come back in
    bfloat16 beside float32 state); the module runs, close to its float32 result."""
    torch.manual_seed(0)
    model = mc.make_rnn(cell, 4, 6, num_layers=2)
    x = torch.randn(5, 3, 4, requires_grad=True)
    kind, _, state, weights, _ = _layer(cell, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.choose_kernel(kind, x, state, weights) == "reference"
        out, (h, c) = model(x)
    want, _ = model(x)
    torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.05)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert torch.isfinite(grad).all()


def _hessian_vector_product(kernel, kind, inputs, run):
    """Gradients (with a graph) of a loss on ``run()``'s outputs, and their product with a
    fixed random vector differentiated again, under ``kernel``."""
    with kernels.use_kernel(kernel):
        out, (h, c) = run()
    grads = torch.autograd.grad(out.pow(2).sum() + (h * c).sum(), inputs, create_graph=True)
    gen = torch.Generator().manual_seed(2)
    dot = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in grads)
    return grads, torch.autograd.grad(dot, inputs)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", ["full", "unsorted"])
def test_second_order_gradients_through_the_fused_kernel_match_the_reference(cell, lengths):
    """``create_graph=True``: the fused backward recomputes on the reference path, so its
    gradients carry a graph and a Hessian-vector product equals the reference path's."""
    kind, x, state, weights, update_mask = _layer(cell, mask=True)
    inputs = _inputs(x, state, weights)

    def run():
        return kernels.run_layer(
            kind, x, state, weights, lengths=LENGTHS[lengths], update_mask=update_mask,
            reverse=True,
        )  # fmt: skip

    fused_grads, fused_hvp = _hessian_vector_product("cpu_fused", kind, inputs, run)
    ref_grads, ref_hvp = _hessian_vector_product("reference", kind, inputs, run)
    for got, want in zip(fused_grads + fused_hvp, ref_grads + ref_hvp):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_gpu_kernel_function_second_order_matches_the_reference(cell):
    """The GPU kernel's Function (with its PyTorch pointwise twins, on the CPU) too."""
    from microcircuits.kernels import gpu_fused

    kind, x, state, weights, update_mask = _layer(cell, mask=True)
    inputs = _inputs(x, state, weights)
    lens = LENGTHS["unsorted"]

    def fused():
        return gpu_fused.run_layer_gpu_fused(
            kind, x, state, weights, lens, update_mask, reverse=True, pointwise="torch"
        )

    def reference():
        return kernels.run_layer(
            kind, x, state, weights, lengths=lens, update_mask=update_mask, reverse=True
        )

    got = _hessian_vector_product("auto", kind, inputs, fused)
    want = _hessian_vector_product("reference", kind, inputs, reference)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("lengths", [None, torch.tensor([3, 1, 2])])
def test_fused_kernel_gradgradcheck(cell, lengths):
    """Second derivatives of the fused kernel against float64 finite differences."""
    kind, x, state, weights, update_mask = _layer(cell, T=3, B=3, I=2, H=2, mask=True)

    def layer(x, h, c, *params):
        w = CellWeights(*params[:4], params[4] if len(params) > 4 else None)
        with kernels.use_kernel("cpu_fused"):
            out, (hn, cn) = kernels.run_layer(
                kind, x, LSTMState(h, c), w, lengths=lengths, update_mask=update_mask
            )
        return out, hn, cn

    assert torch.autograd.gradgradcheck(layer, _inputs(x, state, weights))


def test_first_order_backward_never_recomputes(monkeypatch):
    """The recomputation is for ``create_graph=True`` only: a plain backward keeps to the
    hand-written one (no cost added to training)."""

    def refuse(*args, **kwargs):
        raise AssertionError("first-order backward took the reference recomputation")

    monkeypatch.setattr(cpu_fused, "reference_layer_gradients", refuse)
    kind, x, state, weights, update_mask = _layer("sublstm", mask=True)
    with kernels.use_kernel("cpu_fused"):
        out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=update_mask)
    out.sum().backward(retain_graph=True)
    assert x.grad is not None
    with pytest.raises(AssertionError, match="reference recomputation"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("bias", [True, False])
def test_whole_sequence_linear_equals_functional_linear(bias):
    """cpu_products.linear (oneDNN products forward and backward where available) against
    F.linear: output, gradients of input, weight and bias, a strided weight (a column
    slice) and second-order gradients under create_graph."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 24, generator=gen)
    full = torch.randn(5, 30, generator=gen)
    b = torch.randn(5, generator=gen) if bias else None
    results = []
    for linear in (cpu_products.linear, torch.nn.functional.linear):
        xi = x.clone().requires_grad_()
        wi = full.clone().requires_grad_()
        bi = b.clone().requires_grad_() if bias else None
        out = linear(xi, wi[:, 3:27], bi)
        loss = (out * torch.arange(out.numel()).view_as(out).sin()).sum()
        grads = torch.autograd.grad(loss, [xi, wi, *([bi] if bias else [])], create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [xi, wi])
        results.append((out, *grads, *second))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            cpu_products.linear(x, full[:, :24]), torch.nn.functional.linear(x, full[:, :24])
        )


def test_whole_sequence_linear_first_order_gradients():
    """The oneDNN backward proper (no graph asked for) against F.linear's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 33, generator=gen)
    w = torch.randn(9, 33, generator=gen)
    b = torch.randn(9, generator=gen)
    upstream = torch.randn(40, 9, generator=gen)
    grads = []
    for linear in (cpu_products.linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        linear(*leaves).backward(upstream)
        grads.append([t.grad for t in leaves])
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
