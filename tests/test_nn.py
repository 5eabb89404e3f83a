"""The modules against independent references: the paper's equations in NumPy,
torch.nn.LSTM / LSTMCell, finite differences, and running sequences one by one."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import microcircuits as mc
from microcircuits import nn as mcnn

from .numpy_reference import run as numpy_run
from .numpy_reference import sigmoid
from .numpy_reference import step as numpy_step

CELL_NAMES = ["lstm", "sublstm", "fix_sublstm"]


def _params_np(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def _randomise(module, scale=0.5):
    """Non-default parameters, so biases and phi are exercised too."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale)
    return module


# -- forward against the paper's equations -------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,with_state",
    [
        (1, False, False, False),
        (2, False, True, True),
        (2, True, False, True),
        (1, True, True, False),
    ],
)
def test_forward_matches_numpy_equations(cell, num_layers, bidirectional, batch_first, with_state):
    T, B, I, H = 5, 3, 4, 6
    m = _randomise(
        mc.make_rnn(
            cell,
            I,
            H,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=batch_first,
            dtype=torch.float64,
        )
    )
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = None
    h0 = c0 = None
    if with_state:
        h0 = torch.randn(num_layers * D, B, H, dtype=torch.float64)
        c0 = torch.randn(num_layers * D, B, H, dtype=torch.float64)
        hx = (h0, c0)
    inp = x.transpose(0, 1) if batch_first else x
    out, (hn, cn) = m(inp, hx)
    if batch_first:
        out = out.transpose(0, 1)
    ref_out, ref_h, ref_c = numpy_run(
        cell,
        x.numpy(),
        _params_np(m),
        num_layers,
        bidirectional,
        None if h0 is None else h0.numpy(),
        None if c0 is None else c0.numpy(),
    )
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hn.detach().numpy(), ref_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cn.detach().numpy(), ref_c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_forward_without_bias_matches_numpy(cell):
    m = _randomise(mc.make_rnn(cell, 3, 4, bias=False, dtype=torch.float64))
    assert m.bias_ih_l0 is None and m.bias_hh_l0 is None
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out, _ = m(x)
    ref, _, _ = numpy_run(cell, x.numpy(), _params_np(m), 1, False)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10, atol=1e-12)


def test_subLSTM_hand_computed_single_step():
    """One unit, one step, every number by hand: c' = f c + z - i, h' = sigma(c') - o."""
    m = mc.SubLSTM(1, 1, dtype=torch.float64)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor([[1.0], [2.0], [-1.0], [0.5]], dtype=torch.float64))
        m.weight_hh_l0.zero_()
        m.bias_ih_l0.zero_()
        m.bias_hh_l0.zero_()
    x = torch.tensor([[[2.0]]], dtype=torch.float64)
    c_prev = 0.3
    out, (h, c) = m(
        x,
        (
            torch.zeros(1, 1, 1, dtype=torch.float64),
            torch.full((1, 1, 1), c_prev, dtype=torch.float64),
        ),
    )
    i, f, z, o = sigmoid(2.0), sigmoid(4.0), sigmoid(-2.0), sigmoid(1.0)
    c_expected = f * c_prev + z - i
    assert c.item() == pytest.approx(c_expected, rel=1e-12)
    assert h.item() == pytest.approx(sigmoid(c_expected) - o, rel=1e-12)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cells_match_numpy_step(cell):
    m = _randomise(mc.make_cell(cell, 4, 5, dtype=torch.float64))
    x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (4, 5, 5))
    h1, c1 = m(x, (h, c))
    p = _params_np(m)
    rh, rc = numpy_step(
        cell,
        x.numpy(),
        h.numpy(),
        c.numpy(),
        p["weight_ih"],
        p["weight_hh"],
        p["bias_ih"] + p["bias_hh"],
        p.get("forget"),
    )
    np.testing.assert_allclose(h1.detach().numpy(), rh, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c1.detach().numpy(), rc, rtol=1e-10, atol=1e-12)


# -- drop-in for torch.nn.LSTM --------------------------------------------------------


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first", [(1, False, False), (2, True, True)]
)
def test_lstm_matches_torch_lstm_outputs_and_gradients(num_layers, bidirectional, batch_first):
    I, H = 5, 7
    ref = torch.nn.LSTM(
        I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
    )
    ours = mc.LSTM(
        I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
    )
    ours.load_state_dict(ref.state_dict())
    D = 2 if bidirectional else 1
    x = torch.randn(4, 6, I) if batch_first else torch.randn(6, 4, I)
    h0 = torch.randn(num_layers * D, 4, H)
    c0 = torch.randn(num_layers * D, 4, H)
    results = []
    for module in (ref, ours):
        xi, hi, ci = (t.clone().requires_grad_() for t in (x, h0, c0))
        out, (hn, cn) = module(xi, (hi, ci))
        (out.pow(2).sum() + hn.sin().sum() + cn.cos().sum()).backward()
        grads = [xi.grad, hi.grad, ci.grad] + [p.grad for p in module.parameters()]
        results.append((out, hn, cn, grads))
    (o1, h1, c1, g1), (o2, h2, c2, g2) = results
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, c1, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_lstm_state_dict_loads_into_torch_lstm_and_back():
    ours = _randomise(mc.LSTM(3, 4, num_layers=2))
    ref = torch.nn.LSTM(3, 4, num_layers=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ref(x)[0], ours(x)[0], atol=1e-6, rtol=1e-6)
    again = mc.LSTM(3, 4, num_layers=2)
    again.load_state_dict(ref.state_dict())
    torch.testing.assert_close(again(x)[0], ours(x)[0], atol=0, rtol=0)


def test_lstm_cell_matches_torch_lstm_cell():
    ref = torch.nn.LSTMCell(3, 5)
    ours = mc.LSTMCell(3, 5)
    ours.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(2, 3), torch.randn(2, 5), torch.randn(2, 5)
    for a, b in zip(ref(x, (h, c)), ours(x, (h, c))):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    for a, b in zip(ref(x[0]), ours(x[0])):  # unbatched, zero state
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


# -- gradients by finite differences ----------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_gradcheck_sequence_module(cell):
    m = _randomise(mc.make_rnn(cell, 2, 3, num_layers=2, bidirectional=True, dtype=torch.float64))
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *params):
        out, (hn, cn) = torch.func.functional_call(m, dict(zip(names, params)), (x, (h0, c0)))
        return out, hn, cn

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_gradcheck_cell_with_update_mask(cell):
    m = _randomise(mc.make_cell(cell, 3, 4, dtype=torch.float64))
    mask = torch.tensor([[0.0, 2.0, 2.0, 0.0], [2.0, 2.0, 0.0, 2.0]], dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: m(x, (h, c), update_mask=mask), (x, h, c))


# -- packed sequences ------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences_equal_running_each_sequence_alone(cell, enforce_sorted):
    torch.manual_seed(1)
    m = _randomise(mc.make_rnn(cell, 3, 4, num_layers=2, bidirectional=True))
    lengths = [6, 4, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    x = torch.randn(6, 4, 3)
    h0, c0 = torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    out, (hn, cn) = m(packed, (h0, c0))
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, n in enumerate(lengths):
        alone, (h_alone, c_alone) = m(x[:n, b], (h0[:, b], c0[:, b]))  # unbatched run
        torch.testing.assert_close(padded[:n, b], alone, atol=1e-6, rtol=1e-6)
        assert torch.all(padded[n:, b] == 0)
        torch.testing.assert_close(hn[:, b], h_alone, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cn[:, b], c_alone, atol=1e-6, rtol=1e-6)


def test_packed_lstm_matches_torch_packed_layout():
    ref = torch.nn.LSTM(3, 4, bidirectional=True)
    ours = mc.LSTM(3, 4, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    packed = pack_padded_sequence(
        torch.randn(5, 3, 3), torch.tensor([2, 5, 3]), enforce_sorted=False
    )
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(packed), ours(packed)
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(o1.sorted_indices, o2.sorted_indices)
    torch.testing.assert_close(o2.data, o1.data, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h2, h1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c2, c1, atol=1e-6, rtol=1e-6)


# -- the paper's claim about gradients (section 3.1, eq. 3) -------------------------------


def _grad_at_z_preactivation(pointwise, i_pre, f_pre, z_pre, o_pre, c_prev, delta):
    gates = torch.stack([i_pre, f_pre, z_pre, o_pre]).reshape(1, -1).requires_grad_()
    new = pointwise(gates, c_prev.reshape(1, -1))
    (new.h * delta).sum().backward()
    return gates.grad.reshape(4, -1)[2]


def test_sublstm_gradient_at_z_does_not_depend_on_gate_values():
    """Eq. 3: delta z_bar = Delta * sigma'(c) * sigma'(z_bar); the gates i and o enter
    only through c. Change o, and change i while keeping c fixed (compensating in the
    previous memory): the gradient reaching z_bar stays the same for the subLSTM, while
    for the LSTM (eq. 2: Delta * o * tanh'(c) * i * tanh'(z_bar)) it changes."""
    z_pre, f_pre = torch.tensor([0.3, -1.2]), torch.tensor([0.5, 1.0])
    delta = torch.tensor([0.7, -1.1])
    f = torch.sigmoid(f_pre)

    def with_gates(pointwise, i_pre, o_pre, c_target, combine):
        # choose c_prev so that c' = c_target whatever i is
        c_prev = (c_target - combine(torch.sigmoid(i_pre))) / f
        return _grad_at_z_preactivation(pointwise, i_pre, f_pre, z_pre, o_pre, c_prev, delta)

    c_target = torch.tensor([0.2, -0.4])
    sub_z = torch.sigmoid(z_pre)
    sub = [
        with_gates(
            mc.cells.sublstm_pointwise,
            torch.full((2,), a),
            torch.full((2,), b),
            c_target,
            lambda i: sub_z - i,
        )
        for a, b in [(-3.0, -2.0), (0.0, 1.0), (3.0, 4.0)]
    ]
    for g in sub[1:]:
        torch.testing.assert_close(g, sub[0], atol=1e-7, rtol=1e-6)
    # and it equals the closed form of eq. 3
    s = torch.sigmoid
    expected = delta * s(c_target) * (1 - s(c_target)) * s(z_pre) * (1 - s(z_pre))
    torch.testing.assert_close(sub[0], expected, atol=1e-7, rtol=1e-6)

    lstm_z = torch.tanh(z_pre)
    lstm = [
        with_gates(
            mc.cells.lstm_pointwise,
            torch.full((2,), a),
            torch.full((2,), b),
            c_target,
            lambda i: lstm_z * i,
        )
        for a, b in [(-3.0, -2.0), (3.0, 4.0)]
    ]
    assert (lstm[0] - lstm[1]).abs().max() > 1e-2


# -- regularisers ------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_update_dropout_uses_one_mask_for_all_steps(cell, monkeypatch):
    """With the mask known, the module equals the equations with z * mask at every step."""
    T, B, I, H = 5, 3, 2, 4
    m = _randomise(mc.make_rnn(cell, I, H, update_dropout=0.5, dtype=torch.float64))
    mask = torch.tensor(np.random.default_rng(0).choice([0.0, 2.0], size=(B, H)))
    calls = []

    def fixed_mask(p, batch, hidden, like, training):
        calls.append((p, batch, hidden, training))
        return mask if training else None

    monkeypatch.setattr(mcnn, "_update_mask", fixed_mask)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, _ = m.train()(x)
    assert calls == [(0.5, B, H, True)]  # one draw per sequence, not per step
    p = _params_np(m)
    h = c = np.zeros((B, H))
    for t in range(T):
        h, c = numpy_step(
            cell,
            x[t].numpy(),
            h,
            c,
            p["weight_ih_l0"],
            p["weight_hh_l0"],
            p["bias_ih_l0"] + p["bias_hh_l0"],
            p.get("forget_l0"),
            mask.numpy(),
        )
        np.testing.assert_allclose(out[t].detach().numpy(), h, rtol=1e-10, atol=1e-12)


def test_update_mask_is_scaled_bernoulli():
    mask = mcnn._update_mask(0.25, 400, 50, torch.empty(0, dtype=torch.float64), training=True)
    values = set(mask.unique().tolist())
    assert values <= {0.0, 1 / 0.75} and len(values) == 2
    assert mask.mean().item() == pytest.approx(1.0, abs=0.03)
    assert mcnn._update_mask(0.25, 4, 5, torch.empty(0), training=False) is None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_input_and_output_dropout_act_in_training_only(cell):
    I, H = 200, 100
    m = mc.make_rnn(cell, I, H, input_dropout=0.3, output_dropout=0.6)
    x = torch.randn(3, 8, I, requires_grad=True)
    out, (hn, _) = m.train()(x)
    out.sum().backward()
    zero_grad = (x.grad == 0).float().mean().item()
    assert zero_grad == pytest.approx(0.3, abs=0.03)  # dropped inputs get no gradient
    assert (out == 0).float().mean().item() == pytest.approx(0.6, abs=0.03)
    assert (hn == 0).float().mean().item() < 0.01  # h_n is not the dropped output
    m.eval()
    out1, _ = m(x)
    out2, _ = m(x)
    assert torch.equal(out1, out2)
    assert (out1 == 0).float().mean().item() < 0.01


def test_between_layer_dropout_changes_training_output_and_warns_for_one_layer():
    m = mc.SubLSTM(4, 16, num_layers=2, dropout=0.5)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m.eval()(x)[0], m.eval()(x)[0])
    assert not torch.allclose(m.train()(x)[0], m.eval()(x)[0])
    with pytest.warns(UserWarning, match="num_layers=1"):
        mc.SubLSTM(4, 16, num_layers=1, dropout=0.5)


# -- initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_initialisation_glorot_and_forget_bias(cell):
    I, H = 300, 200
    m = mc.make_rnn(cell, I, H)
    kind = m.cell
    for name, fan_in in (("weight_ih_l0", I), ("weight_hh_l0", H)):
        w = getattr(m, name)
        for block in w.detach().chunk(kind.num_gates, 0):
            bound = math.sqrt(6.0 / (fan_in + H))
            assert block.abs().max().item() <= bound
            assert block.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.all(m.bias_hh_l0 == 0)
    b = m.bias_ih_l0.detach().reshape(kind.num_gates, H)
    for k, gate in enumerate(kind.gate_names):
        assert torch.all(b[k] == (1.0 if gate == "f" else 0.0))
    if kind.learned_decay:
        assert torch.all(m.forget_l0 == 1.0)
    m2 = mc.make_rnn(cell, I, H, forget_bias=0.0)
    assert all(torch.all(p == 0) for n, p in m2.named_parameters() if "bias" in n or "forget" in n)


# -- shapes, unbatched, state -----------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_unbatched_input_equals_batch_of_one(cell):
    m = mc.make_rnn(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(5, 3)
    h0, c0 = torch.randn(4, 4), torch.randn(4, 4)
    out, (hn, cn) = m(x, (h0, c0))
    assert out.shape == (5, 8) and hn.shape == (4, 4) and cn.shape == (4, 4)
    out_b, (hn_b, cn_b) = m(x[None], (h0[:, None], c0[:, None]))
    torch.testing.assert_close(out, out_b[0])
    torch.testing.assert_close(hn, hn_b[:, 0])


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_zero_state_by_default(cell):
    m = mc.make_rnn(cell, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    zeros = torch.zeros(2, 2, 4)
    torch.testing.assert_close(m(x)[0], m(x, (zeros, zeros))[0], atol=0, rtol=0)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize(
    "shape,batch_first", [((0, 2, 3), False), ((2, 0, 3), True), ((0, 3), False)]
)
def test_zero_length_sequences_are_refused_as_torch_does(cell, shape, batch_first):
    x = torch.randn(*shape)
    with pytest.raises(RuntimeError, match="sequence length"):  # torch's type
        torch.nn.LSTM(3, 4, batch_first=batch_first)(x)
    with pytest.raises(RuntimeError, match="sequence length 0"):
        mc.make_rnn(cell, 3, 4, batch_first=batch_first)(x)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_fused_glorot_bounds_the_whole_kernel(cell):
    """``weight_init="glorot_fused"``: one Glorot-uniform kernel ``[W R]`` of shape
    ``(G*H, I + H)``, as TensorFlow's LSTMCell: bound sqrt(6 / (I + H + G*H)) for every
    block of both matrices (layer 2 reads the H outputs of layer 1); biases as before."""
    I, H = 300, 200
    m = mc.make_rnn(cell, I, H, num_layers=2, weight_init="glorot_fused", forget_bias=2.0)
    G = m.cell.num_gates
    for layer, fan_x in ((0, I), (1, H)):
        bound = math.sqrt(6.0 / (fan_x + H + G * H))
        for name in (f"weight_ih_l{layer}", f"weight_hh_l{layer}"):
            w = getattr(m, name).detach()
            assert w.abs().max().item() <= bound
            for block in w.chunk(G, 0):  # each block drawn from the same uniform
                assert block.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    b = m.bias_ih_l0.detach().reshape(G, H)
    for k, gate in enumerate(m.cell.gate_names):
        assert torch.all(b[k] == (2.0 if gate == "f" else 0.0))
    cell_module = mc.make_cell(cell, I, H, weight_init="glorot_fused")
    bound = math.sqrt(6.0 / (I + H + G * H))
    assert cell_module.weight_hh.abs().max().item() <= bound
    assert cell_module.weight_hh.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert "weight_init='glorot_fused'" in repr(m)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_chrono_initialisation_spreads_the_memory_time_constants(cell):
    """``chrono_max=T``: forget biases (phi) log U(1, T - 1), i.e. uniform in
    [0, ln(T - 1)] after the log, so memory time constants -1 / ln sigmoid(b) reach from
    ~1.44 (b = 0) to ~T steps; the LSTM's input-gate bias is -b_f (Tallec & Ollivier
    2018), the subtractive cells' stays 0; ``forget_bias`` is not used."""
    T, H = 784.0, 4000
    torch.manual_seed(0)
    m = mc.make_rnn(cell, 3, H, chrono_max=T, forget_bias=5.0)
    kind = m.cell
    if kind.learned_decay:
        forget = m.forget_l0.detach()
    else:
        forget = m.bias_ih_l0.detach().view(kind.num_gates, H)[kind.gate_names.index("f")]
    assert forget.min() >= 0.0 and forget.max() <= math.log(T - 1)
    # exp(b) is uniform on [1, T - 1]: its mean and quartiles, within ~4.5 standard
    # errors of 4,000 draws (3.6 for the mean, 5.4 for a quartile)
    u = forget.exp()
    assert u.mean().item() == pytest.approx(T / 2, abs=16)
    for q in (0.25, 0.75):
        assert torch.quantile(u, q).item() == pytest.approx(1 + q * (T - 2), abs=25)
    tau = -1.0 / torch.log(torch.sigmoid(forget))
    assert tau.min() > 1.4 and tau.max() < T and tau.max() > 0.9 * T
    if kind.learned_decay:
        assert torch.all(m.bias_ih_l0 == 0)
    else:
        biases = m.bias_ih_l0.detach().view(kind.num_gates, H)
        for k, gate in enumerate(kind.gate_names):
            if gate == "i" and cell == "lstm":
                torch.testing.assert_close(biases[k], -forget, atol=0, rtol=0)
            elif gate != "f":
                assert torch.all(biases[k] == 0)
    assert torch.all(m.bias_hh_l0 == 0)
    assert f"chrono_max={T}" in repr(m)
    single = mc.make_cell(cell, 3, 50, chrono_max=10)
    drawn = single.forget if kind.learned_decay else single.bias_ih.view(kind.num_gates, 50)[1]
    assert drawn.min() >= 0 and drawn.max() <= math.log(9) and drawn.std() > 0


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("gain", [0.25, 0.5, 2.0])
def test_recurrent_gain_scales_the_recurrent_spectrum(cell, gain):
    """``recurrent_gain=g``: each gate block of ``weight_hh`` is Glorot-uniform times g,
    bound g sqrt(6 / 2H), variance g^2 / H, so (circular law) its eigenvalues fill a disc
    of radius ~g; ``weight_ih`` and the biases keep Glorot's init."""
    I, H = 7, 400
    m = mc.make_rnn(cell, I, H, recurrent_gain=gain, forget_bias=2.0)
    G = m.cell.num_gates
    for block in m.weight_hh_l0.detach().chunk(G, 0):
        assert block.abs().max().item() <= gain * math.sqrt(6.0 / (2 * H))
        assert block.std().item() == pytest.approx(gain / math.sqrt(H), rel=0.03)
        radius = torch.linalg.eigvals(block.double()).abs().max().item()
        assert radius == pytest.approx(gain, rel=0.1)
    for block in m.weight_ih_l0.detach().chunk(G, 0):
        assert block.std().item() == pytest.approx(math.sqrt(2.0 / (H + I)), rel=0.1)
    b = m.bias_ih_l0.detach().reshape(G, H)
    for k, gate in enumerate(m.cell.gate_names):
        assert torch.all(b[k] == (2.0 if gate == "f" else 0.0))
    assert f"recurrent_gain={gain}" in repr(m)
    single = mc.make_cell(cell, I, 50, recurrent_gain=gain)
    assert single.weight_hh.abs().max().item() <= gain * math.sqrt(6.0 / 100)


@pytest.mark.parametrize("value", [0, -0.5, math.inf, math.nan, True, "0.5"])
def test_recurrent_gain_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match="recurrent_gain must be a finite number > 0"):
        mc.make_rnn("lstm", 3, 4, recurrent_gain=value)
    with pytest.raises(ValueError, match="recurrent_gain must be a finite number > 0"):
        mc.make_cell("fix_sublstm", 3, 4, recurrent_gain=value)


@pytest.mark.parametrize("value", [2, 1.5, 0, -3, math.inf, math.nan, True, "784"])
def test_chrono_max_must_be_a_number_of_steps(value):
    with pytest.raises(ValueError, match="chrono_max must be"):
        mc.make_rnn("lstm", 3, 4, chrono_max=value)
    with pytest.raises(ValueError, match="chrono_max must be"):
        mc.make_cell("sublstm", 3, 4, chrono_max=value)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_weight_init_must_be_a_known_scheme(cell):
    with pytest.raises(ValueError, match=r"weight_init must be one of \['glorot_gates', "):
        mc.make_rnn(cell, 3, 4, weight_init="orthogonal")
    with pytest.raises(ValueError, match=r"weight_init must be one of"):
        mc.make_cell(cell, 3, 4, weight_init="xavier")


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_forget_bias_must_be_finite(cell, value):
    with pytest.raises(ValueError, match="forget_bias"):
        mc.make_rnn(cell, 3, 4, forget_bias=value)
    with pytest.raises(ValueError, match="forget_bias"):
        mc.make_cell(cell, 3, 4, forget_bias=value)


def _hessian_vector_product(module, x):
    """Gradients (with a graph) of a loss on ``module(x)`` w.r.t. its parameters, and the
    gradients of their product with a fixed random vector (a Hessian-vector product)."""
    params = list(module.parameters())
    out, (h, c) = module(x)
    if isinstance(out, PackedSequence):
        out = out.data
    grads = torch.autograd.grad(out.pow(2).sum() + (h * c).sum(), params, create_graph=True)
    gen = torch.Generator().manual_seed(3)
    dot = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in grads)
    return grads, torch.autograd.grad(dot, params)


def test_lstm_second_order_gradients_match_torch_lstm():
    """Packed sequences take the fused kernel, whose backward recomputes on the reference
    path for ``create_graph=True``; torch.nn.LSTM supports second order too."""
    ours = _randomise(mc.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64))
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    got, want = _hessian_vector_product(ours, packed), _hessian_vector_product(theirs, packed)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["sublstm", "fix_sublstm"])
def test_subtractive_second_order_gradients_match_the_reference_kernel(cell):
    m = _randomise(mc.make_rnn(cell, 3, 4, num_layers=2, batch_first=True))
    x = torch.randn(3, 5, 3)
    got = _hessian_vector_product(m, x)
    with mc.use_kernel("reference"):
        want = _hessian_vector_product(m, x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b)


def test_empty_batch_and_single_step():
    m = mc.SubLSTM(3, 4)
    out, (h, c) = m(torch.randn(1, 2, 3))
    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[-1], h[0])


# -- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"input_size": 0}, ValueError, "input_size"),
        ({"hidden_size": -3}, ValueError, "hidden_size"),
        ({"hidden_size": 2.5}, TypeError, "hidden_size"),
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"update_dropout": 1.5}, ValueError, "update_dropout"),
        ({"input_dropout": "0.1"}, TypeError, "input_dropout"),
        ({"output_dropout": 1.0}, ValueError, "output_dropout"),
        ({"bidirectional": 1}, TypeError, "bidirectional"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bad_constructor_arguments(cell, kwargs, error, pattern):
    args = {"input_size": 3, "hidden_size": 4}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        mc.make_rnn(cell, **args)


def test_unknown_cell_name_lists_choices():
    with pytest.raises(ValueError, match="fix_sublstm"):
        mc.make_rnn("gru", 3, 4)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bad_forward_inputs(cell):
    m = mc.make_rnn(cell, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    good = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match="3-D .* 2-D"):
        m(torch.randn(5, 2, 3, 1))
    with pytest.raises(ValueError, match="3-D .* 2-D"):
        m(torch.randn(5))
    with pytest.raises(ValueError, match="input_size=3"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(np.zeros((5, 2, 3)))
    with pytest.raises(TypeError, match="float64"):
        m(x.double())
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(5, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="device"):
        m(torch.empty(5, 2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 4\)"):
        m(x, (torch.zeros(1, 2, 4), good))
    with pytest.raises(ValueError, match=r"c_0 must have shape \(2, 2, 4\)"):
        m(x, (good, torch.zeros(2, 3, 4)))
    with pytest.raises(TypeError, match="tuple"):
        m(x, good)
    with pytest.raises(TypeError, match="c_0 has dtype torch.float64"):
        m(x, (good, good.double()))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 4\)"):
        m(x[:, 0], (good, good))  # unbatched input with batched state


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_bad_cell_inputs(cell):
    m = mc.make_cell(cell, 3, 4)
    with pytest.raises(ValueError, match="2-D .* 1-D"):
        m(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="input_size=3"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 4\)"):
        m(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="update_mask"):
        m(torch.randn(2, 3), update_mask=torch.ones(2, 5))


# -- tracing, compiling, dtypes, serialisation -------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_jit_trace(cell):
    m = mc.make_rnn(cell, 3, 4, num_layers=2).eval()
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
        x2 = torch.randn(6, 2, 3)
        torch.testing.assert_close(traced(x2)[0], m(x2)[0])


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_torch_compile_traces_the_module(cell):
    """Under ``torch.compile`` the layers run eagerly in a graph break (tests/test_export.py)
    and the compiled module agrees with the eager one, gradients included."""
    m = mc.make_rnn(cell, 3, 4, num_layers=2)
    compiled = torch.compile(m, backend="aot_eager")
    x = torch.randn(4, 2, 3, requires_grad=True)
    out, (h, c) = compiled(x)
    ref_out, _ = m(x)
    torch.testing.assert_close(out, ref_out)
    out.sum().backward()
    assert x.grad is not None and m.weight_hh_l1.grad is not None


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_state_dict_round_trip_through_torch_save(cell):
    m = _randomise(mc.make_rnn(cell, 3, 4, num_layers=2, bidirectional=True))
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    m2 = mc.make_rnn(cell, 3, 4, num_layers=2, bidirectional=True)
    m2.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(m2(x)[0], m(x)[0], atol=0, rtol=0)


def test_whole_module_pickles():
    m = mc.FixSubLSTM(3, 4)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    m2 = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(m2(x)[0], m(x)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cuda_matches_cpu(cell):
    m = _randomise(mc.make_rnn(cell, 3, 4, num_layers=2))
    x = torch.randn(5, 2, 3)
    out_cpu, _ = m(x)
    out_gpu, _ = m.cuda()(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-5, rtol=1e-5)


def test_parameter_count_matches_paper_sizes():
    """fix-subLSTM sizes 11/115/230/750 match (sub)LSTM sizes 10/100/200/650: each is
    the largest size whose 2-layer recurrent parameter count does not exceed theirs."""
    for size, fix_size in [(10, 11), (100, 115), (200, 230), (650, 750)]:
        ref = mcnn.parameter_count("lstm", size, size, 2)
        assert mcnn.parameter_count("sublstm", size, size, 2) == ref
        assert sum(p.numel() for p in mc.LSTM(size, size, 2).parameters()) == ref
        assert sum(p.numel() for p in mc.FixSubLSTM(fix_size, fix_size, 2).parameters()) == (
            mcnn.parameter_count("fix_sublstm", fix_size, fix_size, 2)
        )
        assert mcnn.parameter_count("fix_sublstm", fix_size, fix_size, 2) <= ref
        assert mcnn.parameter_count("fix_sublstm", fix_size + 1, fix_size + 1, 2) > ref


# -- property tests: shapes agree with torch.nn.LSTM for any configuration --------------------


@settings(max_examples=25, deadline=None)
@given(
    cell=st.sampled_from(CELL_NAMES),
    steps=st.integers(1, 4),
    batch=st.integers(1, 3),
    input_size=st.integers(1, 4),
    hidden_size=st.integers(1, 4),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    batched=st.booleans(),
)
def test_output_shapes_match_torch_lstm(
    cell, steps, batch, input_size, hidden_size, num_layers, bidirectional, batch_first, batched
):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    ours = mc.make_rnn(cell, input_size, hidden_size, **kwargs)
    ref = torch.nn.LSTM(input_size, hidden_size, **kwargs)
    shape = (batch, steps) if batch_first else (steps, batch)
    x = torch.randn(*shape, input_size) if batched else torch.randn(steps, input_size)
    out, (h, c) = ours(x)
    ref_out, (ref_h, ref_c) = ref(x)
    assert out.shape == ref_out.shape and h.shape == ref_h.shape and c.shape == ref_c.shape


@settings(max_examples=25, deadline=None)
@given(
    cell=st.sampled_from(CELL_NAMES),
    dims=st.lists(st.integers(1, 3), min_size=1, max_size=5).filter(lambda d: len(d) not in (2, 3)),
)
def test_any_wrong_rank_is_refused_with_value_error(cell, dims):
    m = mc.make_rnn(cell, 3, 2)
    with pytest.raises(ValueError, match="3-D .* 2-D"):
        m(torch.randn(*dims))


@settings(max_examples=25, deadline=None)
@given(
    cell=st.sampled_from(CELL_NAMES),
    h_shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_any_wrong_state_shape_is_refused(cell, h_shape):
    m = mc.make_rnn(cell, 3, 2, num_layers=2)
    good = torch.zeros(2, 3, 2)
    bad = torch.zeros(*h_shape)
    if tuple(h_shape) == (2, 3, 2):
        return
    with pytest.raises(ValueError, match="h_0 must have shape"):
        m(torch.randn(4, 3, 3), (bad, good))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")  # ATen's
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("proj_size", [0, 2])
def test_constructor_takes_torch_lstm_positional_arguments(cell, proj_size):
    """Code written for torch.nn.LSTM passes its arguments positionally, proj_size
    included (projections: tests/test_proj_size.py); bad ones are refused clearly."""
    cls = type(mc.make_rnn(cell, 3, 4))
    args = (3, 4, 2, True, True, 0.0, True, proj_size)  # ..., batch_first, dropout, bidir, proj
    ours, theirs = cls(*args), torch.nn.LSTM(*args)
    assert ours.proj_size == theirs.proj_size == proj_size
    assert ours.batch_first and ours.bidirectional and ours.num_layers == 2
    x = torch.randn(2, 5, 3)
    assert [t.shape for t in _flat(ours(x))] == [t.shape for t in _flat(theirs(x))]
    with pytest.raises(ValueError, match="proj_size=4 must be 0 .* hidden_size=4"):
        cls(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size"):
        cls(3, 4, proj_size=True)


def _flat(result):
    out, (h, c) = result
    return out, h, c
