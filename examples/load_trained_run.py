"""Load a trained run and use its model: evaluate it and look at a few test examples.

A run directory (written by ``microcircuits train``, or committed under ``results/``)
holds ``config.json`` and ``checkpoints/best.safetensors``; ``microcircuits.runs.load_run``
rebuilds its task (the data) and its model from them. The test metric measured here is
the one ``microcircuits report`` shows for the run.

    python examples/load_trained_run.py results/mnist/mnist-mlp-64-seed0
    python examples/load_trained_run.py --steps 20     # train a tiny adding run first

(MNIST is read from ``$MICROCIRCUITS_DATA``, or downloaded.)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from microcircuits.config import load_config
from microcircuits.data import adding_batch, load_mnist
from microcircuits.report import summarize_run
from microcircuits.runs import TrainedRun, load_run


def train_tiny_adding_run(out_dir: str, steps: int) -> Path:
    """A delayed-addition LSTM trained for ``steps`` steps into ``out_dir``; its directory."""
    from microcircuits.train import train

    config = load_config("adding", "lstm", overrides={
        "hidden_size": 16, "seq_len": 20, "steps_per_epoch": steps, "epochs": 1,
        "valid_size": 200, "test_size": 200, "out_dir": out_dir, "run_name": "adding-tiny",
        "progress": False, "tensorboard": False,
    })  # fmt: skip
    return train(config).run_dir


@torch.no_grad()
def show_examples(run: TrainedRun, count: int) -> None:
    """Print the model's outputs on the first ``count`` test examples of its task."""
    config, model = run.config, run.model
    if config.task == "adding":
        x, y = adding_batch(count, config.seq_len, generator=torch.Generator().manual_seed(0))
        predictions = model(x).squeeze(-1)
        for target, prediction in zip(y.tolist(), predictions.tolist()):
            print(f"  sum of the marked values {target:.3f}, predicted {prediction:.3f}")
    elif config.task in ("mnist", "smnist", "psmnist"):
        pixels, labels = load_mnist("test", config.data_dir)
        pixels, labels = pixels[:count], labels[:count]
        if config.task != "mnist":  # the sequential tasks read (B, 784) pixels
            pixels = pixels.reshape(count, -1)
        predicted = model(run.task.model_input(pixels)).argmax(dim=-1)
        print(f"  digits     {' '.join(map(str, labels.tolist()))}")
        print(f"  predicted  {' '.join(map(str, predicted.tolist()))}")
    else:
        print(f"  (no example view for {config.task}; see the task's evaluate())")


def evaluate(run_dir: str | Path, *, examples: int = 8, checkpoint: str = "best") -> tuple:
    """Load ``run_dir``, print its test metric beside the report's and a few examples;
    return ``(measured, reported)`` (accuracy as a fraction; ``reported`` is None for a
    run without a test result)."""
    run = load_run(run_dir, checkpoint)
    measured = run.task.evaluate(run.model, "test").metric
    reported = summarize_run(run_dir).test
    print(f"{run.label}: {run.config.hidden_size} units, from {run.run_dir}")
    shown = "—" if reported is None else f"{reported:.6g}"
    print(f"test {run.task.metric}: {measured:.6g} measured now, {shown} in the report")
    if examples:
        show_examples(run, examples)
    return measured, reported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a run directory (default: train one)")
    parser.add_argument(
        "--steps", type=int, default=20, help="without RUN_DIR: steps of the run trained first"
    )
    parser.add_argument("--examples", type=int, default=8, help="test examples to show")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)

    if args.run_dir is not None:
        evaluate(args.run_dir, examples=args.examples, checkpoint=args.checkpoint)
        return 0
    with tempfile.TemporaryDirectory() as out_dir:
        run_dir = train_tiny_adding_run(out_dir, args.steps)
        evaluate(run_dir, examples=args.examples, checkpoint=args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
