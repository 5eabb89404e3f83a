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


def test_repeats_table_quotes_the_median_over_runs(tmp_path: Path) -> None:
    """Three runs' ratios side by side, nn.LSTM left out, the median column by hand."""

    def run(name: str, ratios: dict[str, float]) -> Path:
        rows = [{"model": "nn.LSTM", "mode": "train", "ratio": 1.0}]
        rows += [{"model": m, "mode": "train", "ratio": r} for m, r in ratios.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"workloads": [{"workload": {"key": "C"}, "rows": rows}]}))
        return path

    paths = [
        run("r1", {"SubLSTM": 1.30, "LSTM": 1.00}),
        run("r2", {"SubLSTM": 1.10, "LSTM": 0.98}),
        run("r3", {"SubLSTM": 1.20}),  # a run without LSTM: its cell reads "-"
    ]
    out = tmp_path / "table.md"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.repeats", *map(str, paths), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[0] == "| workload | model | mode | r1 | r2 | r3 | median |"
    assert "| C | SubLSTM | train | 1.30 | 1.10 | 1.20 | **1.20** |" in lines
    assert "| C | LSTM | train | 1.00 | 0.98 | - | **0.99** |" in lines
    assert not any("nn.LSTM" in line for line in lines)
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.repeats", str(broken)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "not a benchmarks.rnn result" in result.stderr


def test_quick_lm_step_benchmark_writes_both_ways_and_their_ratio(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.lm_step", "--quick", "--sizes", "10",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "lm_step_cpu_1t_quick.json").read_text())
    ways = {(r["size"], r["way"]) for r in report["rows"]}
    assert ways == {(10, "unfused"), (10, "fused"), (10, "ratio")}
    assert all(r.get("median_ms", r.get("ratio")) > 0 for r in report["rows"])
    table = (tmp_path / "lm_step_cpu_1t_quick.md").read_text()
    assert "| 10 |" in table and "fused / unfused" in table


def test_quick_scaling_benchmark_writes_a_row_per_point_model_and_mode(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--quick", "--threads", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "scaling_cpu_1t_quick.json").read_text())
    from benchmarks.scaling import AXES, QUICK_SWEEPS

    want = {
        (axis, value, model, mode)
        for axis in AXES
        for value in QUICK_SWEEPS[axis]
        for model in ("nn.LSTM", "LSTM", "SubLSTM", "FixSubLSTM")
        for mode in ("train", "inference")
    }
    rows = report["rows"]
    assert {(r["axis"], r["value"], r["model"], r["mode"]) for r in rows} == want
    assert len(rows) == len(want)
    for row in rows:
        assert row["median_ms"] > 0 and row["peak_mb"] >= 0
        assert row["ratio"] > 0 and (row["model"] != "nn.LSTM" or row["ratio"] == 1.0)
    table = (tmp_path / "scaling_cpu_1t_quick.md").read_text()
    for heading in ("## sequence length T", "## hidden size H", "## batch B"):
        assert heading in table
    assert "| 3 | train |" in table and "SubLSTM" in table
    png = (tmp_path / "scaling_cpu_1t_quick.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
