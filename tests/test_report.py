"""The report: measured results beside the paper's numbers, as Markdown, CSV and PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from microcircuits.config import load_config
from microcircuits.report import (
    Comparison,
    _comparison_figure,
    comparisons,
    find_runs,
    format_epoch_table,
    paper_result,
    report_text,
    run_labels,
    summarize_run,
    write_report,
)
from microcircuits.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_adding(out: Path, name: str, cell: str = "lstm"):
    overrides = {
        "hidden_size": 4, "seq_len": 6, "batch_size": 8, "steps_per_epoch": 3, "epochs": 2,
        "valid_size": 20, "test_size": 20, "progress": False, "tensorboard": False,
        "out_dir": str(out), "run_name": name, "log_every": 1,
    }  # fmt: skip
    return load_config("adding", cell, overrides=overrides)


def _fake_lm_run(run_dir: Path, cell: str, size: int, finished: bool) -> None:
    """A PTB run directory written by hand (as a long run would leave it)."""
    run_dir.mkdir(parents=True)
    config = load_config("ptb", cell, size)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    records = [
        {"kind": "train", "step": 10, "epoch": 0.5, "loss": 6.0},
        {"kind": "train", "step": 20, "epoch": 1.0, "loss": 5.5},
        {"kind": "valid", "step": 20, "epoch": 1.0, "loss": 5.0, "perplexity": 148.4},
        {"kind": "epoch", "step": 20, "epoch": 1, "train_loss": 5.7},
        {"kind": "train", "step": 30, "epoch": 1.5, "loss": 5.2},
        {"kind": "valid", "step": 40, "epoch": 2.0, "loss": 4.6, "perplexity": 99.5},
        {"kind": "epoch", "step": 40, "epoch": 2, "train_loss": 5.1},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(text + '{"kind": "train", "st')  # cut by a kill
    if finished:
        results = {
            "task": "ptb", "cell": cell, "size": size, "hidden_size": config.hidden_size,
            "metric": "perplexity", "best_valid": 99.5, "test": 95.25, "epochs_done": 2.0,
            "steps_done": 40, "wall_time_s": 3600.0, "stopped": "completed", "parameters": 123,
        }  # fmt: skip
        (run_dir / "results.json").write_text(json.dumps(results))


def test_paper_numbers_come_from_tables_1a_1b_and_section_4_1() -> None:
    assert paper_result("ptb", "sublstm", 200) == 79.59
    assert paper_result("ptb", "fix_sublstm", 650) == 70.58
    assert paper_result("wikitext2", "lstm", 10) == 271.44
    assert paper_result("smnist", "fix_sublstm", 100) == 97.27
    assert paper_result("adding", "lstm", 32) is None
    assert paper_result("ptb", "lstm", 300) is None


def test_report_on_finished_and_running_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    finished = train(_tiny_adding(runs, "lstm"))
    train(_tiny_adding(runs, "sublstm", "sublstm"))
    (runs / "sublstm" / "results.json").unlink()  # as if still running after epoch 2
    _fake_lm_run(runs / "ptb-sub", "sublstm", 200, finished=True)
    _fake_lm_run(runs / "ptb-fix", "fix_sublstm", 200, finished=False)

    files = write_report([runs], tmp_path / "report")

    assert len(find_runs([runs])) == 4
    rows = {(r["task"], r["cell"]): r for r in csv.DictReader(files.csv.open())}
    assert set(rows) == {
        ("adding", "lstm"), ("adding", "sublstm"), ("ptb", "sublstm"), ("ptb", "fix_sublstm"),
    }  # fmt: skip
    adding = rows[("adding", "lstm")]
    planned = load_config("adding", "lstm").epochs
    assert adding["status"] == f"paused at epoch 2 of {planned}"  # preset: more epochs
    assert float(adding["test"]) == pytest.approx(finished.test, rel=1e-5)
    assert adding["paper_test"] == ""
    assert rows[("adding", "sublstm")]["status"] == "in progress (epoch 3)"
    assert rows[("adding", "sublstm")]["test"] == ""
    sub = rows[("ptb", "sublstm")]
    assert (sub["paper_test"], sub["test"], sub["hidden_size"]) == ("79.59", "95.25", "200")
    fix = rows[("ptb", "fix_sublstm")]
    assert (fix["paper_test"], fix["hidden_size"], fix["size"]) == ("81.97", "230", "200")
    assert fix["status"] == "in progress (epoch 3)"
    assert float(fix["valid"]) == 99.5  # best of its validation records

    markdown = files.markdown.read_text()
    assert markdown == files.text
    assert "| 200 | subLSTM | done | 99.50 | 95.25 | 79.59 |" in markdown
    assert "| 200 (230) | fix-subLSTM | in progress (epoch 3) | 99.50 | — | 81.97 |" in markdown
    assert "Delayed addition" in markdown and "Penn Treebank" in markdown

    # ours against the paper's: only finished runs that the paper has a number for
    assert comparisons(files.summaries) == [
        Comparison("ptb", "sublstm", 200, "perplexity", 95.25, 79.59)
    ]
    names = sorted(p.name for p in files.figures)
    assert names == ["comparison_ptb.png", "curves_adding_4.png", "curves_ptb_200.png"]
    for figure in files.figures:
        assert figure.read_bytes()[:8] == PNG_MAGIC


def test_a_run_trained_to_fewer_epochs_than_its_preset_is_paused(tmp_path: Path) -> None:
    planned = load_config("adding", "lstm").epochs
    assert planned > 1
    overrides = {
        "hidden_size": 4, "seq_len": 6, "batch_size": 8, "steps_per_epoch": 2, "epochs": 1,
        "valid_size": 20, "test_size": 20, "progress": False, "tensorboard": False,
        "out_dir": str(tmp_path), "run_name": "staged",
    }  # fmt: skip
    config = load_config("adding", "lstm", overrides=overrides)
    train(config)
    assert summarize_run(tmp_path / "staged").status == f"paused at epoch 1 of {planned}"
    # resumed mid-epoch and stopped at once: the epochs done are a fraction, shown to 0.1
    results = tmp_path / "staged" / "results.json"
    record = json.loads(results.read_text())
    results.write_text(json.dumps({**record, "epochs_done": 17.0912}))
    assert summarize_run(tmp_path / "staged").status == f"paused at epoch 17.1 of {planned}"


def test_a_run_that_did_its_preset_files_epochs_is_done(tmp_path: Path) -> None:
    """The plan is the preset file's (``--preset``) where the run had one, not the task's."""
    preset = tmp_path / "short.toml"
    preset.write_text('[defaults]\ntask = "adding"\nepochs = 1\n')
    overrides = {
        "hidden_size": 4, "seq_len": 6, "batch_size": 8, "steps_per_epoch": 2,
        "valid_size": 20, "test_size": 20, "progress": False, "tensorboard": False,
        "out_dir": str(tmp_path), "run_name": "short",
    }  # fmt: skip
    train(load_config("adding", "lstm", overrides=overrides, preset=preset))
    assert summarize_run(tmp_path / "short").status == "done"
    preset.unlink()  # the plan is unknown now: the run is not called paused
    assert summarize_run(tmp_path / "short").status == "done"


def test_accuracy_is_shown_in_percent(tmp_path: Path) -> None:
    run = tmp_path / "smnist"
    run.mkdir()
    config = load_config("smnist", "lstm")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "valid", "step": 5, "epoch": 0.5, "loss": 2.0, "accuracy": 0.4321})
        + "\n"
    )
    summary = summarize_run(run)
    assert summary.paper == 97.96 and summary.status == "in progress (epoch 1)"
    files = write_report([run], tmp_path / "out", plots=False)
    assert "| 100 | LSTM | in progress (epoch 1) | 43.21 | — | 97.96 |" in files.text
    assert files.figures == []


def test_the_comparison_shows_accuracy_in_percent(tmp_path: Path) -> None:
    run = tmp_path / "smnist"
    run.mkdir()
    config = load_config("smnist", "fix_sublstm")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    results = {
        "task": "smnist", "cell": "fix_sublstm", "size": 100, "hidden_size": 100,
        "metric": "accuracy", "best_valid": 0.91, "test": 0.9025, "epochs_done": 3.0,
        "steps_done": 1650, "wall_time_s": 60.0, "stopped": "completed", "parameters": 31,
    }  # fmt: skip
    (run / "results.json").write_text(json.dumps(results))
    files = write_report([run], tmp_path / "out")
    [point] = comparisons(files.summaries)
    assert (point.ours, point.paper) == (pytest.approx(90.25), 97.27)
    assert [p.name for p in files.figures] == ["comparison_smnist.png"]  # no curves logged
    assert files.figures[0].read_bytes()[:8] == PNG_MAGIC


def test_the_epoch_table_reads_whole_epochs_and_marks_lowered_lrs(tmp_path: Path) -> None:
    """One column per whole epoch (a mid-epoch validation is left out), accuracy in %, a
    `*` where the lr the training went on with fell; a shorter run leaves its cells empty."""

    def run(name: str, points: list[tuple[float, float, float]]) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = load_config("smnist", "lstm").to_dict()
        (run_dir / "config.json").write_text(json.dumps(config))
        records = [
            {"kind": "valid", "step": 1, "epoch": e, "loss": 1.0, "accuracy": a, "lr": lr}
            for e, a, lr in points
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return run_dir

    long = run("long", [(0.5, 0.1, 1e-3), (1, 0.5, 1e-3), (2, 0.6, 1e-3), (3, 0.7, 3e-4)])
    short = run("short", [(1, 0.4, 1e-3)])
    text = format_epoch_table([summarize_run(long), summarize_run(short)])
    assert "| run | 1 | 2 | 3 |\n|---|---|---|---|\n" in text
    assert "| long | 50.0 | 60.0 | 70.0* |" in text
    assert "| short | 40.0 |  |  |" in text


def test_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run directory"):
        write_report([tmp_path], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report([tmp_path / "absent"], tmp_path / "out")


def _fake_smnist_run(run_dir: Path, test: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(load_config("smnist", "lstm").to_dict()))
    results = {
        "task": "smnist", "cell": "lstm", "size": 100, "hidden_size": 100,
        "metric": "accuracy", "best_valid": test, "test": test, "epochs_done": 3.0,
        "steps_done": 1650, "wall_time_s": 60.0, "stopped": "early_stop", "parameters": 31,
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))


def test_each_row_names_its_run_so_same_named_runs_differ(tmp_path: Path) -> None:
    """An archived probe and a main run of the same cell and size: the run column tells
    them apart, with as many parent folders as it takes."""
    main_run = tmp_path / "results" / "smnist" / "smnist-lstm-100-seed0"
    probe = tmp_path / "results" / "archive" / "probes" / "smnist-lstm-100-seed0"
    other = tmp_path / "results" / "archive" / "probes" / "smnist-lstm-100-lr3e-4"
    for run, test in ((main_run, 0.9), (probe, 0.5), (other, 0.6)):
        _fake_smnist_run(run, test)
    labels = run_labels([main_run, probe, other])
    assert labels == {
        main_run: "smnist/smnist-lstm-100-seed0",
        probe: "probes/smnist-lstm-100-seed0",
        other: "smnist-lstm-100-lr3e-4",
    }
    text = report_text([tmp_path / "results"])
    assert "| parameters | run |" in text
    assert "| 90.00 | 97.96 | 3 | 60 s | 31 | smnist/smnist-lstm-100-seed0 |" in text
    assert "| 50.00 | 97.96 | 3 | 60 s | 31 | probes/smnist-lstm-100-seed0 |" in text
    assert "| smnist-lstm-100-lr3e-4 |" in text
    assert not (tmp_path / "results" / "results.md").exists()  # report_text writes nothing


def test_the_perplexity_note_is_only_under_perplexity_tables(tmp_path: Path) -> None:
    _fake_smnist_run(tmp_path / "smnist", 0.9)
    accuracy_only = report_text([tmp_path / "smnist"])
    assert "valid: best validation metric" in accuracy_only
    assert "Perplexity" not in accuracy_only
    _fake_lm_run(tmp_path / "ptb", "sublstm", 10, finished=True)
    both = report_text([tmp_path])
    assert "Perplexity = exp(mean per-token NLL" in both


@pytest.mark.parametrize("metric", ["perplexity", "accuracy"])
def test_the_comparison_legend_leaves_the_axes_free(metric: str) -> None:
    """The legend sat in the corner where runs worse than the paper fall (upper left for
    perplexity, lower right for accuracy): it is now outside the axes."""
    if metric == "perplexity":
        rows = [Comparison("ptb", c, s, metric, 3 * p, p) for c, s, p in (
            ("lstm", 10, 215.93), ("sublstm", 100, 91.46), ("fix_sublstm", 200, 81.97),
        )]  # fmt: skip
    else:
        rows = [Comparison("smnist", c, 100, metric, 60.0, 97.3) for c in ("lstm", "sublstm")]
    fig = _comparison_figure(rows[0].task, rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    [ax] = fig.axes
    legend = ax.get_legend() or fig.legends[0]
    box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= frame.x1 or box.y0 >= frame.y1  # beside or above, never over the axes
    labels = [t.get_text() for t in legend.get_texts()]
    assert "LSTM" in labels and any(label.startswith("size ") for label in labels)
