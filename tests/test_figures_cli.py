"""Figures of trained runs: loading runs, the tasks' probes, and the `figure` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from microcircuits.analysis.trained import resolve_runs
from microcircuits.cli import main
from microcircuits.config import load_config
from microcircuits.data import corpus_from_texts
from microcircuits.runs import load_run
from microcircuits.tasks import AddingTask, LanguageModelTask
from microcircuits.train import train

CPU = torch.device("cpu")


def _adding_config(out: Path, cell: str, **overrides):
    values = {
        "hidden_size": 5,
        "seq_len": 8,
        "batch_size": 8,
        "valid_size": 20,
        "test_size": 20,
        "steps_per_epoch": 4,
        "epochs": 2,
        "progress": False,
        "tensorboard": False,
        "out_dir": str(out),
        "run_name": cell,
    }
    return load_config("adding", cell, overrides=values | overrides)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    return {cell: train(_adding_config(out, cell)).run_dir for cell in ("lstm", "sublstm")}


def test_adding_probe_loss_equals_the_task_evaluation(tmp_path):
    config = _adding_config(tmp_path, "sublstm")
    task = AddingTask(config, CPU)
    model = task.build_model().eval()
    x, loss = task.probe(model, config.test_size)
    assert x.shape == (config.seq_len, config.test_size, 2)
    with torch.no_grad():
        probe_loss = loss(model.rnn(x)[0]).item()
    assert probe_loss == pytest.approx(task.evaluate(model, "test").loss, rel=1e-5)


def test_language_probe_is_next_word_loss_at_the_last_step():
    text = "a b c d e f g h\n" * 20
    corpus = corpus_from_texts("tiny", text, text, text)
    config = load_config("ptb", "fix_sublstm", 10, {"hidden_size": 4, "eval_batch_size": 2})
    task = LanguageModelTask(config, CPU, corpus=corpus)
    model = task.build_model().eval()
    x, loss = task.probe(model, 3, steps=6)
    assert x.shape == (6, 3, 4)
    # independent: the whole model on the same streams, cross-entropy of the last step
    streams = corpus.test[: (corpus.test.numel() // 3) * 3].view(3, -1).t()  # (N, 3)
    with torch.no_grad():
        logits, _ = model(streams[:6])
        expected = F.cross_entropy(logits[-1], streams[6]).item()
        assert loss(model.rnn(x)[0]).item() == pytest.approx(expected, rel=1e-5)


def test_load_run_restores_the_best_checkpoint(trained_runs):
    run = load_run(trained_runs["sublstm"])
    assert run.config.cell == "sublstm" and not run.model.training
    saved = json.loads((trained_runs["sublstm"] / "results.json").read_text())
    assert run.task.evaluate(run.model, "valid").metric == pytest.approx(saved["best_valid"])
    assert run.task.evaluate(run.model, "test").metric == pytest.approx(saved["test"])


def test_load_run_refuses_what_is_not_a_run(tmp_path, trained_runs):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="best"):
        load_run(trained_runs["lstm"], "final")


def test_figure_command_on_trained_runs(tmp_path, trained_runs, capsys):
    out = tmp_path / "figs"
    runs = [str(trained_runs["lstm"]), str(trained_runs["sublstm"])]
    assert (
        main(["-q", "figure", "gradients", "--runs", *runs, "--out", str(out), "--batch", "4"]) == 0
    )
    png = out / "gradients-trained.png"
    assert png.stat().st_size > 10_000
    csv = (out / "gradients-trained.csv").read_text()
    for label in ("LSTM, initial", "LSTM, trained", "subLSTM, initial", "subLSTM, trained"):
        assert label in csv
    assert main(["-q", "figure", "balance", "--runs", *runs, "--out", str(out)]) == 0
    assert "LSTM, trained" not in (out / "balance-trained.csv").read_text().replace("subLSTM", "")
    # an LSTM alone has no subtractive gates to measure
    assert main(["-q", "figure", "balance", "--runs", runs[0], "--out", str(out)]) == 2
    assert "none of the runs" in capsys.readouterr().err


def test_figure_command_without_runs(tmp_path):
    out = tmp_path / "figs"
    args = ["figure", "gating", "--out", str(out), "--set", "trials=1", "--set", "duration=200.0"]
    assert main(["-q", *args]) == 0
    assert (out / "gating.png").stat().st_size > 10_000
    assert main(["-q", "figure", "gating", "--out", str(out), "--set", "bogus=1"]) == 2
    assert main(["-q", "figure", "gating", "--runs", "x", "--out", str(out)]) == 2


def test_figure_runs_accept_a_folder_of_runs_as_compare_writes_it(tmp_path, trained_runs, capsys):
    # what `microcircuits compare` leaves: run directories beside its table and curves
    folder = tmp_path / "compare-adding-20260101-000000"
    for cell, run in trained_runs.items():
        shutil.copytree(run, folder / cell)
    (folder / "results.csv").write_text("task,cell\n")
    (folder / "curves_adding_5.png").write_bytes(b"\x89PNG")
    out = tmp_path / "figs"
    common = ["--out", str(out), "--batch", "4"]
    assert main(["-q", "figure", "gradients", "--runs", str(folder), *common]) == 0
    csv = (out / "gradients-trained.csv").read_text()
    assert "LSTM, trained" in csv and "subLSTM, trained" in csv
    # a shell glob over the folder (runs/compare-adding-*/*): its files are ignored
    listed = sorted(str(p) for p in folder.iterdir())
    assert main(["-q", "figure", "gradients", "--runs", *listed, *common]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no runs here")
    assert main(["-q", "figure", "gradients", "--runs", str(empty), *common]) == 2
    assert "no run directory (a folder holding config.json)" in capsys.readouterr().err
    assert main(["-q", "figure", "gradients", "--runs", str(tmp_path / "absent"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resolve_runs_order_depth_and_duplicates(tmp_path):
    def run(path: Path) -> Path:
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        return path

    b, a = run(tmp_path / "top" / "b"), run(tmp_path / "top" / "nested" / "a")
    single = run(tmp_path / "single")
    (tmp_path / "top" / "table.csv").write_text("")
    found = resolve_runs([single, tmp_path / "top", b, tmp_path / "top" / "table.csv"])
    assert found == [single, b, a]  # in the order given, each folder's runs sorted, once
    with pytest.raises(ValueError, match="no run directory"):
        resolve_runs([tmp_path / "top" / "table.csv"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_runs([tmp_path / "absent"])
