"""The language model's training loss against ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microcircuits.tasks.cross_entropy import mean_cross_entropy


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
