"""The ELM's fused whole-sequence path (microcircuits.elm.fused) against its reference loop.

The reference loop (the module under ``use_kernel("reference")``) steps through
:func:`microcircuits.elm.equations.elm_state_step` with autograd; the fused path must give
the same outputs, final state and gradients (input, initial state, every parameter),
first-order gradients that pass float64 finite differences, and, asked for a graph, the
reference's second-order gradients. Both the C++ loops and the Python loops are checked.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import microcircuits as mc
from microcircuits.elm import fused
from microcircuits.kernels import cpu_products, native, use_kernel


@pytest.fixture(params=["direct", "native", "python"])
def loops(request, monkeypatch):
    """Runs a test with the C++ loops, on their direct path (brgemm and AVX-512, float32;
    skipped where that is not available) and on their ATen path, and without them."""
    if request.param == "python":
        monkeypatch.setattr(fused, "_native_ops", lambda: None)
        return request.param
    if native.step_loops() is None:
        pytest.skip("the C++ step loops are not available")
    if request.param == "native":
        monkeypatch.setattr(cpu_products, "_DIRECT", False)
    elif not cpu_products.direct_available(torch.float32, native.step_loops()):
        pytest.skip("the direct path needs oneDNN's brgemm and AVX-512")
    return request.param


def _model(version, routing, activation="relu", layers=1, learn=False, batch_first=False, **kw):
    if routing is None:  # one synapse per input
        sizes = dict(num_branch=None, num_synapse_per_branch=1) if version == 1 else {}
        if version == 2:
            sizes = dict(num_branch=6, num_synapse_per_branch=2)
        inputs = 12
    else:
        sizes = dict(num_branch=3, num_synapse_per_branch=4)
        inputs = 10
    return mc.ELM(
        inputs,
        3,
        5,
        version=version,
        mlp_num_layers=layers,
        mlp_activation=activation,
        learn_memory_tau=learn,
        input_to_synapse_routing=routing,
        batch_first=batch_first,
        memory_tau_max=30.0,
        **{**sizes, **kw},
    )


def _run(model, x, state, kernel):
    """Output, final state and the gradients of a loss of all three."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if state is not None:
        state = mc.ELMState(*(t.clone().requires_grad_() for t in state))
    with use_kernel(kernel):
        output, final = model(x, state)
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    loss = (output * weight).sum() + (final.trace**2).sum() + (final.memory * 3).sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    if state is not None:
        grads["trace0"], grads["memory0"] = state.trace.grad, state.memory.grad
    return output.detach(), final, grads


def _assert_same(fast, slow):
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1].trace, slow[1].trace, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1].memory, slow[1].memory, rtol=1e-5, atol=1e-5)
    assert fast[2].keys() == slow[2].keys()
    for name, expected in slow[2].items():
        assert fast[2][name] is not None, name
        scale = float(expected.abs().max()) + 1.0
        torch.testing.assert_close(
            fast[2][name],
            expected,
            rtol=1e-5,
            atol=2e-6 * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


CONFIGS = list(
    itertools.product(
        [1, 2],  # version
        [None, "random", "neuronio"],  # routing
        ["relu", "silu"],
        [0, 1, 2],  # MLP hidden layers
    )
)


@pytest.mark.parametrize(("version", "routing", "activation", "layers"), CONFIGS)
def test_fused_path_equals_the_reference_loop(loops, version, routing, activation, layers):
    torch.manual_seed(version * 100 + layers)
    for learn, batch_first, with_state in [(False, False, False), (True, True, True)]:
        model = _model(version, routing, activation, layers, learn, batch_first)
        x = torch.randn((4, 7, model.input_size) if batch_first else (7, 4, model.input_size))
        state = None
        if with_state:
            state = (torch.randn(4, model.num_trace), torch.randn(4, model.num_memory))
        assert (
            fused.unsupported_reason(
                model, x if not batch_first else x.transpose(0, 1), *_state_and_weights(model, 4)
            )
            is None
        )
        _assert_same(_run(model, x, state, "auto"), _run(model, x, state, "reference"))


def _state_and_weights(model, batch):
    return model.initial_state(batch), model.step_weights()


def test_unbatched_and_no_grad_agree(loops):
    model = _model(1, "neuronio", "silu", 2)
    x = torch.randn(9, model.input_size)
    with torch.no_grad():
        fast = model(x)
        with use_kernel("reference"):
            slow = model(x)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1].trace, slow[1].trace, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1].memory, slow[1].memory, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_gradcheck_float64_through_the_fused_function(loops, version):
    model = _model(version, "random", "silu", 1, learn=True, dtype=torch.float64)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.rand(4, 2, model.input_size, dtype=torch.float64, requires_grad=True)
    trace0 = torch.randn(2, model.num_trace, dtype=torch.float64, requires_grad=True)
    memory0 = torch.randn(2, model.num_memory, dtype=torch.float64, requires_grad=True)
    assert fused.unsupported_reason(model, x, *_state_and_weights(model, 2)) is None

    def run(x, trace0, memory0, *params):
        output, state = torch.func.functional_call(
            model, dict(zip(names, params)), (x, mc.ELMState(trace0, memory0))
        )
        return output, state.trace, state.memory

    assert torch.autograd.gradcheck(run, (x, trace0, memory0, *params))


def test_create_graph_gives_the_reference_second_order_gradients(loops):
    model = _model(1, "neuronio", "silu", 1, learn=True, dtype=torch.float64)
    x = torch.randn(6, 2, model.input_size, dtype=torch.float64)
    results = []
    for kernel in ("auto", "reference"):
        model.zero_grad(set_to_none=True)
        with use_kernel(kernel):
            output, state = model(x)
        loss = output.pow(2).sum() + state.trace.pow(2).sum()
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, params, allow_unused=True))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast, slow, rtol=1e-7, atol=1e-9)


def test_falls_back_where_the_fused_path_does_not_apply():
    model = _model(1, "random")
    x = torch.randn(5, 2, model.input_size)
    state, weights = _state_and_weights(model, 2)
    assert fused.unsupported_reason(model, x, state, weights) is None
    with use_kernel("reference"):
        assert "reference" in fused.unsupported_reason(model, x, state, weights)
    assert "dtype" in fused.unsupported_reason(
        model.half(), x.half(), *_state_and_weights(model, 2)
    )
    model.float()
    with torch.no_grad():
        model.trace_tau[0] = 2.0  # version 1 synapses with different decays
    weights = model.step_weights()
    assert "differ" in fused.unsupported_reason(model, x, state, weights)
    output, _ = model(x)  # the reference loop runs instead
    assert output.shape == (5, 2, 3)
    empty = torch.randn(0, 2, model.input_size)
    assert fused.unsupported_reason(model, empty, state, weights) is not None
    assert model(empty)[0].shape == (0, 2, 3)


@pytest.mark.parametrize("project_first", [True, False])
@pytest.mark.parametrize("routing", [None, "random"])
def test_traced_first_layer_input_equals_the_branch_trace(
    loops, monkeypatch, project_first, routing
):
    """With one trace decay for all branches the fused path may trace ``W_0 b_t`` (H_0
    wide) instead of ``b_t`` (N wide); both must equal the reference loop, with and
    without the drive folded into the weight (no routing, one synapse per branch)."""
    monkeypatch.setattr(fused, "_project_first", lambda decay, hidden: project_first)
    torch.manual_seed(3)
    kw = dict(num_branch=None, num_synapse_per_branch=1) if routing is None else {}
    if routing is not None:
        kw = dict(num_branch=8, num_synapse_per_branch=2)
    model = mc.ELM(
        12,
        3,
        4,
        mlp_hidden_size=5,
        input_to_synapse_routing=routing,
        batch_first=True,
        memory_tau_max=30.0,
        **kw,
    )
    x = torch.randn(3, 9, 12)
    state = (torch.randn(3, model.num_trace), torch.randn(3, model.num_memory))
    _assert_same(_run(model, x, state, "auto"), _run(model, x, state, "reference"))


def test_project_first_needs_one_decay_and_fewer_hidden_units():
    same = torch.full((7,), 0.9)
    assert fused._project_first(same, 5)
    assert not fused._project_first(same, 7)  # H_0 = N: nothing to gain
    assert not fused._project_first(torch.linspace(0.5, 0.9, 7), 5)


def test_version2_branch_decays_that_differ_take_the_branch_trace(loops):
    """Version 2's branches may decay at different rates (a trace per branch): the
    fused path traces the branches then, and still equals the reference."""
    model = _model(2, None, layers=1)
    with torch.no_grad():
        model.trace_tau.copy_(torch.linspace(2.0, 9.0, model.num_trace))
    weights = model.step_weights()
    assert not fused._project_first(weights.trace_decay, model.mlp_weight_l0.shape[0])
    x = torch.randn(7, 4, model.input_size)
    state = (torch.randn(4, model.num_trace), torch.randn(4, model.num_memory))
    _assert_same(_run(model, x, state, "auto"), _run(model, x, state, "reference"))


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_direct_path_splits_the_batch_over_two_threads(monkeypatch, activation):
    """A batch of 40 on two threads: the direct path runs blocks of rows (16 and 24)
    through all steps each; outputs and gradients equal the reference loop's."""
    if native.step_loops() is None or not cpu_products.direct_available(
        torch.float32, native.step_loops()
    ):
        pytest.skip("the direct path needs the C++ loops, oneDNN's brgemm and AVX-512")
    torch.set_num_threads(2)
    torch.manual_seed(5)
    model = _model(1, "random", activation, layers=2)
    x = torch.randn(6, 40, model.input_size)
    state = (torch.randn(40, model.num_trace), torch.randn(40, model.num_memory))
    _assert_same(_run(model, x, state, "auto"), _run(model, x, state, "reference"))
