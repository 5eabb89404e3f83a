"""The input projection shared by the whole-sequence kernels (CPU and GPU)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import CellWeights


def input_projection(
    x2d: Tensor, weight_ih: Tensor, bias: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """``x W^T + b`` for the whole sequence as one GEMM: ``(T*B, I) -> (T*B, G*H)``."""
    if bias is None:
        return torch.mm(x2d, weight_ih.t(), out=out)
    return torch.addmm(bias, x2d, weight_ih.t(), out=out)


def combined_bias(weights: CellWeights) -> Tensor | None:
    """``b_ih + b_hh`` (detached, ``(G*H,)``), either alone if the other is absent, or None."""
    b_ih, b_hh = weights.bias_ih, weights.bias_hh
    if b_ih is None:
        return None if b_hh is None else b_hh.detach()
    return b_ih.detach() if b_hh is None else (b_ih.detach() + b_hh.detach())
