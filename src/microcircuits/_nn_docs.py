"""The documentation text shared by the modules of :mod:`microcircuits.nn`.

The three sequence modules (and the three cells) have the same Args, Inputs, Outputs
and Attributes sections but for the gate blocks, their count, the decay parameter and
the kernels: one template each (:data:`SEQUENCE_SECTIONS`, :data:`CELL_SECTIONS`),
filled in per cell by :func:`documented` where a class's docstring says
``@sections@``, so that each class's docstring is complete for ``help()`` and the docs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .cells import CellKind, cell_kind

__all__ = ["CELL_SECTIONS", "SEQUENCE_SECTIONS", "documented"]

_T = TypeVar("_T")

# The keyword-only arguments of initialisation and placement, the same for the sequence
# modules and the cells.
_INIT_ARGS = r"""        forget_bias: (keyword-only) the initial @forget_what@.
            Default: 1
        weight_init: (keyword-only) ``"glorot_gates"`` (each gate block of the weights
            Glorot-uniform on its own) or ``"glorot_fused"`` (one Glorot-uniform kernel
            from ``[x, h]`` to all gates, as TensorFlow's ``LSTMCell``; a smaller bound).
            Default: ``"glorot_gates"``
        recurrent_gain: (keyword-only) factor on the Glorot-drawn ``weight_hh``
            (below 1: a contracting start, for long memories). Default: 1
        chrono_max: (keyword-only) if set (a number of steps > 2), chrono
            initialisation: each unit's @forget_what@ is drawn as
            ``log U(1, chrono_max - 1)`` in place of ``forget_bias`` (memory time
            constants up to ~``chrono_max`` steps), and the LSTM's input-gate bias is
            its negative. Default: ``None``
        device: (keyword-only) where the parameters are created. Default: torch's
        dtype: (keyword-only) the floating-point type of the parameters.
            Default: torch's
"""

SEQUENCE_SECTIONS = (
    r"""    With ``proj_size > 0`` every layer projects its hidden state, as
    ``torch.nn.LSTM`` does: the read-out above becomes :math:`h_t = W_{hr} h_t`, so
    :math:`h_t` (what the layer outputs and feeds back through ``weight_hh``) has
    ``proj_size`` features while the memory :math:`c_t` keeps ``hidden_size``.

    Args:
        input_size: The number of expected features in the input ``x``.
        hidden_size: The number of features of the memory ``c`` (and of ``h``, unless
            ``proj_size > 0``).
        num_layers: Number of recurrent layers. E.g., setting ``num_layers=2`` stacks
            two layers, the second taking the outputs of the first. Default: 1
        bias: If ``False``, the layers have no ``bias_ih`` and ``bias_hh``.
            Default: ``True``
        batch_first: If ``True``, the input and output tensors are
            ``(batch, seq, feature)`` instead of ``(seq, batch, feature)``. It does not
            apply to the hidden and cell states. Default: ``False``
        dropout: If non-zero, dropout with this probability on the outputs of each
            layer except the last (``torch.nn.LSTM``'s ``dropout``). Default: 0
        bidirectional: If ``True``, every layer also runs backward in time, and its
            output is the two directions' outputs concatenated. Default: ``False``
        proj_size: If ``> 0``, the hidden state of every layer is projected to
            ``proj_size`` features by ``weight_hr_l[k]``; it must be smaller than
            ``hidden_size``. Default: 0
        input_dropout: (keyword-only) dropout on the module's input (the paper's input
            dropout, e.g. on word embeddings). Default: 0
        output_dropout: (keyword-only) dropout on the output sequence (not on
            ``h_n``). Default: 0
        update_dropout: (keyword-only) dropout on the candidate ``z`` of every layer,
            one mask per sequence, kept over its steps (recurrent dropout without
            memory loss, Semeniuta et al. 2016). Default: 0
"""
    + _INIT_ARGS
    + r"""
    Inputs: input, (h_0, c_0)
        * **input**: tensor of shape ``(L, H_in)`` for unbatched input,
          ``(L, N, H_in)`` when ``batch_first=False`` or ``(N, L, H_in)`` when
          ``batch_first=True``; or a packed variable-length sequence (see
          :func:`torch.nn.utils.rnn.pack_padded_sequence` and
          :func:`torch.nn.utils.rnn.pack_sequence`).
        * **h_0**: tensor of shape ``(D * num_layers, H_out)`` for unbatched input or
          ``(D * num_layers, N, H_out)``: the initial hidden state of each layer and
          direction. Zeros if ``(h_0, c_0)`` is not given.
        * **c_0**: tensor of shape ``(D * num_layers, H_cell)`` for unbatched input or
          ``(D * num_layers, N, H_cell)``: the initial memory of each layer and
          direction. Zeros if ``(h_0, c_0)`` is not given.

        where::

            N = batch size
            L = sequence length
            D = 2 if bidirectional=True otherwise 1
            H_in = input_size
            H_cell = hidden_size
            H_out = proj_size if proj_size > 0 otherwise hidden_size

    Outputs: output, (h_n, c_n)
        * **output**: tensor of shape ``(L, D * H_out)`` for unbatched input,
          ``(L, N, D * H_out)`` when ``batch_first=False`` or ``(N, L, D * H_out)``
          when ``batch_first=True``: the last layer's :math:`h_t` for every ``t`` (the
          forward and reverse directions concatenated if bidirectional). For packed
          input, a packed sequence with the input's layout.
        * **h_n**: tensor of shape ``(D * num_layers, H_out)`` for unbatched input or
          ``(D * num_layers, N, H_out)``: the final hidden state of each layer and
          direction (for packed input, after each sequence's own last step).
        * **c_n**: tensor of shape ``(D * num_layers, H_cell)`` for unbatched input or
          ``(D * num_layers, N, H_cell)``: the final memory of each layer and
          direction.

    Attributes:
        weight_ih_l[k]: the input weights of layer ``k``, gate blocks @gates@ stacked:
            ``(@g@*hidden_size, input_size)`` for ``k = 0``, otherwise
            ``(@g@*hidden_size, D * H_out)``.
        weight_hh_l[k]: the recurrent weights of layer ``k``, blocks @gates@:
            ``(@g@*hidden_size, H_out)``.
        bias_ih_l[k]: the input biases of layer ``k``, ``(@g@*hidden_size)``.
        bias_hh_l[k]: the recurrent biases of layer ``k``, ``(@g@*hidden_size)``.
@forget_attribute@
        weight_hr_l[k]: the projection of layer ``k``, ``(proj_size, hidden_size)``;
            only with ``proj_size > 0``.
        weight_ih_l[k]_reverse: like ``weight_ih_l[k]``, for the reverse direction
            (this and the other ``*_reverse`` parameters only with
            ``bidirectional=True``).
        weight_hh_l[k]_reverse: like ``weight_hh_l[k]``, for the reverse direction.
        bias_ih_l[k]_reverse: like ``bias_ih_l[k]``, for the reverse direction.
        bias_hh_l[k]_reverse: like ``bias_hh_l[k]``, for the reverse direction.
@forget_reverse@
        weight_hr_l[k]_reverse: like ``weight_hr_l[k]``, for the reverse direction.

    The initialisation is the paper's, not ``torch.nn.LSTM``'s: Glorot-uniform
    weights, zero biases and the forget bias above (:meth:`reset_parameters`). All
    dropouts act in training mode only.

    Kernels (:mod:`microcircuits.kernels` picks one per call): @kernels@

"""
)

_FORGET_ATTRIBUTE = """\
        forget_l[k]: ``phi`` of layer ``k``, ``(hidden_size)``: each unit's memory
            decays by the factor ``f = sigmoid(phi)`` per step.
"""
_FORGET_REVERSE = """\
        forget_l[k]_reverse: like ``forget_l[k]``, for the reverse direction.
"""

CELL_SECTIONS = (
    r"""    Args:
        input_size: The number of expected features in the input ``x``.
        hidden_size: The number of features of the hidden state ``h`` and the
            memory ``c``.
        bias: If ``False``, the cell has no ``bias_ih`` and ``bias_hh``.
            Default: ``True``
"""
    + _INIT_ARGS
    + r"""
    Inputs: input, (h_0, c_0), update_mask
        * **input**: tensor of shape ``(N, H_in)`` or ``(H_in)`` (unbatched).
        * **h_0**: tensor of shape ``(N, H)`` or ``(H)``: the hidden state before the
          step. Zeros if ``(h_0, c_0)`` is not given.
        * **c_0**: tensor of shape ``(N, H)`` or ``(H)``: the memory before the step.
          Zeros if ``(h_0, c_0)`` is not given.
        * **update_mask** (optional): tensor of shape ``(N, H)`` or ``(H)`` that
          multiplies the candidate ``z`` (update dropout): already scaled by
          ``1 / (1 - p)``, and kept the same over a sequence's steps.

        where ``N`` is the batch size, ``H_in`` ``input_size`` and ``H``
        ``hidden_size``.

    Outputs: (h_1, c_1)
        * **h_1**: tensor of shape ``(N, H)`` or ``(H)``: the next hidden state.
        * **c_1**: tensor of shape ``(N, H)`` or ``(H)``: the next memory.

    Attributes:
        weight_ih: the input weights, gate blocks @gates@ stacked:
            ``(@g@*hidden_size, input_size)``.
        weight_hh: the recurrent weights, ``(@g@*hidden_size, hidden_size)``.
        bias_ih: the input biases, ``(@g@*hidden_size)``.
        bias_hh: the recurrent biases, ``(@g@*hidden_size)``.
@cell_forget_attribute@

    The initialisation is the paper's: Glorot-uniform weights, zero biases and the
    forget bias above (:meth:`reset_parameters`).

"""
)

_CELL_FORGET_ATTRIBUTE = """\
        forget: ``phi``, ``(hidden_size)``: each unit's memory decays by the factor
            ``f = sigmoid(phi)`` per step.
"""

_KERNELS = {
    "lstm": (
        "on the CPU,\n"
        "    without update dropout and packed input, the whole stack runs as one call of\n"
        "    ATen's LSTM, what ``torch.nn.LSTM`` runs (projections included); otherwise\n"
        "    the fused whole-sequence kernels, and with ``proj_size > 0`` the reference\n"
        "    path, the slow one (a few torch ops per step, differentiated by autograd)."
    ),
    "subtractive": (
        "the fused\n"
        "    whole-sequence kernels (CPU; CUDA with Triton); with ``proj_size > 0`` the\n"
        "    reference path, the slow one (a few torch ops per step, differentiated by\n"
        "    autograd)."
    ),
}


def _fill_in(template: str, kind: CellKind) -> str:
    """``template`` with the gate blocks, their count and the decay parameter of ``kind``."""
    decay = kind.learned_decay
    if decay:
        forget_what = "``phi`` (the decay is ``sigmoid(phi)``)"
    else:
        forget_what = "bias of the forget gate ``f`` (in ``bias_ih``)"
    values = {
        "@gates@": "(" + ", ".join(kind.gate_names) + ")",
        "@g@": str(kind.num_gates),
        "@forget_what@": forget_what,
        "@forget_attribute@\n": _FORGET_ATTRIBUTE if decay else "",
        "@forget_reverse@\n": _FORGET_REVERSE if decay else "",
        "@cell_forget_attribute@\n": _CELL_FORGET_ATTRIBUTE if decay else "",
        "@kernels@": _KERNELS["subtractive" if kind.subtractive else "lstm"],
    }
    for key, value in values.items():
        template = template.replace(key, value)
    return template


def documented(sections: str) -> Callable[[type[_T]], type[_T]]:
    """Put ``sections`` (Args, Inputs, Outputs, Attributes), filled in for the class's
    cell, where its docstring says ``@sections@``: one text for the three cells, each
    class's docstring complete for ``help()`` and the docs."""

    def decorate(cls: type[_T]) -> type[_T]:
        if cls.__doc__:  # None under python -OO
            text = _fill_in(sections, cell_kind(cls.cell_name))  # type: ignore[attr-defined]
            cls.__doc__ = cls.__doc__.replace("    @sections@\n", text)
        return cls

    return decorate
