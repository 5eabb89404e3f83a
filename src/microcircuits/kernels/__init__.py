"""Whole-layer kernels behind one dispatcher.

``run_layer`` runs one layer and one direction over a whole sequence. It picks the
fastest kernel that applies to the inputs and falls back to the reference path of
:mod:`microcircuits.kernels.reference` (the step functions of ``cells.py``), which is
also the oracle the fast kernels are tested against.

One switch forces the reference path everywhere: ``set_kernel("reference")``, the
context manager ``use_kernel("reference")``, or the environment variable
``MICROCIRCUITS_KERNEL=reference``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from ..cells import CellKind, CellWeights, LSTMState
from .reference import reverse_within_lengths, run_layer_reference

__all__ = ["KERNELS", "get_kernel", "run_layer", "set_kernel", "use_kernel"]

KERNELS = ("auto", "reference")
_selected: str | None = None  # None: read MICROCIRCUITS_KERNEL, default "auto"


def _check_kernel_name(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {list(KERNELS)}")
    return name


def get_kernel() -> str:
    """The kernel selection now in force (``"auto"`` unless set otherwise)."""
    if _selected is not None:
        return _selected
    return _check_kernel_name(os.environ.get("MICROCIRCUITS_KERNEL", "auto").strip().lower())


def set_kernel(name: str) -> None:
    """Select the kernel for all later calls: ``"auto"`` (fastest that applies) or ``"reference"``."""
    global _selected
    _selected = _check_kernel_name(name)


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Select a kernel inside a ``with`` block and restore the previous choice after."""
    global _selected
    previous = _selected
    set_kernel(name)
    try:
        yield
    finally:
        _selected = previous


def run_layer(
    kind: CellKind,
    x: Tensor,
    state: LSTMState,
    weights: CellWeights,
    *,
    lengths: Tensor | None = None,
    update_mask: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, LSTMState]:
    """Run one layer and direction over a whole sequence.

    Args:
        kind: which cell (:data:`microcircuits.cells.CELLS`).
        x: input ``(T, B, I)``.
        state: initial ``(h, c)``, each ``(B, H)``.
        weights: the layer's parameters.
        lengths: valid length of each sequence ``(B,)`` (int64, on CPU or ``x``'s
            device), or ``None`` when all have length ``T``.
        update_mask: update-dropout mask ``(B, H)`` (scaled), fixed over time, or ``None``.
        reverse: run each sequence from its last valid step back to its first
            (the backward direction of a bidirectional layer).

    Returns:
        ``output`` ``(T, B, H)`` (zero at padding steps), and the final state, taken
        at each sequence's last processed step.
    """
    if reverse:
        x = reverse_within_lengths(x, lengths)
    output, final = run_layer_reference(kind, x, state, weights, lengths, update_mask)
    if reverse:
        output = reverse_within_lengths(output, lengths)
    return output, final
