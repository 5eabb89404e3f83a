"""Helpers for the hand-written ``torch.autograd.Function`` backwards of the package
(the fused kernels, the language model's cross-entropy)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def graph_kept() -> bool:
    """Whether this backward keeps the graph (``retain_graph``/``create_graph``): then the
    saved tensors must survive it, so a backward may not overwrite them in place.
    Unknown (older torch): assume kept."""
    return True if _KEEP_GRAPH is None else bool(_KEEP_GRAPH())


def first_order_only(what: str, remedy: str) -> Callable[[Callable], Callable]:
    """Decorate a hand-written ``backward`` (itself ``once_differentiable``) so that asking
    it for a graph (``create_graph=True``, e.g. for a gradient penalty) fails at once with
    a message naming ``what`` gives first-order gradients only and the ``remedy``, instead
    of returning gradients that silently carry no graph."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{what} gives first-order gradients only; for create_graph=True "
                    f"(higher-order gradients) {remedy}"
                )
            return backward(ctx, *grads)

        return wrapper

    return decorate
