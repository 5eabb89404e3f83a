"""The elm-memory figure of a trained ELM run: files written, and the numbers in its CSV
against the model's own time constants and its step function run by hand."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from microcircuits.cli import main
from microcircuits.data import adding_batch
from microcircuits.elm.equations import elm_step, synaptic_drive
from microcircuits.runs import load_run

TAU_MAX = 20.0  # learned time constants from 1 to 20 steps


def _train(out: Path, name: str, *extra: str) -> Path:
    args = [
        "-q", "train", "adding", "--cell", "elm", "--size", "10", "--max-steps", "20",
        "--out", str(out), "--name", name, "--no-progress",
        "--set", "steps_per_epoch=10", "--set", "tensorboard=false",
        "--set", "valid_size=50", "--set", "test_size=50", *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return out / name


@pytest.fixture(scope="module")
def elm_run(tmp_path_factory) -> Path:
    """A tiny ELM trained for 20 steps on the adding task, its time constants learned."""
    out = tmp_path_factory.mktemp("runs")
    return _train(
        out, "elm", "--set", "elm_learn_memory_tau=true", "--set", f"elm_memory_tau_max={TAU_MAX}"
    )


def _read(path: Path) -> tuple[list[dict], list[dict]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [r for r in rows if r["kind"] == "tau"], [r for r in rows if r["kind"] == "memory"]


def test_elm_memory_figure_holds_the_models_numbers(tmp_path, elm_run, capsys):
    out = tmp_path / "figs"
    args = ["-q", "figure", "elm-memory", "--runs", str(elm_run), "--out", str(out)]
    assert main([*args, "--set", "samples=(0, 2)"]) == 0
    assert (out / "elm-memory.png").stat().st_size > 10_000
    assert (out / "elm-memory.pdf").stat().st_size > 5_000
    taus, memory = _read(out / "elm-memory.csv")

    run = load_run(elm_run)
    elm = run.model.elm
    # the time constants: the checkpoint's, and the log-spaced grid they started from
    trained = elm.memory_tau.detach()
    initial = torch.logspace(math.log10(1 + 1e-6), math.log10(TAU_MAX - 1e-6), 10)
    assert [int(r["unit"]) for r in taus] == list(range(10))
    for row in taus:
        unit = int(row["unit"])
        assert float(row["tau_trained"]) == pytest.approx(trained[unit].item(), rel=1e-5)
        assert float(row["tau_initial"]) == pytest.approx(initial[unit].item(), rel=1e-5)
    assert not torch.allclose(trained, initial)  # learned: they moved in 20 steps
    ranks = sorted(taus, key=lambda r: int(r["rank"]))
    assert [float(r["tau_trained"]) for r in ranks] == sorted(float(r["tau_trained"]) for r in taus)

    # the memory: the model's step function over the task's test sequences 0 and 2
    x_all, _ = adding_batch(50, 50, generator=torch.Generator().manual_seed(0xADD_0002))
    x = x_all[:, [0, 2]]  # (T, 2, 2)
    with torch.no_grad():
        weights = elm.step_weights()
        drive = synaptic_drive(elm.route(x), elm.synapse_weight, elm.num_branch, elm.version)
        state, memories = elm.initial_state(2), []
        for drive_t in drive.unbind(0):
            output, state = elm_step(drive_t, state, weights)
            memories.append(state.memory)
        expected = torch.stack(memories)  # (T, 2, M)
        torch.testing.assert_close(output, run.model(x))  # the step function is the model
    assert len(memory) == 2 * 50 * 10
    for row in memory:
        sample = {0: 0, 2: 1}[int(row["test_index"])]
        want = expected[int(row["step"]), sample, int(row["unit"])].item()
        assert float(row["memory"]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_elm_memory_with_fixed_time_constants(tmp_path):
    run = _train(tmp_path / "runs", "fixed")  # the adding preset: fixed, 1 to 1000 steps
    out = tmp_path / "figs"
    assert main(["-q", "figure", "elm-memory", "--runs", str(run), "--out", str(out)]) == 0
    taus, memory = _read(out / "elm-memory.csv")
    assert all(r["tau_initial"] == r["tau_trained"] for r in taus)
    assert float(max(taus, key=lambda r: int(r["rank"]))["tau_trained"]) == pytest.approx(1000)
    assert {r["test_index"] for r in memory} == {"0", "1"}  # the default samples


def test_elm_memory_refuses_other_runs(tmp_path, elm_run, capsys):
    out = str(tmp_path / "figs")
    lstm = tmp_path / "runs"
    args = [
        "-q", "train", "adding", "--cell", "lstm", "--size", "4", "--max-steps", "2",
        "--out", str(lstm), "--name", "lstm", "--no-progress",
        "--set", "steps_per_epoch=2", "--set", "tensorboard=false",
        "--set", "valid_size=20", "--set", "test_size=20",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["-q", "figure", "elm-memory", "--runs", str(lstm / "lstm"), "--out", out]) == 2
    assert "give a run of --cell elm or branch_elm" in capsys.readouterr().err
    runs = [str(lstm / "lstm"), str(elm_run)]
    assert main(["-q", "figure", "elm-memory", "--runs", *runs, "--out", out]) == 2
    assert "got 2 runs" in capsys.readouterr().err
    assert main(["-q", "figure", "elm-memory", "--out", out]) == 2
    assert "got 0 runs" in capsys.readouterr().err
