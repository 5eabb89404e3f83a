"""The optimiser of a config, and the paper's weight decay: added to the gradient, then clipped.

:func:`make_optimizer` builds RMSProp (the paper's, with an optional initial running
mean square), Adam or SGD. The training loop passes it ``weight_decay=0`` and calls
:func:`add_weight_decay_and_clip_` after backward instead, so that the L2 term is part of
the gradient that is clipped, as in the paper's tooling.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .config import ExperimentConfig

__all__ = ["add_weight_decay_and_clip_", "make_optimizer"]


def _start_mean_square_at(optimizer: torch.optim.RMSprop, value: float) -> None:
    """Give every parameter RMSProp state whose running mean square starts at ``value``.

    ``torch.optim.RMSprop`` creates its state lazily, at zero, on the first step; state
    that already exists is used as it is, so filling it in here is all it takes.
    """
    if value == 0.0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["square_avg"] = torch.full_like(p, value, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def make_optimizer(
    config: ExperimentConfig, model: nn.Module, *, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``config`` over ``model``'s parameters.

    By default the optimiser applies ``config.weight_decay`` itself (torch's semantics:
    added to the gradient after any clipping). The training loop instead passes
    ``weight_decay=0`` and calls :func:`add_weight_decay_and_clip_` after backward, as the
    paper's L2 term in the loss would; do the same in a loop of your own to match it.

    Args:
        weight_decay: the optimiser's own L2 term instead of ``config.weight_decay``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = config.weight_decay if weight_decay is None else weight_decay
    if config.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(
            params,
            lr=config.lr,
            alpha=config.rmsprop_alpha,
            eps=config.eps,
            momentum=config.momentum,
            weight_decay=decay,
        )
        _start_mean_square_at(optimizer, config.rmsprop_initial_square_avg)
        return optimizer
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.eps,
            weight_decay=decay,
        )
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=decay)


def add_weight_decay_and_clip_(
    parameters: Iterable[Tensor], weight_decay: float, clip_norm: float | None
) -> Tensor | None:
    """``grad += weight_decay * w`` for every parameter with a gradient, then clip the
    global gradient norm to ``clip_norm`` (``None``: no clipping).

    The gradient of a loss with ``weight_decay / 2 * |w|^2`` added, clipped as one: what
    the paper's tooling optimises (DeepMind's ``lamb``); an optimiser's own
    ``weight_decay`` would add the term after clipping instead, unclipped.

    Returns:
        The total gradient norm before clipping, or ``None`` when not clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if weight_decay:
        with torch.no_grad():
            for p in params:
                p.grad.add_(p, alpha=weight_decay)
    if clip_norm is None:
        return None
    return nn.utils.clip_grad_norm_(params, clip_norm)
