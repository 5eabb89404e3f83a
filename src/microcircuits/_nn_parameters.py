"""Parameters of the modules of :mod:`microcircuits.nn`: names, shapes, initialisation.

:class:`RecurrentParameters` is the base of the sequence modules and the cells: it
registers one layer's (and direction's) parameters under ``torch.nn.LSTM``'s names
(``weight_ih{suffix}``, ``weight_hh``, ``bias_ih``, ``bias_hh``, with a learned decay
``forget``, with ``proj_size > 0`` ``weight_hr``), initialises them as the paper does
and hands them to the kernels as :class:`~microcircuits.cells.CellWeights`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .cells import CellKind, CellWeights, cell_kind

__all__ = ["RecurrentParameters"]


def _init_gate_blocks(weight: Tensor, num_gates: int) -> None:
    """Glorot-uniform init of each gate block on its own (each block maps to H units)."""
    for block in weight.detach().chunk(num_gates, dim=0):
        nn.init.xavier_uniform_(block)


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

    def _reset_suffix(self, suffix: str, hidden_size: int, forget_bias: float) -> None:
        kind = self.cell
        with torch.no_grad():
            _init_gate_blocks(getattr(self, f"weight_ih{suffix}"), kind.num_gates)
            _init_gate_blocks(getattr(self, f"weight_hh{suffix}"), kind.num_gates)
            bias_ih = getattr(self, f"bias_ih{suffix}")
            if bias_ih is not None:
                bias_ih.zero_()
                getattr(self, f"bias_hh{suffix}").zero_()
                if "f" in kind.gate_names:
                    block = kind.gate_names.index("f")
                    bias_ih[block * hidden_size : (block + 1) * hidden_size].fill_(forget_bias)
            if kind.learned_decay:
                getattr(self, f"forget{suffix}").fill_(forget_bias)
            projection = self._projection(suffix)
            if projection is not None:
                nn.init.xavier_uniform_(projection)

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
