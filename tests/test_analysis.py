"""microcircuits.analysis against closed forms, the cells' own equations and autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import microcircuits as mc
from microcircuits.analysis import (
    FIGURES,
    GateRecord,
    LIFParameters,
    depth_only_factor,
    excitation_inhibition_balance,
    gating_curves,
    gradient_flow,
    inhibitory_plasticity,
    lif_rate_approximation,
    make_figure,
    record_module,
    simulate_lif_rate,
)
from microcircuits.analysis.balance import TRACE_STEPS, pearson_over_time, plot_balance
from microcircuits.cells import CELLS

CELL_NAMES = ["lstm", "sublstm", "fix_sublstm"]


def _adding_batch(seq_len, batch, seed=0):
    """A tiny delayed-addition batch: values in [0, 1], two marked steps, target their sum."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(seq_len, batch, generator=g)
    marks = torch.zeros(seq_len, batch)
    columns = torch.arange(batch)
    marks[torch.randint(0, seq_len // 2, (batch,), generator=g), columns] = 1.0
    marks[torch.randint(seq_len // 2, seq_len, (batch,), generator=g), columns] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(dim=0)


def _randomise(module, scale=0.8):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale)
    return module


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# -- gating: the LIF neuron ---------------------------------------------------------------


def test_lif_rate_zero_below_threshold_and_capped():
    p = LIFParameters()  # threshold current theta / R = 0.2 nA
    rates = simulate_lif_rate([0.0, 0.05, 50.0], [0.0], params=p, duration=300.0, trials=4)
    assert rates.shape == (1, 3, 4)
    np.testing.assert_array_equal(rates[0, :2], 0.0)  # 25 % of threshold, noise 2 mV
    assert np.all(rates <= p.max_rate)
    assert np.all(rates[0, 2] > 0.8 * p.max_rate)  # huge drive: near the refractory cap


def test_lif_rate_rises_with_excitation_and_falls_with_inhibition():
    exc = [0.8, 1.2, 1.8, 2.4]  # above threshold (0.2 nA) even with 0.4 nA inhibition
    inh = [0.0, 0.2, 0.4]
    rates = simulate_lif_rate(exc, inh, duration=500.0, trials=4).mean(axis=-1)  # (3, 4)
    assert np.all(np.diff(rates, axis=1) > 0), rates
    assert np.all(np.diff(rates, axis=0) < 0), rates


def test_lif_rate_is_deterministic_given_the_seed():
    a = simulate_lif_rate([0.3], [0.0], duration=100.0, trials=2, seed=3)
    b = simulate_lif_rate([0.3], [0.0], duration=100.0, trials=2, seed=3)
    np.testing.assert_array_equal(a, b)


def test_rate_approximation_is_the_papers_formula():
    # r = 1 / (tau_m ln(RI / (RI - theta))); at RI = 2 theta and no refractory period:
    # 1 / (tau_m ln 2).
    p = LIFParameters(refractory=1e-12)
    at_twice_threshold = lif_rate_approximation(2 * p.threshold / p.resistance, params=p)
    assert at_twice_threshold == pytest.approx(1000.0 / (p.tau_m * math.log(2.0)))
    p = LIFParameters()
    below = lif_rate_approximation(np.array([0.0, 0.1, 0.3]), 0.15, params=p)
    np.testing.assert_array_equal(below[:2], 0.0)
    assert below[2] == 0.0  # 0.15 nA net: still below 0.2 nA
    assert np.all(lif_rate_approximation(np.linspace(0, 100, 50), params=p) < p.max_rate)


def test_rate_approximation_matches_simulation_above_threshold():
    p = LIFParameters()
    exc = np.array([0.5, 1.0, 2.0])  # 2.5 to 10 times threshold
    simulated = simulate_lif_rate(exc, [0.0, 0.2], params=p, duration=1000.0, trials=4)
    approximated = lif_rate_approximation(exc[None, :], np.array([[0.0], [0.2]]), params=p)
    np.testing.assert_allclose(simulated.mean(axis=-1), approximated, rtol=0.05)


def test_sigmoid_panels_equal_closed_forms():
    x = np.linspace(-4, 4, 9)
    data = gating_curves(
        excitatory=[0.0],
        inhibitory=[0.0],
        duration=10.0,
        trials=1,
        sigmoid_input=x,
        subtractive_gates=[0.0, 0.3],
        multiplicative_gates=[1.0, 0.4],
    )
    for k, g in enumerate([0.0, 0.3]):
        np.testing.assert_allclose(data.subtractive[k], [_sigmoid(v) - g for v in x])
    for k, g in enumerate([1.0, 0.4]):
        np.testing.assert_allclose(data.multiplicative[k], [_sigmoid(v) * g for v in x])


def test_lif_parameters_refuse_bad_values():
    with pytest.raises(ValueError, match="tau_m"):
        LIFParameters(tau_m=0.0)
    with pytest.raises(ValueError, match="reset"):
        LIFParameters(reset=25.0)
    with pytest.raises(ValueError, match="dt"):
        LIFParameters(dt=5.0)


# -- inhibitory plasticity ------------------------------------------------------------------


def test_inhibitory_plasticity_reaches_target_and_detailed_balance():
    data = inhibitory_plasticity(seed=1)
    assert data.initial_rate > 2 * data.target_rate  # starts far from the target
    assert data.final_rate == pytest.approx(data.target_rate, rel=0.1)
    assert data.correlation > 0.95
    assert np.all(data.w_inh >= 0)
    # The fixed point of the linear analysis: w_I = w_E - d with a common offset d > 0.
    offset = data.w_exc - data.w_inh_final
    assert np.all(offset > 0) and offset.std() < 0.5 * offset.mean()


def test_inhibitory_plasticity_is_deterministic_and_seed_dependent():
    a = inhibitory_plasticity(duration=1.0, seed=2)
    b = inhibitory_plasticity(duration=1.0, seed=2)
    c = inhibitory_plasticity(duration=1.0, seed=3)
    np.testing.assert_array_equal(a.w_inh, b.w_inh)
    assert not np.array_equal(a.w_inh, c.w_inh)


# -- recording ------------------------------------------------------------------------------


def _paper_output(cell, c, o):
    return torch.tanh(c) * o if cell == "lstm" else torch.sigmoid(c) - o


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("batch_first,bidirectional", [(False, False), (True, True)])
def test_recorded_gates_reproduce_module_output(cell, batch_first, bidirectional):
    T, B, I, H = 6, 3, 4, 5
    module = _randomise(
        mc.make_rnn(cell, I, H, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    )
    x = torch.randn(T, B, I)
    output, (h_n, c_n) = module(x.transpose(0, 1) if batch_first else x)
    if batch_first:
        output = output.transpose(0, 1)
    records = record_module(module, x)
    D = 2 if bidirectional else 1
    assert len(records) == 2 * D
    last = records[-D:]
    recomputed = torch.cat([_paper_output(cell, r.c, r.o) for r in last], dim=-1)
    torch.testing.assert_close(recomputed, output, rtol=0, atol=1e-6)
    for index, r in enumerate(records):
        backward = index % D == 1  # its previous step is the next time index
        # The memory equation of the paper, from the recorded gates.
        c_prev = torch.cat([torch.zeros(1, B, H), r.c[:-1]])
        if backward:
            c_prev = torch.cat([r.c[1:], torch.zeros(1, B, H)])
        update = r.z * r.i if cell == "lstm" else r.z - r.i
        torch.testing.assert_close(r.c, r.f * c_prev + update, rtol=0, atol=1e-6)
        final = r.c[0] if backward else r.c[-1]
        torch.testing.assert_close(final, c_n[index], rtol=0, atol=1e-6)


def test_recording_reads_torch_lstm():
    T, B, I, H = 5, 2, 3, 4
    module = torch.nn.LSTM(I, H, num_layers=2)
    x = torch.randn(T, B, I)
    output, _ = module(x)
    recomputed = _paper_output("lstm", *(lambda r: (r.c, r.o))(record_module(module, x)[-1]))
    torch.testing.assert_close(recomputed, output, rtol=0, atol=1e-6)


def test_fix_sublstm_record_has_constant_decay():
    module = _randomise(mc.FixSubLSTM(2, 3))
    record = record_module(module, torch.randn(4, 2, 2))[0]
    expected = torch.sigmoid(module.forget_l0).expand(4, 2, 3)
    torch.testing.assert_close(record.f, expected)


# -- gradients ------------------------------------------------------------------------------


def _single_step_dh_dzbar(cell, c_target, f_pre, z_pre, i_pre, o_pre):
    """d h / d zbar of one step (through c, with c_{t-1} held), by autograd through the
    cell's own pointwise function, with c_{t-1} chosen so that c_t equals c_target."""
    kind = CELLS[cell]
    f = torch.sigmoid(f_pre)
    z_act = torch.tanh(z_pre) if cell == "lstm" else torch.sigmoid(z_pre)
    update = z_act * torch.sigmoid(i_pre) if cell == "lstm" else z_act - torch.sigmoid(i_pre)
    c_prev = (c_target - update) / f
    z_pre = z_pre.clone().requires_grad_()
    if cell == "fix_sublstm":
        gates, forget = torch.cat([i_pre, z_pre, o_pre], dim=-1), f_pre
    else:
        gates, forget = torch.cat([i_pre, f_pre, z_pre, o_pre], dim=-1), None
    h, c = kind.pointwise(gates, c_prev, forget, None)
    torch.testing.assert_close(c, c_target)  # c_t really is held fixed
    (grad,) = torch.autograd.grad(h.sum(), z_pre)  # elementwise: d h_j / d zbar_j
    gate = GateRecord(
        i=torch.sigmoid(i_pre),
        f=f,
        z=z_act.detach(),
        o=torch.sigmoid(o_pre),
        c=c.detach(),
        h=h.detach(),
    )
    return grad, depth_only_factor(kind, gate)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_depth_only_term_and_the_gates(cell):
    """Section 3.1 for one step: with c_t and zbar_t fixed, changing the input and output
    gate pre-activations leaves the subtractive depth-only term (eq. 3) unchanged and
    changes the multiplicative one (eq. 2). The factor is checked against autograd."""
    g = torch.Generator().manual_seed(0)
    H = 6
    c_target = torch.randn(1, H, generator=g, dtype=torch.float64)
    f_pre = torch.randn(1, H, generator=g, dtype=torch.float64)
    z_pre = torch.randn(1, H, generator=g, dtype=torch.float64)
    closed = (torch.full((1, H), -3.0, dtype=torch.float64),) * 2
    opened = (torch.full((1, H), 3.0, dtype=torch.float64),) * 2
    grad_a, factor_a = _single_step_dh_dzbar(cell, c_target, f_pre, z_pre, *closed)
    grad_b, factor_b = _single_step_dh_dzbar(cell, c_target, f_pre, z_pre, *opened)
    torch.testing.assert_close(factor_a, grad_a)
    torch.testing.assert_close(factor_b, grad_b)
    if cell == "lstm":
        assert torch.all((factor_b - factor_a).abs() > 1e-3)  # i * o scales eq. 2
        assert torch.all(factor_a.abs() < 0.01 * factor_b.abs())  # closed gates shut it
    else:  # equal up to float64 rounding (c is rebuilt from c_{t-1} in each case)
        torch.testing.assert_close(factor_a, factor_b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_depth_only_norm_is_the_whole_gradient_for_one_step(cell):
    """With T = 1 there is no recurrence, so (delta W_z)_0 of each sequence is that
    sequence's whole contribution to the gradient of W_z, measured here by autograd."""
    x, y = _adding_batch(2, 5)
    x, y = x[-1:], x[-1, :, 0] * x[-1, :, 1]  # the last step alone, and its marked value
    batch = x.shape[1]
    module = _randomise(mc.make_rnn(cell, 2, 4))
    readout = torch.randn(4)

    def loss_fn(output):
        return ((output[-1] @ readout - y) ** 2).mean()

    curve = gradient_flow({"m": module}, x, loss_fn=loss_fn).curves[0]
    block = module.cell.gate_names.index("z")
    norms, input_norms = [], []
    for b in range(batch):
        module.zero_grad()
        x_b = x[:, b : b + 1].clone().requires_grad_()
        # Sequence b's share of the batch-mean loss.
        loss_b = ((module(x_b)[0][-1] @ readout - y[b]) ** 2).sum() / batch
        loss_b.backward()
        norms.append(module.weight_ih_l0.grad.chunk(module.cell.num_gates)[block].norm())
        input_norms.append(x_b.grad.norm())
    assert curve.depth_only[0] == pytest.approx(float(torch.stack(norms).mean()), rel=1e-4)
    assert curve.input_grad[0] == pytest.approx(float(torch.stack(input_norms).mean()), rel=1e-5)


def test_gradient_flow_measures_every_step_of_each_model():
    x, y = _adding_batch(12, 4)
    data = gradient_flow(inputs=x, target=y, hidden_size=5)
    assert [c.cell for c in data.curves] == CELL_NAMES
    for curve in data.curves:
        np.testing.assert_array_equal(curve.distance, np.arange(12))
        for values in (curve.input_grad, curve.depth_only, curve.gate_factor):
            assert values.shape == (12,) and np.all(np.isfinite(values))
        assert np.all(curve.input_grad > 0)
        assert curve.input_grad[0] > curve.input_grad[-1]  # error decays with distance
    # The default modules are seeded: the same call gives the same numbers.
    again = gradient_flow(inputs=x, target=y, hidden_size=5)
    np.testing.assert_array_equal(again.curves[1].input_grad, data.curves[1].input_grad)


def test_gradient_flow_accepts_torch_lstm_and_restores_training_mode():
    x, _ = _adding_batch(5, 2)
    module = torch.nn.LSTM(2, 3, num_layers=2, dropout=0.5)
    module.train()
    data = gradient_flow([module], x, layer=1)
    assert data.curves[0].label == "LSTM" and module.training
    with pytest.raises(ValueError, match="layer"):
        gradient_flow([module], x, layer=2)


# -- balance --------------------------------------------------------------------------------


def test_balance_quantities():
    x, _ = _adding_batch(10, 4)
    sub = _randomise(mc.SubLSTM(2, 6))
    fix = _randomise(mc.FixSubLSTM(2, 6))
    data = excitation_inhibition_balance({"sub": sub, "fix": fix}, x, bins=20)
    for cell in data.cells:
        assert 0.0 <= cell.input_closed <= 1.0 and 0.0 <= cell.output_closed <= 1.0
        widths = np.diff(data.bins)
        assert (cell.input_hist * widths).sum() == pytest.approx(1.0)
        assert np.all(np.abs(cell.input_correlation[np.isfinite(cell.input_correlation)]) <= 1)
    fix_data = data.cells[1]
    expected_f = torch.sigmoid(fix.forget_l0).detach().numpy()
    np.testing.assert_allclose(fix_data.decay, expected_f, rtol=1e-6)
    np.testing.assert_allclose(fix_data.timescale, -1.0 / np.log(expected_f), rtol=1e-5)
    # Output closed fraction counts h <= threshold of the module's own output.
    h = sub(x)[0].detach()
    assert data.cells[0].output_closed == pytest.approx(float((h <= 0).float().mean()))
    everything = excitation_inhibition_balance([sub], x, threshold=2.0)
    nothing = excitation_inhibition_balance([sub], x, threshold=-2.0)
    assert everything.cells[0].input_closed == 1.0 and nothing.cells[0].input_closed == 0.0


def test_balance_refuses_lstm():
    with pytest.raises(ValueError, match="subtractive"):
        excitation_inhibition_balance([mc.LSTM(2, 3)], torch.zeros(3, 1, 2))


def test_balance_trace_panel_shows_a_readable_window():
    """Panel f plots the first TRACE_STEPS steps of long traces and says so; the data
    (and the CSV) keep every step."""
    x, _ = _adding_batch(TRACE_STEPS + 30, 2)
    data = excitation_inhibition_balance([_randomise(mc.SubLSTM(2, 3))], x)
    assert data.cells[0].trace["z"].size == TRACE_STEPS + 30
    figure = plot_balance(data)
    panel = figure.axes[5]
    assert [line.get_xydata().shape[0] for line in panel.get_lines()] == [TRACE_STEPS] * 4
    np.testing.assert_allclose(
        panel.get_lines()[0].get_ydata(), data.cells[0].trace["z"][:TRACE_STEPS]
    )
    assert panel.get_xlabel() == f"time step (first {TRACE_STEPS} of {TRACE_STEPS + 30})"
    short = plot_balance(excitation_inhibition_balance([_randomise(mc.SubLSTM(2, 3))], x[:20]))
    assert short.axes[5].get_lines()[0].get_xydata().shape[0] == 20
    assert short.axes[5].get_xlabel() == "time step"


def test_pearson_over_time_matches_numpy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 3, 2, generator=g), torch.randn(20, 3, 2, generator=g)
    b = b + a * torch.tensor([0.0, 2.0])
    expected = [
        np.mean([np.corrcoef(a[:, s, u], b[:, s, u])[0, 1] for s in range(3)]) for u in range(2)
    ]
    np.testing.assert_allclose(pearson_over_time(a, b).numpy(), expected, rtol=1e-5)
    constant = pearson_over_time(torch.ones(5, 2, 1), torch.randn(5, 2, 1))
    assert torch.isnan(constant).all()


# -- figures --------------------------------------------------------------------------------

_TINY = {
    "gating": lambda: dict(
        excitatory=[0.0, 0.5, 1.0], inhibitory=[0.0, 0.5], duration=50.0, trials=2
    ),
    "gradients": lambda: dict(inputs=_adding_batch(6, 3)[0], hidden_size=3),
    "balance": lambda: dict(inputs=_adding_batch(6, 3)[0], hidden_size=3, bins=10),
    "inhibitory-plasticity": lambda: dict(duration=0.5),
}


# Figures of a trained run, tested on a tiny trained run where that task lives.
_OF_TRAINED_RUNS = {
    "cmc-phase": "tests/test_cmc_experiments.py",
    "elm-memory": "tests/test_elm_figure.py",
    "rhythm": "tests/test_rhythm.py",
}


def test_every_figure_is_tested():
    assert set(_TINY) | set(_OF_TRAINED_RUNS) == set(FIGURES)


@pytest.mark.parametrize("name", sorted(_TINY))
def test_make_figure_writes_png_pdf_csv(name, tmp_path):
    paths = make_figure(name, tmp_path / "out", **_TINY[name]())
    assert [p.suffix for p in paths] == [".png", ".pdf", ".csv"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths[2].read_text().splitlines()) > 1


def test_make_figure_refuses_unknown_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="inhibitory-plasticity"):
        make_figure("gates", tmp_path)
    with pytest.raises(ValueError, match="trials"):
        make_figure("gating", tmp_path, trails=3)


@pytest.mark.parametrize("module", ["LSTM", "SubLSTM", "nn.LSTM"])
def test_analyses_refuse_projected_modules(module):
    """The analyses read h as the layer's hidden units: with proj_size > 0 it is not."""
    from microcircuits.analysis.recording import module_cell

    build = nn.LSTM if module == "nn.LSTM" else getattr(mc, module)
    with pytest.raises(ValueError, match="proj_size > 0 is not supported by the analyses"):
        module_cell(build(3, 5, proj_size=2))
    assert module_cell(build(3, 5)).name in ("lstm", "sublstm")
