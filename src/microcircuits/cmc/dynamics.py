r"""The canonical microcircuit (CMC) neural mass: the one place where its equations live.

The model is the four-population column of Bastos et al., "Canonical microcircuits for
predictive coding" (Neuron 2012), as implemented by SPM's ``spm_fx_cmc`` (DCM for M/EEG)
and used as a neural ODE by Douglas, "Computing with Canonical Microcircuits"
(arXiv:2508.06501). Everything here is a pure, differentiable function of tensors.

Each population ``p`` (spiny stellate ``ss``, superficial pyramidal ``sp``, inhibitory
interneurons ``ii``, deep pyramidal ``dp``) has a voltage ``v_p`` and its rate of change
``g_p`` (SPM calls it a conductance or current). Time is in seconds::

    dv_p/dt = g_p
    dg_p/dt = (I_p - 2 g_p - v_p / T_p) / T_p
    S(v)    = 1 / (1 + exp(-R v)) - 1/2                 firing relative to baseline

    I_ss = 32 C u + A1 S(v_sp') - G1 S(v_ss) - G2 S(v_sp) - G3 S(v_ii)
    I_sp = G8 S(v_ss) - G7 S(v_sp)                       - A3 S(v_dp')
    I_ii = G5 S(v_ss) + G6 S(v_dp) - G4 S(v_ii)          - A4 S(v_dp')
    I_dp = A2 S(v_sp') - G9 S(v_ii) - G10 S(v_dp)

i.e. each voltage is a critically damped second-order synapse (an alpha kernel of time
constant ``T_p``) driven by the signed, sigmoid-transformed voltages of the others.
Primes mark other nodes (the extrinsic terms ``A``, summed over sources; zero for a
single column). The parameters are SPM's log-scale ones, which multiply fixed defaults:

* ``T = (2, 2, 16, 28) ms * exp(log_T)`` (order ss, sp, ii, dp);
* ``G = (4, 4, 8, 4, 4, 2, 4, 4, 2, 1) * 200 / s``, of which four are free:
  ``log_G[0]`` scales G7 (sp -> sp), ``log_G[1]`` G2 (sp -> ss), ``log_G[2]`` G3
  (ii -> ss) and ``log_G[3]`` G4 (ii -> ii);
* ``R = 2/3 * exp(log_S)``, the sigmoid's slope;
* ``C = exp(log_C)``, the gain of the exogenous input ``u`` (which SPM multiplies by 32);
* ``A_k = E_k exp(log_A_k)`` with ``E = (200, 100, 200, 100) / s`` for the forward
  sp -> ss, forward sp -> dp, backward dp -> sp and backward dp -> ii connections.
  Where a pair of nodes is connected both ways by the same kind of connection (both
  strengths above ``exp(-8)``), both are divided by 5, as SPM does for lateral links.

All log-scale parameters default to 0, SPM's prior expectation (``spm_cmc_priors``). The
state vector is SPM's order ``(v_ss, g_ss, v_sp, g_sp, v_ii, g_ii, v_dp, g_dp)``; the
resting state ``x = 0`` with ``u = 0`` is a fixed point because ``S(0) = 0``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._validation import check_tensor

__all__ = [
    "EXTRINSIC_NAMES",
    "EXTRINSIC_STRENGTHS",
    "FREE_INTRINSIC",
    "INPUT_GAIN",
    "INTRINSIC_STRENGTHS",
    "NUM_STATES",
    "POPULATIONS",
    "SIGMOID_SLOPE",
    "STATE_NAMES",
    "TIME_CONSTANTS_MS",
    "cmc_dynamics",
    "cmc_network_dynamics",
    "extrinsic_strengths",
    "firing",
    "intrinsic_matrix",
]

POPULATIONS = ("ss", "sp", "ii", "dp")
STATE_NAMES = ("v_ss", "g_ss", "v_sp", "g_sp", "v_ii", "g_ii", "v_dp", "g_dp")
NUM_STATES = len(STATE_NAMES)

# SPM's fixed defaults (spm_fx_cmc): synaptic time constants in ms, intrinsic strengths
# G1..G10 and extrinsic strengths A1..A4 in 1/s, the sigmoid's slope and the input gain.
TIME_CONSTANTS_MS = (2.0, 2.0, 16.0, 28.0)
INTRINSIC_STRENGTHS = tuple(200.0 * g for g in (4, 4, 8, 4, 4, 2, 4, 4, 2, 1))
EXTRINSIC_STRENGTHS = (200.0, 100.0, 200.0, 100.0)
EXTRINSIC_NAMES = ("forward sp->ss", "forward sp->dp", "backward dp->sp", "backward dp->ii")
SIGMOID_SLOPE = 2.0 / 3.0
INPUT_GAIN = 32.0
# Which of G1..G10 (0-based) log_G[k] scales: SPM's P.G(:,k) acts on G(j(k)), j = [7 2 3 4].
FREE_INTRINSIC = (6, 1, 2, 3)
# Both directions of a connection above this strength make it "lateral" (SPM: exp(-8)).
_RECIPROCAL_THRESHOLD = math.exp(-8.0)
_RECIPROCAL_DIVISOR = 5.0

# Intrinsic wiring: (target, source, which G (0-based), sign). Row/column order POPULATIONS.
_WIRING = (
    ("ss", "ss", 0, -1.0),
    ("ss", "sp", 1, -1.0),
    ("ss", "ii", 2, -1.0),
    ("ii", "ii", 3, -1.0),
    ("ii", "ss", 4, 1.0),
    ("ii", "dp", 5, 1.0),
    ("sp", "sp", 6, -1.0),
    ("sp", "ss", 7, 1.0),
    ("dp", "ii", 8, -1.0),
    ("dp", "dp", 9, -1.0),
)


def _wiring_tables() -> tuple[list[int], list[float]]:
    """Position of each of the 16 matrix entries in ``[0, G1, ..., G10]``, and G's signs."""
    position = [0] * 16
    signs = [0.0] * 10
    for target, source, index, sign in _WIRING:
        position[4 * POPULATIONS.index(target) + POPULATIONS.index(source)] = index + 1
        signs[index] = sign
    return position, signs


_MATRIX_POSITION, _G_SIGNS = _wiring_tables()


# -- the equations ---------------------------------------------------------------------


def firing(v: Tensor, slope: Tensor) -> Tensor:
    """``S(v) = sigmoid(slope * v) - 1/2``: firing rate relative to baseline, zero at rest."""
    return torch.sigmoid(slope * v) - 0.5


def intrinsic_matrix(strengths: Tensor) -> Tensor:
    """The signed intrinsic connectivity ``W`` (``(..., 4, 4)``, target x source, order
    ss, sp, ii, dp) from the ten strengths ``G`` (``(..., 10)``, 1/s)::

        W = [[-G1, -G2, -G3,   0],
             [ G8, -G7,   0,   0],
             [ G5,   0, -G4,  G6],
             [  0,   0, -G9, -G10]]
    """
    signed = strengths * strengths.new_tensor(_G_SIGNS)
    padded = torch.cat([torch.zeros_like(signed[..., :1]), signed], dim=-1)
    index = torch.tensor(_MATRIX_POSITION, device=strengths.device)
    return padded[..., index].unflatten(-1, (4, 4))


def extrinsic_strengths(log_A: Tensor) -> Tensor:
    """``A_k = E_k exp(log_A_k)`` (1/s), ``(..., 4, n, n)`` target x source, with SPM's
    reduction of reciprocal pairs (both above ``exp(-8)``: divided by 5). ``-inf`` in
    ``log_A`` is an absent connection."""
    defaults = log_A.new_tensor(EXTRINSIC_STRENGTHS)[:, None, None]
    strengths = defaults * torch.exp(log_A)
    with torch.no_grad():  # which pairs are reciprocal is a discrete choice, not a path
        present = strengths > _RECIPROCAL_THRESHOLD
        reciprocal = present & present.transpose(-1, -2)
    return torch.where(reciprocal, strengths / _RECIPROCAL_DIVISOR, strengths)


def _flow(x: Tensor, drive: Tensor, log_T: Tensor, log_G: Tensor, log_S: Tensor) -> Tensor:
    """``dx/dt`` of columns ``x`` (``(..., 8)``) given the external input to each
    population, ``drive`` (``(..., 4)``: exogenous plus extrinsic, signed, 1/s)."""
    time_constants = x.new_tensor(TIME_CONSTANTS_MS) / 1000.0 * torch.exp(log_T)  # (..., 4) s
    free = torch.exp(log_G)  # (..., 4)
    scale = torch.ones(free.shape[:-1] + (10,), dtype=x.dtype, device=x.device)
    scale = scale.index_copy(-1, torch.tensor(FREE_INTRINSIC, device=x.device), free)
    strengths = x.new_tensor(INTRINSIC_STRENGTHS) * scale  # (..., 10)
    slope = SIGMOID_SLOPE * torch.exp(log_S)  # (...)

    voltage, current = x[..., 0::2], x[..., 1::2]  # (..., 4) each
    rate = firing(voltage, slope.unsqueeze(-1))
    synaptic = (intrinsic_matrix(strengths) @ rate.unsqueeze(-1)).squeeze(-1) + drive
    d_current = (synaptic - 2.0 * current - voltage / time_constants) / time_constants
    return torch.stack(torch.broadcast_tensors(current, d_current), dim=-1).flatten(-2)


# -- argument checks (the public boundary) ---------------------------------------------


def _as_tensor(name: str, value: object, x: Tensor) -> Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=x.dtype, device=x.device)
    value = check_tensor(name, value)
    if value.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but x has {x.dtype}; they must match")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; they must match")
    return value


def _check_state(x: object, trailing: tuple[int, ...], what: str) -> Tensor:
    x = check_tensor("x", x)
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < len(trailing) or tuple(x.shape[x.dim() - len(trailing) :]) != trailing:
        raise ValueError(f"x must have shape {what}, got {tuple(x.shape)}")
    return x


def _check_log(name: str, value: object, x: Tensor, size: int | None) -> Tensor:
    """A log-scale parameter: ``None`` (SPM's prior, 0), or a tensor whose last dimension
    is ``size`` (``None``: a scalar per column, no trailing dimension)."""
    if value is None:
        return x.new_zeros(() if size is None else (size,))
    value = _as_tensor(name, value, x)
    if size is not None and (value.dim() == 0 or value.shape[-1] != size):
        raise ValueError(f"{name} must have shape (..., {size}), got {tuple(value.shape)}")
    return value


def _broadcast(shapes: dict[str, torch.Size]) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"the leading dimensions do not broadcast: {listed}") from None


# -- public functions ------------------------------------------------------------------


def cmc_dynamics(
    x: Tensor,
    u: Tensor | float,
    log_T: Tensor | None = None,
    log_G: Tensor | None = None,
    log_S: Tensor | None = None,
    log_C: Tensor | None = None,
) -> Tensor:
    """``dx/dt`` (per second) of one canonical microcircuit driven by exogenous input ``u``:
    SPM's ``spm_fx_cmc`` for a single source (see the module docstring for the equations).

    Args:
        x: states ``(..., 8)`` in SPM's order ``(v_ss, g_ss, v_sp, g_sp, v_ii, g_ii, v_dp,
            g_dp)``.
        u: exogenous input ``(...)`` (or a number), entering the spiny stellate cells as
            ``32 exp(log_C) u``.
        log_T: log-scales of the time constants (2, 2, 16, 28 ms), ``(..., 4)``.
        log_G: log-scales of G7, G2, G3, G4 (SPM's ``P.G``), ``(..., 4)``.
        log_S: log-scale of the sigmoid's slope 2/3, ``(...)``.
        log_C: log-scale of the input gain, ``(...)``.

    ``None`` is SPM's prior, 0. All leading dimensions broadcast together; every tensor
    must have ``x``'s dtype and device.

    Returns:
        ``dx/dt``, ``(*batch, 8)`` with ``batch`` the broadcast leading shape.
    """
    x = _check_state(x, (NUM_STATES,), "(..., 8)")
    u = _as_tensor("u", u, x)
    log_T = _check_log("log_T", log_T, x, 4)
    log_G = _check_log("log_G", log_G, x, 4)
    log_S = _check_log("log_S", log_S, x, None)
    log_C = _check_log("log_C", log_C, x, None)
    _broadcast(
        {
            "x": x.shape[:-1],
            "u": u.shape,
            "log_T": log_T.shape[:-1],
            "log_G": log_G.shape[:-1],
            "log_S": log_S.shape,
            "log_C": log_C.shape,
        }
    )
    exogenous = INPUT_GAIN * torch.exp(log_C) * u
    zero = torch.zeros_like(exogenous)
    drive = torch.stack([exogenous, zero, zero, zero], dim=-1)  # only ss gets input
    return _flow(x, drive, log_T, log_G, log_S)


def cmc_network_dynamics(
    x: Tensor,
    u: Tensor | float,
    log_A: Tensor | None = None,
    log_T: Tensor | None = None,
    log_G: Tensor | None = None,
    log_S: Tensor | None = None,
    log_C: Tensor | None = None,
) -> Tensor:
    """``dx/dt`` (per second) of ``n`` canonical microcircuits coupled by SPM's extrinsic
    connections: forward sp -> ss and sp -> dp (excitatory), backward dp -> sp and
    dp -> ii (inhibitory). With ``log_A=None`` the nodes are uncoupled and each obeys
    :func:`cmc_dynamics`.

    Args:
        x: states ``(..., n, 8)``, each node in SPM's order.
        u: exogenous input per node ``(..., n)`` (or a number), entering node ``i``'s spiny
            stellate cells as ``32 exp(log_C_i) u_i``. SPM's input matrix ``C`` (nodes x
            inputs) reduces to this once the inputs are mixed: pass ``u_i = sum_j C_ij
            u_j`` and ``log_C = 0``.
        log_A: log-scales of the extrinsic strengths, ``(..., 4, n, n)``: kind ``k`` in the
            order of :data:`EXTRINSIC_NAMES` (SPM's ``P.A{k}``), entry ``[k, i, j]`` from
            node ``j`` to node ``i``, ``-inf`` for none. SPM's prior for an absent link is
            -32 (strength ``~2.5e-12``), for a present one 0 (200 or 100 / s).
        log_T, log_G: per node, ``(..., n, 4)`` or ``(4,)`` (as in :func:`cmc_dynamics`).
        log_S, log_C: per node, ``(..., n)`` or scalars.

    Returns:
        ``dx/dt``, ``(*batch, n, 8)``.
    """
    x = _check_state(x, (NUM_STATES,), "(..., n, 8)")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., n, 8), got {tuple(x.shape)}")
    num_nodes = x.shape[-2]
    u = _as_tensor("u", u, x)
    log_T = _check_log("log_T", log_T, x, 4)
    log_G = _check_log("log_G", log_G, x, 4)
    log_S = _check_log("log_S", log_S, x, None)
    log_C = _check_log("log_C", log_C, x, None)
    shapes = {
        "x": x.shape[:-1],
        "u": u.shape,
        "log_T": log_T.shape[:-1],
        "log_G": log_G.shape[:-1],
        "log_S": log_S.shape,
        "log_C": log_C.shape,
    }
    if log_A is not None:
        log_A = _as_tensor("log_A", log_A, x)
        if log_A.dim() < 3 or tuple(log_A.shape[-3:]) != (4, num_nodes, num_nodes):
            raise ValueError(
                f"log_A must have shape (..., 4, n, n) with n = {num_nodes} nodes (x's "
                f"second-to-last dimension), got {tuple(log_A.shape)}"
            )
        shapes["log_A"] = log_A.shape[:-3] + (num_nodes,)
    batch = _broadcast(shapes)
    if batch[-1] != num_nodes:
        raise ValueError(
            f"the per-node arguments must broadcast to n = {num_nodes} nodes, got "
            + ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        )

    exogenous = INPUT_GAIN * torch.exp(log_C) * u  # (..., n)
    zero = torch.zeros_like(exogenous)
    if log_A is None:
        drive = torch.stack([exogenous, zero, zero, zero], dim=-1)
    else:
        slope = SIGMOID_SLOPE * torch.exp(log_S)
        rate = firing(x[..., 0::2], slope.unsqueeze(-1))  # (..., n, 4)
        strengths = extrinsic_strengths(log_A)  # (..., 4, n, n)

        def incoming(kind: int, population: int) -> Tensor:
            source = rate[..., population].unsqueeze(-1)  # (..., n, 1)
            return (strengths[..., kind, :, :] @ source).squeeze(-1)  # (..., n)

        sp, dp = POPULATIONS.index("sp"), POPULATIONS.index("dp")
        drive = torch.stack(
            torch.broadcast_tensors(
                exogenous + incoming(0, sp),  # -> ss
                -incoming(2, dp),  # -> sp
                -incoming(3, dp),  # -> ii
                incoming(1, sp),  # -> dp
            ),
            dim=-1,
        )
    return _flow(x, drive, log_T, log_G, log_S)
