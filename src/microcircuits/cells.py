r"""The equations of one time step of each cell: the one place where they live.

Everything here is a pure function of tensors. The modules in :mod:`microcircuits.nn`
own the parameters and call these functions; the fast whole-sequence kernels in
:mod:`microcircuits.kernels` are checked against them.

Notation (Costa et al., NIPS 2017, section 3), per layer and step, with ``x`` the
input, ``h``/``c`` the previous state and :math:`\sigma` the logistic sigmoid::

    pre = W x + R h + b                         # gate pre-activations, blocks (i, f, z, o)

    LSTM          i, f, o = sigma(pre_i, pre_f, pre_o);  z = tanh(pre_z)
                  c' = f * c + z * i;           h' = tanh(c') * o
    subLSTM       i, f, z, o = sigma(pre)
                  c' = f * c + z - i;           h' = sigma(c') - o
    fix-subLSTM   like subLSTM, but f = sigma(phi) is a learned per-unit constant
                  (no forget block in W, R, b: blocks are (i, z, o))

``update_mask`` implements the paper's "update dropout" (recurrent dropout without
memory loss, Semeniuta et al. 2016): the candidate update ``z`` is multiplied by a
mask (already scaled by ``1 / (1 - p)``) before it enters the memory. The mask is
drawn once per sequence by the caller, so the same units are dropped at every step.

Shapes: ``B`` batch, ``I`` input size, ``H`` hidden size, ``G`` number of gate blocks
(4 for LSTM and subLSTM, 3 for fix-subLSTM).

A projection of the hidden state (the modules' ``proj_size > 0``, ``h' = W_hr h'``) is
not a cell equation: the layer applies it after each step (``kernels.reference``), and
the step reads the projected ``h`` (``P`` features) through ``weight_hh`` ``(G*H, P)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import lookup_name

__all__ = [
    "CELLS",
    "CellKind",
    "CellWeights",
    "Gates",
    "LSTMState",
    "cell_kind",
    "fix_sublstm_gates",
    "fix_sublstm_pointwise",
    "fix_sublstm_step",
    "lstm_gates",
    "lstm_pointwise",
    "lstm_step",
    "pointwise_inplace",
    "sublstm_gates",
    "sublstm_pointwise",
    "sublstm_step",
]


class LSTMState(NamedTuple):
    """Recurrent state of one layer and direction.

    Attributes:
        h: hidden output, ``(B, H)`` (``(B, P)`` where the layer projects it).
        c: memory cell, ``(B, H)``.

    Examples::

        >>> import torch
        >>> from microcircuits import LSTMState
        >>> state = LSTMState(h=torch.zeros(2, 3), c=torch.zeros(2, 3))
        >>> h, c = state  # a tuple, as torch.nn.LSTMCell's (h, c)
        >>> state.c.shape
        torch.Size([2, 3])
    """

    h: Tensor
    c: Tensor


class CellWeights(NamedTuple):
    """Parameters of one layer and direction, named as in ``torch.nn.LSTM``.

    Attributes:
        weight_ih: input weights ``W``, ``(G*H, I)``.
        weight_hh: recurrent weights ``R``, ``(G*H, H)`` (``(G*H, P)`` in a layer that
            projects its hidden state to ``P`` features; the projection ``weight_hr``
            is not part of these weights).
        bias_ih: input bias, ``(G*H,)``, or ``None``.
        bias_hh: recurrent bias, ``(G*H,)``, or ``None``.
        forget: fix-subLSTM only: ``phi`` with ``f = sigma(phi)``, ``(H,)``; else ``None``.

    Examples::

        >>> import torch
        >>> from microcircuits import CellWeights, LSTMState, SubLSTM, cell_kind
        >>> rnn = SubLSTM(3, 4)
        >>> weights = rnn.layer_weights(0)  # a CellWeights
        >>> weights.weight_hh.shape, weights.forget is None
        (torch.Size([16, 4]), True)
        >>> state = LSTMState(torch.zeros(2, 4), torch.zeros(2, 4))
        >>> h, new_state = cell_kind("sublstm").step(torch.randn(2, 3), state, weights)
        >>> h.shape, new_state.c.shape
        (torch.Size([2, 4]), torch.Size([2, 4]))
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None = None
    bias_hh: Tensor | None = None
    forget: Tensor | None = None


class Gates(NamedTuple):
    """Gate values after their nonlinearity, each ``(B, H)``.

    fix-subLSTM's ``f`` is its per-unit constant ``sigma(phi)`` broadcast to ``(B, H)``.
    """

    i: Tensor
    f: Tensor
    z: Tensor
    o: Tensor


def lstm_gates(gates: Tensor, forget: Tensor | None = None) -> Gates:
    """LSTM gates from pre-activations ``(B, 4H)``: ``i, f, o = sigma(.)``, ``z = tanh(.)``."""
    pre_i, pre_f, pre_z, pre_o = gates.chunk(4, dim=-1)
    sigma = torch.sigmoid
    return Gates(sigma(pre_i), sigma(pre_f), torch.tanh(pre_z), sigma(pre_o))


def sublstm_gates(gates: Tensor, forget: Tensor | None = None) -> Gates:
    """subLSTM gates from pre-activations ``(B, 4H)``: all four ``sigma(.)``."""
    return Gates(*torch.sigmoid(gates).chunk(4, dim=-1))


def fix_sublstm_gates(gates: Tensor, forget: Tensor | None = None) -> Gates:
    """fix-subLSTM gates from pre-activations ``(B, 3H)`` and ``phi`` ``(H,)``.

    ``f = sigma(phi)``, the same for every sample.
    """
    if forget is None:
        raise ValueError("fix-subLSTM needs its forget parameter phi (got None)")
    i, z, o = torch.sigmoid(gates).chunk(3, dim=-1)
    return Gates(i, torch.sigmoid(forget).expand_as(i), z, o)


def _apply_update_mask(z: Tensor, update_mask: Tensor | None) -> Tensor:
    return z if update_mask is None else z * update_mask


def multiplicative_update(g: Gates, c: Tensor, update_mask: Tensor | None = None) -> LSTMState:
    """LSTM memory and output: ``c' = f*c + z*i``, ``h' = tanh(c')*o``."""
    c_new = g.f * c + _apply_update_mask(g.z, update_mask) * g.i
    return LSTMState(torch.tanh(c_new) * g.o, c_new)


def subtractive_update(g: Gates, c: Tensor, update_mask: Tensor | None = None) -> LSTMState:
    """subLSTM memory and output: ``c' = f*c + z - i``, ``h' = sigma(c') - o``.

    Inhibition is subtractive: the input gate ``i`` cancels the excitatory candidate
    ``z`` and the output gate ``o`` cancels the excitatory read-out ``sigma(c')``.
    """
    c_new = g.f * c + _apply_update_mask(g.z, update_mask) - g.i
    return LSTMState(torch.sigmoid(c_new) - g.o, c_new)


def lstm_pointwise(
    gates: Tensor, c: Tensor, forget: Tensor | None = None, update_mask: Tensor | None = None
) -> LSTMState:
    """LSTM nonlinearity: ``c' = f*c + z*i``, ``h' = tanh(c')*o``.

    Args:
        gates: pre-activations ``(B, 4H)`` in block order (i, f, z, o).
        c: previous memory ``(B, H)``.
        forget: unused (must be ``None``); present so all cells share one signature.
        update_mask: optional update-dropout mask on ``z``, ``(B, H)``.

    Returns:
        The new state ``(h', c')``, each ``(B, H)``.
    """
    return multiplicative_update(lstm_gates(gates), c, update_mask)


def sublstm_pointwise(
    gates: Tensor, c: Tensor, forget: Tensor | None = None, update_mask: Tensor | None = None
) -> LSTMState:
    """subLSTM nonlinearity: ``c' = f*c + z - i``, ``h' = sigma(c') - o``.

    Args:
        gates: pre-activations ``(B, 4H)`` in block order (i, f, z, o).
        c: previous memory ``(B, H)``.
        forget: unused (must be ``None``).
        update_mask: optional update-dropout mask on ``z``, ``(B, H)``.

    Returns:
        The new state ``(h', c')``, each ``(B, H)``.
    """
    return subtractive_update(sublstm_gates(gates), c, update_mask)


def fix_sublstm_pointwise(
    gates: Tensor, c: Tensor, forget: Tensor | None = None, update_mask: Tensor | None = None
) -> LSTMState:
    """fix-subLSTM nonlinearity: subLSTM with a learned constant decay ``f = sigma(phi)``.

    Args:
        gates: pre-activations ``(B, 3H)`` in block order (i, z, o).
        c: previous memory ``(B, H)``.
        forget: ``phi``, ``(H,)``; the decay of each unit's memory is ``sigma(phi)``.
        update_mask: optional update-dropout mask on ``z``, ``(B, H)``.

    Returns:
        The new state ``(h', c')``, each ``(B, H)``.
    """
    return subtractive_update(fix_sublstm_gates(gates, forget), c, update_mask)


def pointwise_inplace(
    name: str,
    gates: Tensor,
    c: Tensor,
    decay: Tensor | None,
    update_mask: Tensor | None,
    h_out: Tensor,
) -> None:
    """The ``*_pointwise`` equations above, written in place, for inference loops.

    ``c`` ``(B, H)`` becomes ``c'`` and ``h'`` is written into ``h_out`` ``(B, H)``, which
    must not overlap ``gates`` or ``c``. ``gates`` ``(B, G*H)`` holds the pre-activations;
    for the subtractive cells it is overwritten with the gate values (``z`` times the
    mask, if any). ``decay`` is fix-subLSTM's ``f = sigma(phi)`` ``(H,)``, computed once
    per sequence by the caller (``None`` for the others). subLSTM/fix-subLSTM: six or
    seven torch ops and no allocations per step, against about a dozen ops and six new
    tensors out of place, 5-13% faster per step (best of 40 x 50 steps, one thread,
    B 20-128, H 100-650). Not differentiable (no autograd). The results equal
    ``*_pointwise``'s (tested), which remain the definition.
    """
    hidden = c.shape[-1]
    if name == "lstm":
        # Out of place, then copied: activating the strided i/f, z and o column blocks
        # in place measured ~5% slower than this (B 128, H 100, one thread).
        h, c_new = lstm_pointwise(gates, c, None, update_mask)
        c.copy_(c_new)
        h_out.copy_(h)
        return
    torch.sigmoid(gates, out=gates)  # every subLSTM gate is a sigmoid
    if name == "sublstm":
        i, f, z, o = gates.split(hidden, dim=1)
    else:
        i, z, o = gates.split(hidden, dim=1)
        f = decay
    if update_mask is not None:
        z.mul_(update_mask)
    c.mul_(f).add_(z).sub_(i)  # c' = f*c + z - i
    torch.sigmoid(c, out=h_out).sub_(o)  # h' = sigma(c') - o


def gate_preactivations(x: Tensor, h: Tensor, weights: CellWeights) -> Tensor:
    """``W x + b_ih + R h + b_hh``: ``x`` ``(B, I)``, ``h`` ``(B, H)`` -> ``(B, G*H)``."""
    return F.linear(x, weights.weight_ih, weights.bias_ih) + F.linear(
        h, weights.weight_hh, weights.bias_hh
    )


Pointwise = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None"], LSTMState]


def _step(
    pointwise: Pointwise,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    update_mask: Tensor | None = None,
) -> tuple[Tensor, LSTMState]:
    new = pointwise(gate_preactivations(x, state.h, weights), state.c, weights.forget, update_mask)
    return new.h, new


def lstm_step(
    x: Tensor, state: LSTMState, weights: CellWeights, update_mask: Tensor | None = None
) -> tuple[Tensor, LSTMState]:
    """One LSTM step: ``x`` ``(B, I)``, state ``(B, H)`` each -> ``(h', (h', c'))``."""
    return _step(lstm_pointwise, x, state, weights, update_mask)


def sublstm_step(
    x: Tensor, state: LSTMState, weights: CellWeights, update_mask: Tensor | None = None
) -> tuple[Tensor, LSTMState]:
    """One subLSTM step: ``x`` ``(B, I)``, state ``(B, H)`` each -> ``(h', (h', c'))``."""
    return _step(sublstm_pointwise, x, state, weights, update_mask)


def fix_sublstm_step(
    x: Tensor, state: LSTMState, weights: CellWeights, update_mask: Tensor | None = None
) -> tuple[Tensor, LSTMState]:
    """One fix-subLSTM step: ``x`` ``(B, I)``, state ``(B, H)`` each -> ``(h', (h', c'))``."""
    return _step(fix_sublstm_pointwise, x, state, weights, update_mask)


Update = Callable[[Gates, Tensor, "Tensor | None"], LSTMState]


@dataclass(frozen=True)
class CellKind:
    """What distinguishes the cells: the one table every layer reads (see :data:`CELLS`).

    Attributes:
        name: registry key (``"lstm"``, ``"sublstm"``, ``"fix_sublstm"``).
        label: name for tables and plots (``"subLSTM"``).
        num_gates: gate blocks in ``W``, ``R``, ``b`` (``G``).
        gate_names: block order.
        learned_decay: whether the layer owns ``forget_l{k}`` (phi).
        activate: gate values ``Gates(i, f, z, o)`` from pre-activations (and phi).
        pointwise: the nonlinearity of one step.
        step: one whole step, projection included.
        update: the second half of ``pointwise``: memory and read-out from the gate
            values, ``pointwise(pre, c, phi, m) == update(activate(pre, phi), c, m)``.
        code: the cell's number in the compiled kernels (``enum Kind`` of
            ``kernels/csrc/step_loops.cpp``, ``KIND`` of ``kernels/triton_pointwise.py``),
            which cannot read this table.
        aliases: other spellings :func:`cell_kind` accepts (besides any case).
    """

    name: str
    label: str
    num_gates: int
    gate_names: tuple[str, ...]
    learned_decay: bool
    activate: Callable[[Tensor, Tensor | None], Gates]
    pointwise: Pointwise
    step: Callable[..., tuple[Tensor, LSTMState]]
    update: Update
    code: int
    aliases: tuple[str, ...] = ()

    @property
    def subtractive(self) -> bool:
        """Whether inhibition is subtractive (subLSTM, fix-subLSTM), not multiplicative."""
        return self.update is subtractive_update


_KINDS = (
    CellKind(
        name="lstm",
        label="LSTM",
        num_gates=4,
        gate_names=("i", "f", "z", "o"),
        learned_decay=False,
        activate=lstm_gates,
        pointwise=lstm_pointwise,
        step=lstm_step,
        update=multiplicative_update,
        code=0,
    ),
    CellKind(
        name="sublstm",
        label="subLSTM",
        num_gates=4,
        gate_names=("i", "f", "z", "o"),
        learned_decay=False,
        activate=sublstm_gates,
        pointwise=sublstm_pointwise,
        step=sublstm_step,
        update=subtractive_update,
        code=1,
        aliases=("sub-lstm",),
    ),
    CellKind(
        name="fix_sublstm",
        label="fix-subLSTM",
        num_gates=3,
        gate_names=("i", "z", "o"),
        learned_decay=True,
        activate=fix_sublstm_gates,
        pointwise=fix_sublstm_pointwise,
        step=fix_sublstm_step,
        update=subtractive_update,
        code=2,
        aliases=("fix-sublstm", "fixsublstm"),
    ),
)
CELLS: dict[str, CellKind] = {kind.name: kind for kind in _KINDS}
"""Every cell by name, in the order tables, plots and ``--cells`` list them."""
_ALIASES = {alias: kind.name for kind in _KINDS for alias in kind.aliases}


def cell_kind(name: str) -> CellKind:
    """Look a cell up by name (case-insensitive; aliases such as ``fix-sublstm`` work too).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: naming the valid choices when ``name`` is unknown.

    Examples::

        >>> from microcircuits import cell_kind
        >>> kind = cell_kind("Fix-subLSTM")
        >>> kind.name, kind.num_gates, kind.gate_names, kind.learned_decay
        ('fix_sublstm', 3, ('i', 'z', 'o'), True)
    """
    return lookup_name(name, CELLS, _ALIASES, what="cell", choices=sorted(CELLS))
