"""The run-queue and results-collection scripts of ``scripts/``, on a tiny adding run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

TINY = (
    "--set steps_per_epoch=2 --set valid_size=16 --set test_size=16 --set batch_size=8 "
    "--set seq_len=6 --set tensorboard=false"
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    # the scripts call `microcircuits`: the one installed next to this Python
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_queue_runs_in_turn_resumes_and_reports_failures(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    queue = [str(ROOT / "scripts" / "queue.sh")]
    first = subprocess.run(
        [*queue, f"adding lstm 4 --epochs 1 {TINY}", "adding nosuchcell 4"],
        env=_env(OUT=str(out)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "end" in first.stdout and "failed" in first.stdout and "exit 2" in first.stdout
    run = out / "adding-lstm-4-seed0"
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 1
    # the same spec with more epochs continues the run from its checkpoint
    subprocess.run(
        [*queue, f"adding lstm 4 --epochs 2 {TINY}"],
        env=_env(OUT=str(out)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 2
    meta = json.loads((run / "meta.json").read_text())
    assert len(meta["resumes"]) == 1

    work = tmp_path / "checkout"
    work.mkdir()
    subprocess.run(
        [str(ROOT / "scripts" / "collect_results.sh"), "adding"],
        cwd=work, env=_env(RUNS=str(out)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    copied = work / "results" / "adding" / run.name
    assert (copied / "metrics.jsonl").is_file() and not (copied / "tensorboard").exists()
    # paused after 2 of the preset's 30 epochs: its resumable state is kept with its weights
    assert sorted(p.name for p in (copied / "checkpoints").iterdir()) == [
        "best.safetensors",
        "last.safetensors",
    ]
    assert "| 4 | LSTM |" in (work / "results" / "adding" / "results.md").read_text()

    # Another machine: a fresh runs/ folder; the queue continues from the committed state
    elsewhere = tmp_path / "elsewhere"
    moved = subprocess.run(
        [*queue, f"adding lstm 4 --epochs 3 {TINY}"], cwd=work,
        env=_env(OUT=str(elsewhere)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "continue results/adding/adding-lstm-4-seed0 (committed state)" in moved.stdout
    continued = elsewhere / run.name
    assert json.loads((continued / "results.json").read_text())["epochs_done"] == 3
    assert len(json.loads((continued / "meta.json").read_text())["resumes"]) == 2
    # the same three epochs as one uninterrupted run
    straight = tmp_path / "straight"
    subprocess.run(
        [*queue, f"adding lstm 4 --epochs 3 {TINY}"], cwd=tmp_path,
        env=_env(OUT=str(straight)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        json.loads((continued / "results.json").read_text())["test"]
        == json.loads((straight / run.name / "results.json").read_text())["test"]
    )

    # a run that ended (the preset's 30 tiny epochs) keeps only its best weights, and the
    # queue on another machine does not train it again
    subprocess.run(
        [*queue, f"adding sublstm 4 {TINY}"],
        env=_env(OUT=str(out)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    subprocess.run(
        [str(ROOT / "scripts" / "collect_results.sh"), "adding"],
        cwd=work, env=_env(RUNS=str(out)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    ended = work / "results" / "adding" / "adding-sublstm-4-seed0"
    assert [p.name for p in (ended / "checkpoints").iterdir()] == ["best.safetensors"]
    again = subprocess.run(
        [*queue, f"adding sublstm 4 {TINY}"], cwd=work,
        env=_env(OUT=str(tmp_path / "third")), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "skip adding-sublstm-4-seed0: finished" in again.stdout
    assert not (tmp_path / "third" / "adding-sublstm-4-seed0").exists()


def test_readme_results_table_comes_from_the_reports(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "ptb").mkdir(parents=True)
    (results / "smnist").mkdir()
    head = "task,cell,size,hidden_size,metric,status,valid,test,paper_test,epochs\n"
    (results / "ptb" / "results.csv").write_text(
        head
        + "ptb,sublstm,10,10,perplexity,early stop,277.677,273.439,222.8,24\n"
        + "ptb,lstm,10,10,perplexity,in progress (epoch 1),,,215.93,0.188253\n"
    )
    (results / "smnist" / "results.csv").write_text(
        head + "smnist,fix_sublstm,100,100,accuracy,paused at epoch 2 of 100,0.31,0.3021,97.27,2\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n")
    script = [
        sys.executable,
        str(ROOT / "scripts" / "readme_results.py"),
        "--results",
        str(results),
    ]
    subprocess.run([*script, "--readme", str(readme), "--write"], check=True, capture_output=True)
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- results:end -->\nafter\n")
    lines = text.splitlines()
    # LSTM before subLSTM within a size; values rounded; a run without a test shows a dash
    rows = [line for line in lines if line.startswith("| PTB") or line.startswith("| sMNIST")]
    assert rows == [
        "| PTB, size 10 | LSTM | in progress (epoch 1) | 0.2 | — | — | 215.93 |",
        "| PTB, size 10 | subLSTM | early stop | 24 | 277.7 | 273.4 | 222.80 |",
        "| sMNIST, 100 units | fix-subLSTM | paused at epoch 2 of 100 | 2 | 31.0 % | 30.2 % "
        "| 97.27 % |",
    ]
    missing = tmp_path / "plain.md"
    missing.write_text("no markers\n")
    failed = subprocess.run([*script, "--readme", str(missing), "--write"], capture_output=True)
    assert failed.returncode == 1 and b"markers" in failed.stderr
