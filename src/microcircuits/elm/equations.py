r"""The equations of the Expressive Leaky Memory (ELM) neuron: the one place where they live.

Spieler, Rahaman, Martius, Schoelkopf and Levina, "The ELM Neuron: an Efficient and
Expressive Cortical Neuron Model Can Solve Long-Horizon Tasks" (arXiv:2306.16922, ICLR
2024). Everything here is a pure function of tensors; :class:`microcircuits.elm.ELM` owns
the parameters and calls these functions.

Per step, with ``x_t`` the input already routed to the synapses, ``w_s = relu(raw)``
the synaptic weights, the decays :math:`\kappa = e^{-\Delta t / \tau}` and
:math:`g(u) = 1.7159 \tanh(2u/3)`::

    version 1 (synapse trace)                 version 2 (branch trace)
    s_t   = k_s * s_{t-1} + w_s * x_t         b_t = k_b * b_{t-1} + sum_branch(w_s * x_t)
    b_t   = sum_branch(s_t)
    dm_t  = g(MLP([b_t, k_m * m_{t-1}]))      (the same)
    m_t   = k_m * m_{t-1} + lambda (1 - k_m) dm_t
                                              m_t = k_m * m_{t-1} + (1 - k_lambda) dm_t,
                                                    k_lambda = exp(-dt * lambda / tau_m)
    y_t   = W_y m_t + b_y                     (the same)

``sum_branch`` sums each branch's consecutive block of synapses. Both versions are
one recursion once the time-independent parts are taken out: a leaky ``trace`` (per
synapse in v1, per branch in v2) fed by a ``drive`` (:func:`synaptic_drive`, computed for
the whole sequence at once), and a memory update ``m_t = k_m m_{t-1} + gain * dm_t``
whose per-unit ``gain`` (:func:`memory_gain`) is where the versions differ.

Shapes: ``B`` batch, ``S`` synapses, ``N`` branches (``S = N * synapses per branch``),
``K`` trace size (``S`` in v1, ``N`` in v2), ``M`` memory units, ``O`` outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "ELMState",
    "ELMWeights",
    "decay_factor",
    "elm_readout",
    "elm_state_step",
    "elm_step",
    "memory_gain",
    "memory_tau",
    "raw_memory_tau",
    "scaled_tanh",
    "synaptic_drive",
]

# Time constants are floored here before dividing, as in the reference implementation.
TAU_FLOOR = 1e-6

ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class ELMState(NamedTuple):
    """Recurrent state of an ELM neuron.

    Attributes:
        trace: the leaky input trace, ``(B, K)``: per synapse in version 1 (``s_t``,
            ``K = num_synapse``), per branch in version 2 (``b_t``, ``K = num_branch``).
        memory: the memory units ``m_t``, ``(B, M)``.
    """

    trace: Tensor
    memory: Tensor


class ELMWeights(NamedTuple):
    """Everything a step needs that does not change over time.

    Attributes:
        trace_decay: ``k_s`` (v1) or ``k_b`` (v2), ``(K,)``.
        memory_decay: ``k_m``, ``(M,)``.
        memory_gain: ``lambda (1 - k_m)`` (v1) or ``1 - k_lambda`` (v2), ``(M,)``.
        mlp_weights: weight of each MLP layer, the last one mapping to ``M``.
        mlp_biases: bias of each MLP layer.
        readout_weight: ``W_y``, ``(O, M)``.
        readout_bias: ``b_y``, ``(O,)``.
        num_branch: ``N``; the trace is summed in ``N`` consecutive blocks.
        activation: the MLP's hidden nonlinearity, a key of :data:`ACTIVATIONS`.
    """

    trace_decay: Tensor
    memory_decay: Tensor
    memory_gain: Tensor
    mlp_weights: tuple[Tensor, ...]
    mlp_biases: tuple[Tensor, ...]
    readout_weight: Tensor
    readout_bias: Tensor
    num_branch: int
    activation: str


def scaled_tanh(x: Tensor) -> Tensor:
    """``1.7159 tanh(2x/3)``, the tanh of LeCun et al.'s "Efficient BackProp": ``g(+-1) = +-1``."""
    return torch.tanh(x * 2 / 3) * 1.7159


def memory_tau(raw: Tensor, tau_min: float, tau_max: float) -> Tensor:
    """Memory time constants ``tau_m = tau_min + (tau_max - tau_min) sigmoid(raw)``, in steps
    of ``tau_min`` to ``tau_max``, whatever a learned ``raw`` becomes."""
    return (tau_max - tau_min) * torch.sigmoid(raw) + tau_min


def raw_memory_tau(tau: Tensor, tau_min: float, tau_max: float) -> Tensor:
    """Inverse of :func:`memory_tau`; ``tau`` is first clipped 1e-6 inside the bounds.

    In float64: in float32 ``tau_max - 1e-6`` rounds to ``tau_max`` once ``tau_max``
    exceeds 32 (float32's spacing there is over 2e-6), which gave a unit initialised at
    ``tau_max`` (e.g. 500 or 1000) the raw value ``+inf``: harmless for fixed time
    constants, but a learned one is then a non-finite parameter.
    """
    wide = tau.to(torch.float64).clamp(tau_min + 1e-6, tau_max - 1e-6)
    return torch.log((wide - tau_min) / (tau_max - wide)).to(tau.dtype)


def decay_factor(tau: Tensor, delta_t: float) -> Tensor:
    """``exp(-delta_t / tau)``: the fraction of a leaky variable left after one step."""
    return torch.exp(-delta_t / tau.clamp(min=TAU_FLOOR))


def memory_gain(tau_m: Tensor, lambda_value: float, delta_t: float, version: int) -> Tensor:
    """How much of ``dm_t`` enters the memory per step, ``(M,)``.

    Version 1: ``lambda (1 - k_m)``, which exceeds 1 for fast units when ``lambda > 1``.
    Version 2: ``1 - exp(-delta_t lambda / tau_m)``, in [0, 1), i.e. the update integrates
    over a ``lambda`` times shorter time constant than the memory's decay.
    """
    if version == 1:
        return lambda_value * (1 - decay_factor(tau_m, delta_t))
    return 1 - torch.exp(-delta_t * lambda_value / tau_m.clamp(min=TAU_FLOOR))


def synaptic_drive(x: Tensor, synapse_weight: Tensor, num_branch: int, version: int) -> Tensor:
    """The trace's input: ``w_s * x`` (v1, ``(..., S)``) or its branch sums (v2, ``(..., N)``).

    Args:
        x: input routed to the synapses, ``(..., S)``, any number of leading dimensions
            (a whole sequence at once).
        synapse_weight: ``w_s`` (already rectified), ``(S,)``.
        num_branch: ``N``; synapse ``j`` belongs to branch ``j // (S / N)``.
        version: 1 or 2.
    """
    drive = synapse_weight * x
    if version == 1:
        return drive
    return drive.unflatten(-1, (num_branch, -1)).sum(-1)


def _mlp(x: Tensor, weights: ELMWeights) -> Tensor:
    activation = ACTIVATIONS[weights.activation]
    last = len(weights.mlp_weights) - 1
    for layer, (weight, bias) in enumerate(zip(weights.mlp_weights, weights.mlp_biases)):
        x = F.linear(x, weight, bias)
        if layer < last:
            x = activation(x)
    return x


def elm_state_step(drive: Tensor, state: ELMState, weights: ELMWeights) -> ELMState:
    """One step of the ELM's dynamics (everything but the readout).

    ``trace_t = k * trace_{t-1} + drive_t``; the branch inputs are the trace summed per
    branch (v1; in v2 the trace already is per branch);
    ``m_t = k_m m_{t-1} + gain * g(MLP([branch, k_m m_{t-1}]))``.

    Args:
        drive: this step's :func:`synaptic_drive`, ``(B, K)``.
        state: previous ``(trace (B, K), memory (B, M))``.
        weights: the step's constants.

    Returns:
        The new state.
    """
    trace = weights.trace_decay * state.trace + drive
    branch = trace
    if trace.shape[-1] != weights.num_branch:
        branch = trace.unflatten(-1, (weights.num_branch, -1)).sum(-1)  # (B, N)
    decayed = weights.memory_decay * state.memory  # (B, M)
    update = scaled_tanh(_mlp(torch.cat([branch, decayed], dim=-1), weights))
    return ELMState(trace, decayed + weights.memory_gain * update)


def elm_readout(memory: Tensor, weights: ELMWeights) -> Tensor:
    """``y = W_y m + b_y``: memory ``(..., M)`` -> output ``(..., O)``."""
    return F.linear(memory, weights.readout_weight, weights.readout_bias)


def elm_step(drive: Tensor, state: ELMState, weights: ELMWeights) -> tuple[Tensor, ELMState]:
    """One whole ELM step: ``drive`` ``(B, K)``, state -> ``(y_t (B, O), new state)``."""
    state = elm_state_step(drive, state, weights)
    return elm_readout(state.memory, weights), state
