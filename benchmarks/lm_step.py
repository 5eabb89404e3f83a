"""A word-level language model's training step: the fused decoder + loss against the
unfused one.

One command::

    python -m benchmarks.lm_step              # PTB shapes, sizes 10 and 100, 1 thread
    python -m benchmarks.lm_step --vocab 33278  # WikiText-2's vocabulary
    python -m benchmarks.lm_step --quick      # smoke test: small vocabulary, 2 repeats

A PTB training step of the paper (batch 20, BPTT 35, 10k words, 2 layers) spends most
of its time on the ``(700, 10000)`` logits. Two ways of computing the loss are timed on
the same model, interleaved round by round in one process (as in ``benchmarks.rnn``):

* ``unfused``: ``decoder(output)`` then ``mean_cross_entropy`` of the logits (the
  package's lean cross-entropy; autograd forms the decoder's gradients);
* ``fused``: ``model(tokens, targets=...)``, i.e. ``linear_cross_entropy`` (decoder and
  loss in one autograd function; what training uses).

A step is forward, the loss summed over time, backward, gradient clipping and an Adam
step, on random token ids (no data needed). Reported per (size, way): the median time
with its 25-75% spread, and the ratio fused / unfused as the median of the per-round
ratios. Results go to
``benchmarks/results/lm_step_cpu_<threads>t[_quick | _v<vocab>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.rnn import RESULTS_DIR, machine_info, quantiles, time_interleaved
from microcircuits.config import load_config
from microcircuits.tasks.cross_entropy import mean_cross_entropy
from microcircuits.tasks.models import LanguageModel, make_recurrent_stack

WAYS = ("unfused", "fused")


def make_step(
    cell: str, size: int, vocab: int, batch: int, bptt: int, way: str, seed: int = 0
) -> Callable[[], None]:
    """One training step of the paper's preset model (dropouts on) for ``way``."""
    config = load_config("ptb", cell, size)
    torch.manual_seed(seed)
    rnn = make_recurrent_stack(config, input_size=config.hidden_size)
    model = LanguageModel(rnn, vocab, config.hidden_size).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bptt + 1, batch), generator=g)
    inputs, targets = tokens[:-1], tokens[1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if way == "fused":
            loss, _ = model(inputs, None, targets=targets)
        else:
            logits, _ = model(inputs, None)
            loss = mean_cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        (bptt * loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    calls = {
        (size, way): make_step(args.cell, size, args.vocab, args.batch, args.bptt, way)
        for size in args.sizes
        for way in WAYS
    }
    times, loads = time_interleaved(calls, args.repeats, args.warmup)
    rows = []
    for size in args.sizes:
        ratios = [f / u for f, u in zip(times[(size, "fused")], times[(size, "unfused")])]
        for way in WAYS:
            q1, med, q3 = quantiles([t * 1e3 for t in times[(size, way)]])
            rows.append({"size": size, "way": way, "median_ms": med, "q1_ms": q1, "q3_ms": q3})
        r1, rmed, r3 = quantiles(ratios)
        rows.append({"size": size, "way": "ratio", "ratio": rmed, "q1": r1, "q3": r3})
    return {
        "machine": machine_info(torch.device("cpu"), args.threads),
        "settings": {
            k: getattr(args, k) for k in ("cell", "sizes", "vocab", "batch", "bptt", "repeats")
        },
        "loads": loads,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# LM training step, fused vs unfused decoder + loss ({s['cell']}, CPU, "
        f"{m['threads']} thread(s))",
        "",
        f"{m['host_cpu']}, torch {m['torch']}, commit {m['git_commit']}, {m['date']}; "
        f"batch {s['batch']}, BPTT {s['bptt']}, vocabulary {s['vocab']}, "
        f"{s['repeats']} interleaved rounds.",
        "",
        "| size | unfused (ms) | fused (ms) | fused / unfused |",
        "|---|---|---|---|",
    ]
    by = {(r["size"], r["way"]): r for r in report["rows"]}
    for size in s["sizes"]:
        u, f, r = by[(size, "unfused")], by[(size, "fused")], by[(size, "ratio")]
        lines.append(
            f"| {size} | {u['median_ms']:.1f} ({u['q1_ms']:.1f}-{u['q3_ms']:.1f}) "
            f"| {f['median_ms']:.1f} ({f['q1_ms']:.1f}-{f['q3_ms']:.1f}) "
            f"| {r['ratio']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) |"
        )
    lines += ["", "Medians with the 25-75% spread; the ratio is the median of per-round ratios."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lm_step", description=__doc__.split("\n")[0]
    )
    p.add_argument("--cell", default="lstm", help="lstm (default), sublstm or fix_sublstm")
    p.add_argument("--sizes", default="10,100", help="paper sizes, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument(
        "--vocab", type=int, default=10000, help="words (default 10000, PTB; WikiText-2: 33278)"
    )
    p.add_argument("--quick", action="store_true", help="vocabulary 500, few repeats: smoke test")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(v) for v in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.vocab < 2:
        p.error(f"--vocab must be at least 2, got {args.vocab}")
    args.vocab, args.batch, args.bptt = (500 if args.quick else args.vocab), 20, 35
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"lm_step_cpu_{args.threads}t"
    stem += "_quick" if args.quick else ("" if args.vocab == 10000 else f"_v{args.vocab}")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / f"{stem}.md").write_text(table)
    sys.stdout.write(table)
    return report


if __name__ == "__main__":
    main()
