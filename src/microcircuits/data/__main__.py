"""``python -m microcircuits.data verify [--data-dir DIR] [--download]``: check every file."""

from __future__ import annotations

import argparse
import sys

from .registry import DATA_ENV_VAR, check_files, resolve_data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m microcircuits.data",
        description="Check the dataset files against their published sha256 checksums.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="verify every registered file, print a table")
    verify.add_argument(
        "--data-dir",
        help=f"data directory (default: ${DATA_ENV_VAR}, else ~/.cache/microcircuits)",
    )
    verify.add_argument(
        "--download", action="store_true", help="download absent files into the data directory"
    )
    args = parser.parse_args(argv)

    root = resolve_data_dir(args.data_dir)
    print(f"data directory: {root}")
    rows = [("status", "file", "found as")]
    missing, corrupt = [], []
    for result in check_files(args.data_dir, download=args.download):
        found = str(result.path.relative_to(root)) if result.path is not None else "-"
        rows.append((result.status, result.spec.relpath, found))
        if result.status == "missing":
            missing.append(result.detail)
        elif result.status == "corrupt":
            corrupt.append(result.detail)
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for detail in corrupt:
        print(f"\n{detail}")
    if missing:  # the messages differ only in the file named, so one stands for all
        print(f"\n{len(missing)} file(s) missing. For the first: {missing[0]}")
    return 1 if missing or corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
