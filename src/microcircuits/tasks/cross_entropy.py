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

:func:`linear_cross_entropy` also takes in the decoder (``logits = x W^T + b``): the
logits are then never stored apart from their softmax, and for small ``H`` the weight's
gradient is formed as ``(x^T g)^T``, which is several times faster on CPU than ``g^T x``
(a skinny ``(V, N) @ (N, H)`` product).
"""

from __future__ import annotations

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
# (one CPU thread, 700 x 10k logits): faster at H = 10 (52 vs 61 ms), slower at H = 100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
    ) -> Tensor:
        def logits_of(x: Tensor) -> Tensor:  # (n, V)
            return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())

        probs = torch.softmax(logits_of(inputs), dim=1)  # (N, V); the logits are freed
        nll = _nll_from_probs(probs, targets, lambda rows: logits_of(inputs[rows]))
        ctx.save_for_backward(probs, inputs, weight, targets)
        return nll.mean()

    @staticmethod
    @first_order_only("linear_cross_entropy", "use torch.nn.functional.cross_entropy")
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        probs, inputs, weight, targets = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g = _probs_to_grad(probs, targets, grad)  # (N, V)
        grad_x = g @ weight if need_x else None  # (N, H)
        grad_w = None
        if need_w:  # (V, H); with few units (H, N) @ (N, V) transposed is the faster
            narrow = inputs.shape[1] <= _NARROW  # product on CPU (3x at H = 10)
            grad_w = (inputs.t() @ g).t() if narrow else g.t() @ inputs
        grad_b = g.sum(0) if need_b else None  # need_b: a bias was given
        return grad_x, grad_w, grad_b, None


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
    never kept (only their softmax, which backward turns into the gradient in place),
    and the weight's gradient is formed in the layout that is fast for small models. A
    whole PTB-10 training step (``python -m benchmarks.lm_step``, one CPU thread) takes
    0.88x the time of the unfused one (median of per-round ratios); PTB-100 0.99x.

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
