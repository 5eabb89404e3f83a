"""The benchmark command runs and writes its table (a smoke test: speed is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.rnn", *args],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip


def test_quick_benchmark_writes_json_and_markdown_and_renders_again(tmp_path: Path) -> None:
    _bench("--quick", "--threads", "1", "--workloads", "C", "--out", str(tmp_path))
    report = json.loads((tmp_path / "rnn_cpu_1t_quick.json").read_text())
    rows = report["workloads"][0]["rows"]
    models = {(r["model"], r["mode"]) for r in rows}
    assert models == {
        (m, mode)
        for m in ("nn.LSTM", "LSTM", "SubLSTM", "FixSubLSTM")
        for mode in ("train", "inference")
    }
    for row in rows:
        assert row["median_ms"] > 0 and row["ratio"] > 0
        assert row["kernel"].split(" (")[0] in ("ATen", "aten_lstm", "cpu_fused")
        if row["kernel"].startswith("cpu_fused"):  # which products and which step loops
            assert "products" in row["kernel"] and "loops" in row["kernel"]
    table = (tmp_path / "rnn_cpu_1t_quick.md").read_text()
    assert "| C " in table and "SubLSTM" in table and "torch 2" in table
    (tmp_path / "rnn_cpu_1t_quick.md").unlink()
    _bench("--render", str(tmp_path / "rnn_cpu_1t_quick.json"))
    assert (tmp_path / "rnn_cpu_1t_quick.md").read_text() == table
