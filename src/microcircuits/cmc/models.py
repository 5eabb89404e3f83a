"""Trainable canonical microcircuits: an image drives the dynamics of
:mod:`microcircuits.cmc.dynamics`, an ODE solver integrates them and a linear readout
classifies the trajectory.

The solver is torchdiffeq's (Chen et al., NeurIPS 2018): ``odeint`` for backpropagation
through the solver's steps and ``odeint_adjoint`` for the adjoint method, fixed-step
(``euler``, ``midpoint``, ``rk4``) and adaptive (``dopri5``, ``bosh3``, ...) alike.

Douglas (arXiv:2508.06501) integrates the CMC as a neural ODE with fourth-order
Runge-Kutta and classifies images with one column or a hierarchy of them; how the image
becomes an input, which states are read out, for how long and at which times are not
specified there. Our choices, marked "ours" below, are:

* input: the flattened image through a learned affine map, one scalar drive per column,
  held constant over the integration window and entering the spiny stellate cells as
  SPM's exogenous input; the columns start at rest (``x = 0``);
* integration: 100 ms (about 3.5 of the slowest population's 28 ms time constant), RK4
  with a 1 ms step (the fastest eigenvalues are about -500 / s);
* readout: the four voltages at ``num_readout_times`` evenly spaced times after the start,
  flattened, through a learned affine map to the outputs;
* hierarchy: a chain of nodes, the image driving the first, forward connections up the
  chain and backward ones down it, read out from the last node.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .._validation import check_bool, check_matches_parameters, check_positive_int, check_tensor
from .dynamics import NUM_STATES, cmc_dynamics, cmc_network_dynamics

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "CMCHierarchy", "CMCNode"]

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
READOUTS = ("top", "all")


def _check_positive_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class _CMCModel(nn.Module):
    """What both models share: the encoder, the solver settings and the integration."""

    def __init__(
        self,
        input_size: int,
        drive_size: int,
        *,
        integration_time: float,
        num_readout_times: int,
        method: str,
        step_size: float | None,
        rtol: float,
        atol: float,
        adjoint: bool,
        input_scale: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.integration_time = _check_positive_real("integration_time", integration_time)
        self.num_readout_times = check_positive_int("num_readout_times", num_readout_times)
        methods = FIXED_STEP_METHODS + ADAPTIVE_METHODS
        if not isinstance(method, str) or method not in methods:
            raise ValueError(f"method must be one of {list(methods)}, got {method!r}")
        self.method = method
        if method in FIXED_STEP_METHODS:
            if step_size is None:
                raise ValueError(f"method {method!r} is fixed-step: give step_size (seconds)")
            self.step_size: float | None = _check_positive_real("step_size", step_size)
        else:
            self.step_size = None  # adaptive: rtol and atol decide the steps
        self.rtol = _check_positive_real("rtol", rtol)
        self.atol = _check_positive_real("atol", atol)
        self.adjoint = check_bool("adjoint", adjoint)
        self.input_scale = _check_positive_real("input_scale", input_scale)
        self.encoder = nn.Linear(self.input_size, drive_size, device=device, dtype=dtype)

    def readout_times(self) -> Tensor:
        """The times (s) at which the trajectory is read out, ``(num_readout_times,)``."""
        weight = self.encoder.weight
        times = torch.linspace(
            0.0, self.integration_time, self.num_readout_times + 1, dtype=weight.dtype
        )
        return times[1:].to(weight.device)

    def _encode(self, images: object) -> Tensor:
        """``(B, *)`` images, ``input_size`` numbers each -> drive
        ``input_scale * (W_in x + b_in)``, ``(B, drive_size)``."""
        images = check_tensor("images", images)
        check_matches_parameters("images", images, self.encoder.weight)
        if images.dim() < 2 or images[0].numel() != self.input_size:
            raise ValueError(
                f"images must have shape (B, ...) with input_size = {self.input_size} numbers "
                f"per sample, got {tuple(images.shape)}"
            )
        drive = self.encoder(images.flatten(1))
        return drive if self.input_scale == 1.0 else self.input_scale * drive

    def _solution_times(self, times: Tensor | None) -> Tensor:
        """``times`` checked (1-D, from 0, increasing), or 0 and :meth:`readout_times`."""
        if times is None:
            readout = self.readout_times()
            return torch.cat([readout.new_zeros(1), readout])
        times = check_tensor("times", times)
        if times.dim() != 1 or times.numel() < 2 or times[0].item() != 0.0:
            raise ValueError(
                f"times must be 1-D, start at 0 and hold at least 2 times, got shape "
                f"{tuple(times.shape)}"
            )
        if not bool((times[1:] > times[:-1]).all()):
            raise ValueError("times must increase strictly")
        weight = self.encoder.weight
        return times.to(device=weight.device, dtype=weight.dtype)

    def _integrate(
        self,
        field: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        params: Sequence[Tensor],
        times: Tensor | None = None,
    ) -> Tensor:
        """Solve ``dx/dt = field(t, x)`` from ``x0`` at time 0; the states at ``times``
        (default: 0 and :meth:`readout_times`), ``(len(times), *x0.shape)``. ``params`` are
        the tensors the adjoint differentiates (everything ``field`` uses that needs a
        grad)."""
        times = self._solution_times(times)
        options = {"step_size": self.step_size} if self.step_size is not None else None
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        if self.adjoint and torch.is_grad_enabled():
            return odeint_adjoint(field, x0, times, adjoint_params=tuple(params), **kwargs)
        return odeint(field, x0, times, **kwargs)

    def extra_repr(self) -> str:
        step = f", step_size={self.step_size}" if self.step_size is not None else ""
        return (
            f"integration_time={self.integration_time}, num_readout_times="
            f"{self.num_readout_times}, method={self.method!r}{step}, adjoint={self.adjoint}, "
            f"input_scale={self.input_scale}"
        )


def _log_parameter(
    module: nn.Module, name: str, shape: tuple[int, ...], learn: bool, device, dtype
) -> None:
    """A log-scale parameter at SPM's prior (0), trained or a buffer."""
    value = torch.zeros(shape, device=device, dtype=dtype)
    if learn:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class CMCNode(_CMCModel):
    """One canonical microcircuit column as a classifier: image -> input drive ->
    CMC dynamics (:func:`~microcircuits.cmc.cmc_dynamics`) -> readout of the trajectory.

    ``u = W_in flatten(image) + b_in`` drives the spiny stellate cells of a column that
    starts at rest; the four voltages at ``num_readout_times`` evenly spaced times in
    ``(0, integration_time]`` go through ``W_out`` to the outputs. ``num_columns > 1``
    (ours) runs that many independent columns side by side, each with its own drive and
    dynamics parameters, and reads them all out; 1 is the paper's single node.

    Args:
        input_size: numbers per image (``C * H * W``).
        output_size: outputs (classes).
        num_columns: independent columns ``K``.
        integration_time: seconds to integrate (ours: 0.1).
        num_readout_times: readout times (ours: 10, every 10 ms).
        method: a torchdiffeq solver: fixed-step ``euler``, ``midpoint``, ``rk4`` (ours)
            or adaptive ``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``.
        step_size: seconds per step of a fixed-step method (ours: 1e-3).
        rtol, atol: tolerances of an adaptive method.
        adjoint: gradients by the adjoint method (memory constant in the number of steps,
            about twice the compute) instead of backpropagation through the steps. Ours:
            off, since a column's state is 8 numbers and storing the steps costs little.
        input_scale: a fixed factor on the encoder's output, so that the drive reaches
            the sigmoid's nonlinear range (voltages of order 1/R = 1.5) from an encoder at
            torch's default initialisation (|W_in x| about 1 on MNIST, which leaves the
            voltages at 0.003-0.04 and the column nearly linear); 1: none.
        learn_dynamics: train SPM's log-scale parameters (else fixed at the prior).
        device, dtype: of the parameters.

    Parameters: ``encoder`` (``Linear(input_size, K)``), ``readout``
    (``Linear(num_readout_times * K * 4, output_size)``) and, per column, ``log_T``
    ``(K, 4)``, ``log_G`` ``(K, 4)``, ``log_S`` ``(K,)``, ``log_C`` ``(K,)``, all 0 (SPM's
    prior) at the start.

    Input: images ``(B, ...)``. Output: ``(B, output_size)``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        num_columns: int = 1,
        integration_time: float = 0.1,
        num_readout_times: int = 10,
        method: str = "rk4",
        step_size: float | None = 1e-3,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        adjoint: bool = False,
        input_scale: float = 1.0,
        learn_dynamics: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        num_columns = check_positive_int("num_columns", num_columns)
        super().__init__(
            input_size,
            num_columns,
            integration_time=integration_time,
            num_readout_times=num_readout_times,
            method=method,
            step_size=step_size,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            input_scale=input_scale,
            device=device,
            dtype=dtype,
        )
        self.output_size = check_positive_int("output_size", output_size)
        self.num_columns = num_columns
        learn = check_bool("learn_dynamics", learn_dynamics)
        for name, shape in (
            ("log_T", (num_columns, 4)),
            ("log_G", (num_columns, 4)),
            ("log_S", (num_columns,)),
            ("log_C", (num_columns,)),
        ):
            _log_parameter(self, name, shape, learn, device, dtype)
        features = self.num_readout_times * num_columns * 4
        self.readout = nn.Linear(features, self.output_size, device=device, dtype=dtype)

    def trajectory(self, images: Tensor, times: Tensor | None = None) -> Tensor:
        """The columns' states at ``times`` (s; 1-D, from 0, increasing; default: 0 and
        :meth:`readout_times`), ``(len(times), B, num_columns, 8)``."""
        drive = self._encode(images)  # (B, K)
        x0 = drive.new_zeros(drive.shape + (NUM_STATES,))
        dynamics = (self.log_T, self.log_G, self.log_S, self.log_C)

        def field(t: Tensor, x: Tensor) -> Tensor:
            return cmc_dynamics(x, drive, *dynamics)

        return self._integrate(field, x0, (drive,) + dynamics, times)

    def forward(self, images: Tensor) -> Tensor:
        voltages = self.trajectory(images)[1:, ..., 0::2]  # (R, B, K, 4)
        return self.readout(voltages.movedim(0, 1).flatten(1))


def _check_levels(value: object) -> tuple[int, ...]:
    """``num_nodes`` as level sizes: an int ``n`` is a chain of ``n`` single nodes."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        levels = (1,) * check_positive_int("num_nodes", value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        levels = tuple(check_positive_int("num_nodes (a level's size)", v) for v in value)
    else:
        raise TypeError(
            f"num_nodes must be an int (a chain) or a sequence of level sizes, got "
            f"{type(value).__name__} ({value!r})"
        )
    if sum(levels) < 2:
        raise ValueError(f"num_nodes must be >= 2 (use CMCNode for one), got {value!r}")
    if len(levels) < 2:
        raise ValueError(
            f"num_nodes must give at least 2 levels (one level of independent columns is a "
            f"CMCNode with num_columns), got {value!r}"
        )
    return levels


def _level_masks(levels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Forward links from every node of level ``l`` to every node of level ``l + 1``
    (``[target, source]``), backward links the other way."""
    starts = [sum(levels[:i]) for i in range(len(levels) + 1)]
    forward = torch.zeros(starts[-1], starts[-1], dtype=torch.bool)
    for level in range(len(levels) - 1):
        source = slice(starts[level], starts[level + 1])
        target = slice(starts[level + 1], starts[level + 2])
        forward[target, source] = True
    return forward, forward.T.clone()


def _check_mask(name: str, value: object, num_nodes: int) -> Tensor:
    value = check_tensor(name, value)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {value.dtype}")
    if tuple(value.shape) != (num_nodes, num_nodes):
        raise ValueError(
            f"{name} must have shape ({num_nodes}, {num_nodes}) (target x source), "
            f"got {tuple(value.shape)}"
        )
    return value.detach().cpu().clone()


class CMCHierarchy(_CMCModel):
    """A hierarchy of canonical microcircuits with learned extrinsic connectivity, as a
    classifier (:func:`~microcircuits.cmc.cmc_network_dynamics`).

    The nodes form levels (ours). The image drives the spiny stellate cells of each node
    of the first level through its own scalar (as :class:`CMCNode`'s columns); forward
    connections (sp -> ss and sp -> dp, excitatory) run from every node of a level to
    every node of the next, backward ones (dp -> sp and dp -> ii, inhibitory) down again,
    unless ``forward_mask``/``backward_mask`` say otherwise. Their log-scale strengths are
    learned and start at SPM's prior (0: 200 and 100 / s) divided by the link's fan-in
    (``-log`` of the number of links of that kind into the node), so that a node starts
    with one prior link's worth of input. ``num_nodes=n`` is a chain of ``n`` single nodes
    (fan-in 1, the prior itself), which reads the image through one number. The readout
    sees the voltages of the last level (``readout="top"``) or of every node (``"all"``)
    at the readout times.

    Args:
        input_size, output_size: as :class:`CMCNode`.
        num_nodes: an int ``n`` (a chain of ``n`` nodes) or the level sizes, e.g.
            ``(32, 32)``; at least 2 levels.
        forward_mask, backward_mask: bool ``(n, n)``, ``[i, j]`` for a link from node
            ``j`` to node ``i``; ``None`` for the links between adjacent levels.
        readout: ``"top"`` or ``"all"``.
        integration_time, num_readout_times, method, step_size, rtol, atol, adjoint,
        input_scale, learn_dynamics, device, dtype: as :class:`CMCNode`.

    Parameters: ``encoder`` (``Linear(input_size, levels[0])``), ``log_A`` ``(links,)``
    (one log-scale per link, in the order of ``extrinsic_mask.nonzero()``; the full
    ``(4, n, n)`` matrix is :meth:`extrinsic_log_scales`), per node ``log_T``/``log_G``
    ``(n, 4)`` and ``log_S``/``log_C`` ``(n,)``, and ``readout``. Buffer
    ``extrinsic_mask`` ``(4, n, n)``.

    Input: images ``(B, ...)``. Output: ``(B, output_size)``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        num_nodes: int | Sequence[int] = 2,
        *,
        forward_mask: Tensor | None = None,
        backward_mask: Tensor | None = None,
        readout: str = "top",
        integration_time: float = 0.1,
        num_readout_times: int = 10,
        method: str = "rk4",
        step_size: float | None = 1e-3,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        adjoint: bool = False,
        input_scale: float = 1.0,
        learn_dynamics: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        levels = _check_levels(num_nodes)
        super().__init__(
            input_size,
            levels[0],
            integration_time=integration_time,
            num_readout_times=num_readout_times,
            method=method,
            step_size=step_size,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            input_scale=input_scale,
            device=device,
            dtype=dtype,
        )
        self.output_size = check_positive_int("output_size", output_size)
        self.levels = levels
        self.num_nodes = n = sum(levels)
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        self.readout_nodes = readout
        level_forward, level_backward = _level_masks(levels)
        forward = (
            level_forward if forward_mask is None else _check_mask("forward_mask", forward_mask, n)
        )
        backward = (
            level_backward
            if backward_mask is None
            else _check_mask("backward_mask", backward_mask, n)
        )
        mask = torch.stack([forward, forward, backward, backward])
        fan_in = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float64)
        initial = (-fan_in.log()).expand(mask.shape) * mask  # 0 where there is no link
        self.register_buffer("extrinsic_mask", mask.to(device))
        links = initial[mask].to(device=device, dtype=dtype or torch.get_default_dtype())
        self.log_A = nn.Parameter(links)
        learn = check_bool("learn_dynamics", learn_dynamics)
        for name, shape in (("log_T", (n, 4)), ("log_G", (n, 4)), ("log_S", (n,)), ("log_C", (n,))):
            _log_parameter(self, name, shape, learn, device, dtype)
        read_nodes = n if readout == "all" else levels[-1]
        features = self.num_readout_times * read_nodes * 4
        self.readout = nn.Linear(features, self.output_size, device=device, dtype=dtype)

    def extrinsic_log_scales(self) -> Tensor:
        """The links' log-scales as SPM's ``(4, n, n)`` matrix, ``-inf`` where there is no
        link (the ``log_A`` of :func:`~microcircuits.cmc.cmc_network_dynamics`)."""
        full = self.log_A.new_full(self.extrinsic_mask.shape, float("-inf"))
        return full.masked_scatter(self.extrinsic_mask, self.log_A)

    def trajectory(self, images: Tensor, times: Tensor | None = None) -> Tensor:
        """The nodes' states at ``times`` (as :meth:`CMCNode.trajectory`),
        ``(len(times), B, n, 8)``."""
        drive = self._encode(images)  # (B, levels[0])
        rest = self.num_nodes - self.levels[0]
        inputs = torch.cat([drive, drive.new_zeros(drive.shape[0], rest)], 1)  # (B, n)
        x0 = inputs.new_zeros(inputs.shape + (NUM_STATES,))
        log_A = self.extrinsic_log_scales()
        dynamics = (self.log_T, self.log_G, self.log_S, self.log_C)

        def field(t: Tensor, x: Tensor) -> Tensor:
            return cmc_network_dynamics(x, inputs, log_A, *dynamics)

        return self._integrate(field, x0, (inputs, log_A) + dynamics, times)

    def forward(self, images: Tensor) -> Tensor:
        states = self.trajectory(images)[1:]  # (R, B, n, 8)
        if self.readout_nodes == "top":
            states = states[:, :, self.num_nodes - self.levels[-1] :]
        voltages = states[..., 0::2]  # (R, B, nodes read, 4)
        return self.readout(voltages.movedim(0, 1).flatten(1))
