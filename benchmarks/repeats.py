"""Side by side: the ratios to ``nn.LSTM`` of several runs of ``benchmarks.rnn``.

On a shared machine whole runs differ from each other by 10-20%, more than the spread
within one run, so the numbers worth quoting are medians over runs::

    python -m benchmarks.repeats benchmarks/results/repeats/rnn_cpu_2t_run7.json ... \\
        --out benchmarks/results/repeats/native.md

prints (and with ``--out`` writes) a Markdown table: one row per workload, model and
mode, one column per run (the run's median ratio) and the median over the runs. Rows of
``nn.LSTM`` itself (ratio 1 by definition) are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_ratios(path: Path) -> dict[tuple[str, str, str], float]:
    """``(workload, model, mode) -> ratio`` of one run's JSON."""
    try:
        report = json.loads(path.read_text())
        ratios = {}
        for workload in report["workloads"]:
            for row in workload["rows"]:
                if row["model"] == "nn.LSTM":
                    continue
                key = (workload["workload"]["key"], row["model"], row["mode"])
                ratios[key] = float(row["ratio"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a benchmarks.rnn result ({exc})") from exc
    return ratios


def table(paths: list[Path]) -> str:
    """The Markdown table of the runs in ``paths`` with the median over them."""
    runs = [load_ratios(p) for p in paths]
    keys = sorted(set().union(*runs))
    names = [p.stem for p in paths]
    lines = [
        "| workload | model | mode | " + " | ".join(names) + " | median |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for key in keys:
        values = [run.get(key) for run in runs]
        present = [v for v in values if v is not None]
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        lines.append(
            f"| {' | '.join(key)} | {' | '.join(cells)} | **{statistics.median(present):.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repeats", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of benchmarks.rnn")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    text = table(args.runs)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
