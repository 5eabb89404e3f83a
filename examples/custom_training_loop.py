"""A training loop of your own with the paper's optimisation.

Costa et al. (2017) train with RMSProp with momentum, an L2 weight decay that is part of
the loss, and a clipped gradient norm. In their tooling the decay's gradient joins the
data's *before* clipping, so the clip scales both alike; ``torch.optim``'s own
``weight_decay`` adds it after any clipping instead. ``microcircuits`` keeps the paper's
order in one call, :func:`add_weight_decay_and_clip_`, between ``backward()`` and
``step()``, with an optimiser from :func:`make_optimizer` that decays nothing itself.
``microcircuits train`` does exactly this; here it is in a loop you can change.

The model is a subLSTM with a linear read-out at the last step, on the delayed-addition
problem (``microcircuits.data.adding_batch``): always predicting 1 scores an MSE of 1/6.

    python examples/custom_training_loop.py               # 300 steps, a few seconds
    python examples/custom_training_loop.py --steps 1000 --seq-len 100
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import microcircuits
from microcircuits.config import ExperimentConfig
from microcircuits.data import ADDING_BASELINE_MSE, adding_batch
from microcircuits.train import add_weight_decay_and_clip_, make_optimizer


class LastStep(nn.Module):
    """A recurrent layer read out linearly at the last step."""

    def __init__(self, rnn: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 2) -> (B,)
        output, _ = self.rnn(x)
        return self.readout(output[-1]).squeeze(-1)


def train(
    steps: int, *, seq_len: int = 20, hidden_size: int = 32, batch_size: int = 50,
    seed: int = 0, log_every: int = 50,
) -> tuple[float, float]:  # fmt: skip
    """Train for ``steps`` steps; return the validation MSE before and after."""
    torch.manual_seed(seed)
    # The optimiser's settings, as a config holds them (any ExperimentConfig will do, e.g.
    # microcircuits.config.load_config("ptb", "sublstm", 200) for the paper's Table 2 row).
    config = ExperimentConfig(
        optimizer="rmsprop", lr=3e-3, momentum=0.9, rmsprop_alpha=0.9,
        weight_decay=1e-5, clip_norm=1.0,
    )  # fmt: skip
    model = LastStep(microcircuits.SubLSTM(2, hidden_size), hidden_size)
    optimizer = make_optimizer(config, model, weight_decay=0.0)  # the decay comes below
    data = torch.Generator().manual_seed(seed)
    valid_x, valid_y = adding_batch(1000, seq_len, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def valid_mse() -> float:
        return nn.functional.mse_loss(model(valid_x), valid_y).item()

    before = valid_mse()
    for step in range(1, steps + 1):
        x, y = adding_batch(batch_size, seq_len, generator=data)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # grad += weight_decay * w, then the global norm clipped to clip_norm (the norm
        # before clipping comes back, e.g. to log)
        norm = add_weight_decay_and_clip_(model.parameters(), config.weight_decay, config.clip_norm)
        optimizer.step()
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  gradient norm {float(norm):.3f}")
    return before, valid_mse()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--seq-len", type=int, default=20, help="steps per sequence")
    parser.add_argument("--hidden", type=int, default=32, help="units (default: 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    before, after = train(args.steps, seq_len=args.seq_len, hidden_size=args.hidden,
                          seed=args.seed)  # fmt: skip
    print(f"validation MSE {before:.4f} -> {after:.4f} after {args.steps} steps "
          f"(always predicting 1: {ADDING_BASELINE_MSE:.4f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
