"""Mean softmax cross-entropy over many classes, with a lean forward and backward.

A word-level language model spends most of a training step on its ``(N, V)`` logits
(``N = bptt * batch = 700`` tokens, ``V = 10000`` words): for the small models of the
paper (10-200 units) more than on the recurrent layers. ``F.cross_entropy`` runs
``log_softmax`` (about twice the time of ``softmax`` on CPU: it writes ``x - lse`` after
an exp pass) and in backward makes four more passes over that matrix (a zero-filled
``nll_loss`` gradient, then ``log_softmax``'s backward, which exponentiates again).
Here forward keeps the probabilities and backward turns them into the gradient in
place, in one pass:

    loss = -mean_n log p[n, target_n],   d loss / d logits = (p - onehot(target)) / N

Rows whose target probability underflows (a logit gap beyond ~87 in float32) get their
loss from ``log_softmax`` instead, so the loss stays finite and exact. With
``retain_graph`` backward works on a copy; ``create_graph`` (a second derivative) is
refused with a clear error. Only used in training (autograd on, float32 or float64);
``F.cross_entropy`` is the reference it is tested against.

:func:`linear_cross_entropy` also takes in the decoder (``logits = x W^T + b``) and
never stores the logits apart from their softmax. With few features on CPU it works
through them in blocks of rows that stay in cache (forward keeps one log-sum-exp per
row; backward recomputes each block's logits, a cheap product there, and turns them into
the gradient in place); the bias is one more column of the product; and for small ``H``
the weight's gradient is formed as ``(x^T g)^T``, several times faster on CPU than
``g^T x`` (a skinny ``(V, N) @ (N, H)`` product).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._autograd import first_order_only, graph_kept


def _nll_from_probs(probs: Tensor, targets: Tensor, exact_logits) -> Tensor:
    """Per-row ``-log p[n, target_n]`` ``(N,)`` from softmax ``probs`` ``(N, V)``; rows
    whose target probability underflowed take ``log_softmax`` of ``exact_logits(rows)``
    (the logits of those rows) instead, so the loss stays finite and exact."""
    picked = probs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    nll = -torch.log(picked)
    lost = picked < torch.finfo(picked.dtype).tiny
    if bool(lost.any()):
        rows = lost.nonzero().squeeze(1)
        exact = torch.log_softmax(exact_logits(rows), dim=1).gather(1, targets[rows, None])
        nll[rows] = -exact.squeeze(1)
    return nll


def _probs_to_grad(probs: Tensor, targets: Tensor, grad: Tensor) -> Tensor:
    """``d mean_n nll_n / d logits = (probs - onehot(targets)) / N``, times ``grad``;
    computed in ``probs``'s storage unless the graph is kept for another backward."""
    n = probs.shape[0]
    grad_logits = probs.clone() if graph_kept() else probs
    grad_logits.scatter_add_(1, targets[:, None], grad_logits.new_full((n, 1), -1.0))
    return grad_logits.mul_(grad / n)


class _MeanCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        probs = torch.softmax(logits, dim=1)  # (N, V), becomes the gradient
        nll = _nll_from_probs(probs, targets, lambda rows: logits[rows])
        ctx.save_for_backward(probs, targets)
        return nll.mean()

    @staticmethod
    @first_order_only("mean_cross_entropy", "use torch.nn.functional.cross_entropy")
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        probs, targets = ctx.saved_tensors
        return _probs_to_grad(probs, targets, grad), None


_NARROW = 32  # up to this many features: the weight's gradient as (x^T g)^T; measured
# (one CPU thread, 700 x 10k logits, unblocked): faster at H = 10 (52 vs 61 ms), slower
# at H = 100


def _block_rows(rows: int, features: int, classes: int, device: torch.device) -> int:
    """Rows of the ``(rows, classes)`` logits that :class:`_LinearCrossEntropy` handles at
    once. On CPU with few features, blocks of about ``_BLOCK_ELEMENTS``: they stay in
    cache through the passes over them, and recomputing them in backward is a cheap
    product. Otherwise all rows in one block, whose softmax is kept for backward (with
    100 units and 33k words the recomputation cost more than the cache saved: a step at
    1.12x the unfused time)."""
    if device.type != "cpu" or features > _NARROW:
        return max(rows, 1)
    return max(1, min(rows, _BLOCK_ELEMENTS // classes))


_BLOCK_ELEMENTS = 2**20  # logits per block on CPU (4 MiB in float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """``mean_n (lse_n - logit[n, target_n])`` of ``logits = [x, 1] [W, b]^T``, in blocks
    of rows (:func:`_block_rows`): forward keeps the log-sum-exp per row ``(N,)``, and the
    softmax only when there is one block; backward turns that softmax, or each block's
    logits computed again, into the gradient in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
    ) -> Tensor:
        n, classes = inputs.shape[0], weight.shape[0]
        x, w = _with_bias_column(inputs, weight, bias)  # (N, H+1), (V, H+1): no bias pass
        lse, picked = inputs.new_empty(n), inputs.new_empty(n)
        rows = _block_rows(n, inputs.shape[1], classes, inputs.device)
        probs = None
        for block in _blocks(n, rows):
            logits = x[block] @ w.t()  # (rows, V)
            picked[block] = logits.gather(1, targets[block, None]).squeeze(1)
            top = logits.amax(1, keepdim=True)
            total = logits.sub_(top).exp_().sum(1)  # logits now hold exp(logit - top)
            lse[block] = total.log().add_(top.squeeze(1))
            if rows >= n:
                probs = logits.div_(total[:, None])  # (N, V)
        ctx.rows, ctx.has_bias = rows, bias is not None
        ctx.save_for_backward(x, w, targets, lse, probs)
        return (lse - picked).mean()

    @staticmethod
    @first_order_only("linear_cross_entropy", "use torch.nn.functional.cross_entropy")
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, w, targets, lse, probs = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        n, features = x.shape
        h = features - ctx.has_bias
        scale = float(grad) / n
        if probs is None:  # exp(logit - lse + log scale) = scale * p: one pass fewer
            shift = lse - math.log(scale) if scale > 0 else lse
        grad_x = x.new_empty(n, h) if need_x else None
        # few features: the weight's gradient as (x^T g)^T, several times faster on CPU
        # than the skinny g^T x (3x at H = 10)
        narrow = h <= _NARROW
        grad_wb = None
        if need_w or need_b:
            grad_wb = x.new_zeros(features, w.shape[0]) if narrow else torch.zeros_like(w)
        for block in _blocks(n, ctx.rows):
            if probs is not None:  # one block: its softmax was kept
                g = _probs_to_grad(probs, targets, grad)
            else:
                g = (x[block] @ w.t()).sub_(shift[block, None]).exp_()  # (rows, V)
                if scale <= 0:
                    g.mul_(scale)
                g.scatter_add_(1, targets[block, None], g.new_full((g.shape[0], 1), -scale))
            if grad_x is not None:
                torch.mm(g, w[:, :h], out=grad_x[block])
            if grad_wb is not None:
                if narrow:
                    grad_wb.addmm_(x[block].t(), g)
                else:
                    grad_wb.addmm_(g.t(), x[block])
        if grad_wb is not None and narrow:
            grad_wb = grad_wb.t()  # (V, H+1)
        grad_w = grad_wb[:, :h] if need_w and grad_wb is not None else None
        grad_b = grad_wb[:, h] if need_b and grad_wb is not None else None
        return grad_x, grad_w, grad_b, None


def _with_bias_column(inputs: Tensor, weight: Tensor, bias: Tensor | None):
    """``([x, 1], [W, b])``: the bias as one more feature, so that each block's logits are
    one product (``addmm`` would first copy the bias into every row)."""
    if bias is None:
        return inputs, weight
    ones = inputs.new_ones(inputs.shape[0], 1)
    return torch.cat([inputs, ones], 1), torch.cat([weight, bias[:, None]], 1)


def _blocks(n: int, rows: int) -> list[slice]:
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy(logits, targets)`` (mean over the ``N`` rows), faster.

    A PTB training step (batch 20, BPTT 35, 10k words, RMSProp, one CPU thread, best of
    3 x 20 steps) took 90 -> 80 ms with 10 units and 164 -> 138 ms with 100 units.

    Args:
        logits: ``(N, V)`` float32 or float64 scores.
        targets: ``(N,)`` int64 class indices in ``[0, V)``.

    Returns:
        The scalar mean negative log-likelihood. Falls back to ``F.cross_entropy`` for
        other dtypes or shapes and when no gradient is needed.
    """
    if (
        logits.dim() != 2
        or targets.shape != logits.shape[:1]
        or targets.dtype != torch.int64
        or logits.dtype not in (torch.float32, torch.float64)
        or not (torch.is_grad_enabled() and logits.requires_grad)
        or logits.shape[0] == 0
    ):
        return F.cross_entropy(logits, targets)
    _check_targets(targets, logits.shape[0], logits.shape[1])
    return _MeanCrossEntropy.apply(logits, targets)


def _check_targets(targets: Tensor, rows: int, classes: int) -> None:
    """``targets`` must be ``(rows,)`` int64 ids in ``[0, classes)``."""
    if targets.dtype != torch.int64 or targets.shape != (rows,):
        raise ValueError(
            f"targets must be int64 of shape ({rows},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if rows:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise IndexError(f"target ids must lie in [0, {classes}), got [{low}, {high}]")


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # older torch: no device argument, one query per device type
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False


def linear_cross_entropy(
    inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
) -> Tensor:
    """``F.cross_entropy(F.linear(inputs, weight, bias), targets)``, fused and faster.

    The softmax decoder of a language model and its loss in one step: the logits are
    never kept (with few features on CPU they pass through the cache a block of rows at
    a time and backward recomputes them; otherwise only their softmax is kept), and the
    weight's gradient is formed in the layout that is fast for small models. A
    whole training step (``python -m benchmarks.lm_step``, one CPU thread) takes 0.57x
    the time of the unfused one at PTB-10 (median of per-round ratios), 0.88x at PTB-100,
    0.39x and 0.90x at WikiText-2's sizes 10 and 100.

    Args:
        inputs: ``(N, H)`` float32 or float64 features (the recurrent output).
        weight: ``(V, H)`` decoder weight; ``bias``: ``(V,)`` or ``None``.
        targets: ``(N,)`` int64 class indices in ``[0, V)``.

    Returns:
        The scalar mean negative log-likelihood. Falls back to the unfused
        ``mean_cross_entropy(F.linear(...).float(), targets)`` under autocast, for other
        dtypes or shapes, and when no gradient is needed.
    """
    fused = (
        inputs.dim() == 2
        and weight.dim() == 2
        and inputs.shape[1] == weight.shape[1]
        and (bias is None or bias.shape == weight.shape[:1])
        and inputs.dtype in (torch.float32, torch.float64)
        and weight.dtype == inputs.dtype
        and (bias is None or bias.dtype == inputs.dtype)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (inputs, weight, bias))
        and not _autocast_on(inputs.device.type)
    )
    if not fused:
        return mean_cross_entropy(F.linear(inputs, weight, bias).float(), targets)
    _check_targets(targets, inputs.shape[0], weight.shape[0])
    if inputs.shape[0] == 0:
        return F.cross_entropy(F.linear(inputs, weight, bias), targets)
    return _LinearCrossEntropy.apply(inputs, weight, bias, targets)
