"""The ELM neuron against independent truth: the published implementation's outputs
(fixtures, see tests/fixtures/README.md), the paper's equations worked by hand in plain
Python, its parameter counts, finite differences, and clear errors for bad inputs."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch.func import functional_call

import microcircuits as mc
from microcircuits.elm.equations import elm_step, synaptic_drive
from microcircuits.elm.routing import neuronio_routing

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[1]
NEURONIO_MODEL = Path("elm-neuronio", "num_memory_10", "neuronio_best_model_state.pt")

NEURONIO = dict(
    input_size=1278,
    output_size=2,
    num_branch=45,
    num_synapse_per_branch=100,
    input_to_synapse_routing="neuronio",
    memory_tau_max=150.0,
)


def _data_dir() -> Path:
    return Path(os.environ.get("MICROCIRCUITS_DATA") or REPO_ROOT.parent / "shared" / "data")


def _fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / name), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- (a) the published implementation ------------------------------------------------


def test_released_neuronio_model_matches_the_reference_code():
    path = _data_dir() / NEURONIO_MODEL
    if not path.is_file():
        pytest.skip(f"released ELM model not found at {path} (set MICROCIRCUITS_DATA)")
    tensors, meta = _fixture("elm_neuronio_num_memory_10.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["model_sha256"], (
        f"{path} is not the file the fixture was made from"
    )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = mc.ELM.from_reference_state_dict(
        state_dict, version=1, **json.loads(meta["reference_kwargs"])
    )
    assert model.batch_first and _trainable(model) == 5852
    output, state = model(tensors["input"].float())
    torch.testing.assert_close(output, tensors["output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.trace, tensors["trace"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.memory, tensors["memory"], rtol=1e-5, atol=1e-5)
    assert output.std() > 0.1  # the fixture exercises the model


@pytest.mark.parametrize("version", [1, 2])
def test_tiny_reference_models_with_random_routing_match(version):
    tensors, meta = _fixture("elm_reference_tiny.safetensors")
    prefix = f"v{version}."
    state_dict = {
        key[len(prefix + "state_dict.") :]: value
        for key, value in tensors.items()
        if key.startswith(prefix + "state_dict.")
    }
    kwargs = json.loads(meta["reference_kwargs"])
    kwargs["tau_s_value" if version == 1 else "tau_b_value"] = 3.0
    model = mc.ELM.from_reference_state_dict(state_dict, version=version, **kwargs)
    # 12 synaptic weights, MLP 6-5-5-3, readout 3-2, learned memory time constants
    assert _trainable(model) == 12 + (30 + 5) + (25 + 5) + (15 + 3) + (6 + 2) + 3
    output, state = model(tensors[prefix + "input"])
    torch.testing.assert_close(output, tensors[prefix + "output"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.trace, tensors[prefix + "trace"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.memory, tensors[prefix + "memory"], rtol=1e-5, atol=1e-6)


# -- (b) the equations, by hand --------------------------------------------------------

# A tiny Branch-ELM: 4 inputs, 2 branches of 2 synapses, 2 memory units, MLP 4-3-2.
RAW_W_S = [0.5, -0.2, 1.0, 0.3]  # the second synapse is rectified away
RAW_TAU = [-1.0, 0.5]
W0 = [[0.3, -0.5, 0.2, 0.1], [-0.4, 0.6, -0.3, 0.8], [0.7, 0.2, 0.5, -0.6]]
B0 = [0.1, -0.2, 0.05]
W1 = [[0.9, -0.7, 0.4], [-0.3, 0.8, 0.6]]
B1 = [-0.1, 0.2]
WY = [[1.5, -0.5]]
BY = [0.25]
INPUTS = [[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 1.5, 1.0], [0.0, 0.0, 0.0, 0.0]]


def _by_hand(version: int, lambda_value: float) -> tuple[list[float], list[float], list[float]]:
    """The published equations for the tiny model, one float at a time (delta_t = 1,
    trace tau 2, memory tau in [1, 20])."""
    tau_m = [1 + 19 / (1 + math.exp(-r)) for r in RAW_TAU]
    k_m = [math.exp(-1 / tau) for tau in tau_m]
    k_trace = math.exp(-1 / 2)
    w_s = [max(0.0, w) for w in RAW_W_S]
    if version == 1:
        gain = [lambda_value * (1 - k) for k in k_m]
    else:
        gain = [1 - math.exp(-lambda_value / tau) for tau in tau_m]
    trace = [0.0] * (4 if version == 1 else 2)
    memory = [0.0, 0.0]
    outputs = []
    for x in INPUTS:
        if version == 1:  # one trace per synapse, summed per branch
            trace = [k_trace * s + w * xi for s, w, xi in zip(trace, w_s, x)]
            branch = [trace[0] + trace[1], trace[2] + trace[3]]
        else:  # one trace per branch, fed by the branch's weighted inputs
            drive = [w_s[0] * x[0] + w_s[1] * x[1], w_s[2] * x[2] + w_s[3] * x[3]]
            trace = [k_trace * b + d for b, d in zip(trace, drive)]
            branch = trace
        z = branch + [k * m for k, m in zip(k_m, memory)]
        hidden = [max(0.0, sum(w * v for w, v in zip(row, z)) + b) for row, b in zip(W0, B0)]
        pre = [sum(w * v for w, v in zip(row, hidden)) + b for row, b in zip(W1, B1)]
        delta = [1.7159 * math.tanh(2 * p / 3) for p in pre]
        memory = [k * m + g * d for k, m, g, d in zip(k_m, memory, gain, delta)]
        outputs.append(sum(w * m for w, m in zip(WY[0], memory)) + BY[0])
    return outputs, trace, memory


def _tiny_model(version: int, lambda_value: float) -> mc.ELM:
    model = mc.ELM(
        4,
        1,
        2,
        version=version,
        lambda_value=lambda_value,
        mlp_hidden_size=3,
        trace_tau=2.0,
        memory_tau_min=1.0,
        memory_tau_max=20.0,
        num_branch=2,
        num_synapse_per_branch=2,
        dtype=torch.float64,
    )
    values = {
        "raw_synapse_weight": RAW_W_S,
        "raw_memory_tau": RAW_TAU,
        "mlp_weight_l0": W0,
        "mlp_bias_l0": B0,
        "mlp_weight_l1": W1,
        "mlp_bias_l1": B1,
        "readout_weight": WY,
        "readout_bias": BY,
    }
    with torch.no_grad():
        for name, value in values.items():
            getattr(model, name).copy_(torch.tensor(value, dtype=torch.float64))
    return model


@pytest.mark.parametrize("version,lambda_value", [(1, 5.0), (2, 5.0), (2, 0.7)])
def test_tiny_model_follows_the_equations_by_hand(version, lambda_value):
    model = _tiny_model(version, lambda_value)
    expected, trace, memory = _by_hand(version, lambda_value)
    x = torch.tensor(INPUTS, dtype=torch.float64).unsqueeze(1)  # (T, 1, 4)
    output, state = model(x)
    assert output.shape == (4, 1, 1)
    torch.testing.assert_close(output.flatten().tolist(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.trace.flatten().tolist(), trace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.memory.flatten().tolist(), memory, rtol=1e-12, atol=1e-12)

    # the pure step function, called by hand, gives the same
    weights = model.step_weights()
    state = mc.ELMState(torch.zeros(1, model.num_trace, dtype=torch.float64), x.new_zeros(1, 2))
    for t in range(4):
        drive = synaptic_drive(x[t], model.synapse_weight, 2, version)
        y, state = elm_step(drive, state, weights)
        assert y.item() == pytest.approx(expected[t], rel=1e-12, abs=1e-12)


def test_neuronio_routing_interleaves_and_masks_by_hand():
    # inputs 0-2 excitatory, 3-5 inhibitory -> interleaved 0 3 1 4 2 5; stride ceil(6/2) = 3
    index, mask = neuronio_routing(6, 2, 4)
    assert index.tolist() == [0, 3, 1, 4, 4, 2, 5, 5]
    assert mask.tolist() == [True, True, True, True, True, True, True, False]
    model = mc.ELM(
        6, 1, 2, num_branch=2, num_synapse_per_branch=4, input_to_synapse_routing="neuronio"
    )
    x = torch.arange(1.0, 7.0).expand(1, 6)
    assert model.route(x).tolist() == [[1.0, 4.0, 2.0, 5.0, 5.0, 3.0, 6.0, 0.0]]


def test_initial_memory_time_constants_are_log_spaced_over_the_bounds():
    model = mc.ELM(3, 1, 5, memory_tau_min=2.0, memory_tau_max=200.0, dtype=torch.float64)
    expected = torch.logspace(math.log10(2.0), math.log10(200.0), 5, dtype=torch.float64)
    torch.testing.assert_close(model.memory_tau, expected, rtol=1e-5, atol=0)
    assert torch.all(model.synapse_weight == 0.5)
    assert model.trace_tau.tolist() == [5.0] * 3
    # version 2 accepts equal bounds: fixed time constants
    fixed = mc.ELM(3, 1, 2, version=2, memory_tau_min=4.0, memory_tau_max=4.0)
    torch.testing.assert_close(fixed.memory_tau, torch.full((2,), 4.0))


# -- (c) the paper's parameter counts ----------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("num_memory,count", [(1, 4601), (10, 5852), (20, 8002), (100, 54002)])
def test_neuronio_branch_elm_parameter_counts(version, num_memory, count):
    assert _trainable(mc.ELM(num_memory=num_memory, version=version, **NEURONIO)) == count


def test_default_elm_parameter_count():
    assert _trainable(mc.ELM(700, 20)) == 183_020
    assert _trainable(mc.ELM(700, 20, learn_memory_tau=True)) == 183_020 + 100


# -- (d) finite differences --------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_gradcheck_float64(version):
    model = mc.ELM(
        3,
        2,
        2,
        version=version,
        mlp_hidden_size=3,
        mlp_activation="silu",
        memory_tau_max=10.0,
        learn_memory_tau=True,
        num_branch=2,
        num_synapse_per_branch=2,
        input_to_synapse_routing="random",
        dtype=torch.float64,
    )
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.rand(4, 2, 3, dtype=torch.float64, requires_grad=True)  # (T, B, I)
    trace0 = torch.randn(2, model.num_trace, dtype=torch.float64, requires_grad=True)
    memory0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def run(x, trace0, memory0, *params):
        output, state = functional_call(
            model, dict(zip(names, params)), (x, mc.ELMState(trace0, memory0))
        )
        return output, state.trace, state.memory

    assert torch.autograd.gradcheck(run, (x, trace0, memory0, *params))


# -- the RNN conventions -------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_batch_first_unbatched_and_resumed_sequences_agree(version):
    kwargs = dict(num_branch=3, num_synapse_per_branch=3, input_to_synapse_routing="random")
    model = mc.ELM(5, 2, 4, version=version, **kwargs)
    first = mc.ELM(5, 2, 4, version=version, batch_first=True, **kwargs)
    first.load_state_dict(model.state_dict())
    x = torch.rand(7, 3, 5)  # (T, B, I)
    output, state = model(x)
    assert output.shape == (7, 3, 2) and isinstance(state, mc.ELMState)
    assert state.trace.shape == (3, 9 if version == 1 else 3) and state.memory.shape == (3, 4)
    output_bf, state_bf = first(x.transpose(0, 1))
    torch.testing.assert_close(output_bf.transpose(0, 1), output)
    torch.testing.assert_close(state_bf.memory, state.memory)
    single, single_state = model(x[:, 1])
    torch.testing.assert_close(single, output[:, 1])
    torch.testing.assert_close(single_state.trace, state.trace[1])
    head, middle = model(x[:4])
    tail, end = model(x[4:], middle)
    torch.testing.assert_close(torch.cat([head, tail]), output)
    torch.testing.assert_close(end.memory, state.memory)
    empty, unchanged = model(x[:0], state)
    assert empty.shape == (0, 3, 2) and unchanged.memory is state.memory


@settings(max_examples=20, deadline=None)
@given(
    version=st.sampled_from([1, 2]),
    steps=st.integers(1, 4),
    batch=st.integers(1, 3),
    num_branch=st.integers(1, 3),
    per_branch=st.integers(1, 3),
    num_memory=st.integers(1, 3),
    mlp_num_layers=st.integers(0, 2),
)
def test_shapes(version, steps, batch, num_branch, per_branch, num_memory, mlp_num_layers):
    model = mc.ELM(
        num_branch * per_branch,
        2,
        num_memory,
        version=version,
        mlp_num_layers=mlp_num_layers,
        num_branch=num_branch,
        num_synapse_per_branch=per_branch,
    )
    output, state = model(torch.rand(steps, batch, num_branch * per_branch))
    assert output.shape == (steps, batch, 2)
    trace = num_branch * per_branch if version == 1 else num_branch
    assert state.trace.shape == (batch, trace) and state.memory.shape == (batch, num_memory)
    assert torch.isfinite(output).all()


# -- (e) bad inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(input_size=0), ValueError, "input_size"),
        (dict(input_size=True), TypeError, "input_size"),
        (dict(num_memory=2.0), TypeError, "num_memory"),
        (dict(version=3), ValueError, "version must be 1 or 2"),
        (dict(version="1"), TypeError, "version"),
        (dict(mlp_activation="tanh"), ValueError, r"mlp_activation.*\['relu', 'silu'\]"),
        (dict(mlp_num_layers=-1), ValueError, "mlp_num_layers"),
        (dict(mlp_hidden_size=0), ValueError, "mlp_hidden_size"),
        (dict(lambda_value=0.0), ValueError, "lambda_value"),
        (dict(delta_t=float("nan")), ValueError, "delta_t"),
        (dict(trace_tau=-1.0), ValueError, "trace_tau"),
        (dict(memory_tau_min=10.0, memory_tau_max=5.0), ValueError, "memory_tau_max"),
        (dict(memory_tau_min=5.0, memory_tau_max=5.0), ValueError, "version 1 needs"),
        (dict(synapse_weight_init=float("inf")), ValueError, "synapse_weight_init"),
        (dict(learn_memory_tau=1), TypeError, "learn_memory_tau"),
        (dict(input_to_synapse_routing="nearest"), ValueError, "input_to_synapse_routing"),
        (dict(num_branch=2, num_synapse_per_branch=2), ValueError, r"4 != input_size = 6"),
        (
            dict(num_branch=2, num_synapse_per_branch=2, input_to_synapse_routing="neuronio"),
            ValueError,
            r"num_synapse_per_branch must be >= ceil\(input_size / num_branch\)",
        ),
        (dict(dtype=torch.int64), TypeError, "dtype"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    arguments = dict(input_size=6, output_size=2, num_memory=3)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        mc.ELM(**arguments)


def test_bad_forward_inputs_raise_clear_errors():
    model = mc.ELM(4, 2, 3, num_branch=2, num_synapse_per_branch=2)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        model([[0.0] * 4])
    with pytest.raises(ValueError, match="3-D .* or 2-D"):
        model(torch.rand(2, 3, 4, 1))
    with pytest.raises(ValueError, match="input_size=4, got 5"):
        model(torch.rand(3, 2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(3, 2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64.*float32"):
        model(torch.rand(3, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="ELMState"):
        model(torch.rand(3, 2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"state.trace must have shape \(2, 4\)"):
        model(torch.rand(3, 2, 4), mc.ELMState(torch.zeros(2, 2), torch.zeros(2, 3)))
    with pytest.raises(ValueError, match=r"state.memory must have shape \(3,\)"):
        model(torch.rand(3, 4), mc.ELMState(torch.zeros(4), torch.zeros(2, 3)))


def test_bad_reference_state_dicts_raise_clear_errors():
    reference = dict(num_input=4, num_output=2, num_memory=3)
    good = {
        "_proto_w_s": torch.zeros(4),
        "tau_s": torch.full((4,), 5.0),
        "_proto_tau_m": torch.zeros(3),
        "input_to_synapse_indices": torch.empty(0),
        "valid_indices_mask": torch.empty(0),
        "mlp.network.0.weight": torch.zeros(6, 7),
        "mlp.network.0.bias": torch.zeros(6),
        "mlp.network.2.weight": torch.zeros(3, 6),
        "mlp.network.2.bias": torch.zeros(3),
        "w_y.weight": torch.zeros(2, 3),
        "w_y.bias": torch.zeros(2),
    }
    assert _trainable(mc.ELM.from_reference_state_dict(good, **reference)) == 4 + 48 + 21 + 8
    with pytest.raises(TypeError, match=r"tau_b_value.*belongs to version 2"):
        mc.ELM.from_reference_state_dict(good, tau_b_value=5.0, **reference)
    with pytest.raises(TypeError, match="needs the reference's 'num_output'"):
        mc.ELM.from_reference_state_dict(good, num_input=4)
    with pytest.raises(ValueError, match=r"missing \['tau_b'\], unexpected \['tau_s'\]"):
        mc.ELM.from_reference_state_dict(good, version=2, **reference)
    with pytest.raises(ValueError, match=r"'w_y.weight'\] has shape \(2, 3\).*\(5, 3\)"):
        mc.ELM.from_reference_state_dict(good, num_input=4, num_output=5, num_memory=3)
    routed = dict(good, input_to_synapse_indices=torch.tensor([0, 1, 2, 9]))
    routed["valid_indices_mask"] = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        mc.ELM.from_reference_state_dict(
            routed, input_to_synapse_routing="random_routing", **reference
        )
