"""The scripts of examples/ on a tiny budget: each runs and does what it says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

from microcircuits.data import MissingDataError, load_mnist
from microcircuits.report import summarize_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MNIST_RUN = ROOT / "results" / "mnist" / "mnist-mlp-64-seed0"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(pattern: str, text: str) -> tuple[float, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return tuple(float(g) for g in match.groups())


def test_char_lm_drop_in_learns_with_a_sublstm_in_place_of_nn_lstm(capsys) -> None:
    example = _example("char_lm_drop_in")
    assert example.main(["--steps", "40", "--hidden", "32", "--sample", "12"]) == 0
    out = capsys.readouterr().out
    before, after = _numbers(r"SubLSTM: ([\d.]+) -> ([\d.]+) bits/char", out)
    assert before > 4.5 and after < before - 1.0  # from ~uniform over ~35 characters
    assert "'The " in out  # the greedy sample
    # the same model with torch.nn.LSTM: the layer is the only difference
    model, *_ = example.train(1, "lstm", hidden_size=8, log_every=0)
    assert type(model.rnn) is torch.nn.LSTM


def test_custom_training_loop_learns_the_adding_problem(capsys) -> None:
    example = _example("custom_training_loop")
    assert example.main(["--steps", "60", "--hidden", "16"]) == 0
    before, after, _ = _numbers(
        r"validation MSE ([\d.]+) -> ([\d.]+) after 60 steps \(always predicting 1: ([\d.]+)",
        capsys.readouterr().out,
    )
    assert after < before / 3  # untrained: ~1.2 (predicting ~0); trained: near 1/6 or below


def test_load_trained_run_measures_what_the_report_says(capsys) -> None:
    """Without a run directory: a 20-step adding run is trained first, then loaded."""
    example = _example("load_trained_run")
    assert example.main(["--steps", "20", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    measured, reported = _numbers(r"test mse: ([\d.e-]+) measured now, ([\d.e-]+) in the", out)
    assert measured == reported and 0 < measured < 5
    assert len(re.findall(r"sum of the marked values [\d.]+, predicted -?[\d.]+", out)) == 3


def _have_mnist() -> bool:
    try:
        load_mnist("test", download=False)
    except MissingDataError:
        return False
    return True


@pytest.mark.skipif(not _have_mnist(), reason="MNIST not found (set MICROCIRCUITS_DATA)")
def test_load_trained_run_on_the_committed_mnist_mlp(capsys) -> None:
    example = _example("load_trained_run")
    measured, reported = example.evaluate(MNIST_RUN, examples=5)
    assert reported == summarize_run(MNIST_RUN).test
    assert measured == pytest.approx(reported, abs=1e-4)  # at most one digit of 10,000
    out = capsys.readouterr().out
    digits = _numbers(r"digits +(\d) (\d) (\d) (\d) (\d)", out)
    predicted = _numbers(r"predicted +(\d) (\d) (\d) (\d) (\d)", out)
    assert sum(d == p for d, p in zip(digits, predicted)) >= 4  # a 97.9 % classifier
