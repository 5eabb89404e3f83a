"""The ``microcircuits`` command end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from microcircuits.cli import build_parser, main, register_command
from microcircuits.config import TASKS
from microcircuits.data import MissingDataError, data_file, read_verified

TINY = [
    "--set", "hidden_size=4", "--set", "seq_len=6", "--set", "batch_size=8",
    "--set", "steps_per_epoch=3", "--set", "valid_size=20", "--set", "test_size=20",
    "--set", "tensorboard=false", "--epochs", "2", "--no-progress", "--device", "cpu",
]  # fmt: skip


def test_train_runs_end_to_end(tmp_path: Path, capsys) -> None:
    status = main(["train", "adding", "--cell", "sublstm", "--out", str(tmp_path), *TINY])
    assert status == 0
    run = tmp_path / "adding-sublstm-4-seed0"
    results = json.loads((run / "results.json").read_text())
    assert (results["cell"], results["steps_done"], results["completed"]) == ("sublstm", 6, True)
    out = capsys.readouterr().out
    assert "| 4 | subLSTM | paused at epoch 2 of 30 |" in out and str(run) in out


def test_train_refuses_to_overwrite_then_resumes(tmp_path: Path, capsys) -> None:
    args = ["train", "adding", "--out", str(tmp_path), "--name", "r", *TINY]
    assert main([*args, "--max-steps", "4"]) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "Traceback" not in err
    assert main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["steps_done"] == 6


def test_compare_trains_three_cells_and_prints_a_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "adding", "--out", str(out), "--seed", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    for label in ("| LSTM |", "| subLSTM |", "| fix-subLSTM |"):
        assert label in printed
    for cell in ("lstm", "sublstm", "fix_sublstm"):
        config = json.loads((out / f"adding-{cell}-4-seed3" / "config.json").read_text())
        assert config["seed"] == 3
    assert (out / "results.md").read_text() in printed
    assert (out / "curves_adding_4.png").is_file()


def test_report_command(tmp_path: Path, capsys) -> None:
    main(["train", "adding", "--out", str(tmp_path / "runs"), *TINY])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert "| 4 | LSTM | paused at epoch 2 of 30 |" in capsys.readouterr().out
    assert (tmp_path / "rep" / "results.csv").is_file()
    # --per-epoch prints the validation after each epoch (TINY: 2 epochs) instead
    assert main(["report", str(tmp_path / "runs"), "--per-epoch"]) == 0
    printed = capsys.readouterr().out
    assert "after each epoch" in printed and "| run | 1 | 2 |" in printed
    assert (tmp_path / "rep" / "epochs.md").read_text().startswith("### Delayed addition")


def test_report_without_out_prints_the_table_and_writes_nothing(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    main(["train", "adding", "--out", str(tmp_path / "runs"), *TINY])
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["report", "runs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Results") and "| adding-lstm-4-seed0 |" in out
    assert "Perplexity" not in out and "wrote" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# -- presets, --preset in their format, --config, --dry-run ------------------------------


def test_presets_lists_them_and_prints_one(tmp_path: Path, capsys) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "default"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    for task in TASKS:
        assert task in rows
    assert "lstm 100" in rows["ptb"] and "at 10/100/200/650" in rows["ptb"]
    assert "fix_sublstm (10: 11, 100: 115, 200: 230, 650: 750)" in rows["ptb"]
    assert rows["ptb"].endswith("Table 2 of Costa et al. 2017")
    assert "cmc 64" in rows["mnist"] and "mlp (64: 96)" in rows["mnist"]
    # a printed preset, edited, is a preset file: the task comes from it
    assert main(["presets", "adding"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# The delayed-addition task")
    (tmp_path / "mine.toml").write_text(text.replace("lr = 0.003", "lr = 0.0123"))
    args = ["train", "--preset", str(tmp_path / "mine.toml"), "--dry-run", "--cell", "sublstm"]
    assert main(args) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["task"], config["cell"], config["lr"], config["hidden_size"]) == (
        "adding", "sublstm", 0.0123, 32,
    )  # fmt: skip


def test_dry_run_prints_the_config_and_parameters_and_creates_nothing(
    tmp_path: Path, capsys
) -> None:
    from microcircuits.config import load_config
    from microcircuits.tasks import make_task

    out = tmp_path / "runs"
    args = ["train", "adding", "--cell", "sublstm", "--size", "16", "--set", "lr=0.01"]
    assert main([*args, "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr()
    config = load_config("adding", "sublstm", 16, {"lr": "0.01", "out_dir": str(out)})
    assert json.loads(printed.out) == config.to_dict()
    model = make_task(config).build_model()
    count = sum(p.numel() for p in model.parameters())
    assert f"parameters: {count:,} (subLSTM, 16 units, 1 layer, adding)" in printed.err
    assert f"run directory (not created): {out / 'adding-sublstm-16-seed0'}" in printed.err
    assert not out.exists()


def test_config_reruns_a_run_exactly(tmp_path: Path, capsys) -> None:
    assert main(["train", "adding", "--cell", "fix_sublstm", "--out", str(tmp_path / "a"),
                 "--seed", "5", *TINY]) == 0  # fmt: skip
    first = tmp_path / "a" / "adding-fix_sublstm-4-seed5"
    saved = json.loads((first / "config.json").read_text())
    capsys.readouterr()
    # the run directory or its config.json; --out decides where the rerun goes
    assert main(["train", "--config", str(first), "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == {**saved, "out_dir": str(tmp_path / "b")}
    assert main(["train", "--preset", str(first / "config.json"),
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "b" / first.name / "results.json").read_text())
    assert again["test"] == json.loads((first / "results.json").read_text())["test"]
    # what the config fixes cannot be changed; what may be changed, is
    assert main(["train", "--config", str(first), "--cell", "lstm", "--dry-run"]) == 2
    assert "cell 'lstm' differs from the cell 'fix_sublstm'" in capsys.readouterr().err
    assert main(["train", "--config", str(first), "--epochs", "7", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "adding", "--set", "lr=-1"], "lr must be in (0, inf], got -1.0"),
        (["train", "adding", "--set", "speed=3"], "unknown --set key(s) ['speed']"),
        (["train", "adding", "--cell", "gru"], "unknown cell 'gru'"),
        (["train", "ptb", "--size", "300"], "size must be one of [10, 100, 200, 650]"),
        (["compare", "adding", "--resume"], "--resume needs --out"),
        (["report", "does-not-exist", "--out", "x"], "does not exist"),
        (["report", "does-not-exist"], "does not exist"),
        (["train", "--config", "best.toml"], "--config takes a run's config.json"),
        (["train", "--config", "."], "the directory has no config.json"),
        (["train", "--preset", "a.toml", "--config", "b.json"], "give --preset or --config"),
        (["train", "--preset", "absent.toml"], "preset file absent.toml does not exist"),
        (["train"], "a task is needed, one of ['adding'"),
        (["compare"], "compare needs TASK"),
    ],
)
def test_bad_values_exit_with_a_message_not_a_traceback(
    tmp_path: Path, capsys, monkeypatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("microcircuits: error: ") and message in err
    assert "Traceback" not in err


def test_missing_data_is_reported_plainly(tmp_path: Path, capsys) -> None:
    args = ["train", "ptb", "--size", "10", "--data-dir", str(tmp_path / "empty")]
    assert main([*args, "--set", "download=false", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ptb.train.txt" in err and "not found" in err


def test_argparse_rejects_unknown_tasks() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "cifar"])
    assert exit_info.value.code == 2


def test_more_subcommands_can_be_registered() -> None:
    def add_hello(subparsers) -> None:
        parser = subparsers.add_parser("hello")
        parser.set_defaults(handler=lambda args: 0)

    parser = build_parser()
    assert "hello" not in parser.format_help()
    try:
        register_command(add_hello)
        assert build_parser().parse_args(["hello"]).handler(None) == 0
        assert main(["hello"]) == 0
    finally:
        from microcircuits import cli

        cli.COMMANDS.remove(add_hello)


def test_python_dash_m_runs_the_cli() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "microcircuits", "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0
    for command in ("train", "compare", "report"):
        assert command in completed.stdout


def _have_ptb() -> bool:
    try:
        read_verified("ptb", data_file("ptb", "ptb.valid.txt").name, download=False)
    except MissingDataError:
        return False
    return True


@pytest.mark.slow  # scoring all of PTB's validation and test words takes ~15 s on 2 cores
@pytest.mark.skipif(not _have_ptb(), reason="PTB not found (set MICROCIRCUITS_DATA)")
def test_train_ptb_on_a_slice(tmp_path: Path) -> None:
    args = [
        "train", "ptb", "--size", "10", "--cell", "fix_sublstm", "--out", str(tmp_path),
        "--set", "steps_per_epoch=2", "--set", "hidden_size=3", "--set", "eval_batch_size=200",
        "--set", "tensorboard=false", "--epochs", "1", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((tmp_path / "ptb-fix_sublstm-10-seed0" / "results.json").read_text())
    assert results["metric"] == "perplexity" and results["size"] == 10
    # An untrained model over a 10,000-word vocabulary: perplexity near 10,000.
    assert 1000 < results["test"] < 40000


# -- file system errors: one line naming the path and the cause, exit status 2 ----------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_out_that_is_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("mine")
    assert main(["train", "adding", "--out", str(tmp_path / "afile"), *TINY]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("microcircuits: error: ") and str(tmp_path / "afile") in line
    assert "Not a directory" in line
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_full_disk_names_errno_28_and_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    """The disk fills at the first checkpoint, under a wrapper that hides the cause."""
    import microcircuits.train as train_module

    def full_disk(path, payload):
        try:
            raise OSError(28, "No space left on device", str(path))
        except OSError as exc:
            raise RuntimeError("writing the checkpoint failed") from exc

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    assert main(["train", "adding", "--out", str(tmp_path), *TINY]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device (errno 28)" in line and ".safetensors" in line


def test_a_bogus_storage_url_is_one_line(tmp_path: Path, capsys) -> None:
    args = ["search", "adding", "--trials", "1", "--storage", "bogus://x", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "storage 'bogus://x' is not a database URL" in _one_error_line(capsys)


def test_a_huge_hidden_size_names_the_value(tmp_path: Path, capsys) -> None:
    args = ["train", "adding", "--out", str(tmp_path), *TINY, "--set", "hidden_size=3000000"]
    assert main(args) == 2
    assert "hidden_size=3000000" in _one_error_line(capsys)
