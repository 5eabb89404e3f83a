"""The tasks' models: a recurrent stack or an ELM neuron under each task's head.

The last-step tasks (adding, sequential MNIST) build their model with
:func:`make_last_step_model`, which asks the family of ``config.cell``
(:data:`~microcircuits.model_registry.MODELS`) for its builder in
:data:`LAST_STEP_BUILDERS`: the LSTM-family cells become a recurrent stack
(:func:`make_recurrent_stack`) under a linear readout (:class:`LastStepReadout`); the ELM
becomes :class:`ELMLastStep`, whose own readout is the task's. A new family (e.g. a
canonical-microcircuit model) adds an entry to the registry and a builder here. The
language model wraps an LSTM-family stack only.

The image tasks (static MNIST) build theirs with :func:`make_image_model` from
:data:`IMAGE_BUILDERS`: the canonical microcircuit (:func:`make_cmc`, a
:class:`~microcircuits.CMCNode` or :class:`~microcircuits.CMCHierarchy` from the
``cmc_*`` fields) or the one-hidden-layer :class:`MLPClassifier` baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..cmc import CMCHierarchy, CMCNode
from ..config import ExperimentConfig
from ..elm import ELM
from ..model_registry import LSTM_FAMILY, model_kind
from ..nn import make_rnn
from .cross_entropy import linear_cross_entropy

__all__ = [
    "ELMLastStep",
    "IMAGE_BUILDERS",
    "LAST_STEP_BUILDERS",
    "LanguageModel",
    "LastStepReadout",
    "MLPClassifier",
    "SummedLayerStack",
    "make_cmc",
    "make_elm",
    "make_image_model",
    "make_last_step_model",
    "make_recurrent_stack",
]


def make_recurrent_stack(config: ExperimentConfig, input_size: int) -> nn.Module:
    """The recurrent stack of ``config`` (cell, sizes, the paper's three dropouts).

    With ``skip_connections`` and more than one layer, a :class:`SummedLayerStack` of
    one-layer stacks (the same parameters, differently named); otherwise one module
    with the API of ``torch.nn.LSTM``.

    Returns:
        A time-major module: ``(x, (h0, c0) | None) -> (output, (h_n, c_n))``.
    """
    kwargs = dict(
        forget_bias=config.forget_bias,
        weight_init=config.weight_init,
        recurrent_gain=config.recurrent_gain,
        chrono_max=config.chrono_max,
        update_dropout=config.update_dropout,
    )
    if config.skip_connections and config.num_layers > 1:
        layers = [
            make_rnn(
                config.cell,
                input_size if index == 0 else config.hidden_size,
                config.hidden_size,
                input_dropout=config.input_dropout if index == 0 else config.dropout,
                **kwargs,
            )
            for index in range(config.num_layers)
        ]
        return SummedLayerStack(layers, output_dropout=config.output_dropout)
    return make_rnn(
        config.cell,
        input_size,
        config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        output_dropout=config.output_dropout,
        **kwargs,
    )


class SummedLayerStack(nn.Module):
    """Stacked recurrent layers whose output is the sum of every layer's output.

    Layer ``k`` reads layer ``k - 1``'s output; the stack's output at each step is
    ``h^1_t + ... + h^L_t`` (then output dropout), so the readout sees every depth and
    its gradient reaches each layer directly. This is ``SkipMultiRNNCell``, the default
    multi-layer LSTM of DeepMind's ``lamb`` (the code of Melis et al. 2017, whose input,
    output and update dropouts the paper's Tables 2 and 3 tune).

    Args:
        layers: one-layer time-major stacks (e.g. :func:`~microcircuits.make_rnn` with
            ``num_layers=1``), all with the same hidden size; each applies its own input
            dropout (the first: the embeddings'; the others: dropout between layers)
            and update dropout.
        output_dropout: dropout on the summed output sequence.
    """

    def __init__(self, layers: list[nn.Module], output_dropout: float = 0.0) -> None:
        super().__init__()
        if not layers:
            raise ValueError("SummedLayerStack needs at least one layer, got none")
        sizes = {layer.hidden_size for layer in layers}
        if len(sizes) != 1:
            raise ValueError(f"SummedLayerStack needs one hidden size, got {sorted(sizes)}")
        self.layers = nn.ModuleList(layers)
        self.hidden_size = sizes.pop()
        self.num_layers = len(layers)
        self.output_dropout = output_dropout

    def forward(
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``(T, B, I)``; ``hx``: ``(h0, c0)``, each ``(L, B, H)``, or ``None``
        (zeros). Returns the summed output ``(T, B, H)`` and ``(h_n, c_n)``, each
        ``(L, B, H)``."""
        if hx is not None and (
            hx[0].shape[0] != self.num_layers or hx[1].shape[0] != self.num_layers
        ):
            raise ValueError(
                f"hx must hold {self.num_layers} layers' states, got h0 {tuple(hx[0].shape)} "
                f"and c0 {tuple(hx[1].shape)}"
            )
        total: Tensor | None = None
        final_h, final_c = [], []
        for index, layer in enumerate(self.layers):
            state = None if hx is None else (hx[0][index : index + 1], hx[1][index : index + 1])
            x, (h_n, c_n) = layer(x, state)
            total = x if total is None else total + x
            final_h.append(h_n)
            final_c.append(c_n)
        assert total is not None
        output = nn.functional.dropout(total, self.output_dropout, self.training)
        return output, (torch.cat(final_h), torch.cat(final_c))


class LastStepReadout(nn.Module):
    """A recurrent stack read out by a linear layer at the last step.

    Used by the adding task (1 output, regression) and sequential MNIST (10 classes).

    Args:
        rnn: time-major recurrent stack with ``hidden_size`` outputs.
        hidden_size: its output size.
        out_features: readout size.
    """

    def __init__(self, rnn: nn.Module, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(hidden_size, out_features)
        nn.init.xavier_uniform_(self.readout.weight)  # Glorot, as the paper's weights
        nn.init.zeros_(self.readout.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``(T, B, I)`` to the readout of the last step, ``(B, out_features)``."""
        output, _ = self.rnn(x)  # (T, B, H)
        return self.readout(output[-1])


def make_elm(config: ExperimentConfig, input_size: int, output_size: int) -> ELM:
    """The ELM neuron of ``config`` (its ``elm_*`` fields; ``hidden_size`` memory units).

    Time-major, as the recurrent stacks. A Branch-ELM (``elm_num_branch`` set) routes its
    synapses with ``elm_routing``.
    """
    return ELM(
        input_size,
        output_size,
        num_memory=config.hidden_size,
        version=config.elm_version,
        lambda_value=config.elm_lambda,
        mlp_num_layers=config.elm_mlp_num_layers,
        mlp_hidden_size=config.elm_mlp_hidden_size,
        trace_tau=config.elm_trace_tau,
        memory_tau_min=config.elm_memory_tau_min,
        memory_tau_max=config.elm_memory_tau_max,
        learn_memory_tau=config.elm_learn_memory_tau,
        num_branch=config.elm_num_branch,
        num_synapse_per_branch=config.elm_synapses_per_branch,
        input_to_synapse_routing=config.elm_routing,
    )


class ELMLastStep(nn.Module):
    """An ELM neuron whose output at the last step is the task's output.

    The ELM's own linear readout ``y_t = W_y m_t + b_y`` of its memory is the task's
    readout (no second linear layer), initialised as in the published code.

    Args:
        elm: a time-major :class:`~microcircuits.elm.ELM` with ``out_features`` outputs.
    """

    def __init__(self, elm: ELM) -> None:
        super().__init__()
        self.elm = elm

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``(T, B, I)`` to the ELM's output at the last step, ``(B, O)``."""
        output, _ = self.elm(x)  # (T, B, O)
        return output[-1]


def _lstm_last_step(config: ExperimentConfig, input_size: int, out_features: int) -> nn.Module:
    rnn = make_recurrent_stack(config, input_size)
    return LastStepReadout(rnn, config.hidden_size, out_features)


def _elm_last_step(config: ExperimentConfig, input_size: int, out_features: int) -> nn.Module:
    return ELMLastStep(make_elm(config, input_size, out_features))


LastStepBuilder = Callable[[ExperimentConfig, int, int], nn.Module]

LAST_STEP_BUILDERS: dict[str, LastStepBuilder] = {
    LSTM_FAMILY: _lstm_last_step,
    "elm": _elm_last_step,
}
"""For each model family, ``build(config, input_size, out_features)``: the model of a
task read out at the last step."""


def make_last_step_model(config: ExperimentConfig, input_size: int, out_features: int) -> nn.Module:
    """The model of ``config.cell`` for a task read out at the last step.

    Args:
        config: the run's config (cell and its family's fields).
        input_size: input features per step.
        out_features: outputs at the last step (1 for adding, 10 classes for sMNIST).

    Returns:
        A module mapping ``(T, B, input_size)`` to ``(B, out_features)``.
    """
    return LAST_STEP_BUILDERS[model_kind(config.cell).family](config, input_size, out_features)


def make_cmc(config: ExperimentConfig, input_size: int, output_size: int) -> CMCNode | CMCHierarchy:
    """The canonical microcircuit of ``config``: a :class:`~microcircuits.CMCNode` of
    ``hidden_size`` columns (``cell="cmc"``) or a :class:`~microcircuits.CMCHierarchy` of
    ``hidden_size`` nodes in ``cmc_levels`` equal levels (``cell="cmc_hierarchy"``; None:
    a chain), solver from ``cmc_*``."""
    solver = dict(
        integration_time=config.cmc_integration_time,
        num_readout_times=config.cmc_num_readout_times,
        method=config.cmc_method,
        step_size=config.cmc_step_size,
        rtol=config.cmc_rtol,
        atol=config.cmc_atol,
        adjoint=config.cmc_adjoint,
        input_scale=config.cmc_input_scale,
        learn_dynamics=config.cmc_learn_dynamics,
    )
    if model_kind(config.cell).name == "cmc_hierarchy":
        count = config.cmc_levels or config.hidden_size  # None: a chain of single nodes
        levels = (config.hidden_size // count,) * count
        return CMCHierarchy(input_size, output_size, levels, readout=config.cmc_readout, **solver)
    return CMCNode(input_size, output_size, num_columns=config.hidden_size, **solver)


class MLPClassifier(nn.Module):
    """``Linear -> ReLU -> Linear``: the baseline of a parameter count near the CMC's.

    Args:
        input_size: numbers per image.
        hidden_size: hidden units.
        output_size: classes.

    Input: images ``(B, ...)`` with ``input_size`` numbers each. Output: ``(B, output_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, output_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.readout(torch.relu(self.hidden(images.flatten(1))))


ImageBuilder = Callable[[ExperimentConfig, int, int], nn.Module]

IMAGE_BUILDERS: dict[str, ImageBuilder] = {
    "cmc": make_cmc,
    "mlp": lambda config, inputs, outputs: MLPClassifier(inputs, config.hidden_size, outputs),
}
"""For each model family that classifies whole images, ``build(config, input_size,
out_features)``."""


def make_image_model(config: ExperimentConfig, input_size: int, out_features: int) -> nn.Module:
    """The model of ``config.cell`` for an image task: ``(B, ...)`` images, ``input_size``
    numbers each, to ``(B, out_features)`` logits."""
    return IMAGE_BUILDERS[model_kind(config.cell).family](config, input_size, out_features)


class LanguageModel(nn.Module):
    """Embedding -> recurrent stack -> linear decoder over the vocabulary.

    The embedding size equals the hidden size unless given. Input dropout (on the
    embeddings) and output dropout (before the decoder) are the recurrent stack's
    ``input_dropout`` and ``output_dropout``; update dropout acts inside its cells.

    Args:
        rnn: time-major recurrent stack, input size ``embedding_size``, output size
            ``hidden_size``.
        vocab_size: number of words.
        hidden_size: hidden size (the decoder's input).
        embedding_size: word-vector size; ``None``: ``hidden_size``.
        tie_embeddings: the decoder's weight is the embedding matrix (one parameter,
            ``(V, H)``; its gradient is the sum of both uses); needs ``embedding_size``
            equal to ``hidden_size``.
    """

    def __init__(
        self,
        rnn: nn.Module,
        vocab_size: int,
        hidden_size: int,
        embedding_size: int | None = None,
        *,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        embedding_size = embedding_size or hidden_size
        if tie_embeddings and embedding_size != hidden_size:
            raise ValueError(
                f"tie_embeddings needs embedding_size == hidden_size, got {embedding_size} "
                f"and {hidden_size}"
            )
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = rnn
        self.decoder = nn.Linear(hidden_size, vocab_size)
        # Small uniform embeddings (as in Zaremba et al. 2014); Glorot decoder as the
        # paper's weights (tied: the embedding's init); zero output bias.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.xavier_uniform_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)
        if tie_embeddings:
            self.decoder.weight = self.embedding.weight

    def forward(
        self,
        tokens: Tensor,
        hidden: tuple[Tensor, Tensor] | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Next-token logits, or with ``targets`` the training loss.

        Args:
            tokens: ``(T, B)`` int64 token ids.
            hidden: ``(h, c)``, each ``(num_layers, B, H)``, or ``None`` for zeros.
            targets: ``(T, B)`` int64 next-token ids, or ``None``.

        Returns:
            ``logits`` ``(T, B, V)`` and the final ``(h, c)``; with ``targets``, the mean
            next-token cross-entropy over the ``T * B`` tokens (a scalar, by the fused
            :func:`~microcircuits.tasks.cross_entropy.linear_cross_entropy`: the logits
            are never kept) in place of the logits.
        """
        embedded = self.embedding(tokens)  # (T, B, H)
        output, hidden = self.rnn(embedded, hidden)  # (T, B, H)
        if targets is None:
            return self.decoder(output), hidden
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets must have the shape of tokens {tuple(tokens.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        features = output.reshape(-1, output.shape[-1])  # (T*B, H)
        loss = linear_cross_entropy(
            features, self.decoder.weight, self.decoder.bias, targets.reshape(-1)
        )
        return loss, hidden
