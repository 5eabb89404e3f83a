"""The language model's training loss against ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microcircuits.tasks.cross_entropy import linear_cross_entropy, mean_cross_entropy


def _case(n=13, v=29, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_equal_f_cross_entropy(dtype):
    logits, targets = _case(dtype=dtype)
    ours = mean_cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(2.5 * ours, logits)
    ref = F.cross_entropy(logits, targets)
    (g_ref,) = torch.autograd.grad(2.5 * ref, logits)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(ours.item() - ref.item()) < tol * 10
    torch.testing.assert_close(g_ours, g_ref, rtol=tol, atol=tol)


def test_gradient_matches_finite_differences():
    logits, targets = _case(n=5, v=7)
    assert torch.autograd.gradcheck(lambda x: mean_cross_entropy(x, targets), (logits,))


def test_a_retained_graph_gives_the_same_gradient_twice():
    logits, targets = _case()
    loss = mean_cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    torch.testing.assert_close(logits.grad, first)


def test_repeated_targets_and_no_grad_fallback():
    logits, _ = _case(n=6, v=4)
    targets = torch.tensor([1, 1, 1, 0, 3, 1])
    (g,) = torch.autograd.grad(mean_cross_entropy(logits, targets), logits)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(logits, targets), logits)
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        assert mean_cross_entropy(logits, targets).item() == pytest.approx(
            F.cross_entropy(logits, targets).item()
        )


def test_out_of_range_targets_are_named():
    logits, targets = _case(v=5)
    targets[3] = 5
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        mean_cross_entropy(logits, targets)


def test_an_underflowed_target_probability_gives_the_exact_finite_loss():
    logits = torch.zeros(3, 4, dtype=torch.float32)
    logits[1, 0] = 200.0  # p(target 2) = e^-200: zero in float32
    logits.requires_grad_()
    targets = torch.tensor([1, 2, 3])
    ours = mean_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits, targets)
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    (g,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref)


def test_create_graph_is_refused_not_silently_first_order():
    """A double backward (e.g. a gradient penalty) through the loss must not get
    gradients without a graph: it fails naming the function and the alternative."""
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6,))
    loss = mean_cross_entropy(logits, targets)
    refused = "mean_cross_entropy gives first-order.*functional.cross_entropy"
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(loss, logits, create_graph=True)
    # the reference it names does give a second-order graph
    (g,) = torch.autograd.grad(F.cross_entropy(logits, targets), logits, create_graph=True)
    assert g.requires_grad


# -- the fused decoder + loss ------------------------------------------------------------


def _linear_case(n=11, h=6, v=23, dtype=torch.float64, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, dtype=dtype) / h**0.5).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return x, w, b, targets


def _grads(loss, tensors, retain_graph=False):
    return torch.autograd.grad(
        loss, [t for t in tensors if t is not None], retain_graph=retain_graph
    )


@pytest.mark.parametrize("h", [6, 40])  # both layouts of the weight's gradient
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_equals_f_cross_entropy_of_f_linear(dtype, bias, h):
    x, w, b, targets = _linear_case(h=h, dtype=dtype, bias=bias)
    ours = linear_cross_entropy(x, w, b, targets)
    ref = F.cross_entropy(F.linear(x, w, b), targets)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(ours.item() - ref.item()) < tol * 10
    for g_ours, g_ref in zip(_grads(1.7 * ours, (x, w, b)), _grads(1.7 * ref, (x, w, b))):
        torch.testing.assert_close(g_ours, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 3, 4, 11])  # blocks, the last one shorter; one
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_in_blocks_of_rows_equals_the_reference(monkeypatch, rows, bias):
    """On CPU with few features the logits are handled a block of rows at a time (here 11
    rows in blocks of 1, 3 or 4, or all at once): loss and gradients as F.cross_entropy's,
    also after a retained graph, and as finite differences."""
    from microcircuits.tasks import cross_entropy

    monkeypatch.setattr(cross_entropy, "_BLOCK_ELEMENTS", rows * 23)
    assert cross_entropy._block_rows(11, 3, 23, torch.device("cpu")) == rows
    assert cross_entropy._block_rows(11, 40, 23, torch.device("cpu")) == 11  # wide: one
    x, w, b, targets = _linear_case(h=3, bias=bias)
    ours = linear_cross_entropy(x, w, b, targets)
    ref = F.cross_entropy(F.linear(x, w, b), targets)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    expected = _grads(0.3 * ref, (x, w, b))
    first = _grads(0.3 * ours, (x, w, b), retain_graph=True)
    for g_ours, g_again, g_ref in zip(first, _grads(0.3 * ours, (x, w, b)), expected):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_again, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, w, b, targets),
        (x, w, b) if bias else (x, w, None),
    )


def test_linear_cross_entropy_follows_a_negative_or_zero_upstream_gradient():
    """The scale of the gradient rides on the exp pass when it is positive; a negative or
    zero one (a loss subtracted, or multiplied by 0) takes the other branch."""
    x, w, b, targets = _linear_case()
    for factor in (-2.5, 0.0):
        ours = _grads(factor * linear_cross_entropy(x, w, b, targets), (x, w, b))
        ref = _grads(factor * F.cross_entropy(F.linear(x, w, b), targets), (x, w, b))
        for g_ours, g_ref in zip(ours, ref):
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_gradient_matches_finite_differences():
    x, w, b, targets = _linear_case(n=4, h=3, v=5)
    assert torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, w, b, targets), (x, w, b)
    )


def test_linear_cross_entropy_only_computes_the_gradients_asked_for():
    x, w, b, targets = _linear_case()
    x.requires_grad_(False)
    b.requires_grad_(False)
    (g_w,) = torch.autograd.grad(linear_cross_entropy(x, w, b, targets), w)
    (ref,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), targets), w)
    torch.testing.assert_close(g_w, ref)


def test_linear_cross_entropy_survives_a_retained_graph_and_underflow():
    x, w, b, targets = _linear_case(dtype=torch.float32)
    with torch.no_grad():
        b[targets[2]] = -300.0  # p(target of row 2) = 0 in float32
    loss = linear_cross_entropy(x, w, b, targets)
    ref = F.cross_entropy(F.linear(x, w, b), targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    first = _grads(loss, (x, w, b))  # retain_graph not needed: one backward each
    loss2 = linear_cross_entropy(x, w, b, targets)
    loss2.backward(retain_graph=True)
    again = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    for t in (x, w, b):
        t.grad = None
    loss2.backward()
    for a, c, r in zip(first, again, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(c, r)


def test_linear_cross_entropy_falls_back_without_grad_and_checks_targets():
    x, w, b, targets = _linear_case()
    with torch.no_grad():
        assert linear_cross_entropy(x, w, b, targets).item() == pytest.approx(
            F.cross_entropy(F.linear(x, w, b), targets).item()
        )
    bad = targets.clone()
    bad[0] = 23
    with pytest.raises(IndexError, match=r"\[0, 23\)"):
        linear_cross_entropy(x, w, b, bad)
    with pytest.raises(ValueError, match=r"int64 of shape \(11,\)"):
        linear_cross_entropy(x, w, b, targets[:5])
    with pytest.raises(RuntimeError, match="linear_cross_entropy gives first-order"):
        torch.autograd.grad(linear_cross_entropy(x, w, b, targets), x, create_graph=True)


def test_linear_cross_entropy_under_cpu_autocast_takes_the_unfused_float32_path():
    """Under autocast the decoder runs in bfloat16; the loss is then computed from the
    float32 logits as before (the fused function would keep bfloat16 probabilities)."""
    x, w, b, targets = _linear_case(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(x, w, b, targets)
        ref = F.cross_entropy(F.linear(x, w, b).float(), targets)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
