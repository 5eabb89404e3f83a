"""Model heads around a recurrent stack: last-step readout, and the language model."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ExperimentConfig
from ..nn import make_rnn
from .cross_entropy import linear_cross_entropy

__all__ = ["LanguageModel", "LastStepReadout", "make_recurrent_stack"]


def make_recurrent_stack(config: ExperimentConfig, input_size: int) -> nn.Module:
    """The recurrent stack of ``config`` (cell, sizes, the paper's three dropouts).

    Returns:
        A module with the API of ``torch.nn.LSTM`` (time-major).
    """
    return make_rnn(
        config.cell,
        input_size,
        config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        output_dropout=config.output_dropout,
        update_dropout=config.update_dropout,
        forget_bias=config.forget_bias,
    )


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
