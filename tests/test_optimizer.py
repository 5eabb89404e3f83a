"""RMSProp as the paper's TensorFlow-era tooling ran it: the running mean square starts at 1."""

from __future__ import annotations

import math

import pytest
import torch

from microcircuits.config import ExperimentConfig
from microcircuits.train import make_optimizer


def _config(**changes):
    base = ExperimentConfig(task="adding", cell="lstm", steps_per_epoch=1)
    return base.replace(**changes)


def test_first_rmsprop_steps_follow_the_hand_derived_update():
    lr, alpha, momentum, eps = 0.01, 0.9, 0.9, 1e-8
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0]))
    model = torch.nn.Module()
    model.w = w
    opt = make_optimizer(
        _config(lr=lr, rmsprop_alpha=alpha, momentum=momentum, eps=eps, weight_decay=0.0), model
    )
    grads = [torch.tensor([3.0, -0.1]), torch.tensor([1.0, 0.4])]
    expected = [0.5, -2.0]
    mean_square = [1.0, 1.0]
    buffer = [0.0, 0.0]
    for g in grads:
        w.grad = g.clone()
        opt.step()
        for k in range(2):
            mean_square[k] = alpha * mean_square[k] + (1 - alpha) * g[k].item() ** 2
            buffer[k] = momentum * buffer[k] + g[k].item() / (math.sqrt(mean_square[k]) + eps)
            expected[k] -= lr * buffer[k]
        torch.testing.assert_close(w.detach(), torch.tensor(expected), atol=1e-7, rtol=1e-6)


def test_zero_initial_mean_square_is_torch_default():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Module()
    model.w = w
    opt = make_optimizer(_config(lr=0.1, momentum=0.0, rmsprop_initial_square_avg=0.0), model)
    w.grad = torch.tensor([2.0])
    opt.step()
    # mean square = 0.1 * 4 -> step = 0.1 * 2 / sqrt(0.4)
    assert w.item() == pytest.approx(1.0 - 0.1 * 2 / math.sqrt(0.4), rel=1e-6)


def test_adam_with_zero_beta1_is_bias_corrected_rmsprop():
    """lamb's "rmsprop" (Adam, beta1 = 0): v_t = b2 v + (1 - b2) g^2, and the step is
    lr g / sqrt(v_t / (1 - b2^t)), with the weight decay in g."""
    lr, beta2, wd = 0.01, 0.999, 0.1
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0]))
    model = torch.nn.Module()
    model.w = w
    config = _config(optimizer="adam", lr=lr, adam_beta1=0.0, adam_beta2=beta2, weight_decay=wd)
    opt = make_optimizer(config, model)
    expected, mean_square = [0.5, -2.0], [0.0, 0.0]
    for t, g in enumerate([torch.tensor([3.0, -0.1]), torch.tensor([1.0, 0.4])], start=1):
        w.grad = g.clone()
        opt.step()
        for k in range(2):
            grad = g[k].item() + wd * expected[k]  # L2 enters the gradient
            mean_square[k] = beta2 * mean_square[k] + (1 - beta2) * grad**2
            expected[k] -= lr * grad / (math.sqrt(mean_square[k] / (1 - beta2**t)) + 1e-8)
        torch.testing.assert_close(w.detach(), torch.tensor(expected), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("field", ["adam_beta1", "adam_beta2"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_adam_betas_outside_zero_one_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value}).validate()
