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
    assert (copied / "metrics.jsonl").is_file() and not (copied / "checkpoints").exists()
    assert "| 4 | LSTM |" in (work / "results" / "adding" / "results.md").read_text()
