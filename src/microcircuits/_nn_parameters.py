"""Parameters of the modules of :mod:`microcircuits.nn`: names, shapes, initialisation.

:class:`RecurrentParameters` is the base of the sequence modules and the cells: it
registers one layer's (and direction's) parameters under ``torch.nn.LSTM``'s names
(``weight_ih{suffix}``, ``weight_hh``, ``bias_ih``, ``bias_hh``, with a learned decay
``forget``, with ``proj_size > 0`` ``weight_hr``), initialises them as the paper does
and hands them to the kernels as :class:`~microcircuits.cells.CellWeights`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from .cells import CellKind, CellWeights, cell_kind

__all__ = [
    "WEIGHT_INITS",
    "RecurrentParameters",
    "check_chrono_max",
    "check_recurrent_gain",
    "check_weight_init",
]

WEIGHT_INITS = ("glorot_gates", "glorot_fused")
"""The two readings of "Glorot initialisation" for a gated cell: ``"glorot_gates"``, each
gate block of ``weight_ih`` and ``weight_hh`` its own Glorot-uniform matrix (fans ``H``
and ``H_in`` or ``H``); ``"glorot_fused"``, one Glorot-uniform kernel mapping the
concatenated ``[x, h]`` to all gates (fans ``H_in + H`` and ``G * H``), as TensorFlow's
``LSTMCell`` initialises it (bound ``sqrt(6 / (H_in + H + G * H))``, smaller)."""


def check_weight_init(value: object) -> str:
    """Return ``value`` if it names one of :data:`WEIGHT_INITS`, else raise ValueError."""
    if value not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {list(WEIGHT_INITS)}, got {value!r}")
    return value


def check_chrono_max(value: object) -> float | None:
    """Return ``value`` as a float if it is ``None`` or a real number > 2 (the chrono
    initialisation draws from U(1, chrono_max - 1)), else raise ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 2:
        raise ValueError(
            f"chrono_max must be None or a number of steps > 2 (the longest memory time "
            f"constant to draw), got {value!r}"
        )
    if not math.isfinite(value):
        raise ValueError(f"chrono_max must be finite, got {value!r}")
    return float(value)


def check_recurrent_gain(value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 0 (the factor on the
    Glorot-drawn ``weight_hh``), else raise ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ValueError(
            f"recurrent_gain must be a finite number > 0 (the factor on the initial "
            f"recurrent weights; 1: Glorot's), got {value!r}"
        )
    return float(value)


def _init_gate_blocks(weight: Tensor, num_gates: int) -> None:
    """Glorot-uniform init of each gate block on its own (each block maps to H units)."""
    for block in weight.detach().chunk(num_gates, dim=0):
        nn.init.xavier_uniform_(block)


def _init_fused(weight_ih: Tensor, weight_hh: Tensor) -> None:
    """Glorot-uniform init of the kernel ``[weight_ih, weight_hh]`` ``(G*H, H_in + R)``
    as one matrix, drawn as its two parts (the same bound for both)."""
    gates, fan_in = weight_ih.shape[0], weight_ih.shape[1] + weight_hh.shape[1]
    bound = math.sqrt(6.0 / (fan_in + gates))
    nn.init.uniform_(weight_ih.detach(), -bound, bound)
    nn.init.uniform_(weight_hh.detach(), -bound, bound)


class RecurrentParameters(nn.Module):
    """Creates, names and initialises the parameters of one cell kind."""

    cell_name: ClassVar[str]

    @property
    def cell(self) -> CellKind:
        """The :class:`~microcircuits.cells.CellKind` of this module."""
        return cell_kind(self.cell_name)

    def _make_parameters(
        self,
        suffix: str,
        input_size: int,
        hidden_size: int,
        bias: bool,
        factory: dict,
        proj_size: int = 0,
    ) -> None:
        """Register one layer's (and direction's) parameters; with ``proj_size > 0`` the
        recurrent weights read the projected ``h`` and ``weight_hr`` projects it."""
        gates = self.cell.num_gates * hidden_size
        recurrent = proj_size or hidden_size
        self.register_parameter(
            f"weight_ih{suffix}", nn.Parameter(torch.empty(gates, input_size, **factory))
        )
        self.register_parameter(
            f"weight_hh{suffix}", nn.Parameter(torch.empty(gates, recurrent, **factory))
        )
        for name in (f"bias_ih{suffix}", f"bias_hh{suffix}"):
            self.register_parameter(
                name, nn.Parameter(torch.empty(gates, **factory)) if bias else None
            )
        if self.cell.learned_decay:
            self.register_parameter(
                f"forget{suffix}", nn.Parameter(torch.empty(hidden_size, **factory))
            )
        if proj_size:
            self.register_parameter(
                f"weight_hr{suffix}", nn.Parameter(torch.empty(proj_size, hidden_size, **factory))
            )

    def _reset_suffix(self, suffix: str, hidden_size: int) -> None:
        """Initialise one layer's (and direction's) parameters from the module's
        ``weight_init``, ``recurrent_gain``, ``forget_bias`` and ``chrono_max`` (see
        ``reset_parameters``)."""
        kind = self.cell
        weight_ih = getattr(self, f"weight_ih{suffix}")
        weight_hh = getattr(self, f"weight_hh{suffix}")
        with torch.no_grad():
            if self.weight_init == "glorot_fused":
                _init_fused(weight_ih, weight_hh)
            else:
                _init_gate_blocks(weight_ih, kind.num_gates)
                _init_gate_blocks(weight_hh, kind.num_gates)
            weight_hh.mul_(self.recurrent_gain)
            forget = self._initial_forget_bias(hidden_size, weight_ih)
            bias_ih = getattr(self, f"bias_ih{suffix}")
            if bias_ih is not None:
                bias_ih.zero_()
                getattr(self, f"bias_hh{suffix}").zero_()
                blocks = bias_ih.view(kind.num_gates, hidden_size)
                if "f" in kind.gate_names:
                    blocks[kind.gate_names.index("f")] = forget
                    if self.chrono_max is not None and kind.name == "lstm":
                        blocks[kind.gate_names.index("i")] = -forget
            if kind.learned_decay:
                getattr(self, f"forget{suffix}").copy_(forget)
            projection = self._projection(suffix)
            if projection is not None:
                nn.init.xavier_uniform_(projection)

    def _initial_forget_bias(self, hidden_size: int, like: Tensor) -> Tensor:
        """``(hidden_size,)``: ``forget_bias`` for every unit, or with ``chrono_max`` the
        chrono initialisation's ``log U(1, chrono_max - 1)`` (Tallec & Ollivier 2018):
        memory time constants ``-1 / ln sigmoid(b)`` spread from ~1.4 to ~``chrono_max``
        steps."""
        if self.chrono_max is None:
            return torch.full(
                (hidden_size,), self.forget_bias, dtype=like.dtype, device=like.device
            )
        draw = torch.empty(hidden_size, dtype=like.dtype, device=like.device)
        return draw.uniform_(1.0, self.chrono_max - 1.0).log_()

    def _projection(self, suffix: str) -> Tensor | None:
        """``weight_hr{suffix}`` where the module projects its hidden state, else ``None``."""
        return getattr(self, f"weight_hr{suffix}", None)

    def _weights(self, suffix: str) -> CellWeights:
        return CellWeights(
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
            getattr(self, f"bias_ih{suffix}"),
            getattr(self, f"bias_hh{suffix}"),
            getattr(self, f"forget{suffix}", None),
        )
