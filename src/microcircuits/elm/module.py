"""The ELM neuron as an ``nn.Module`` with the conventions of our recurrent modules.

The module owns the parameters, checks its inputs and loops over time; the equations
live in :mod:`microcircuits.elm.equations`. Both published versions of the model are
one class, chosen by ``version``, and a Branch-ELM is an ELM with ``num_branch`` and a
routing (:mod:`microcircuits.elm.routing`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import (
    check_bool,
    check_count,
    check_float_dtype,
    check_input,
    check_pair,
    check_positive_int,
    check_real,
    check_shaped,
    check_tensor,
)
from . import fused
from .equations import (
    ACTIVATIONS,
    ELMState,
    ELMWeights,
    decay_factor,
    elm_readout,
    elm_state_step,
    memory_gain,
    memory_tau,
    raw_memory_tau,
    synaptic_drive,
)
from .routing import ROUTINGS, neuronio_routing, random_routing

__all__ = ["ELM"]

# The published code's names for the routings, accepted as aliases.
_ROUTING_ALIASES = {"random_routing": "random", "neuronio_routing": "neuronio"}

# The reference's constructor keywords and ours, where they differ in name only.
_REFERENCE_KEYWORDS = {
    "num_input": "input_size",
    "num_output": "output_size",
    "num_memory": "num_memory",
    "lambda_value": "lambda_value",
    "mlp_num_layers": "mlp_num_layers",
    "mlp_hidden_size": "mlp_hidden_size",
    "mlp_activation": "mlp_activation",
    "memory_tau_min": "memory_tau_min",
    "memory_tau_max": "memory_tau_max",
    "learn_memory_tau": "learn_memory_tau",
    "w_s_value": "synapse_weight_init",
    "num_branch": "num_branch",
    "num_synapse_per_branch": "num_synapse_per_branch",
    "input_to_synapse_routing": "input_to_synapse_routing",
    "delta_t": "delta_t",
}
_REFERENCE_TRACE_TAU = {1: "tau_s", 2: "tau_b"}  # state-dict key; keyword is this + "_value"


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, numbers.Integral):
        raise TypeError(f"version must be an int (1 or 2), got {type(version).__name__}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2 (the two published ELM models), got {version}")
    return int(version)


def _check_finite(name: str, value: object, *, minimum: float, strict: bool) -> float:
    """A finite real ``> minimum`` (``strict``) or ``>= minimum``."""
    value = check_real(name, value)
    bad = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or bad:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_routing(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        key = _ROUTING_ALIASES.get(value.strip().lower(), value.strip().lower())
        if key in ROUTINGS:
            return key
    raise ValueError(f"input_to_synapse_routing must be one of {list(ROUTINGS)}, got {value!r}")


class ELM(nn.Module):
    r"""Expressive Leaky Memory neuron (Spieler et al., ICLR 2024), with its Branch-ELM form.

    A few memory units ``m`` with fixed (or learned) time constants, spread
    log-uniformly from ``memory_tau_min`` to ``memory_tau_max``, are updated by an MLP
    of the input trace and the decayed memory, and read out linearly:

    .. math::
        \mathrm{v1:}\; s_t = \kappa_s s_{t-1} + w_s x_t,\; b_t = \textstyle\sum_{branch} s_t;
        \quad \mathrm{v2:}\; b_t = \kappa_b b_{t-1} + \textstyle\sum_{branch} w_s x_t

        \Delta m_t = 1.7159 \tanh(\tfrac23 \mathrm{MLP}([b_t, \kappa_m m_{t-1}])),\quad
        m_t = \kappa_m m_{t-1} + \gamma \Delta m_t,\quad y_t = W_y m_t + b_y

    with :math:`\kappa = e^{-\Delta t/\tau}`, :math:`\gamma = \lambda (1 - \kappa_m)` in
    version 1 and :math:`1 - e^{-\Delta t \lambda / \tau_m}` in version 2 (see
    :mod:`microcircuits.elm.equations`). :math:`w_s = \mathrm{relu}(\cdot)` of a learned
    per-synapse weight.

    Args:
        input_size: number of inputs ``I``.
        output_size: number of outputs ``O``.
        num_memory: memory units ``M`` (the paper's ``d_m``).
        version: 1 (synapse trace, as the released NeuronIO models) or 2 (branch trace).
        lambda_value: ``lambda``, the memory's update rate relative to its decay.
        mlp_num_layers: hidden layers of the MLP (0: one linear map).
        mlp_hidden_size: their width; ``None`` for ``2 * num_memory``.
        mlp_activation: ``"relu"`` or ``"silu"``.
        trace_tau: time constant of the input trace, per synapse (v1, ``tau_s``) or per
            branch (v2, ``tau_b``), in steps; fixed.
        memory_tau_min, memory_tau_max: range of the memory time constants. Version 2
            raises ``memory_tau_max`` to at least ``memory_tau_min + 3e-6`` (so equal
            bounds give fixed time constants); version 1 needs them that far apart.
        learn_memory_tau: whether the memory time constants are trained.
        synapse_weight_init: initial ``w_s`` of every synapse.
        num_branch: branches ``N``; ``None`` for one per input.
        num_synapse_per_branch: synapses per branch; ``S = N * num_synapse_per_branch``.
        input_to_synapse_routing: ``None`` (synapse ``j`` gets input ``j``; needs
            ``S == I``), ``"random"`` or ``"neuronio"`` (see :mod:`.routing`; the
            published names ``"random_routing"``/``"neuronio_routing"`` work too).
        delta_t: time step, in the units of the time constants.
        batch_first: input and output are ``(B, T, *)`` instead of ``(T, B, *)``.
        device, dtype: of the parameters.

    Parameters (trainable): ``raw_synapse_weight`` ``(S,)`` (``w_s = relu(.)``),
    ``mlp_weight_l{k}``/``mlp_bias_l{k}`` for ``k = 0..mlp_num_layers`` (the last maps to
    ``M``), ``readout_weight`` ``(O, M)``, ``readout_bias`` ``(O,)``, and
    ``raw_memory_tau`` ``(M,)`` if ``learn_memory_tau`` (else a buffer). Buffers:
    ``trace_tau`` ``(K,)``, and with a routing ``synapse_input_index`` ``(S,)`` and
    ``synapse_mask`` ``(S,)``.

    Initialisation follows the published code and draws from the global generator in the
    same order, so a seed gives the same initial model as the reference's.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        num_memory: int = 100,
        *,
        version: int = 1,
        lambda_value: float = 5.0,
        mlp_num_layers: int = 1,
        mlp_hidden_size: int | None = None,
        mlp_activation: str = "relu",
        trace_tau: float = 5.0,
        memory_tau_min: float = 1.0,
        memory_tau_max: float = 1000.0,
        learn_memory_tau: bool = False,
        synapse_weight_init: float = 0.5,
        num_branch: int | None = None,
        num_synapse_per_branch: int = 1,
        input_to_synapse_routing: str | None = None,
        delta_t: float = 1.0,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.output_size = check_positive_int("output_size", output_size)
        self.num_memory = check_positive_int("num_memory", num_memory)
        self.version = _check_version(version)
        self.lambda_value = _check_finite("lambda_value", lambda_value, minimum=0.0, strict=True)
        self.mlp_num_layers = check_count("mlp_num_layers", mlp_num_layers)
        self.mlp_hidden_size = (
            2 * self.num_memory
            if mlp_hidden_size is None
            else check_positive_int("mlp_hidden_size", mlp_hidden_size)
        )
        if not isinstance(mlp_activation, str) or mlp_activation not in ACTIVATIONS:
            raise ValueError(
                f"mlp_activation must be one of {sorted(ACTIVATIONS)}, got {mlp_activation!r}"
            )
        self.mlp_activation = mlp_activation
        trace_tau = _check_finite("trace_tau", trace_tau, minimum=0.0, strict=False)
        self.memory_tau_min = _check_finite(
            "memory_tau_min", memory_tau_min, minimum=0.0, strict=False
        )
        memory_tau_max = _check_finite(
            "memory_tau_max", memory_tau_max, minimum=self.memory_tau_min, strict=False
        )
        if self.version == 2:
            memory_tau_max = max(memory_tau_max, self.memory_tau_min + 3e-6)
        elif memory_tau_max < self.memory_tau_min + 3e-6:
            raise ValueError(
                f"version 1 needs memory_tau_max >= memory_tau_min + 3e-6, got "
                f"[{self.memory_tau_min}, {memory_tau_max}] (its time-constant "
                "parametrisation is undefined otherwise); version 2 accepts equal bounds"
            )
        self.memory_tau_max = memory_tau_max
        self.learn_memory_tau = check_bool("learn_memory_tau", learn_memory_tau)
        self.synapse_weight_init = _check_finite(
            "synapse_weight_init", synapse_weight_init, minimum=-math.inf, strict=True
        )
        self.num_branch = (
            self.input_size if num_branch is None else check_positive_int("num_branch", num_branch)
        )
        self.num_synapse_per_branch = check_positive_int(
            "num_synapse_per_branch", num_synapse_per_branch
        )
        self.num_synapse = self.num_branch * self.num_synapse_per_branch
        self.input_to_synapse_routing = _check_routing(input_to_synapse_routing)
        self._check_synapse_layout()
        self.delta_t = _check_finite("delta_t", delta_t, minimum=0.0, strict=True)
        self.batch_first = check_bool("batch_first", batch_first)
        check_float_dtype(dtype)

        factory = {"device": device, "dtype": dtype}
        sizes = [self.num_branch + self.num_memory]
        sizes += [self.mlp_hidden_size] * self.mlp_num_layers + [self.num_memory]
        for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            weight = nn.Parameter(torch.empty(fan_out, fan_in, **factory))
            self.register_parameter(f"mlp_weight_l{layer}", weight)
            self.register_parameter(
                f"mlp_bias_l{layer}", nn.Parameter(torch.empty(fan_out, **factory))
            )
        self.raw_synapse_weight = nn.Parameter(torch.empty(self.num_synapse, **factory))
        self.readout_weight = nn.Parameter(
            torch.empty(self.output_size, self.num_memory, **factory)
        )
        self.readout_bias = nn.Parameter(torch.empty(self.output_size, **factory))
        raw_tau = torch.empty(self.num_memory, **factory)
        if self.learn_memory_tau:
            self.raw_memory_tau = nn.Parameter(raw_tau)
        else:
            self.register_buffer("raw_memory_tau", raw_tau)
        self.register_buffer("trace_tau", torch.full((self.num_trace,), trace_tau, **factory))
        self._trace_tau_value = trace_tau
        self.reset_parameters()

        # After the parameters, as the reference draws them.
        if self.input_to_synapse_routing is None:
            self.register_buffer("synapse_input_index", None)
            self.register_buffer("synapse_mask", None)
        else:
            route = (
                random_routing if self.input_to_synapse_routing == "random" else neuronio_routing
            )
            index, mask = route(self.input_size, self.num_branch, self.num_synapse_per_branch)
            self.register_buffer("synapse_input_index", index.to(device))
            self.register_buffer("synapse_mask", mask.to(device=device, dtype=raw_tau.dtype))

    def _check_synapse_layout(self) -> None:
        routing = self.input_to_synapse_routing
        if routing is None and self.num_synapse != self.input_size:
            raise ValueError(
                f"without input_to_synapse_routing every input needs one synapse, but "
                f"num_branch * num_synapse_per_branch = {self.num_branch} * "
                f"{self.num_synapse_per_branch} = {self.num_synapse} != input_size = "
                f"{self.input_size}; set a routing ('random' or 'neuronio') or change the sizes"
            )
        if routing == "neuronio":
            stride = math.ceil(self.input_size / self.num_branch)
            if self.num_synapse_per_branch < stride:
                raise ValueError(
                    f"neuronio routing must reach every input: num_synapse_per_branch must be "
                    f">= ceil(input_size / num_branch) = ceil({self.input_size} / "
                    f"{self.num_branch}) = {stride}, got {self.num_synapse_per_branch}"
                )

    @property
    def num_trace(self) -> int:
        """Size ``K`` of the input trace: ``num_synapse`` (v1) or ``num_branch`` (v2)."""
        return self.num_synapse if self.version == 1 else self.num_branch

    def reset_parameters(self) -> None:
        """Initialise as the published code: each MLP layer and the readout as
        ``torch.nn.Linear`` (in that order), every ``w_s`` at ``synapse_weight_init``, and
        memory time constants log-spaced over ``[memory_tau_min, memory_tau_max]``."""
        with torch.no_grad():
            for layer in range(self.mlp_num_layers + 1):
                _linear_init(
                    getattr(self, f"mlp_weight_l{layer}"), getattr(self, f"mlp_bias_l{layer}")
                )
            self.raw_synapse_weight.fill_(self.synapse_weight_init)
            _linear_init(self.readout_weight, self.readout_bias)
            low, high = self.memory_tau_min, self.memory_tau_max
            tau = torch.logspace(
                math.log10(low + 1e-6),
                math.log10(high - 1e-6),
                self.num_memory,
                dtype=self.raw_memory_tau.dtype,
                device=self.raw_memory_tau.device,
            )
            self.raw_memory_tau.copy_(raw_memory_tau(tau, low, high))
            self.trace_tau.fill_(self._trace_tau_value)

    # -- derived quantities ------------------------------------------------------------

    @property
    def synapse_weight(self) -> Tensor:
        """``w_s = relu(raw_synapse_weight)``, ``(S,)``."""
        return torch.relu(self.raw_synapse_weight)

    def effective_synapse_weight(self) -> Tensor:
        """``w_s`` times the routing's mask of valid synapses (NeuronIO routing), ``(S,)``:
        the weight each synapse applies to what :meth:`route` selects for it."""
        if self.synapse_mask is None:
            return self.synapse_weight
        return self.synapse_weight * self.synapse_mask

    @property
    def memory_tau(self) -> Tensor:
        """Memory time constants ``tau_m``, ``(M,)``, in the units of ``delta_t``."""
        return memory_tau(self.raw_memory_tau, self.memory_tau_min, self.memory_tau_max)

    def step_weights(self) -> ELMWeights:
        """The constants of one step (decays, gains, MLP and readout), computed once per
        sequence; with them :func:`~microcircuits.elm.equations.elm_step` is one step."""
        tau_m = self.memory_tau
        layers = range(self.mlp_num_layers + 1)
        return ELMWeights(
            trace_decay=decay_factor(self.trace_tau, self.delta_t),
            memory_decay=decay_factor(tau_m, self.delta_t),
            memory_gain=memory_gain(tau_m, self.lambda_value, self.delta_t, self.version),
            mlp_weights=tuple(getattr(self, f"mlp_weight_l{k}") for k in layers),
            mlp_biases=tuple(getattr(self, f"mlp_bias_l{k}") for k in layers),
            readout_weight=self.readout_weight,
            readout_bias=self.readout_bias,
            num_branch=self.num_branch,
            activation=self.mlp_activation,
        )

    def route(self, input: Tensor) -> Tensor:
        """Input ``(..., I)`` -> what each synapse receives, ``(..., S)``."""
        if self.synapse_input_index is None:
            return input
        return input.index_select(-1, self.synapse_input_index) * self.synapse_mask

    def initial_state(self, batch_size: int | None = None) -> ELMState:
        """Zeros: trace ``(B, K)`` and memory ``(B, M)`` (no batch dimension if ``None``)."""
        batch = () if batch_size is None else (check_positive_int("batch_size", batch_size),)
        like = self.readout_weight
        return ELMState(
            like.new_zeros(*batch, self.num_trace), like.new_zeros(*batch, self.num_memory)
        )

    # -- forward -----------------------------------------------------------------------

    def _check_state(self, state: object, batch: int | None, reference: Tensor) -> ELMState:
        pair = check_pair("state", state, "an ELMState (trace, memory)")
        lead = () if batch is None else (batch,)
        layout = "" if batch is None else "batch, "
        sizes = (
            (self.num_trace, {1: "num_synapse", 2: "num_branch"}[self.version]),
            (self.num_memory, "num_memory"),
        )
        for name, tensor, (size, size_name) in zip(("state.trace", "state.memory"), pair, sizes):
            check_shaped(name, tensor, (*lead, size), reference, layout + size_name)
        return ELMState(*pair)

    def forward(self, input: Tensor, state: ELMState | None = None) -> tuple[Tensor, ELMState]:
        """Run the neuron over a sequence.

        Args:
            input: ``(T, B, I)`` (``(B, T, I)`` if ``batch_first``) or unbatched ``(T, I)``.
            state: optional initial :class:`ELMState`: trace ``(B, K)`` and memory
                ``(B, M)`` (unbatched: ``(K,)``, ``(M,)``); zeros when ``None``.

        Returns:
            ``output`` ``(T, B, O)`` (``(B, T, O)`` if ``batch_first``; unbatched
            ``(T, O)``), and the :class:`ELMState` after the last step.
        """
        reference = self.readout_weight
        batched = check_input(input, self.input_size, reference, batched_dim=3)
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I)
        batch = x.shape[1]
        if state is None:
            state = ELMState(
                x.new_zeros(batch, self.num_trace), x.new_zeros(batch, self.num_memory)
            )
        else:
            state = self._check_state(state, batch if batched else None, reference)
            if not batched:
                state = ELMState(state.trace.unsqueeze(0), state.memory.unsqueeze(0))

        weights = self.step_weights()
        if fused.unsupported_reason(self, x, state, weights) is None:
            output, state = fused.elm_sequence_fused(self, x, state, weights)
        else:
            output, state = self._forward_reference(x, state, weights)

        if not batched:
            return output.squeeze(1), ELMState(state.trace.squeeze(0), state.memory.squeeze(0))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, state

    def _forward_reference(
        self, x: Tensor, state: ELMState, weights: ELMWeights
    ) -> tuple[Tensor, ELMState]:
        """The reference loop over :func:`~microcircuits.elm.equations.elm_state_step`, one
        autograd node per op and step: ``x`` ``(T, B, I)`` -> ``(T, B, O)``, final state.
        The oracle of the fused path (:mod:`microcircuits.elm.fused`) and the path for what
        it does not cover."""
        batch = x.shape[1]
        synapse_weight = self.effective_synapse_weight()
        routed = (
            x if self.synapse_input_index is None else x.index_select(-1, self.synapse_input_index)
        )
        drive = synaptic_drive(routed, synapse_weight, self.num_branch, self.version).contiguous()
        memories = []
        # unbind, not drive[t]: one backward node for all steps, where T selects would
        # each scatter into a zero tensor the size of the whole sequence
        for drive_t in drive.unbind(0):
            state = elm_state_step(drive_t, state, weights)
            memories.append(state.memory)
        if memories:
            output = elm_readout(torch.stack(memories), weights)  # (T, B, O)
        else:
            output = x.new_zeros(0, batch, self.output_size)
        return output, state

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.output_size}, num_memory={self.num_memory}"
        text += f", version={self.version}"
        if self.num_branch != self.input_size or self.num_synapse_per_branch != 1:
            text += f", num_branch={self.num_branch}"
            text += f", num_synapse_per_branch={self.num_synapse_per_branch}"
        if self.input_to_synapse_routing is not None:
            text += f", input_to_synapse_routing={self.input_to_synapse_routing!r}"
        if self.batch_first:
            text += ", batch_first=True"
        return text

    # -- the published models ----------------------------------------------------------

    @classmethod
    def from_reference_state_dict(
        cls, state_dict: Mapping[str, Tensor], version: int = 1, **reference_kwargs: Any
    ) -> ELM:
        """An :class:`ELM` equal to a model of the published implementation.

        ``state_dict`` comes from the reference ``ELM`` (AaronSpieler/elmneuron,
        ``src/expressive_leaky_memory_neuron.py`` for ``version=1``, ``..._v2.py`` for 2),
        e.g. a released NeuronIO model loaded with
        ``torch.load(path, map_location="cpu", weights_only=True)``;
        ``reference_kwargs`` are that model's constructor keywords (``num_input``,
        ``num_output``, ``num_memory``, ``tau_s_value`` (v1) or ``tau_b_value`` (v2),
        ``input_to_synapse_routing="neuronio_routing"``, ...). The result is
        ``batch_first`` as the reference, gives the same output for the same input
        ``(B, T, num_input)`` and has as many trainable parameters.

        Raises:
            TypeError: for an unknown or missing keyword.
            ValueError: when the state dict lacks keys, has extra ones, or its shapes do
                not fit the keywords.
        """
        version = _check_version(version)
        tau_key = _REFERENCE_TRACE_TAU[version]
        known = {**_REFERENCE_KEYWORDS, f"{tau_key}_value": "trace_tau"}
        unknown = sorted(set(reference_kwargs) - set(known))
        if unknown:
            other = f"{_REFERENCE_TRACE_TAU[3 - version]}_value"
            hint = f" ({other} belongs to version {3 - version})" if other in unknown else ""
            raise TypeError(
                f"unknown keyword(s) {unknown} for the version {version} reference ELM{hint}; "
                f"known: {sorted(known)}"
            )
        for required in ("num_input", "num_output"):
            if required not in reference_kwargs:
                raise TypeError(f"from_reference_state_dict() needs the reference's {required!r}")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        kwargs = {known[key]: value for key, value in reference_kwargs.items()}
        if kwargs.get("mlp_hidden_size") == 0:  # the reference reads 0 as "default"
            kwargs["mlp_hidden_size"] = None
        model = cls(version=version, batch_first=True, **kwargs)

        names = {
            "_proto_w_s": "raw_synapse_weight",
            tau_key: "trace_tau",
            "_proto_tau_m": "raw_memory_tau",
            "w_y.weight": "readout_weight",
            "w_y.bias": "readout_bias",
        }
        for layer in range(model.mlp_num_layers + 1):
            names[f"mlp.network.{2 * layer}.weight"] = f"mlp_weight_l{layer}"
            names[f"mlp.network.{2 * layer}.bias"] = f"mlp_bias_l{layer}"
        routing_keys = {"input_to_synapse_indices": "synapse_input_index"}
        routing_keys["valid_indices_mask"] = "synapse_mask"
        if model.input_to_synapse_routing is not None:
            names.update(routing_keys)

        missing = sorted(set(names) - set(state_dict))
        unexpected = sorted(
            key
            for key in set(state_dict) - set(names)
            # without a routing the reference still saves these, empty
            if not (key in routing_keys and state_dict[key].numel() == 0)
        )
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not fit a version {version} reference ELM with "
                f"mlp_num_layers={model.mlp_num_layers} and input_to_synapse_routing="
                f"{model.input_to_synapse_routing!r}: missing {missing}, unexpected {unexpected}"
            )
        own = model.state_dict()
        converted = {}
        for key, name in names.items():
            tensor = check_tensor(f"state_dict[{key!r}]", state_dict[key])
            if tensor.shape != own[name].shape:
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(tensor.shape)}, but the keywords "
                    f"give {tuple(own[name].shape)}"
                )
            converted[name] = tensor.detach().to(device=own[name].device, dtype=own[name].dtype)
        index = converted.get("synapse_input_index")
        if (
            index is not None
            and index.numel()
            and not (0 <= int(index.min()) and int(index.max()) < model.input_size)
        ):
            raise ValueError(
                f"state_dict['input_to_synapse_indices'] must lie in [0, {model.input_size}), "
                f"got [{int(index.min())}, {int(index.max())}]"
            )
        model.load_state_dict(converted)
        return model


def _linear_init(weight: Tensor, bias: Tensor) -> None:
    """``torch.nn.Linear``'s initialisation (uniform in +-1/sqrt(fan_in)), same draws."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)
