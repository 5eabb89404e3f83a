"""Projected hidden states (``proj_size > 0``, LSTMP) in all three modules, as
``torch.nn.LSTM`` has them: ``weight_hr_l{k}`` ``(P, H)``, ``h`` of ``P`` features.

:class:`microcircuits.LSTM` must be ``torch.nn.LSTM(proj_size=...)``: the same
``state_dict`` and, loaded with it, the same outputs and gradients -- on torch's own
module test samples for ``nn.LSTM`` too. The subtractive cells are checked against an
independent NumPy loop of the paper's equations plus the projection, and by
finite differences.
"""

from __future__ import annotations

import ast
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import microcircuits as mc
from microcircuits import kernels
from microcircuits.cells import LSTMState, cell_kind
from microcircuits.kernels import aten_lstm
from microcircuits.nn import parameter_count

from .numpy_reference import sigmoid

# ATen says so once per process, for torch.nn.LSTM as for ours
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

CELL_NAMES = ["lstm", "sublstm", "fix_sublstm"]
SUBTRACTIVE = ["sublstm", "fix_sublstm"]


def _randomise(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale)
    return module


def _forward_and_grads(module, x, hx):
    """Outputs and the gradients of a loss that reads all of them, for ``x``, ``hx`` and
    every parameter (in ``named_parameters`` order)."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)
    out, (h_n, c_n) = module(x, hx)
    loss = out.pow(2).sum() + h_n.sin().sum() + c_n.cos().sum()
    leaves = [x, *(hx or ()), *module.parameters()]
    grads = torch.autograd.grad(loss, leaves)
    return (out, h_n, c_n), grads


def _pair(num_layers=2, bidirectional=False, batch_first=False, bias=True, I=3, H=5, P=2):
    kwargs = dict(
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    )
    torch.manual_seed(3)
    ref = torch.nn.LSTM(I, H, proj_size=P, dtype=torch.float64, **kwargs)
    ours = mc.LSTM(I, H, proj_size=P, dtype=torch.float64, **kwargs)
    assert str(ours.load_state_dict(ref.state_dict())) == "<All keys matched successfully>"
    return ref, ours


# -- LSTM: torch.nn.LSTM(proj_size=...) exactly ---------------------------------------


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias",
    [
        (1, False, False, True),
        (2, False, True, True),
        (2, True, False, True),
        (2, True, True, False),
    ],
)
def test_lstm_matches_torch_lstm_with_projections(num_layers, bidirectional, batch_first, bias):
    ref, ours = _pair(num_layers, bidirectional, batch_first, bias)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [
        (n, p.shape) for n, p in ours.named_parameters()
    ]
    D = 2 if bidirectional else 1
    x = torch.randn(4, 6, 3, dtype=torch.float64)  # (B, T, I) or (T, B, I)
    batch = 4 if batch_first else 6
    hx = (
        torch.randn(num_layers * D, batch, 2, dtype=torch.float64),
        torch.randn(num_layers * D, batch, 5, dtype=torch.float64),
    )
    for state in (None, hx):
        want, want_grads = _forward_and_grads(ref, x, state)
        got, got_grads = _forward_and_grads(ours, x, state)
        for a, b in zip(want + want_grads, got + got_grads):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    out, (h_n, c_n) = ours(x)
    assert out.shape[-1] == D * 2 and h_n.shape[-1] == 2 and c_n.shape[-1] == 5


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_projected_lstm_matches_torch_lstm(bidirectional):
    ref, ours = _pair(2, bidirectional)
    D = 2 if bidirectional else 1
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([2, 5, 1, 3])
    hx = (
        torch.randn(2 * D, 4, 2, dtype=torch.float64),
        torch.randn(2 * D, 4, 5, dtype=torch.float64),
    )
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        hi = tuple(t.clone().requires_grad_() for t in hx)
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(packed, hi)
        assert isinstance(out, PackedSequence)
        loss = out.data.pow(2).sum() + h_n.sin().sum() + c_n.cos().sum()
        grads = torch.autograd.grad(loss, [xi, *hi, *module.parameters()])
        results.append((out, h_n, c_n, grads))
    (o1, h1, c1, g1), (o2, h2, c2, g2) = results
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(o1.sorted_indices, o2.sorted_indices)
    for a, b in zip((o1.data, h1, c1, *g1), (o2.data, h2, c2, *g2)):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_projected_state_dict_loads_into_torch_lstm_and_back():
    ours = _randomise(mc.LSTM(3, 5, num_layers=2, proj_size=3, bidirectional=True))
    ref = torch.nn.LSTM(3, 5, num_layers=2, proj_size=3, bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ref(x)[0], ours(x)[0], atol=1e-6, rtol=1e-6)
    again = mc.LSTM(3, 5, num_layers=2, proj_size=3, bidirectional=True)
    again.load_state_dict(ref.state_dict())
    torch.testing.assert_close(again(x)[0], ours(x)[0], atol=0, rtol=0)
    assert [[p.shape for p in ps] for ps in ours.all_weights] == [
        [p.shape for p in ps] for ps in ref.all_weights
    ]


class _FunctionInput:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _ModuleInput:
    def __init__(self, constructor_input, forward_input=None, **kwargs):
        self.constructor_input, self.forward_input = constructor_input, forward_input


def _says(kwargs, message):
    return f"{kwargs}: {message}"


def _not_called(*args, **kwargs):  # the samples' reference_fn: checked here otherwise
    raise AssertionError("not used")


def _torch_lstm_samples():
    """``module_inputs_torch_nn_LSTM`` of torch's own module tests (its samples for
    ``nn.LSTM``: with and without projections, bias, batch_first, bidirectional), read
    from the installed torch. The function is compiled on its own: importing
    ``torch.testing._internal.common_modules`` needs ``expecttest`` and switches off
    ``torch.backends`` flags for the whole process."""
    path = Path(torch.__file__).parent / "testing" / "_internal" / "common_modules.py"
    if not path.is_file():
        pytest.skip(f"{path} is not part of this torch installation")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "module_inputs_torch_nn_LSTM"
    ]
    if not found:
        pytest.skip("this torch's common_modules.py has no module_inputs_torch_nn_LSTM")
    namespace = {
        "partial": functools.partial,
        "product": itertools.product,
        "make_tensor": torch.testing.make_tensor,
        "FunctionInput": _FunctionInput,
        "ModuleInput": _ModuleInput,
        "no_batch_dim_reference_lstm": _not_called,
        "torch": torch,
    }
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["module_inputs_torch_nn_LSTM"](
        None, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )


def test_torch_module_test_samples_for_lstm():
    samples = _torch_lstm_samples()
    assert any(s.constructor_input.kwargs.get("proj_size", 0) > 0 for s in samples)
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        inputs = sample.forward_input.args
        torch.manual_seed(0)
        ref = torch.nn.LSTM(*args, **kwargs, dtype=torch.float64)
        ours = mc.LSTM(*args, **kwargs, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        hx = inputs[1] if len(inputs) > 1 else None
        want, want_grads = _forward_and_grads(ref, inputs[0], hx)
        got, got_grads = _forward_and_grads(ours, inputs[0], hx)
        for a, b in zip(want + want_grads, got + got_grads):
            assert a.shape == b.shape, kwargs
            torch.testing.assert_close(
                b, a, atol=1e-12, rtol=1e-10, msg=functools.partial(_says, kwargs)
            )
        # the subtractive cells take the same samples: torch's shapes, and an unbatched
        # input equals a batch of one (the samples' reference_fn for nn.LSTM)
        for cell in SUBTRACTIVE:
            module = mc.make_rnn(cell, *args, **kwargs, dtype=torch.float64)
            out, (h_n, c_n) = module(*inputs)
            assert (out.shape, h_n.shape, c_n.shape) == (
                want[0].shape,
                want[1].shape,
                want[2].shape,
            )
            batch_dim = 0 if kwargs["batch_first"] else 1
            batched = [inputs[0].unsqueeze(batch_dim)]
            if hx is not None:
                batched.append(tuple(t.unsqueeze(1) for t in hx))
            out1, (h1, c1) = module(*batched)
            torch.testing.assert_close(out1.squeeze(batch_dim), out)
            torch.testing.assert_close(h1.squeeze(1), h_n)
            torch.testing.assert_close(c1.squeeze(1), c_n)


# -- the subtractive cells: the equations and their gradients ----------------------------


def _numpy_run(cell, x, params, num_layers, bidirectional, h0, c0, lengths):
    """The paper's equations plus ``h = W_hr h`` in float64 NumPy, one sequence at a
    time (no masking to trust): x (T, B, I) -> output (T, B, D*P), h_n, c_n."""
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    layer_in, h_n, c_n = x, [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            W, R, W_hr = (
                params["weight_ih" + sfx],
                params["weight_hh" + sfx],
                params["weight_hr" + sfx],
            )
            b = params.get("bias_ih" + sfx, 0) + params.get("bias_hh" + sfx, 0)
            H = W_hr.shape[1]
            out = np.zeros((T, B, W_hr.shape[0]))
            finals_h, finals_c = [], []
            for n in range(B):
                h, c = h0[layer * D + d, n], c0[layer * D + d, n]
                steps = range(lengths[n]) if d == 0 else reversed(range(lengths[n]))
                for t in steps:
                    pre = W @ layer_in[t, n] + R @ h + b
                    if cell == "fix_sublstm":
                        i, z, o = (sigmoid(pre[k * H : (k + 1) * H]) for k in range(3))
                        f = sigmoid(params["forget" + sfx])
                    else:
                        i, f, z, o = (sigmoid(pre[k * H : (k + 1) * H]) for k in range(4))
                    c = f * c + z - i
                    h = W_hr @ (sigmoid(c) - o)
                    out[t, n] = h
                finals_h.append(h)
                finals_c.append(c)
            outs.append(out)
            h_n.append(np.stack(finals_h))
            c_n.append(np.stack(finals_c))
        layer_in = np.concatenate(outs, axis=-1)
    return layer_in, np.stack(h_n), np.stack(c_n)


@pytest.mark.parametrize("cell", SUBTRACTIVE)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_subtractive_projections_match_numpy_equations(cell, bidirectional, packed):
    m = _randomise(
        mc.make_rnn(
            cell, 3, 5, num_layers=2, bidirectional=bidirectional, proj_size=2, dtype=torch.float64
        )
    )
    D = 2 if bidirectional else 1
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    h0 = torch.randn(2 * D, 3, 2, dtype=torch.float64)
    c0 = torch.randn(2 * D, 3, 5, dtype=torch.float64)
    lengths = [3, 5, 1] if packed else [5, 5, 5]
    params = {k: v.numpy() for k, v in m.state_dict().items()}
    want = _numpy_run(cell, x.numpy(), params, 2, bidirectional, h0.numpy(), c0.numpy(), lengths)
    with torch.no_grad():
        if packed:
            out, (h_n, c_n) = m(
                pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False), (h0, c0)
            )
            out, _ = pad_packed_sequence(out)
        else:
            out, (h_n, c_n) = m(x, (h0, c0))
    assert out.shape == (5, 3, 2 * D) and h_n.shape == (2 * D, 3, 2) and c_n.shape == (2 * D, 3, 5)
    for got, expected in zip((out, h_n, c_n), want):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_with_projections(cell, packed):
    m = _randomise(
        mc.make_rnn(cell, 2, 3, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    )
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("weight_hr") for n in names) == 4
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1, 3])

    def fn(x, h0, c0, *params):
        given = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (hn, cn) = torch.func.functional_call(m, dict(zip(names, params)), (given, (h0, c0)))
        if packed:
            out = pad_packed_sequence(out)[0]
        return out, hn, cn

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell", SUBTRACTIVE)
def test_second_order_gradients_through_projections(cell):
    m = _randomise(mc.make_rnn(cell, 2, 3, proj_size=1, dtype=torch.float64))
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,), eps=1e-6, atol=1e-5)


# -- the module around the projections ------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_parameters_shapes_and_repr(cell):
    m = mc.make_rnn(cell, 3, 5, num_layers=2, bidirectional=True, proj_size=2)
    G = cell_kind(cell).num_gates
    assert m.proj_size == 2 and m.output_size == 2
    assert m.weight_ih_l0.shape == (G * 5, 3)
    assert m.weight_hh_l0.shape == (G * 5, 2)
    assert m.weight_hr_l0.shape == m.weight_hr_l1_reverse.shape == (2, 5)
    assert m.weight_ih_l1.shape == (G * 5, 4)  # the previous layer's 2 directions x P
    assert m.layer_projection(1, reverse=True) is m.weight_hr_l1_reverse
    assert m.all_weights[0][-1] is m.weight_hr_l0
    assert "proj_size=2" in repr(m)
    assert mc.make_rnn(cell, 3, 5).layer_projection(0) is None
    assert parameter_count(cell, 3, 5, num_layers=2, proj_size=2) == sum(
        p.numel() for p in mc.make_rnn(cell, 3, 5, num_layers=2, proj_size=2).parameters()
    )
    bound = (6 / (2 + 5)) ** 0.5  # Glorot-uniform over the whole projection
    assert 0 < m.weight_hr_l0.abs().max() <= bound


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("proj_size", [-1, 5, 7, True, 2.0, "2"])
def test_bad_proj_sizes_are_refused(cell, proj_size):
    with pytest.raises(ValueError, match="proj_size"):
        mc.make_rnn(cell, 3, 5, proj_size=proj_size)
    if isinstance(proj_size, int) and not isinstance(proj_size, bool):
        with pytest.raises(ValueError):
            torch.nn.LSTM(3, 5, proj_size=proj_size)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_state_shapes_are_checked_with_projections(cell):
    m = mc.make_rnn(cell, 3, 5, num_layers=2, proj_size=2)
    x = torch.randn(4, 3, 3)
    good_h, good_c = torch.zeros(2, 3, 2), torch.zeros(2, 3, 5)
    m(x, (good_h, good_c))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 3, 2\).*proj_size"):
        m(x, (good_c, good_c))
    with pytest.raises(ValueError, match=r"c_0 must have shape \(2, 3, 5\).*hidden_size"):
        m(x, (good_h, good_h))
    out, (h, c) = m(x[:, 0], (good_h[:, 0], good_c[:, 0]))  # unbatched
    assert out.shape == (4, 2) and h.shape == (2, 2) and c.shape == (2, 5)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_training_with_dropouts_runs_layer_by_layer_with_projections(cell):
    m = mc.make_rnn(cell, 3, 5, num_layers=2, proj_size=2, dropout=0.3, update_dropout=0.3)
    x = torch.randn(4, 3, 3)
    out, (h, c) = m(x)
    out.sum().backward()
    assert out.shape == (4, 3, 2) and h.shape == (2, 3, 2) and c.shape == (2, 3, 5)
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    with torch.no_grad(), kernels.use_kernel("reference"):
        want = m(x)[0]
    torch.testing.assert_close(m(x)[0], want, atol=1e-6, rtol=1e-5)


# -- the dispatcher -------------------------------------------------------------------


def _projected_call(cell, dtype=torch.float32, P=2):
    kind = cell_kind(cell)
    H = 5
    m = mc.make_rnn(cell, 3, H, proj_size=P, dtype=dtype)
    x = torch.randn(4, 2, 3, dtype=dtype)
    state = LSTMState(torch.zeros(2, P, dtype=dtype), torch.zeros(2, H, dtype=dtype))
    return kind, x, state, m.layer_weights(0), m.layer_projection(0)


def test_projected_lstm_takes_aten_others_take_the_reference_path():
    kind, x, state, weights, hr = _projected_call("lstm")
    assert kernels.choose_kernel(kind, x, state, weights, weight_hr=hr) == "aten_lstm"
    lengths = torch.tensor([4, 2])
    assert (
        kernels.choose_kernel(kind, x, state, weights, lengths=lengths, weight_hr=hr) == "reference"
    )
    for cell in SUBTRACTIVE:
        kind, x, state, weights, hr = _projected_call(cell)
        assert kernels.choose_kernel(kind, x, state, weights, weight_hr=hr) == "reference"
        assert kernels.choose_kernel(kind, x, state, weights) != "reference"  # not projected


@pytest.mark.parametrize("cell", SUBTRACTIVE)
def test_forcing_a_fused_kernel_for_projections_says_why(cell):
    kind, x, state, weights, hr = _projected_call(cell)
    with kernels.use_kernel("cpu_fused"), pytest.raises(ValueError, match="projections"):
        kernels.run_layer(kind, x, state, weights, weight_hr=hr)


def test_aten_refuses_a_projection_it_cannot_tell_apart():
    kind, x, state, weights, _ = _projected_call("lstm")
    square = torch.zeros(5, 5)
    reason = aten_lstm.unsupported_reason(kind, x, state, weights, None, None, square)
    assert reason is not None and "P < H" in reason


@pytest.mark.parametrize("kernel", ["aten_lstm", "reference"])
def test_run_layer_with_projection_equals_the_reference(kernel):
    kind, x, state, weights, hr = _projected_call("lstm", dtype=torch.float64)
    with kernels.use_kernel("reference"):
        want_out, want = kernels.run_layer(kind, x, state, weights, weight_hr=hr, reverse=True)
    with kernels.use_kernel(kernel):
        out, got = kernels.run_layer(kind, x, state, weights, weight_hr=hr, reverse=True)
    assert out.shape == (4, 2, 2)
    for a, b in ((want_out, out), (want.h, got.h), (want.c, got.c)):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_a_projected_lstm_stack_runs_as_one_aten_call(monkeypatch):
    calls = []
    original = aten_lstm.run_stack_aten_lstm

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(aten_lstm, "run_stack_aten_lstm", spy)
    ref, ours = _pair(2, True)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-12, rtol=1e-10)
    assert len(calls) == 1 and len(calls[0][-1]) == 4  # one call, 4 projections
    # a stack where only some layers project is not one ATen call
    layers = [ours.layer_weights(0), ours.layer_weights(0, reverse=True)]
    h0, c0 = torch.zeros(2, 3, 2, dtype=torch.float64), torch.zeros(2, 3, 5, dtype=torch.float64)
    mixed = [ours.layer_projection(0), None]
    kind = ours.cell
    assert kernels.choose_stack_kernel(kind, x, h0, c0, layers, projections=mixed) is None


def test_jit_trace_of_projected_modules():
    import warnings

    for cell in CELL_NAMES:
        m = mc.make_rnn(cell, 3, 5, proj_size=2, num_layers=2).eval()
        x = torch.randn(4, 2, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(m, (x,))
        torch.testing.assert_close(traced(x)[0], m(x)[0])
        if cell == "lstm":
            assert "aten::lstm" in str(traced.graph)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_projections_on_cuda_match_the_cpu(cell):
    """On CUDA projected layers run on the reference path (the GPU kernel does not
    project); float64, so the comparison is tight."""
    m = _randomise(
        mc.make_rnn(cell, 3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    )
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 3])
    for given in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
        want, want_grads = _forward_and_grads_any(m, given)
        got, got_grads = _forward_and_grads_any(m.cuda(), given.to("cuda"))
        m.cpu()
        for a, b in zip(want + want_grads, got + got_grads):
            torch.testing.assert_close(b.cpu(), a, atol=1e-10, rtol=1e-9)


def _forward_and_grads_any(module, given):
    out, (h_n, c_n) = module(given)
    data = out.data if isinstance(out, PackedSequence) else out
    loss = data.pow(2).sum() + h_n.sin().sum() + c_n.cos().sum()
    return (data, h_n, c_n), torch.autograd.grad(loss, list(module.parameters()))
