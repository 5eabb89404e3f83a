r"""``nn.Module`` front ends with the API of ``torch.nn.LSTM`` and ``torch.nn.LSTMCell``.

The modules own parameters, check their inputs and run layers through
:func:`microcircuits.kernels.run_layer`; the equations themselves live in
:mod:`microcircuits.cells`.

Parameter names and gate order follow ``torch.nn.LSTM`` (``weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``_reverse`` for the backward
direction; gate blocks (i, f, z, o)), so that :class:`LSTM`'s ``state_dict`` loads
into ``torch.nn.LSTM`` and back. :class:`FixSubLSTM` has three blocks (i, z, o) and
one more parameter per layer, ``forget_l{k}`` (phi, the per-unit decay is sigma(phi)).

Regularisers of the paper (Costa et al. 2017, Tables 2 and 3) map to arguments:

=================  ==================  =================================================
paper              argument            what is dropped
=================  ==================  =================================================
input dropout      ``input_dropout``   the module's input (e.g. word embeddings)
output dropout     ``output_dropout``  the module's output sequence (not ``h_n``)
update dropout     ``update_dropout``  the candidate ``z`` in every layer, one mask per
                                       sequence, fixed over its steps (Semeniuta et al.)
(torch's)          ``dropout``         outputs of every layer but the last, as in torch
=================  ==================  =================================================

All dropouts act in training mode only.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import kernels
from ._validation import (
    check_bool,
    check_finite_real,
    check_matches_parameters,
    check_positive_int,
    check_probability,
    check_tensor,
)
from .cells import CellKind, CellWeights, LSTMState, cell_kind

__all__ = [
    "FixSubLSTM",
    "FixSubLSTMCell",
    "LSTM",
    "LSTMCell",
    "SubLSTM",
    "SubLSTMCell",
    "make_cell",
    "make_rnn",
]

HiddenState = tuple[Tensor, Tensor]


def _init_gate_blocks(weight: Tensor, num_gates: int) -> None:
    """Glorot-uniform init of each gate block on its own (each block maps to H units)."""
    for block in weight.detach().chunk(num_gates, dim=0):
        nn.init.xavier_uniform_(block)


def _update_mask(p: float, batch: int, hidden: int, like: Tensor, training: bool) -> Tensor | None:
    """Scaled Bernoulli mask ``(B, H)`` for update dropout, or ``None`` when inactive."""
    if not training or p == 0.0:
        return None
    keep = 1.0 - p
    return torch.empty(batch, hidden, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep


class _RecurrentParameters(nn.Module):
    """Creates, names and initialises the parameters of one cell kind."""

    cell_name: ClassVar[str]

    @property
    def cell(self) -> CellKind:
        """The :class:`~microcircuits.cells.CellKind` of this module."""
        return cell_kind(self.cell_name)

    def _make_parameters(
        self, suffix: str, input_size: int, hidden_size: int, bias: bool, factory: dict
    ) -> None:
        gates = self.cell.num_gates * hidden_size
        self.register_parameter(
            f"weight_ih{suffix}", nn.Parameter(torch.empty(gates, input_size, **factory))
        )
        self.register_parameter(
            f"weight_hh{suffix}", nn.Parameter(torch.empty(gates, hidden_size, **factory))
        )
        for name in (f"bias_ih{suffix}", f"bias_hh{suffix}"):
            self.register_parameter(
                name, nn.Parameter(torch.empty(gates, **factory)) if bias else None
            )
        if self.cell.learned_decay:
            self.register_parameter(
                f"forget{suffix}", nn.Parameter(torch.empty(hidden_size, **factory))
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

    def _weights(self, suffix: str) -> CellWeights:
        return CellWeights(
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
            getattr(self, f"bias_ih{suffix}"),
            getattr(self, f"bias_hh{suffix}"),
            getattr(self, f"forget{suffix}", None),
        )


class _RecurrentSequence(_RecurrentParameters):
    """Multi-layer, optionally bidirectional recurrent network over whole sequences."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        input_dropout: float = 0.0,
        output_dropout: float = 0.0,
        update_dropout: float = 0.0,
        forget_bias: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size != 0:
            raise ValueError(
                f"proj_size={proj_size!r}: projected hidden states (torch.nn.LSTM's "
                "proj_size > 0) are not implemented for these cells; only proj_size=0"
            )
        self.proj_size = 0  # as torch.nn.LSTM, for code that reads it
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        self.update_dropout = check_probability("update_dropout", update_dropout)
        self.forget_bias = check_finite_real("forget_bias", forget_bias)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers and has no effect with num_layers=1",
                stacklevel=2,
            )
        factory = {"device": device, "dtype": dtype}
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.hidden_size * self.num_directions
            for suffix in self._direction_suffixes(layer):
                self._make_parameters(suffix, layer_input, self.hidden_size, self.bias, factory)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _direction_suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def reset_parameters(self) -> None:
        """Initialise as in Costa et al. (2017): Glorot-uniform weights, zero biases,
        forget-gate bias (or fix-subLSTM's phi) equal to ``forget_bias`` (1 by default).

        Glorot's bound is computed per gate block (fan-out ``H``), since each block is
        its own linear map. The forget bias sits in ``bias_ih`` (``bias_hh`` is zero).
        Override this method, or re-initialise parameters after construction, for
        another scheme.
        """
        for layer in range(self.num_layers):
            for suffix in self._direction_suffixes(layer):
                self._reset_suffix(suffix, self.hidden_size, self.forget_bias)

    def layer_weights(self, layer: int, reverse: bool = False) -> CellWeights:
        """The parameters of one layer and direction as :class:`CellWeights`."""
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < self.num_layers
        ):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if reverse and not self.bidirectional:
            raise ValueError("reverse=True needs a bidirectional module")
        return self._weights(self._direction_suffixes(layer)[int(reverse)])

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Parameters per layer and direction, as ``torch.nn.LSTM.all_weights`` lists them."""
        return [
            [p for p in self._weights(suffix) if p is not None]
            for layer in range(self.num_layers)
            for suffix in self._direction_suffixes(layer)
        ]

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``torch.nn.LSTM`` (which compacts cuDNN weights)."""

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script``'s hook: refuse at once, with the ways that work.

        The forward picks a kernel in Python per call (and takes packed sequences),
        which TorchScript cannot compile. (``torch.nn.LSTM`` scripts in torch 2.13 but
        the result has no callable ``forward``.)
        """
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward picks a "
            "kernel in Python at run time; use torch.jit.trace, torch.export or "
            "torch.onnx.export instead (README, 'Export')"
        )

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "input_dropout": 0.0,
            "output_dropout": 0.0,
            "update_dropout": 0.0,
            "forget_bias": 1.0,
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value}"
        return text

    # -- forward -------------------------------------------------------------------

    def _check_hidden(self, hx: object, batch: int | None, reference: Tensor) -> HiddenState:
        """Validate ``hx = (h_0, c_0)``; ``batch is None`` means unbatched input."""
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            what = type(hx).__name__
            if isinstance(hx, (tuple, list)):
                what += f" of length {len(hx)}"
            raise TypeError(f"hx must be a tuple (h_0, c_0) of two tensors, got {what}")
        stacked = self.num_layers * self.num_directions
        expected = (
            (stacked, self.hidden_size) if batch is None else (stacked, batch, self.hidden_size)
        )
        for name, tensor in zip(("h_0", "c_0"), hx):
            check_tensor(name, tensor)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{name} must have shape {expected} (num_layers * num_directions, "
                    f"{'' if batch is None else 'batch, '}hidden_size), got {tuple(tensor.shape)}"
                )
            check_matches_parameters(name, tensor, reference)
        return hx[0], hx[1]

    def forward(
        self, input: Tensor | PackedSequence, hx: HiddenState | None = None
    ) -> tuple[Tensor | PackedSequence, HiddenState]:
        """Run the network over a sequence.

        Args:
            input: ``(L, N, H_in)`` (``(N, L, H_in)`` if ``batch_first``), unbatched
                ``(L, H_in)``, or a ``PackedSequence``.
            hx: optional ``(h_0, c_0)``, each ``(D * num_layers, N, H)`` (unbatched:
                ``(D * num_layers, H)``); zeros when ``None``. ``D`` is 2 if
                bidirectional else 1.

        Returns:
            ``output`` ``(L, N, D * H)`` (batch-first or packed like the input) with the
            last layer's ``h_t`` for every ``t``, and ``(h_n, c_n)``, each
            ``(D * num_layers, N, H)``, the state after each sequence's last step.
        """
        reference = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            check_matches_parameters("input", input.data, reference)
            x, lengths = pad_packed_sequence(input)  # (T, B, I), original batch order
            batched = True
        else:
            check_tensor("input", input)
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input must be 3-D (batched) or 2-D (unbatched), got {input.dim()}-D "
                    f"of shape {tuple(input.shape)}"
                )
            check_matches_parameters("input", input, reference)
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be equal to input_size={self.input_size}, got {x.shape[-1]}"
            )
        if x.shape[0] == 0:  # RuntimeError, as torch.nn.LSTM raises for it
            raise RuntimeError(
                f"input has sequence length 0 (shape {tuple(input.shape)}); a recurrent "
                "network needs at least one step (torch.nn.LSTM: 'Expected sequence length "
                "to be larger than 0 in RNN')"
            )
        batch = x.shape[1]
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.num_directions, batch, self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = self._check_hidden(hx, batch if batched else None, reference)
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if lengths is not None:
            lengths = lengths.to(x.device)

        output, h_n, c_n = self._run_layers(x, h0, c0, lengths)

        if packed:
            output = self._pack_like(output, input)
        elif not batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _run_layers(
        self, x: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Time-major core: ``x`` ``(T, B, I)``, ``h0``/``c0`` ``(L*D, B, H)``."""
        kind = self.cell
        batch = x.shape[1]
        x = F.dropout(x, self.input_dropout, self.training)
        layers = [  # nn.LSTM's order: layer-major, forward before reverse
            self._weights(suffix)
            for layer in range(self.num_layers)
            for suffix in self._direction_suffixes(layer)
        ]
        if not self._drops_inside_stack():
            whole = kernels.run_stack(
                kind, x, h0, c0, layers, bidirectional=self.num_directions == 2, lengths=lengths
            )
            if whole is not None:
                x, h_n, c_n = whole
                return F.dropout(x, self.output_dropout, self.training), h_n, c_n
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                mask = _update_mask(self.update_dropout, batch, self.hidden_size, x, self.training)
                out, state = kernels.run_layer(
                    kind,
                    x,
                    LSTMState(h0[index], c0[index]),
                    layers[index],
                    lengths=lengths,
                    update_mask=mask,
                    reverse=direction == 1,
                )
                outputs.append(out)
                final_h.append(state.h)
                final_c.append(state.c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, self.training)
        x = F.dropout(x, self.output_dropout, self.training)
        return x, torch.stack(final_h), torch.stack(final_c)

    def _drops_inside_stack(self) -> bool:
        """Whether a dropout acts inside the stack now (update dropout, or dropout
        between layers), so that the layers must run one by one."""
        return self.training and (
            self.update_dropout > 0 or (self.dropout > 0 and self.num_layers > 1)
        )

    @staticmethod
    def _pack_like(output: Tensor, like: PackedSequence) -> PackedSequence:
        """Pack ``output`` ``(T, B, H)`` (original batch order) with ``like``'s layout."""
        batch_sizes = like.batch_sizes
        if like.sorted_indices is not None:
            output = output.index_select(1, like.sorted_indices)
        # Sequence b (in sorted order) is present at step t iff b < batch_sizes[t].
        present = torch.arange(output.shape[1]).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B)
        data = output[present.to(output.device)]
        return PackedSequence(data, batch_sizes, like.sorted_indices, like.unsorted_indices)


class LSTM(_RecurrentSequence):
    r"""Multiplicatively gated LSTM; drop-in for ``torch.nn.LSTM`` (same state_dict).

    .. math::
        [i, f, o] = \sigma(\cdot),\; z = \tanh(W x + R h + b),\quad
        c' = f \odot c + z \odot i,\quad h' = \tanh(c') \odot o

    Arguments are those of ``torch.nn.LSTM`` (``proj_size`` only 0) plus the paper's
    ``input_dropout``, ``output_dropout``, ``update_dropout`` and ``forget_bias``.
    """

    cell_name = "lstm"


class SubLSTM(_RecurrentSequence):
    r"""Subtractively gated LSTM (Costa et al. 2017); API of ``torch.nn.LSTM``.

    .. math::
        [i, f, z, o] = \sigma(W x + R h + b),\quad c' = f \odot c + z - i,\quad
        h' = \sigma(c') - o

    Inhibitory gates ``i`` and ``o`` subtract from the excitatory ``z`` and
    ``sigma(c')``. Parameters as in ``torch.nn.LSTM``, gate blocks (i, f, z, o).
    """

    cell_name = "sublstm"


class FixSubLSTM(_RecurrentSequence):
    r"""subLSTM whose memory decay is a learned per-unit constant (Costa et al. 2017).

    .. math::
        [i, z, o] = \sigma(W x + R h + b),\quad f = \sigma(\phi),\quad
        c' = f \odot c + z - i,\quad h' = \sigma(c') - o

    Gate blocks (i, z, o); ``forget_l{k}`` holds ``phi`` ``(H,)``, initialised to
    ``forget_bias``.
    """

    cell_name = "fix_sublstm"


# -- single-step cells ------------------------------------------------------------------


class _RecurrentCell(_RecurrentParameters):
    """One step of a cell; API of ``torch.nn.LSTMCell``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        forget_bias: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bias = check_bool("bias", bias)
        self.forget_bias = check_finite_real("forget_bias", forget_bias)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self._make_parameters(
            "", self.input_size, self.hidden_size, self.bias, {"device": device, "dtype": dtype}
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights per gate block, zero biases, forget bias ``forget_bias``."""
        self._reset_suffix("", self.hidden_size, self.forget_bias)

    @property
    def weights(self) -> CellWeights:
        return self._weights("")

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def forward(
        self,
        input: Tensor,
        hx: HiddenState | None = None,
        update_mask: Tensor | None = None,
    ) -> HiddenState:
        """One step.

        Args:
            input: ``(N, H_in)`` or unbatched ``(H_in,)``.
            hx: optional ``(h, c)``, each ``(N, H)`` (unbatched ``(H,)``); zeros if ``None``.
            update_mask: optional update-dropout mask on ``z``, ``(N, H)``, already
                scaled by ``1/(1-p)``; keep it fixed over a sequence's steps.

        Returns:
            ``(h', c')``, each ``(N, H)`` (unbatched ``(H,)``).
        """
        reference = self.weight_ih
        check_tensor("input", input)
        if input.dim() not in (1, 2):
            raise ValueError(
                f"input must be 2-D (batched) or 1-D (unbatched), got {input.dim()}-D "
                f"of shape {tuple(input.shape)}"
            )
        check_matches_parameters("input", input, reference)
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be equal to input_size={self.input_size}, "
                f"got {input.shape[-1]}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            state = LSTMState(zeros, zeros)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(
                    f"hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}"
                )
            for name, tensor in zip(("h", "c"), hx):
                check_tensor(name, tensor)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"{name} must have shape {expected}, got {tuple(tensor.shape)}"
                    )
                check_matches_parameters(name, tensor, reference)
            state = LSTMState(hx[0], hx[1]) if batched else LSTMState(hx[0][None], hx[1][None])
        if update_mask is not None:
            check_tensor("update_mask", update_mask)
            if tuple(update_mask.shape) != expected:
                raise ValueError(
                    f"update_mask must have shape {expected}, got {tuple(update_mask.shape)}"
                )
            check_matches_parameters("update_mask", update_mask, reference)
            if not batched:
                update_mask = update_mask[None]
        _, new = self.cell.step(x, state, self.weights, update_mask)
        if not batched:
            return new.h[0], new.c[0]
        return new.h, new.c


class LSTMCell(_RecurrentCell):
    """One LSTM step; drop-in for ``torch.nn.LSTMCell`` (same state_dict)."""

    cell_name = "lstm"


class SubLSTMCell(_RecurrentCell):
    """One subLSTM step: ``c' = f*c + z - i``, ``h' = sigma(c') - o``; gates (i, f, z, o)."""

    cell_name = "sublstm"


class FixSubLSTMCell(_RecurrentCell):
    """One fix-subLSTM step (``f = sigma(phi)``, ``phi`` in ``forget``); gates (i, z, o)."""

    cell_name = "fix_sublstm"


# The module of each cell, keyed by the name it declares (``cell_name``, a key of CELLS).
_SEQUENCE_MODULES: dict[str, type[_RecurrentSequence]] = {
    module.cell_name: module for module in (LSTM, SubLSTM, FixSubLSTM)
}
_CELL_MODULES: dict[str, type[_RecurrentCell]] = {
    module.cell_name: module for module in (LSTMCell, SubLSTMCell, FixSubLSTMCell)
}


def make_rnn(cell: str, input_size: int, hidden_size: int, **kwargs) -> _RecurrentSequence:
    """Build :class:`LSTM`, :class:`SubLSTM` or :class:`FixSubLSTM` by cell name.

    ``kwargs`` are the modules' constructor arguments (``num_layers``, dropouts, ...).
    """
    return _SEQUENCE_MODULES[cell_kind(cell).name](input_size, hidden_size, **kwargs)


def make_cell(cell: str, input_size: int, hidden_size: int, **kwargs) -> _RecurrentCell:
    """Build :class:`LSTMCell`, :class:`SubLSTMCell` or :class:`FixSubLSTMCell` by name."""
    return _CELL_MODULES[cell_kind(cell).name](input_size, hidden_size, **kwargs)


def parameter_count(cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
    """Number of recurrent parameters of a unidirectional stack with biases.

    Used to match model sizes across cells (the paper's fix-subLSTM sizes 11/115/230/750
    match (sub)LSTM sizes 10/100/200/650).
    """
    kind = cell_kind(cell)
    total = 0
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else hidden_size
        gates = kind.num_gates * hidden_size
        total += gates * (layer_input + hidden_size + 2) + (
            hidden_size if kind.learned_decay else 0
        )
    return total
