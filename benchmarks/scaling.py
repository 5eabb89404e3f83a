"""How time and memory grow with sequence length, hidden size and batch.

One command::

    python -m benchmarks.scaling                # CPU, 2 threads, about two minutes
    python -m benchmarks.scaling --threads 1
    python -m benchmarks.scaling --quick        # smoke test: tiny shapes, 2 repeats

From a base shape (2 layers, T=35, B=20, I=H=200: workload C of ``benchmarks.rnn``) one
axis at a time is varied -- the sequence length T, the hidden size H (with I = H) and
the batch B -- and at every point ``torch.nn.LSTM`` and ``microcircuits``' ``LSTM``,
``SubLSTM`` and ``FixSubLSTM`` are timed exactly as ``benchmarks.rnn`` times a workload
(its ``run_workload``: a training step, forward + backward of ``output.sum()``, and a
``no_grad`` forward; all (model, mode) pairs once per round, rounds interleaved; ratio =
median of the per-round ratios to ``nn.LSTM``; peak memory from the profiler's
allocation events). So a point of an axis is a small ``benchmarks.rnn`` run, and the
table shows where each path wins: per point the median time, the ratio to ``nn.LSTM``
and the peak memory.

Results go to ``benchmarks/results/scaling_<device>_<threads>t[_quick].{json,md,png}``
(the plot: time, ratio and training memory against each axis, log scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.rnn import (
    BASELINE,
    MODEL_NAMES,
    MODES,
    RESULTS_DIR,
    Workload,
    _load,
    machine_info,
    parse_models,
    run_workload,
)

AXES = ("seq", "hidden", "batch")
AXIS_LABELS = {"seq": "sequence length T", "hidden": "hidden size H (= input size)",
               "batch": "batch B"}  # fmt: skip
BASE = {"seq": 35, "batch": 20, "hidden": 200, "layers": 2}
SWEEPS = {"seq": [10, 35, 100, 300], "hidden": [50, 100, 200, 400, 800], "batch": [1, 4, 20, 64]}
QUICK_BASE = {"seq": 6, "batch": 4, "hidden": 16, "layers": 2}
QUICK_SWEEPS = {"seq": [3, 6], "hidden": [8, 16], "batch": [1, 4]}


def point(axis: str, value: int, base: dict[str, int]) -> Workload:
    """The workload of one point: the base shape with ``axis`` set to ``value``."""
    shape = {**base, axis: value}
    return Workload(
        key=f"{axis}={value}",
        label=f"{AXIS_LABELS[axis]} {value}",
        seq=shape["seq"],
        batch=shape["batch"],
        input_size=shape["hidden"],
        hidden_size=shape["hidden"],
        layers=shape["layers"],
    )


def measure(
    sweeps: dict[str, list[int]],
    base: dict[str, int],
    names: list[str],
    modes: list[str],
    repeats: int,
    warmup: int,
    memory: bool,
    device: torch.device,
) -> list[dict]:
    """One ``benchmarks.rnn.run_workload`` per point; the base shape (shared by the
    axes) is measured once and reported on each axis."""
    done: dict[tuple[int, int, int], dict] = {}
    points = []
    for axis in AXES:
        for value in sweeps.get(axis, []):
            w = point(axis, value, base)
            shape = (w.seq, w.batch, w.hidden_size)
            if shape not in done:
                print(f"[{axis}={value}] {w.shape()}", file=sys.stderr, flush=True)
                done[shape] = run_workload(w, device, names, modes, repeats, warmup, memory)
            result = done[shape]
            points.append({"axis": axis, "value": value, **result})
    return points


def rows_of(points: list[dict]) -> list[dict]:
    """Flat rows: one per (axis, value, model, mode)."""
    rows = []
    for p in points:
        for row in p["rows"]:
            rows.append(
                {
                    "axis": p["axis"],
                    "value": p["value"],
                    "model": row["model"],
                    "mode": row["mode"],
                    "kernel": row["kernel"],
                    "median_ms": row["median_ms"],
                    "q25_ms": row["q25_ms"],
                    "q75_ms": row["q75_ms"],
                    "ratio": row.get("ratio"),
                    "ratio_q25": row.get("ratio_q25"),
                    "ratio_q75": row.get("ratio_q75"),
                    "peak_mb": row.get("peak_mb"),
                    "memory_ratio": row.get("memory_ratio"),
                }
            )
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    base = report["base"]
    names, modes = report["models"], report["modes"]
    lines = [
        f"# RNN scaling: {m['device']}, {m['threads']} thread(s)",
        "",
        f"- machine: {m['host_cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}, "
        f"threads {m['threads']}, kernel selection `{m['kernel_selection']}`, commit "
        f"{m['git_commit']}",
        f"- date {m['date']}; load average before {report['load_before']}, after "
        f"{report['load_after']}",
        f"- base shape: {base['layers']} layers, T={base['seq']}, B={base['batch']}, "
        f"I=H={base['hidden']}; one axis varied at a time; float32",
        f"- every point as `benchmarks.rnn` times a workload: {report['repeats']} interleaved "
        f"rounds after {report['warmup']} warm-up; train = forward + backward of "
        "`output.sum()`, inference = `torch.no_grad()` forward",
        "- each cell: median ms, then `xR` = median over rounds of the time / `nn.LSTM`'s "
        "in the same round (below 1: faster than `nn.LSTM`), then the peak MB allocated "
        "during one call (torch profiler allocation events)",
        "",
    ]
    rows = report["rows"]
    for axis in AXES:
        values = sorted({r["value"] for r in rows if r["axis"] == axis})
        if not values:
            continue
        lines += [f"## {AXIS_LABELS[axis]}", ""]
        header = "| " + AXIS_LABELS[axis].split(" (")[0] + " | mode | "
        header += " | ".join(names) + " |"
        lines += [header, "|---|---|" + "---|" * len(names)]
        for value in values:
            for mode in modes:
                cells = []
                for name in names:
                    row = next(
                        (r for r in rows if r["axis"] == axis and r["value"] == value
                         and r["model"] == name and r["mode"] == mode),
                        None,
                    )  # fmt: skip
                    cells.append("-" if row is None else _cell(row))
                lines.append(f"| {value} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    kernels = sorted({(r["model"], r["kernel"]) for r in rows if r["model"] != BASELINE})
    if kernels:
        lines.append(
            "Kernels: " + "; ".join(f"{model}: {kernel}" for model, kernel in kernels) + "."
        )
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    text = f"{row['median_ms']:.2f}"
    if row["model"] != BASELINE and row.get("ratio") is not None:
        text += f" x{row['ratio']:.2f}"
    if row.get("peak_mb") is not None:
        text += f", {row['peak_mb']:.1f} MB"
    return text


def plot(report: dict, path: Path) -> None:
    """Time (train, inference), ratio to nn.LSTM and training memory against each axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    rows = report["rows"]
    names = report["models"]
    panels = [
        ("time, train (ms)", "median_ms", "train"),
        ("time, inference (ms)", "median_ms", "inference"),
        ("time / nn.LSTM (-- inference)", "ratio", None),
        ("peak memory, train (MB)", "peak_mb", "train"),
    ]
    fig, axes = plt.subplots(
        len(panels), len(AXES), figsize=(4.2 * len(AXES), 3.0 * len(panels)), squeeze=False
    )
    colors = {name: f"C{i}" for i, name in enumerate(MODEL_NAMES)}
    for col, axis in enumerate(AXES):
        for row_i, (title, key, mode) in enumerate(panels):
            ax = axes[row_i][col]
            for name in names:
                for m in [mode] if mode else list(report["modes"]):
                    pts = sorted(
                        (r["value"], r[key]) for r in rows
                        if r["axis"] == axis and r["model"] == name and r["mode"] == m
                        and r.get(key) is not None
                    )  # fmt: skip
                    if not pts or (key == "ratio" and name == BASELINE):
                        continue
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        markersize=3,
                        color=colors.get(name),
                        linestyle="--" if m == "inference" else "-",
                        label=name if (m == (mode or "train")) else None,
                    )
            ax.set_xscale("log")
            ax.set_xticks(sorted({r["value"] for r in rows if r["axis"] == axis}))
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            if key == "ratio":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            else:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            if row_i == len(panels) - 1:
                ax.set_xlabel(AXIS_LABELS[axis])
            if col == 0:
                ax.set_ylabel(title)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = report["machine"]
    base = report["base"]
    fig.suptitle(
        f"{m['device']}, {m['threads']} thread(s); base L={base['layers']}, T={base['seq']}, "
        f"B={base['batch']}, I=H={base['hidden']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--axes", default=",".join(AXES), help="comma-separated subset of seq,hidden,batch"
    )
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.set_num_threads(args.threads)
    names = parse_models(args.models)
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    if any(a not in AXES for a in axes):
        raise SystemExit(f"unknown axis in {axes}; choose from {list(AXES)}")
    base, sweeps = (QUICK_BASE, QUICK_SWEEPS) if args.quick else (BASE, SWEEPS)
    sweeps = {a: sweeps[a] for a in axes}
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    modes = list(MODES)
    report = {
        "machine": machine_info(device, args.threads),
        "base": base,
        "sweeps": sweeps,
        "models": names,
        "modes": modes,
        "repeats": repeats,
        "warmup": warmup,
        "quick": args.quick,
        "load_before": _load(),
    }
    points = measure(sweeps, base, names, modes, repeats, warmup, not args.no_memory, device)
    report["load_after"] = _load()
    report["points"] = points
    report["rows"] = rows_of(points)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling_{device.type}_{args.threads}t" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    if not args.no_plot:
        plot(report, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md" + ("" if args.no_plot else ", .png"),
          file=sys.stderr)  # fmt: skip
    return report


if __name__ == "__main__":
    main()
