"""The delayed-addition ("adding") problem, generated on the fly.

Hochreiter & Schmidhuber (1997), in the form of Le, Jaitly & Hinton (2015): every step
carries two channels, a value drawn uniformly from [0, 1) and a marker that is 1 at
exactly two steps, one drawn uniformly from the first half of the sequence and one from
the second half, and 0 elsewhere. The target is the sum of the two marked values; the
network must hold the first one in memory for up to ``seq_len`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_positive_int

__all__ = ["ADDING_BASELINE_MSE", "adding_batch"]

ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of always predicting 1, the expected target: the variance of the sum of two
independent U(0, 1) values, 2 * 1/12 = 1/6 ~ 0.1667. A model has learnt the task only
where its MSE is well below this."""


def adding_batch(
    batch_size: int,
    seq_len: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A random batch of the adding problem, time-major.

    The first half is steps ``0 .. seq_len // 2 - 1``, the second half the rest (one
    step longer when ``seq_len`` is odd).

    Args:
        batch_size: number of sequences.
        seq_len: steps per sequence, at least 2.
        generator: source of randomness (CPU); the batch is a deterministic function of
            its state. ``None`` uses torch's global generator.
        dtype: floating-point dtype of both outputs (values are drawn in float32 and
            converted, so the dtype changes no draw).

    Returns:
        ``(inputs, targets)``: inputs ``(seq_len, batch_size, 2)``, channel 0 the values,
        channel 1 the markers; targets ``(batch_size,)``, the sum of the two marked values.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    seq_len = check_positive_int("seq_len", seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one marker in each half), got {seq_len}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    # Always drawn in float32 so that a seed gives the same task whatever the dtype.
    values = torch.rand(seq_len, batch_size, generator=generator).to(dtype)  # (T, B)
    half = seq_len // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, seq_len, (batch_size,), generator=generator)

    columns = torch.arange(batch_size)
    markers = torch.zeros(seq_len, batch_size, dtype=dtype)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    targets = values[first, columns] + values[second, columns]  # (B,)
    return torch.stack((values, markers), dim=-1), targets  # (T, B, 2), (B,)
