r"""``nn.Module`` front ends with the API of ``torch.nn.LSTM`` and ``torch.nn.LSTMCell``.

The modules own parameters, check their inputs and run layers through
:func:`microcircuits.kernels.run_layer`; the equations themselves live in
:mod:`microcircuits.cells`.

Parameter names and gate order follow ``torch.nn.LSTM`` (``weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, with ``proj_size > 0`` also
``weight_hr_l{k}``, ``_reverse`` for the backward direction; gate blocks (i, f, z, o)),
so that :class:`LSTM`'s ``state_dict`` loads into ``torch.nn.LSTM`` and back.
:class:`FixSubLSTM` has three blocks (i, z, o) and one more parameter per layer,
``forget_l{k}`` (phi, the per-unit decay is sigma(phi)).

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

import functools
import inspect
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import kernels
from ._nn_docs import CELL_SECTIONS, SEQUENCE_SECTIONS, documented
from ._nn_parameters import (
    RecurrentParameters,
    check_chrono_max,
    check_recurrent_gain,
    check_weight_init,
)
from ._validation import (
    check_bool,
    check_finite_real,
    check_float_dtype,
    check_input,
    check_input_size,
    check_matches_parameters,
    check_pair,
    check_positive_int,
    check_probability,
    check_shaped,
)
from .cells import CellWeights, LSTMState, cell_kind

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


def _update_mask(p: float, batch: int, hidden: int, like: Tensor, training: bool) -> Tensor | None:
    """Scaled Bernoulli mask ``(B, H)`` for update dropout, or ``None`` when inactive."""
    if not training or p == 0.0:
        return None
    keep = 1.0 - p
    return torch.empty(batch, hidden, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep


class _RecurrentSequence(RecurrentParameters):
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
        weight_init: str = "glorot_gates",
        recurrent_gain: float = 1.0,
        chrono_max: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Check the arguments, create the parameters and initialise them
        (:meth:`reset_parameters`); the class's docstring describes the arguments."""
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral):
            raise ValueError(f"proj_size must be an int >= 0 (0: no projection), got {proj_size!r}")
        if not 0 <= proj_size < self.hidden_size:
            raise ValueError(
                f"proj_size={proj_size} must be 0 (no projection) or in [1, hidden_size="
                f"{self.hidden_size}) as in torch.nn.LSTM"
            )
        self.proj_size = int(proj_size)
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        self.update_dropout = check_probability("update_dropout", update_dropout)
        self.forget_bias = check_finite_real("forget_bias", forget_bias)
        self.weight_init = check_weight_init(weight_init)
        self.recurrent_gain = check_recurrent_gain(recurrent_gain)
        self.chrono_max = check_chrono_max(chrono_max)
        check_float_dtype(dtype)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers and has no effect with num_layers=1",
                stacklevel=2,
            )
        factory = {"device": device, "dtype": dtype}
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.output_size * self.num_directions
            for suffix in self._direction_suffixes(layer):
                self._make_parameters(
                    suffix, layer_input, self.hidden_size, self.bias, factory, self.proj_size
                )
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        """2 if bidirectional, else 1 (``D`` in the shapes)."""
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of ``h`` per direction: ``proj_size`` if it is > 0, else ``hidden_size``
        (``H_out`` in the shapes)."""
        return self.proj_size or self.hidden_size

    def _direction_suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def reset_parameters(self) -> None:
        """Initialise as in Costa et al. (2017): Glorot-uniform weights, zero biases,
        forget-gate bias (or fix-subLSTM's phi) equal to ``forget_bias`` (1 by default).

        With ``weight_init="glorot_gates"`` (the default) Glorot's bound is computed per
        gate block (fan-out ``H``), since each block is its own linear map; with
        ``"glorot_fused"`` once for the kernel mapping ``[x, h]`` to all gates, as
        TensorFlow's ``LSTMCell`` does; ``recurrent_gain`` then scales ``weight_hh``
        (spectral radius ~``recurrent_gain`` per gate block). ``weight_hr``
        (``proj_size > 0``) is Glorot-uniform as a whole. The forget bias sits in
        ``bias_ih`` (``bias_hh`` is zero). With ``chrono_max`` set, each unit's forget
        bias (phi) is drawn as ``log U(1, chrono_max - 1)`` instead (chrono
        initialisation, Tallec & Ollivier 2018: memory time constants from ~1 to
        ~``chrono_max`` steps) and the LSTM's input-gate bias is its negative. Neither
        is ``torch.nn.LSTM``'s scheme (uniform in +-1/sqrt(hidden_size)); override this
        method, or re-initialise parameters after construction, for another one.
        """
        for layer in range(self.num_layers):
            for suffix in self._direction_suffixes(layer):
                self._reset_suffix(suffix, self.hidden_size)

    def layer_weights(self, layer: int, reverse: bool = False) -> CellWeights:
        """The parameters of one layer and direction as :class:`CellWeights` (the
        projection ``weight_hr``, if any, apart: :meth:`layer_projection`)."""
        return self._weights(self._suffix(layer, reverse))

    def layer_projection(self, layer: int, reverse: bool = False) -> Tensor | None:
        """``weight_hr_l{layer}`` (``_reverse``) ``(proj_size, hidden_size)``, or ``None``
        when ``proj_size`` is 0. :meth:`layer_weights` leaves it out: a layer's cell reads
        the projected ``h`` through ``weight_hh`` ``(G*hidden_size, proj_size)``."""
        return self._projection(self._suffix(layer, reverse))

    def _suffix(self, layer: int, reverse: bool) -> str:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < self.num_layers
        ):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if reverse and not self.bidirectional:
            raise ValueError("reverse=True needs a bidirectional module")
        return self._direction_suffixes(layer)[int(reverse)]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """Parameters per layer and direction, as ``torch.nn.LSTM.all_weights`` lists them
        (``weight_ih, weight_hh[, bias_ih, bias_hh][, forget][, weight_hr]``)."""
        return [
            [p for p in (*self._weights(suffix), self._projection(suffix)) if p is not None]
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
        for name, default in _constructor_defaults().items():
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value!r}" if isinstance(value, str) else f", {name}={value}"
        return text

    # -- forward -------------------------------------------------------------------

    def _check_hidden(self, hx: object, batch: int | None, reference: Tensor) -> HiddenState:
        """Validate ``hx = (h_0, c_0)``; ``batch is None`` means unbatched input."""
        pair = check_pair("hx", hx, "a tuple (h_0, c_0)")
        stacked = self.num_layers * self.num_directions
        rows = (stacked,) if batch is None else (stacked, batch)
        layout = "num_layers * num_directions, " + ("" if batch is None else "batch, ")
        sizes = (
            (self.output_size, "proj_size" if self.proj_size else "hidden_size"),
            (self.hidden_size, "hidden_size"),
        )
        h0, c0 = (
            check_shaped(name, tensor, (*rows, size), reference, layout + size_name)
            for name, tensor, (size, size_name) in zip(("h_0", "c_0"), pair, sizes)
        )
        return h0, c0

    def forward(
        self, input: Tensor | PackedSequence, hx: HiddenState | None = None
    ) -> tuple[Tensor | PackedSequence, HiddenState]:
        """Run the network over a sequence (the class's docstring has the details).

        Args:
            input: ``(L, N, H_in)`` (``(N, L, H_in)`` if ``batch_first``), unbatched
                ``(L, H_in)``, or a ``PackedSequence``.
            hx: optional ``(h_0, c_0)``, ``(D * num_layers, N, H_out)`` and
                ``(D * num_layers, N, H_cell)`` (unbatched: without ``N``); zeros when
                ``None``. ``D`` is 2 if bidirectional else 1, ``H_cell`` is
                ``hidden_size``, ``H_out`` is ``proj_size`` if it is > 0 else
                ``hidden_size``.

        Returns:
            ``output`` ``(L, N, D * H_out)`` (batch-first or packed like the input) with
            the last layer's ``h_t`` for every ``t``, and ``(h_n, c_n)``,
            ``(D * num_layers, N, H_out)`` and ``(D * num_layers, N, H_cell)``, the state
            after each sequence's last step.
        """
        reference = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            check_matches_parameters("input", input.data, reference)
            x, lengths = pad_packed_sequence(input)  # (T, B, I), original batch order
            check_input_size(x.shape[-1], self.input_size)
            batched = True
        else:
            batched = check_input(input, self.input_size, reference, batched_dim=3)
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[0] == 0:  # RuntimeError, as torch.nn.LSTM raises for it
            raise RuntimeError(
                f"input has sequence length 0 (shape {tuple(input.shape)}); a recurrent "
                "network needs at least one step (torch.nn.LSTM: 'Expected sequence length "
                "to be larger than 0 in RNN')"
            )
        batch = x.shape[1]
        if hx is None:
            stacked = self.num_layers * self.num_directions
            c0 = x.new_zeros(stacked, batch, self.hidden_size)
            h0 = c0 if not self.proj_size else x.new_zeros(stacked, batch, self.proj_size)
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
        """Time-major core: ``x`` ``(T, B, I)``, ``h0`` ``(L*D, B, H_out)``, ``c0``
        ``(L*D, B, H)``."""
        kind = self.cell
        batch = x.shape[1]
        x = F.dropout(x, self.input_dropout, self.training)
        suffixes = [  # nn.LSTM's order: layer-major, forward before reverse
            suffix for layer in range(self.num_layers) for suffix in self._direction_suffixes(layer)
        ]
        layers = [self._weights(suffix) for suffix in suffixes]
        projections = [self._projection(suffix) for suffix in suffixes]
        if not self._drops_inside_stack():
            whole = kernels.run_stack(
                kind,
                x,
                h0,
                c0,
                layers,
                bidirectional=self.num_directions == 2,
                lengths=lengths,
                projections=projections if self.proj_size else None,
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
                    weight_hr=projections[index],
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


@functools.cache
def _constructor_defaults() -> dict[str, object]:
    """The defaults of :class:`_RecurrentSequence`'s arguments (sizes and factory
    arguments aside): its ``extra_repr`` names only the arguments that differ."""
    parameters = inspect.signature(_RecurrentSequence.__init__).parameters
    skip = {"self", "input_size", "hidden_size", "device", "dtype"}
    return {name: p.default for name, p in parameters.items() if name not in skip}


@documented(SEQUENCE_SECTIONS)
class LSTM(_RecurrentSequence):
    r"""Multi-layer LSTM; a drop-in for ``torch.nn.LSTM`` (its arguments, inputs, outputs
    and ``state_dict``), with the paper's dropouts and initialisation.

    For each element of the input sequence each layer computes

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        z_t = \tanh(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot z_t \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    where :math:`h_t` is the hidden state at time ``t``, :math:`c_t` the memory,
    :math:`x_t` the input (for the layers after the first, the previous layer's
    :math:`h_t`, with dropout ``dropout`` in training), :math:`i_t, f_t, o_t` the input,
    forget and output gates and :math:`z_t` the candidate (``torch.nn.LSTM``'s
    :math:`g_t`); :math:`\sigma` is the logistic sigmoid and :math:`\odot` the
    elementwise product. Gates multiply: this is the LSTM the paper compares its
    subtractive cells with (:class:`SubLSTM`, :class:`FixSubLSTM`).

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import LSTM
        >>> rnn = LSTM(10, 20, num_layers=2)
        >>> x = torch.randn(5, 3, 10)  # (L, N, H_in)
        >>> h0, c0 = torch.zeros(2, 3, 20), torch.zeros(2, 3, 20)
        >>> output, (hn, cn) = rnn(x, (h0, c0))
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]), torch.Size([2, 3, 20]))

        ``torch.nn.LSTM``'s weights load as they are, projections included, and give
        its outputs:

        >>> reference = torch.nn.LSTM(10, 20, proj_size=4, bidirectional=True)
        >>> rnn = LSTM(10, 20, proj_size=4, bidirectional=True)
        >>> rnn.load_state_dict(reference.state_dict())
        <All keys matched successfully>
        >>> output, (hn, cn) = rnn(x)
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([5, 3, 8]), torch.Size([2, 3, 4]), torch.Size([2, 3, 20]))
        >>> torch.allclose(output, reference(x)[0], atol=1e-6)
        True
    """

    cell_name = "lstm"


@documented(SEQUENCE_SECTIONS)
class SubLSTM(_RecurrentSequence):
    r"""Multi-layer subtractively gated LSTM (subLSTM, Costa et al. 2017) with the API of
    ``torch.nn.LSTM``.

    For each element of the input sequence each layer computes

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + z_t - i_t \\
        h_t = \sigma(c_t) - o_t
        \end{array}

    where :math:`h_t` is the hidden state at time ``t``, :math:`c_t` the memory,
    :math:`x_t` the input (for the layers after the first, the previous layer's
    :math:`h_t`, with dropout ``dropout`` in training), :math:`\sigma` the logistic
    sigmoid and :math:`\odot` the elementwise product. Every gate is a sigmoid, and
    inhibition subtracts: the input gate :math:`i_t` from the excitatory candidate
    :math:`z_t`, the output gate :math:`o_t` from the excitatory read-out
    :math:`\sigma(c_t)` -- the paper's model of a cortical microcircuit, where
    inhibitory interneurons subtract from pyramidal cells' input and output.

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import SubLSTM
        >>> rnn = SubLSTM(10, 20, num_layers=2, batch_first=True)
        >>> x = torch.randn(3, 5, 10)  # (N, L, H_in)
        >>> output, (hn, cn) = rnn(x)  # zero initial state
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([3, 5, 20]), torch.Size([2, 3, 20]), torch.Size([2, 3, 20]))
        >>> bool(torch.all(output.abs() < 1))  # sigma(c) - o lies in (-1, 1)
        True

        Sequences of different lengths, packed; projected hidden states:

        >>> from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence
        >>> rnn = SubLSTM(10, 20, proj_size=6)
        >>> packed = pack_sequence([torch.randn(7, 10), torch.randn(4, 10)])
        >>> output, (hn, cn) = rnn(packed)
        >>> padded, lengths = pad_packed_sequence(output)
        >>> padded.shape, lengths, hn.shape, cn.shape
        (torch.Size([7, 2, 6]), tensor([7, 4]), torch.Size([1, 2, 6]), torch.Size([1, 2, 20]))
        >>> rnn.weight_hh_l0.shape, rnn.weight_hr_l0.shape
        (torch.Size([80, 6]), torch.Size([6, 20]))
    """

    cell_name = "sublstm"


@documented(SEQUENCE_SECTIONS)
class FixSubLSTM(_RecurrentSequence):
    r"""Multi-layer fix-subLSTM (Costa et al. 2017): a subLSTM whose memory decay is a
    learned constant of each unit, not a gate; API of ``torch.nn.LSTM``.

    For each element of the input sequence each layer computes

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        f = \sigma(\phi) \\
        c_t = f \odot c_{t-1} + z_t - i_t \\
        h_t = \sigma(c_t) - o_t
        \end{array}

    where :math:`h_t` is the hidden state at time ``t``, :math:`c_t` the memory,
    :math:`x_t` the input (for the layers after the first, the previous layer's
    :math:`h_t`, with dropout ``dropout`` in training), :math:`\sigma` the logistic
    sigmoid and :math:`\odot` the elementwise product. The decay :math:`f` depends on
    neither input nor state: :math:`\phi` (``forget_l[k]``) is a parameter of each
    unit, so the weights have three gate blocks (i, z, o) instead of four.

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import FixSubLSTM
        >>> rnn = FixSubLSTM(10, 20)
        >>> rnn.weight_ih_l0.shape, rnn.weight_hh_l0.shape, rnn.forget_l0.shape
        (torch.Size([60, 10]), torch.Size([60, 20]), torch.Size([20]))
        >>> torch.sigmoid(rnn.forget_l0[:3].detach())  # initial decay sigmoid(forget_bias)
        tensor([0.7311, 0.7311, 0.7311])
        >>> output, (hn, cn) = rnn(torch.randn(5, 10))  # unbatched (L, H_in)
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([5, 20]), torch.Size([1, 20]), torch.Size([1, 20]))

        A sequence can continue from where the previous one stopped:

        >>> x = torch.randn(8, 2, 10)
        >>> whole, _ = rnn(x)
        >>> first, state = rnn(x[:5])
        >>> rest, _ = rnn(x[5:], state)
        >>> torch.allclose(torch.cat([first, rest]), whole, atol=1e-6)
        True
    """

    cell_name = "fix_sublstm"


# -- single-step cells ------------------------------------------------------------------


class _RecurrentCell(RecurrentParameters):
    """One step of a cell; API of ``torch.nn.LSTMCell``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        forget_bias: float = 1.0,
        weight_init: str = "glorot_gates",
        recurrent_gain: float = 1.0,
        chrono_max: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Check the arguments, create the parameters and initialise them
        (:meth:`reset_parameters`); the class's docstring describes the arguments."""
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bias = check_bool("bias", bias)
        self.forget_bias = check_finite_real("forget_bias", forget_bias)
        self.weight_init = check_weight_init(weight_init)
        self.recurrent_gain = check_recurrent_gain(recurrent_gain)
        self.chrono_max = check_chrono_max(chrono_max)
        check_float_dtype(dtype)
        self._make_parameters(
            "", self.input_size, self.hidden_size, self.bias, {"device": device, "dtype": dtype}
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights (per gate block, or fused: ``weight_init``; ``weight_hh``
        times ``recurrent_gain``), zero biases,
        forget bias ``forget_bias`` (or drawn: ``chrono_max``; see the sequence module's
        ``reset_parameters``)."""
        self._reset_suffix("", self.hidden_size)

    @property
    def weights(self) -> CellWeights:
        """The parameters as :class:`~microcircuits.cells.CellWeights` (for the step
        functions of :mod:`microcircuits.cells`)."""
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
        batched = check_input(input, self.input_size, reference, batched_dim=2)
        x = input if batched else input.unsqueeze(0)
        expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            state = LSTMState(zeros, zeros)
        else:
            h, c = (
                check_shaped(name, tensor, expected, reference)
                for name, tensor in zip(("h", "c"), check_pair("hx", hx, "a tuple (h, c)"))
            )
            state = LSTMState(h, c) if batched else LSTMState(h[None], c[None])
        if update_mask is not None:
            check_shaped("update_mask", update_mask, expected, reference)
            if not batched:
                update_mask = update_mask[None]
        _, new = self.cell.step(x, state, self.weights, update_mask)
        if not batched:
            return new.h[0], new.c[0]
        return new.h, new.c


@documented(CELL_SECTIONS)
class LSTMCell(_RecurrentCell):
    r"""One LSTM step; a drop-in for ``torch.nn.LSTMCell`` (its arguments, inputs,
    outputs and ``state_dict``).

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}) \\
        z = \tanh(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = f \odot c + i \odot z \\
        h' = o \odot \tanh(c')
        \end{array}

    where :math:`\sigma` is the logistic sigmoid and :math:`\odot` the elementwise
    product (the equations of :class:`LSTM`, one step at a time).

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import LSTMCell
        >>> reference = torch.nn.LSTMCell(10, 20)
        >>> cell = LSTMCell(10, 20)
        >>> cell.load_state_dict(reference.state_dict())
        <All keys matched successfully>
        >>> x, h, c = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
        >>> h1, c1 = cell(x, (h, c))
        >>> h1.shape, c1.shape
        (torch.Size([3, 20]), torch.Size([3, 20]))
        >>> torch.allclose(h1, reference(x, (h, c))[0], atol=1e-6)
        True
    """

    cell_name = "lstm"


@documented(CELL_SECTIONS)
class SubLSTMCell(_RecurrentCell):
    r"""One subLSTM step (Costa et al. 2017) with the API of ``torch.nn.LSTMCell``.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}) \\
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = f \odot c + z - i \\
        h' = \sigma(c') - o
        \end{array}

    where :math:`\sigma` is the logistic sigmoid and :math:`\odot` the elementwise
    product (the equations of :class:`SubLSTM`, one step at a time).

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import SubLSTMCell
        >>> cell = SubLSTMCell(10, 20)
        >>> x = torch.randn(6, 3, 10)  # (time, batch, input_size)
        >>> h, c = torch.zeros(3, 20), torch.zeros(3, 20)
        >>> outputs = []
        >>> for x_t in x:
        ...     h, c = cell(x_t, (h, c))
        ...     outputs.append(h)
        >>> torch.stack(outputs).shape
        torch.Size([6, 3, 20])
    """

    cell_name = "sublstm"


@documented(CELL_SECTIONS)
class FixSubLSTMCell(_RecurrentCell):
    r"""One fix-subLSTM step (Costa et al. 2017) with the API of ``torch.nn.LSTMCell``.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = \sigma(\phi) \odot c + z - i \\
        h' = \sigma(c') - o
        \end{array}

    where :math:`\sigma` is the logistic sigmoid, :math:`\odot` the elementwise product
    and :math:`\phi` the parameter ``forget`` (the equations of :class:`FixSubLSTM`,
    one step at a time).

    @sections@
    Examples::

        >>> import torch
        >>> from microcircuits import FixSubLSTMCell
        >>> cell = FixSubLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(10))  # unbatched, zero state
        >>> h.shape, c.shape
        (torch.Size([20]), torch.Size([20]))

        Update dropout: one scaled mask on the candidate ``z``, the same at every step:

        >>> mask = torch.bernoulli(torch.full((3, 20), 0.75)) / 0.75
        >>> h, c = torch.zeros(3, 20), torch.zeros(3, 20)
        >>> for x_t in torch.randn(4, 3, 10):
        ...     h, c = cell(x_t, (h, c), mask)
        >>> h.shape
        torch.Size([3, 20])
    """

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

    ``cell`` is a name of :data:`microcircuits.CELLS` (any case, aliases such as
    ``"fix-sublstm"`` too); ``kwargs`` are the modules' constructor arguments
    (``num_layers``, ``proj_size``, dropouts, ...).

    Examples::

        >>> from microcircuits import make_rnn
        >>> make_rnn("fix-subLSTM", 10, 20, num_layers=2, update_dropout=0.25)
        FixSubLSTM(10, 20, num_layers=2, update_dropout=0.25)
    """
    return _SEQUENCE_MODULES[cell_kind(cell).name](input_size, hidden_size, **kwargs)


def make_cell(cell: str, input_size: int, hidden_size: int, **kwargs) -> _RecurrentCell:
    """Build :class:`LSTMCell`, :class:`SubLSTMCell` or :class:`FixSubLSTMCell` by name.

    Examples::

        >>> from microcircuits import make_cell
        >>> make_cell("sublstm", 10, 20, bias=False)
        SubLSTMCell(10, 20, bias=False)
    """
    return _CELL_MODULES[cell_kind(cell).name](input_size, hidden_size, **kwargs)


def parameter_count(
    cell: str, input_size: int, hidden_size: int, num_layers: int = 1, proj_size: int = 0
) -> int:
    """Number of recurrent parameters of a unidirectional stack with biases.

    Used to match model sizes across cells (the paper's fix-subLSTM sizes 11/115/230/750
    match (sub)LSTM sizes 10/100/200/650). ``proj_size > 0`` counts ``weight_hr`` and
    the narrower recurrent and next-layer input weights.

    Examples::

        >>> parameter_count("lstm", 10, 20) == sum(
        ...     p.numel() for p in torch.nn.LSTM(10, 20).parameters()
        ... )
        True
        >>> parameter_count("fix_sublstm", 10, 20, num_layers=2, proj_size=5) == sum(
        ...     p.numel() for p in FixSubLSTM(10, 20, num_layers=2, proj_size=5).parameters()
        ... )
        True
    """
    kind = cell_kind(cell)
    output_size = proj_size or hidden_size
    total = 0
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else output_size
        gates = kind.num_gates * hidden_size
        total += gates * (layer_input + output_size + 2) + (
            hidden_size if kind.learned_decay else 0
        )
        total += proj_size * hidden_size
    return total
