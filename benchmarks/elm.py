"""Speed of the ELM neuron: our fused path and reference loop against the published code.

One command::

    python -m benchmarks.elm --reference /path/to/elmneuron     # both shapes, 2 threads
    python -m benchmarks.elm                                     # without the published code
    python -m benchmarks.elm --quick --reference /path/...       # smoke test

``--reference`` is a checkout of the published implementation (AaronSpieler/elmneuron,
MIT): the folder that holds its ``src/expressive_leaky_memory_neuron.py``. It is imported
from there and never copied into this repository. Its ``src/neuronio`` helpers import
plotting libraries; where those are missing, the one constant the model takes from them
(``DEFAULT_Y_TRAIN_SOMA_SCALE``, only used by its NeuronIO evaluation methods) is
supplied by a stub module. Without ``--reference`` the rows of the published code are
skipped (with a message) and the ratios are to our reference loop.

Workloads (version 1, the published models' version, float32):

* ``neuronio``: the NeuronIO Branch-ELM (1278 inputs, 45 branches of 100 synapses,
  NeuronIO routing, ``d_m = 20``, MLP 1x40 SiLU, ``tau_m`` up to 150), batch 8, 500 steps;
* ``shd``: the SHD model (700 inputs, ``d_m = 100``, MLP 1x200 ReLU, ``tau_m`` up to 500,
  ``delta_t = 10``, 20 outputs), batch 32, 100 steps.

Models: ``published`` (the TorchScript ``ELM`` of the published code), ``fused`` (our
``microcircuits.ELM``, which takes :mod:`microcircuits.elm.fused` on the CPU) and
``loop`` (the same module forced onto its reference loop by ``use_kernel("reference")``).
All three have the same weights (ours are loaded with ``ELM.from_reference_state_dict``)
and their outputs are checked to agree before timing. Modes: ``train`` (forward,
``output.sum()``, backward; gradients set to ``None`` first) and ``inference`` (forward
under ``torch.no_grad()``).

Timing as in :mod:`benchmarks.rnn`: every (model, mode) once per round, rounds
interleaved with the order rotated, ratio = median over rounds of the paired per-round
ratio to ``published`` (to ``loop`` without it). Results go to
``benchmarks/results/elm_cpu_<threads>t[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.rnn import _load, machine_info, quantiles, time_interleaved

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("train", "inference")
TARGET_SPEEDUP = 2.0


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    steps: int
    batch: int
    kwargs: dict = field(default_factory=dict)  # the published ELM's keywords

    def shape(self) -> str:
        k = self.kwargs
        branches = k.get("num_branch") or k["num_input"]
        return (
            f"T={self.steps}, B={self.batch}, I={k['num_input']}, d_m={k['num_memory']}, "
            f"branches={branches}x{k.get('num_synapse_per_branch', 1)}"
        )


_NEURONIO = dict(
    num_input=1278,
    num_output=2,
    num_memory=20,
    mlp_activation="silu",
    memory_tau_max=150.0,
    num_branch=45,
    num_synapse_per_branch=100,
    input_to_synapse_routing="neuronio_routing",
)
_SHD = dict(num_input=700, num_output=20, num_memory=100, memory_tau_max=500.0, delta_t=10.0)
WORKLOADS = {
    "neuronio": Workload("neuronio", "NeuronIO Branch-ELM", 500, 8, _NEURONIO),
    "shd": Workload("shd", "SHD", 100, 32, _SHD),
}
QUICK = {
    "neuronio": Workload("neuronio", "NeuronIO (quick)", 20, 2, _NEURONIO),
    "shd": Workload("shd", "SHD (quick)", 10, 4, _SHD),
}


# ------------------------------------------------------------------------- models


def import_reference(root: Path) -> type:
    """The published ``ELM`` class from a checkout at ``root``."""
    root = root.expanduser().resolve()
    if not (root / "src" / "expressive_leaky_memory_neuron.py").is_file():
        raise SystemExit(f"--reference {root}: no src/expressive_leaky_memory_neuron.py there")
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("src.neuronio.neuronio_data_utils")
    except ImportError as exc:  # plotting libraries missing: stub the one constant used
        print(
            f"(published code: {exc}; stubbing src.neuronio.neuronio_data_utils)", file=sys.stderr
        )
        importlib.import_module("src.neuronio")
        stub = types.ModuleType("src.neuronio.neuronio_data_utils")
        stub.DEFAULT_Y_TRAIN_SOMA_SCALE = 1 / 10
        sys.modules[stub.__name__] = stub
    return importlib.import_module("src.expressive_leaky_memory_neuron").ELM


def build_models(w: Workload, reference: type | None) -> dict[str, torch.nn.Module]:
    import microcircuits as mc

    torch.manual_seed(1234)
    if reference is not None:
        published = reference(**w.kwargs)
        state_dict = published.state_dict()
    else:
        published = None
        state_dict = _state_dict_without_reference(w.kwargs)
    ours = mc.ELM.from_reference_state_dict(state_dict, version=1, **w.kwargs)
    models = {"fused": ours, "loop": ours}
    if published is not None:
        models = {"published": published, **models}
    return models


def _state_dict_without_reference(kwargs: dict) -> dict[str, torch.Tensor]:
    """A state dict in the published layout, from one of our models (same initialisation)."""
    import microcircuits as mc

    model = mc.ELM(
        kwargs["num_input"],
        kwargs["num_output"],
        kwargs["num_memory"],
        mlp_activation=kwargs.get("mlp_activation", "relu"),
        memory_tau_max=kwargs.get("memory_tau_max", 1000.0),
        num_branch=kwargs.get("num_branch"),
        num_synapse_per_branch=kwargs.get("num_synapse_per_branch", 1),
        input_to_synapse_routing=kwargs.get("input_to_synapse_routing"),
        delta_t=kwargs.get("delta_t", 1.0),
    )
    names = {
        "raw_synapse_weight": "_proto_w_s",
        "trace_tau": "tau_s",
        "raw_memory_tau": "_proto_tau_m",
        "readout_weight": "w_y.weight",
        "readout_bias": "w_y.bias",
        "synapse_input_index": "input_to_synapse_indices",
        "synapse_mask": "valid_indices_mask",
    }
    for layer in range(model.mlp_num_layers + 1):
        names[f"mlp_weight_l{layer}"] = f"mlp.network.{2 * layer}.weight"
        names[f"mlp_bias_l{layer}"] = f"mlp.network.{2 * layer}.bias"
    return {names[key]: value for key, value in model.state_dict().items()}


def make_call(name: str, model: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    from microcircuits.kernels import use_kernel

    def context() -> contextlib.AbstractContextManager:
        return use_kernel("reference") if name == "loop" else contextlib.nullcontext()

    def forward() -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    if mode == "train":

        def call() -> None:
            model.zero_grad(set_to_none=True)
            with context():
                forward().sum().backward()

    else:

        def call() -> None:
            with context(), torch.no_grad():
                forward()

    return call


def check_agreement(models: dict[str, torch.nn.Module], x: torch.Tensor) -> float | None:
    """Largest difference between the published model's output and the fused path's."""
    if "published" not in models:
        return None
    with torch.no_grad():
        a = models["published"](x)
        b = models["fused"](x)[0]
    diff = float((a - b).abs().max())
    if not diff < 1e-3 * max(1.0, float(a.abs().max())):
        raise SystemExit(f"the published model and ours disagree by {diff}")
    return diff


# ------------------------------------------------------------------------ running


def run_workload(
    w: Workload, reference: type | None, modes: list[str], repeats: int, warmup: int
) -> dict:
    models = build_models(w, reference)
    torch.manual_seed(0)
    x = torch.rand(w.batch, w.steps, w.kwargs["num_input"])  # (B, T, I), as the published code
    diff = check_agreement(models, x)
    calls = {
        (name, mode): make_call(name, model, x, mode)
        for name, model in models.items()
        for mode in modes
    }
    times, loads = time_interleaved(calls, repeats, warmup)
    baseline = "published" if "published" in models else "loop"
    rows = []
    for name in models:
        for mode in modes:
            t = times[(name, mode)]
            q25, med, q75 = quantiles(t)
            base = times[(baseline, mode)]
            # speedup: baseline time / this time, paired per round
            r25, rmed, r75 = quantiles([b / a for a, b in zip(t, base)])
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "times_s": t,
                    "median_ms": med * 1e3,
                    "q25_ms": q25 * 1e3,
                    "q75_ms": q75 * 1e3,
                    "speedup": rmed,
                    "speedup_q25": r25,
                    "speedup_q75": r75,
                    "speedup_of_medians": statistics.median(base) / med,
                }
            )
    return {
        "workload": asdict(w),
        "baseline": baseline,
        "max_output_difference": diff,
        "rows": rows,
        "load_per_round": loads,
    }


# ------------------------------------------------------------------------ reports


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# ELM benchmark: CPU, {m['threads']} thread(s)",
        "",
        f"- machine: {m['host_cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}, "
        f"Python {m['python']}, commit {m['git_commit']}, C++ loops {report['native']}",
        f"- date {m['date']}; load average before {report['load_before']}, after "
        f"{report['load_after']}",
        f"- conditions: {report['conditions']}",
        f"- {report['repeats']} interleaved rounds after {report['warmup']} warm-up; float32; "
        "train = forward + backward of `output.sum()` (parameter gradients); inference = "
        "`torch.no_grad()` forward",
        "- speedup = median over rounds of (baseline time / time) in the same round "
        "[25%-75%]; baseline: the published TorchScript `ELM` (`published`) where given, "
        f"else our reference loop (`loop`); target: fused >= {TARGET_SPEEDUP:.0f}x the "
        "published code",
        "",
        "| workload | model | mode | median ms [25%-75%] | speedup [25%-75%] | target |",
        "|---|---|---|---|---|---|",
    ]
    for wl in report["workloads"]:
        w = wl["workload"]
        for row in wl["rows"]:
            target = "-"
            if row["model"] == "fused" and wl["baseline"] == "published":
                target = "yes" if row["speedup"] >= TARGET_SPEEDUP else "**no**"
            lines.append(
                f"| {w['label']} | {row['model']} | {row['mode']} "
                f"| {row['median_ms']:.1f} [{row['q25_ms']:.1f}-{row['q75_ms']:.1f}] "
                f"| {row['speedup']:.2f} [{row['speedup_q25']:.2f}-{row['speedup_q75']:.2f}] "
                f"| {target} |"
            )
    lines += ["", "Workloads (version 1):"]
    for wl in report["workloads"]:
        w = Workload(**wl["workload"])
        diff = wl["max_output_difference"]
        agree = "" if diff is None else f"; outputs of published and fused differ by {diff:.1e}"
        loads = [v for v in wl["load_per_round"] if v is not None]
        load = f"; load {min(loads):.1f}-{max(loads):.1f} during the rounds" if loads else ""
        lines.append(f"- {w.label}: {w.shape()}, keywords {w.kwargs}{agree}{load}")
    if report.get("skipped"):
        lines += ["", report["skipped"]]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.elm", description=__doc__.split("\n")[0])
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="checkout of AaronSpieler/elmneuron (the folder holding src/); rows skipped if absent",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--workloads", default="neuronio,shd", help="comma-separated subset")
    p.add_argument("--modes", default=",".join(MODES), help="train,inference or one of them")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke test")
    p.add_argument(
        "--conditions",
        default="",
        help="free text for the results file: what else ran on the machine, nice level",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from microcircuits.kernels import native

    reference = None
    skipped = ""
    if args.reference is None:
        skipped = (
            "The published implementation was not given (--reference): its rows are skipped "
            "and the speedups are to our reference loop."
        )
        print(skipped, file=sys.stderr)
    else:
        reference = import_reference(args.reference)
    table = QUICK if args.quick else WORKLOADS
    keys = [k.strip().lower() for k in args.workloads.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {sorted(table)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    report = {
        "machine": machine_info(torch.device("cpu"), args.threads),
        "native": "yes" if native.step_loops() is not None else "no (Python loops)",
        "conditions": args.conditions or "not stated",
        "repeats": repeats,
        "warmup": warmup,
        "quick": args.quick,
        "skipped": skipped,
        "load_before": _load(),
        "workloads": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"elm_cpu_{args.threads}t" + ("_quick" if args.quick else "")
    for key in keys:
        w = table[key]
        print(f"[{key}] {w.label}: {w.shape()}", file=sys.stderr, flush=True)
        result = run_workload(w, reference, modes, repeats, warmup)
        report["workloads"].append(result)
        for row in result["rows"]:
            print(
                f"  {row['model']:>9} {row['mode']:>9} {row['median_ms']:9.1f} ms  "
                f"x{row['speedup']:.2f} vs {result['baseline']}",
                file=sys.stderr,
                flush=True,
            )
        report["load_after"] = _load()
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
