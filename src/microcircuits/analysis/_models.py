"""What the network analyses run on: the models (given or freshly built) and the input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .recording import module_cell

__all__ = ["Models", "adding_inputs", "initial_models", "named_models"]

Models = Mapping[str, nn.Module] | Sequence[nn.Module]


def adding_inputs(batch: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded delayed-addition batch (:func:`microcircuits.data.adding_batch`).

    Returns ``(x, target)``: ``x`` ``(T, B, 2)`` (time-major) and the sums ``(B,)``.
    """
    try:
        from ..data import adding_batch
    except ImportError as error:
        raise ImportError(
            "the default input is the delayed-addition task of microcircuits.data, which "
            "could not be imported; pass inputs=(T, B, I) explicitly"
        ) from error
    return adding_batch(batch, seq_len, generator=torch.Generator().manual_seed(seed))


def initial_models(
    cells: Sequence[str], input_size: int, hidden_size: int, seed: int, like: Tensor
) -> dict[str, nn.Module]:
    """One freshly initialised module per cell, each seeded by ``seed``, labelled by cell.

    The caller's global RNG is left as it was.
    """
    from ..nn import make_rnn

    built = {}
    for name in cells:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = make_rnn(name, input_size, hidden_size).to(like)
        built[module.cell.label] = module
    return built


def named_models(models: Models) -> list[tuple[str, nn.Module]]:
    """``(label, module)`` pairs; a list is labelled by cell (``subLSTM``, ``subLSTM #2``)."""
    if isinstance(models, Mapping):
        named = list(models.items())
    else:
        named = []
        counts: dict[str, int] = {}
        for module in models:
            label = module_cell(module).label
            counts[label] = counts.get(label, 0) + 1
            named.append((label if counts[label] == 1 else f"{label} #{counts[label]}", module))
    if not named:
        raise ValueError("models is empty: pass at least one module")
    return named
