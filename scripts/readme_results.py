"""The README's table of PTB and sequential-MNIST results, from the committed reports.

    python scripts/readme_results.py            # print the table
    python scripts/readme_results.py --write    # put it into README.md between the markers

Reads ``results/<task>/results.csv`` (written by ``microcircuits report`` through
``scripts/collect_results.sh``), so the README shows what the runs measured and nothing
typed by hand. The table goes between ``<!-- results:start -->`` and
``<!-- results:end -->``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from microcircuits.model_registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "ptb": "PTB",
    "wikitext2": "WikiText-2",
    "smnist": "sMNIST",
    "psmnist": "psMNIST",
    "mnist": "MNIST",
}
CELLS = {name: kind.label for name, kind in MODELS.items()}  # the models' labels, in order
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _value(text: str, metric: str) -> str:
    if not text:
        return "—"
    number = float(text)
    if metric == "accuracy":
        return f"{100 * number:.1f} %"
    return f"{number:.1f}"


def _paper(text: str, metric: str) -> str:
    if not text:
        return "—"
    return f"{float(text):.2f} %" if metric == "accuracy" else f"{float(text):.2f}"


def rows(results: Path) -> list[str]:
    """One Markdown row per run of every task present under ``results``."""
    lines = []
    for task, label in TASKS.items():
        table = results / task / "results.csv"
        if not table.is_file():
            continue
        with table.open(newline="") as handle:
            records = list(csv.DictReader(handle))
        order = {cell: n for n, cell in enumerate(CELLS)}
        records.sort(key=lambda r: (int(r["size"]), order.get(r["cell"], 99)))
        for r in records:
            metric = r["metric"]
            sized = task in ("ptb", "wikitext2", "mnist")  # a table row, not hidden units
            name = f"{label}, size {r['size']}" if sized else f"{label}, {r['size']} units"
            epochs = f"{round(float(r['epochs'] or 0), 1):g}"
            cells = [
                name,
                CELLS.get(r["cell"], r["cell"]),
                r["status"],
                epochs,
                _value(r["valid"], metric),
                _value(r["test"], metric),
                _paper(r["paper_test"], metric),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(results: Path) -> str:
    head = [
        "| experiment | cell | status | epochs | valid | test | paper (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows(results)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--write", action="store_true", help="update the README in place")
    args = parser.parse_args(argv)
    text = table(args.results)
    if not args.write:
        print(text, end="")
        return 0
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        print(f"{args.readme}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    args.readme.write_text(f"{before}{START}\n{text}{END}{after}")
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
