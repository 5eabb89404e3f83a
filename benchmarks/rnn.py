"""Speed and memory of LSTM, subLSTM and fix-subLSTM against ``torch.nn.LSTM``.

One command::

    python -m benchmarks.rnn                 # CPU, 2 threads, workloads A, B, C
    python -m benchmarks.rnn --quick         # smoke test: tiny shapes, 2 repeats
    python -m benchmarks.rnn --device cuda   # adds workload D
    python -m benchmarks.rnn --workloads A,C --repeats 15 --threads 1

For every workload it builds ``torch.nn.LSTM`` and :mod:`microcircuits`' ``LSTM``,
``SubLSTM`` and ``FixSubLSTM`` with the same sizes (float32) and times

* a training step: forward, ``output.sum()``, backward (gradients of the input and of
  every weight; gradients are set to ``None`` before each step), and
* inference: forward under ``torch.no_grad()`` (modules in ``eval()``).

All (model, mode) pairs are timed once per round and the rounds are interleaved in one
process, with the order rotated every round, so that load from other processes hits all
models alike. Reported per pair: median time, its 25-75% spread, and the ratio to
``torch.nn.LSTM`` in the same mode, as the median of the per-round ratios (each round's
times are paired) with its 25-75% spread.

Peak memory (separate pass, after timing): on CUDA, ``torch.cuda.max_memory_allocated``
minus the memory allocated before the call. On CPU, tracemalloc does not see torch's
allocations, and RSS hides reuse by the C allocator, so the peak is taken from the
allocation events of torch's profiler (``profile_memory=True``): the running sum of
allocated minus freed bytes over one call, maximised. It counts every tensor allocated
during the call (activations, oneDNN workspaces, gradients) but not memory a library
allocates outside torch's allocator (e.g. oneDNN scratchpads), so it can only
understate ``torch.nn.LSTM``'s peak, not ours.

Results go to ``benchmarks/results/rnn_<device>_<threads>t[_quick].{json,md}`` with the
machine, threads, torch version and load averages in the header.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "nn.LSTM"
MODEL_NAMES = (BASELINE, "LSTM", "SubLSTM", "FixSubLSTM")
MODES = ("train", "inference")
TARGET_RATIO = 1.0
TARGET_MEMORY = 1.1


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    seq: int
    batch: int
    input_size: int
    hidden_size: int
    layers: int
    gpu_only: bool = False

    def shape(self) -> str:
        return (
            f"T={self.seq}, B={self.batch}, I={self.input_size}, H={self.hidden_size}, "
            f"L={self.layers}"
        )


WORKLOADS = {
    "A": Workload("A", "LM-650", 35, 20, 650, 650, 2),
    "B": Workload("B", "sMNIST", 784, 128, 1, 100, 1),
    "C": Workload("C", "LM-200", 35, 20, 200, 200, 2),
    "D": Workload("D", "large", 100, 256, 1024, 1024, 2, gpu_only=True),
}
QUICK = {
    "A": Workload("A", "LM-650 (quick)", 6, 4, 32, 32, 2),
    "B": Workload("B", "sMNIST (quick)", 40, 8, 1, 16, 1),
    "C": Workload("C", "LM-200 (quick)", 6, 4, 16, 16, 2),
    "D": Workload("D", "large (quick)", 6, 8, 64, 64, 2, gpu_only=True),
}


# ------------------------------------------------------------------------- models


def build_models(w: Workload, device: torch.device, names: list[str]) -> dict[str, torch.nn.Module]:
    """The models to compare, float32, same sizes, seeded."""
    import microcircuits as mc

    makers: dict[str, Callable[..., torch.nn.Module]] = {
        BASELINE: torch.nn.LSTM,
        "LSTM": mc.LSTM,
        "SubLSTM": mc.SubLSTM,
        "FixSubLSTM": mc.FixSubLSTM,
    }
    models = {}
    for i, name in enumerate(names):
        torch.manual_seed(1234 + i)
        models[name] = makers[name](w.input_size, w.hidden_size, w.layers).to(
            device=device, dtype=torch.float32
        )
    return models


def kernel_of(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Which kernel the dispatcher picks for the first layer of one of our models."""
    if not hasattr(model, "layer_weights"):
        return "cuDNN" if x.is_cuda else "ATen (oneDNN)"
    from microcircuits import kernels
    from microcircuits.cells import LSTMState

    h = x.new_zeros(x.shape[1], model.hidden_size)
    weights = model.layer_weights(0)
    try:
        name = kernels.choose_kernel(model.cell, x, LSTMState(h, h), weights)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"? ({exc})"
    if name != "cpu_fused":
        return name
    from microcircuits.kernels import cpu_fused, native

    gate_rows, hidden = weights.weight_hh.shape
    products = cpu_fused.step_backend(x.dtype, x.shape[1], hidden, gate_rows)
    if products == "direct":  # see kernels/csrc/step_loops.cpp
        return "cpu_fused (brgemm products, C++ direct loops)"
    loops = "Python" if native.step_loops() is None else "C++"
    return f"cpu_fused ({products} products, {loops} loops)"


def make_call(
    model: torch.nn.Module, x: torch.Tensor, mode: str, device: torch.device
) -> Callable[[], None]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if mode == "train":

        def call() -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = model(x)
            out.sum().backward()
            sync()

    else:

        def call() -> None:
            model.eval()
            with torch.no_grad():
                model(x)
            sync()

    return call


# ---------------------------------------------------------------------- measuring


def time_interleaved(
    calls: dict[tuple[str, str], Callable[[], None]], repeats: int, warmup: int
) -> tuple[dict[tuple[str, str], list[float]], list[float | None]]:
    """Times of every call per round, and the 1-minute load average after each round."""
    from microcircuits.kernels import native

    native.step_loops()  # build or load before any timed call
    keys = list(calls)
    for _ in range(warmup):
        for key in keys:
            calls[key]()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    loads: list[float | None] = []
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
        load = _load()
        loads.append(None if load is None else load[0])
    return times, loads


def peak_memory(call: Callable[[], None], device: torch.device, tries: int = 3) -> int:
    """Peak bytes allocated during one call, above what was allocated before it.

    On CPU the largest of ``tries`` measurements: the profiler now and then misses
    allocation events (one call in ~20 read 10-25% of the usual peak, for ``nn.LSTM``'s
    ATen path as for ours), which can only understate a peak, never overstate it."""
    if device.type != "cuda":
        return max(_profiled_peak(call) for _ in range(tries))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    return int(torch.cuda.max_memory_allocated() - before)


def _profiled_peak(call: Callable[[], None]) -> int:
    """Peak of the running sum of torch's CPU allocation events during one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25%, median, 75%)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


# ------------------------------------------------------------------------ running


def run_workload(
    w: Workload,
    device: torch.device,
    names: list[str],
    modes: list[str],
    repeats: int,
    warmup: int,
    memory: bool,
) -> dict:
    models = build_models(w, device, names)
    torch.manual_seed(0)
    x = torch.randn(w.seq, w.batch, w.input_size, device=device, requires_grad=True)
    calls = {
        (name, mode): make_call(models[name], x, mode, device) for name in names for mode in modes
    }
    times, loads = time_interleaved(calls, repeats, warmup)
    rows = []
    for name in names:
        for mode in modes:
            t = times[(name, mode)]
            q25, med, q75 = quantiles(t)
            row = {
                "model": name,
                "mode": mode,
                "kernel": kernel_of(models[name], x),
                "times_s": t,
                "median_ms": med * 1e3,
                "q25_ms": q25 * 1e3,
                "q75_ms": q75 * 1e3,
            }
            if (BASELINE, mode) in times:
                base = times[(BASELINE, mode)]
                paired = [a / b for a, b in zip(t, base)]
                r25, rmed, r75 = quantiles(paired)
                row.update(
                    ratio=rmed,
                    ratio_q25=r25,
                    ratio_q75=r75,
                    ratio_of_medians=med / statistics.median(base),
                )
            rows.append(row)
    if memory:
        peaks = {key: peak_memory(call, device) for key, call in calls.items()}
        for row in rows:
            key = (row["model"], row["mode"])
            row["peak_mb"] = peaks[key] / 2**20
            base_key = (BASELINE, row["mode"])
            if base_key in peaks and peaks[base_key] > 0:
                row["memory_ratio"] = peaks[key] / peaks[base_key]
    return {"workload": asdict(w), "rows": rows, "load_per_round": loads}


# ------------------------------------------------------------------------ reports


def machine_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "git_commit": _git_commit(),
        "kernel_selection": _kernel_selection(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _kernel_selection() -> str:
    try:
        from microcircuits import kernels

        return kernels.get_kernel()
    except Exception:  # noqa: BLE001
        return "?"


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _time_mark(row: dict) -> str:
    """``yes`` (median ratio within target), ``within spread`` (the median misses it but
    the lower quartile meets it: not distinguishable from the target in this run), or
    ``no``."""
    if row["ratio"] <= TARGET_RATIO:
        return "yes"
    if row["ratio_q25"] <= TARGET_RATIO:
        return "within spread"
    return "**no**"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# RNN benchmark: {m['device']}, {m['threads']} thread(s)",
        "",
        f"- machine: {m['host_cpu']} ({m['logical_cpus']} logical CPUs)"
        + (f", GPU {m['gpu']} (cuDNN {m['cudnn']})" if "gpu" in m else ""),
        f"- torch {m['torch']}, Python {m['python']}, threads {m['threads']}, "
        f"kernel selection `{m['kernel_selection']}`, commit {m['git_commit']}",
        f"- date {m['date']}; load average before {report['load_before']}, "
        f"after {report['load_after']} (ratios are paired per round, which cancels "
        "load from other jobs; times are not)",
        f"- {report['repeats']} interleaved rounds after {report['warmup']} warm-up; float32; "
        "train = forward + backward of `output.sum()` (grads of input and weights); "
        "inference = `torch.no_grad()` forward",
        "- ratio = median over rounds of (time / `nn.LSTM` time in the same round) "
        "[25%-75%]; memory = peak bytes allocated during one call "
        + (
            "(`max_memory_allocated`)"
            if m["device"].startswith("cuda")
            else "(torch profiler allocation events, see `benchmarks/rnn.py`)"
        )
        + ", as a ratio to `nn.LSTM`",
        f"- targets: time ratio <= {TARGET_RATIO:.1f}, training memory ratio <= "
        f"{TARGET_MEMORY:.1f}",
    ]
    if "cudnn_allow_tf32" in m:
        lines.append(f"- TF32: cuDNN {m['cudnn_allow_tf32']}, matmul {m['matmul_allow_tf32']}")
    lines += [
        "",
        "| workload | model | kernel | mode | median ms [25%-75%] | ratio [25%-75%] "
        "| time target | peak MB | memory ratio | memory target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wl in report["workloads"]:
        w = wl["workload"]
        for row in wl["rows"]:
            ratio = row.get("ratio")
            ratio_s = (
                f"{ratio:.2f} [{row['ratio_q25']:.2f}-{row['ratio_q75']:.2f}]"
                if ratio is not None
                else "-"
            )
            is_base = row["model"] == BASELINE
            time_ok = "-" if is_base or ratio is None else _time_mark(row)
            mem = row.get("memory_ratio")
            mem_ok = (
                "-"
                if is_base or mem is None or row["mode"] != "train"
                else _mark(mem <= TARGET_MEMORY)
            )
            lines.append(
                f"| {w['key']} {w['label']} | {row['model']} | {row['kernel']} | {row['mode']} "
                f"| {row['median_ms']:.1f} [{row['q25_ms']:.1f}-{row['q75_ms']:.1f}] "
                f"| {ratio_s} | {time_ok} "
                f"| {row.get('peak_mb', float('nan')):.1f} "
                f"| {'-' if mem is None else f'{mem:.2f}'} | {mem_ok} |"
            )
    lines.append("")
    lines.append(
        "Workloads: "
        + "; ".join(
            f"{wl['workload']['key']} {wl['workload']['label']} "
            f"(T={wl['workload']['seq']}, B={wl['workload']['batch']}, "
            f"I={wl['workload']['input_size']}, H={wl['workload']['hidden_size']}, "
            f"L={wl['workload']['layers']})"
            for wl in report["workloads"]
        )
        + "."
    )
    loads = []
    for wl in report["workloads"]:
        vals = [v for v in wl.get("load_per_round", []) if v is not None]
        if vals:
            loads.append(f"{wl['workload']['key']} {min(vals):.1f}-{max(vals):.1f}")
    if loads:
        lines.append("")
        lines.append(
            "1-minute load average during the timed rounds (2 logical CPUs): "
            + "; ".join(loads)
            + "."
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def parse_models(text: str) -> list[str]:
    """``--models`` as a list of model names, the baseline first; unknown names exit."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    bad = [n for n in names if n not in MODEL_NAMES]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {list(MODEL_NAMES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rnn", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated keys of A,B,C,D (default A,B,C; plus D on CUDA)",
    )
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset")
    p.add_argument("--modes", default=",".join(MODES), help="train,inference or one of them")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument(
        "--kernel",
        default=None,
        help="force a microcircuits kernel (e.g. reference) instead of 'auto'",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: allow TF32 in cuDNN and matmul (default: off for both, like for like)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the Markdown table of a results JSON (no measuring)",
    )
    p.add_argument("--tag", default="", help="extra suffix for the output file names")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {args.render.with_suffix('.md')}", file=sys.stderr)
        return report
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.kernel:
        from microcircuits import kernels

        kernels.set_kernel(args.kernel)
    table = QUICK if args.quick else WORKLOADS
    keys = (
        [k.strip().upper() for k in args.workloads.split(",") if k.strip()]
        if args.workloads
        else [k for k, w in table.items() if device.type == "cuda" or not w.gpu_only]
    )
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {sorted(table)}")
    names = parse_models(args.models)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    report = {
        "machine": machine_info(device, args.threads),
        "repeats": repeats,
        "warmup": warmup,
        "quick": args.quick,
        "load_before": _load(),
        "workloads": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"rnn_{device.type}_{args.threads}t"
        + ("_quick" if args.quick else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    for key in keys:
        w = table[key]
        print(f"[{key}] {w.label}: {w.shape()}", file=sys.stderr, flush=True)
        result = run_workload(w, device, names, modes, repeats, warmup, not args.no_memory)
        report["workloads"].append(result)
        for row in result["rows"]:
            ratio = row.get("ratio")
            print(
                f"  {row['model']:>10} {row['mode']:>9} {row['median_ms']:9.1f} ms"
                + (f"  x{ratio:.2f}" if ratio is not None else "")
                + (f"  mem x{row['memory_ratio']:.2f}" if "memory_ratio" in row else ""),
                file=sys.stderr,
                flush=True,
            )
        report["load_after"] = _load()
        # written after every workload, so a long run that is cut short keeps its results
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
