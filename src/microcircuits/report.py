"""Results of runs beside the paper's numbers: a table (Markdown + CSV) and learning curves.

``write_report(["runs/"], "results/")`` finds every run directory (one holding a
``config.json``) under the given paths and writes

- ``results.md``: one table per task: our validation and test metric next to the
  paper's test number (``configs/paper_results.toml``, the one place they live), one
  row per run, named by its directory (with as many parent folders as tell runs of the
  same name apart, e.g. an archived probe from a main run);
- ``results.csv``: the same rows, machine-readable;
- ``curves_<task>_<size>.png`` (and ``.pdf``): training loss and validation metric
  against epochs, one line per cell;
- ``comparison_<task>.png`` (and ``.pdf``): each finished run's test metric against the
  paper's, one point per cell and size, beside the line where the two are equal.

:func:`report_text` is the table alone (``microcircuits report RUNS`` without ``--out``).

A run without ``results.json`` is still reported, from its ``metrics.jsonl``, and
marked "in progress (epoch k)"; a run stopped by a non-finite loss is marked "failed".
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .data import ADDING_BASELINE_MSE
from .model_registry import MODELS, model_kind
from .task_registry import TASK_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Comparison",
    "RunSummary",
    "comparisons",
    "epoch_table_text",
    "find_runs",
    "format_epoch_table",
    "format_table",
    "paper_result",
    "report_text",
    "run_labels",
    "summarize_run",
    "write_report",
]

# How a task's numbers read, after its title in the table heading.
_METRIC_READINGS = {"mse": "test MSE", "accuracy": "test accuracy, %", "perplexity": "perplexity"}
_TASK_ORDER = list(TASK_KINDS)
_CELL_ORDER = list(MODELS)

CSV_COLUMNS = (
    "task", "cell", "size", "hidden_size", "metric", "status", "valid", "test",
    "paper_test", "epochs", "steps", "wall_time_s", "parameters", "seed", "run",
)  # fmt: skip


@dataclass
class RunSummary:
    """What the report shows of one run.

    Attributes:
        run_dir: the run directory.
        task, cell, size, hidden_size, seed: from its config (``size``: nominal size).
        metric: metric name; ``higher_is_better`` its direction.
        status: ``"done"``, ``"early stop"``, ``"stopped at max_steps"``,
            ``"in progress (epoch k)"`` or ``"failed (...)"``.
        valid: best validation metric (from results.json, else from the metrics).
        test: test metric of the best-validation checkpoint (finished runs only).
        paper: the paper's test number for this task, cell and size, if any.
        epochs, steps, wall_time_s, parameters: progress and cost.
        curves: ``{"train": [(epoch, loss)], "valid": [(epoch, metric)], "lr": [(epoch,
            lr)]}`` (the lr at each validation).
    """

    run_dir: Path
    task: str
    cell: str
    size: int
    hidden_size: int
    seed: int
    metric: str
    higher_is_better: bool
    status: str
    valid: float | None
    test: float | None
    paper: float | None
    epochs: float | None
    steps: int | None
    wall_time_s: float | None
    parameters: int | None
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """It has test numbers (also a stage of a longer run: ``paused at epoch k``)."""
        return self.test is not None

    @property
    def ended(self) -> bool:
        """It will not train further: all its epochs are done, or early stopping ended it."""
        return self.status in ("done", "early stop")


# -- reading runs -----------------------------------------------------------------------


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories (holding ``config.json``) at or below each path, sorted, unique.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no run directory was found at all.
    """
    found: set[Path] = set()
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"run path {path} does not exist")
        if (path / "config.json").is_file():
            found.add(path)
        else:
            found.update(p.parent for p in path.rglob("config.json"))
    if not found:
        raise ValueError(
            f"no run directory (a folder with config.json) under {[str(p) for p in paths]}"
        )
    return sorted(found)


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill mid-write
                continue
    return records


@cache
def _paper_results() -> dict[str, Any]:
    text = resources.files("microcircuits").joinpath("configs", "paper_results.toml")
    return tomllib.loads(text.read_text("utf-8"))


def paper_result(task: str, cell: str, size: int) -> float | None:
    """The paper's test number (accuracy in %, or perplexity), or ``None`` if it has none."""
    table = _paper_results().get(task, {})
    return table.get(model_kind(cell).name, {}).get(str(size))


def _preset_epochs(config: dict[str, Any]) -> int | None:
    """The epochs the run's presets plan: the task's, and the preset file's it was trained
    with (``None`` when unknown, e.g. a custom run, or a preset file no longer there)."""
    extra = config.get("extra") or {}
    if extra.get("preset") is None:
        return None
    from .config import load_config

    preset_file = extra.get("preset_file")
    try:
        planned = load_config(
            config["task"], config.get("cell"), config.get("size"), preset=preset_file
        ).epochs
    except (ValueError, KeyError, OSError):
        return None
    return int(planned) if planned else None


def summarize_run(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Read one run directory (finished or not) into a :class:`RunSummary`."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    task, cell = config["task"], config["cell"]
    size = config.get("size") or config["hidden_size"]
    kind = TASK_KINDS.get(task)
    metric, higher = (kind.metric, kind.higher_is_better) if kind else ("metric", False)
    records = _read_metrics(run_dir)
    train_curve = [(r["epoch"], r["loss"]) for r in records if r.get("kind") == "train"]
    valid_records = [r for r in records if r.get("kind") == "valid" and metric in r]
    valid_curve = [(r["epoch"], r[metric]) for r in valid_records]
    lr_curve = [(r["epoch"], r["lr"]) for r in valid_records if "lr" in r]
    errors = [r for r in records if r.get("kind") == "error"]

    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    if results is not None:
        status = {
            "completed": "done",
            "early_stop": "early stop",
            "max_steps": "stopped at max_steps",
        }.get(results["stopped"], results["stopped"])
        valid, test = results["best_valid"], results["test"]
        epochs, steps = results["epochs_done"], results["steps_done"]
        planned = _preset_epochs(config)
        asked = config.get("epochs")
        if results["stopped"] == "completed" and planned and asked and asked < planned:
            # ``--epochs k`` below the preset's: a stage of a longer run (``--resume``)
            status = f"paused at epoch {round(epochs, 1):g} of {planned}"
        wall_time, parameters = results["wall_time_s"], results["parameters"]
    else:
        values = [v for _, v in valid_curve if v is not None and math.isfinite(v)]
        valid = (max(values) if higher else min(values)) if values else None
        test = None
        last = records[-1] if records else {}
        epochs = last.get("epoch")
        steps = last.get("step")
        wall_time = last.get("time")
        parameters = None
        completed_epochs = sum(1 for r in records if r.get("kind") == "epoch")
        if errors:
            status = f"failed (non-finite loss at step {errors[-1]['step']})"
        else:
            status = f"in progress (epoch {completed_epochs + 1})"
    meta_path = run_dir / "meta.json"
    if parameters is None and meta_path.exists():
        parameters = json.loads(meta_path.read_text()).get("parameters")
    return RunSummary(
        run_dir=run_dir,
        task=task,
        cell=cell,
        size=int(size),
        hidden_size=config["hidden_size"],
        seed=config.get("seed", 0),
        metric=metric,
        higher_is_better=higher,
        status=status,
        valid=valid,
        test=test,
        paper=paper_result(task, cell, size),
        epochs=epochs,
        steps=steps,
        wall_time_s=wall_time,
        parameters=parameters,
        curves={"train": train_curve, "valid": valid_curve, "lr": lr_curve},
    )


# -- formatting -------------------------------------------------------------------------


def _in_table_units(metric: str, value: float) -> float:
    """A metric in the units the table and figures show: accuracy in %, others as is."""
    return 100.0 * value if metric == "accuracy" else value


def _display(metric: str, value: float | None) -> str:
    """A metric as the table shows it: accuracy in %, perplexity to 2 decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if metric == "accuracy":
        return f"{_in_table_units(metric, value):.2f}"
    if metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _title(task: str) -> str:
    """A task's name for headings and plots (``"Penn Treebank"``)."""
    return TASK_KINDS[task].title if task in TASK_KINDS else task


def _heading(task: str) -> str:
    """A task's table heading: its title and how its numbers read."""
    if task not in TASK_KINDS:
        return task
    reading = _METRIC_READINGS[TASK_KINDS[task].metric]
    if task == "adding":
        reading += f"; always predicting 1 gives {ADDING_BASELINE_MSE:.4f}"
    return f"{_title(task)} ({reading})"


def run_labels(run_dirs: Iterable[str | os.PathLike[str]]) -> dict[Path, str]:
    """Each run's name in the table: its directory's name, with as many parent folders as
    tell it apart from the others (``ptb-probes/ptb-lstm-100-seed0`` beside
    ``ptb/ptb-lstm-100-seed0``)."""
    dirs = [Path(d) for d in dict.fromkeys(run_dirs)]
    parts = {d: Path(os.path.abspath(d)).parts for d in dirs}
    labels = {}
    for d in dirs:
        suffix = parts[d][-1:]
        for n in range(1, len(parts[d]) + 1):
            suffix = parts[d][-n:]
            if sum(parts[other][-n:] == suffix for other in dirs) == 1:
                break
        labels[d] = "/".join(suffix)
    return labels


def _escape_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _sort_key(summary: RunSummary) -> tuple:
    task = _TASK_ORDER.index(summary.task) if summary.task in _TASK_ORDER else 99
    cell = _CELL_ORDER.index(summary.cell) if summary.cell in _CELL_ORDER else 99
    return (task, summary.size, cell, summary.seed, str(summary.run_dir))


def format_table(summaries: Sequence[RunSummary]) -> str:
    """Markdown tables, one per task, of our results beside the paper's; the last column
    names each run (:func:`run_labels`)."""
    lines: list[str] = []
    ordered = sorted(summaries, key=_sort_key)
    names = run_labels(s.run_dir for s in ordered)
    for task in dict.fromkeys(s.task for s in ordered):
        rows = [s for s in ordered if s.task == task]
        lines.append(f"### {_heading(task)}")
        lines.append("")
        size_label = "size (units)"
        lines.append(
            f"| {size_label} | cell | status | valid | test | paper (test) | epochs | "
            "time | parameters | run |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for s in rows:
            units = f"{s.size}" if s.hidden_size == s.size else f"{s.size} ({s.hidden_size})"
            paper = "—" if s.paper is None else f"{s.paper:.2f}"
            epochs = "—" if s.epochs is None else f"{s.epochs:.3g}"
            lines.append(
                f"| {units} | {model_kind(s.cell).label} | {s.status} | "
                f"{_display(s.metric, s.valid)} | {_display(s.metric, s.test)} | {paper} | "
                f"{epochs} | {_duration(s.wall_time_s)} | "
                f"{'—' if s.parameters is None else f'{s.parameters:,}'} | "
                f"{_escape_cell(names[Path(s.run_dir)])} |"
            )
        lines.append("")
    note = "valid: best validation metric; test: of the best-validation checkpoint."
    if any(s.metric == "perplexity" for s in ordered):
        note += " Perplexity = exp(mean per-token NLL, `<eos>` included)."
    lines.append(note)
    return "\n".join(lines) + "\n"


def _after_each_epoch(curve: Sequence[tuple[float, float]]) -> dict[int, float]:
    """The values of a curve at whole epochs (the last record of each), by epoch."""
    return {round(e): v for e, v in curve if e >= 0.5 and abs(e - round(e)) < 1e-6}


def format_epoch_table(summaries: Sequence[RunSummary]) -> str:
    """Markdown tables, one per task, of each run's validation metric after each whole
    epoch (accuracy in %), one row per run (:func:`run_labels`), a column per epoch; a
    ``*`` marks a validation after which the schedule lowered the lr (a validation
    record holds the lr the training goes on with), so probes of different lengths and
    schedules read side by side."""
    lines: list[str] = []
    ordered = sorted(summaries, key=_sort_key)
    names = run_labels(s.run_dir for s in ordered)
    for task in dict.fromkeys(s.task for s in ordered):
        runs = [s for s in ordered if s.task == task]
        values = {s.run_dir: _after_each_epoch(s.curves.get("valid", [])) for s in runs}
        rates = {s.run_dir: _after_each_epoch(s.curves.get("lr", [])) for s in runs}
        last = max((max(v, default=0) for v in values.values()), default=0)
        metric = runs[0].metric
        lines += [
            f"### {_title(task)}: validation {metric} after each epoch",
            "",
            "`*`: the schedule lowered the lr after that validation (the next epochs ran "
            "at the lower lr).",
            "",
            "| run | " + " | ".join(str(e) for e in range(1, last + 1)) + " |",
            "|---|" + "---|" * last,
        ]
        for s in runs:
            cells = []
            for epoch in range(1, last + 1):
                value = values[s.run_dir].get(epoch)
                lr, before = rates[s.run_dir].get(epoch), rates[s.run_dir].get(epoch - 1)
                lowered = lr is not None and before is not None and lr < before
                shown = "" if value is None else f"{_in_table_units(metric, value):.1f}"
                cells.append(shown + ("*" if lowered and shown else ""))
            lines.append(f"| {_escape_cell(names[s.run_dir])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv_rows(summaries: Sequence[RunSummary], base: Path) -> list[list[object]]:
    rows = []
    for s in sorted(summaries, key=_sort_key):
        try:
            run = os.path.relpath(s.run_dir, base)
        except ValueError:  # another drive on Windows
            run = str(s.run_dir)
        rows.append(
            [
                s.task, s.cell, s.size, s.hidden_size, s.metric, s.status, s.valid, s.test,
                s.paper, s.epochs, s.steps, s.wall_time_s, s.parameters, s.seed, run,
            ]
        )  # fmt: skip
    return rows


# -- learning curves --------------------------------------------------------------------


def _plot_curves(summaries: Sequence[RunSummary], out_dir: Path) -> list[Path]:
    """One figure per (task, size): training loss and validation metric vs epoch."""
    from .analysis.style import cell_color, new_figure, save_figure, styled

    @styled
    def plot(task: str, size: int, runs: list[RunSummary]) -> list[Path]:
        fig, axes = new_figure(2, width=7.0, height=2.6)
        train_ax, valid_ax = axes[0]
        metric = runs[0].metric
        for s in runs:
            label = f"{model_kind(s.cell).label} ({s.hidden_size})"
            if len({r.seed for r in runs}) > 1:
                label += f" seed {s.seed}"
            color = cell_color(s.cell)
            if s.curves["train"]:
                x, y = zip(*s.curves["train"])
                train_ax.plot(x, y, color=color, label=label, alpha=0.85)
            if s.curves["valid"]:
                x, y = zip(*s.curves["valid"])
                y = [_in_table_units(metric, v) for v in y]
                valid_ax.plot(x, y, color=color, marker=".", label=label)
            if s.paper is not None:
                valid_ax.axhline(s.paper, color=color, linestyle=":", linewidth=1.0)
        train_ax.set(xlabel="epoch", ylabel="training loss", title=f"{task}, size {size}")
        unit = " (%)" if metric == "accuracy" else ""
        valid_ax.set(xlabel="epoch", ylabel=f"validation {metric}{unit}")
        if metric in ("perplexity", "mse"):
            valid_ax.set_yscale("log")
            train_ax.set_yscale("log")
        if task == "adding":
            valid_ax.axhline(ADDING_BASELINE_MSE, color="grey", linestyle="--", linewidth=0.8)
            valid_ax.set_title("dashed: always predicting 1", fontsize=7)
        if any(s.paper is not None for s in runs):
            valid_ax.set_title("dotted: the paper's test result", fontsize=7)
        train_ax.legend()
        return save_figure(fig, out_dir, f"curves_{task}_{size}")

    paths: list[Path] = []
    groups: dict[tuple[str, int], list[RunSummary]] = {}
    for s in sorted(summaries, key=_sort_key):
        groups.setdefault((s.task, s.size), []).append(s)
    for (task, size), runs in groups.items():
        if any(r.curves["train"] or r.curves["valid"] for r in runs):
            paths.extend(p for p in plot(task, size, runs) if p.suffix == ".png")
    return paths


# -- ours against the paper's ----------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One point of the comparison figure: a finished run's test metric and the paper's.

    ``ours`` and ``paper`` are in the table's units (accuracy in %, perplexity as is).
    """

    task: str
    cell: str
    size: int
    metric: str
    ours: float
    paper: float


def comparisons(summaries: Sequence[RunSummary]) -> list[Comparison]:
    """The runs that have both a test result and a paper number, in table order."""
    points = []
    for s in sorted(summaries, key=_sort_key):
        if s.test is None or s.paper is None or not math.isfinite(s.test):
            continue
        ours = _in_table_units(s.metric, s.test)
        points.append(Comparison(s.task, s.cell, s.size, s.metric, ours, s.paper))
    return points


_SIZE_MARKERS = ("o", "s", "^", "D", "v", "P")


def _comparison_figure(task: str, rows: Sequence[Comparison]) -> Any:
    """Our test metric (y) against the paper's (x) for one task, log axes for perplexity;
    points below the diagonal beat the paper (above, for accuracy). The legend sits
    outside the axes, right of them: inside, either corner it could take off the diagonal
    is one where points fall (worse or better than the paper)."""
    from .analysis.style import styled

    return styled(_draw_comparison)(task, rows)


def _draw_comparison(task: str, rows: Sequence[Comparison]) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .analysis.style import cell_color, new_figure

    fig, axes = new_figure(1, width=4.6, height=3.3)
    ax = axes[0][0]
    sizes = sorted({p.size for p in rows})
    for p in rows:
        marker = _SIZE_MARKERS[sizes.index(p.size) % len(_SIZE_MARKERS)]
        ax.scatter(p.paper, p.ours, color=cell_color(p.cell), marker=marker, s=28, zorder=3)
    values = [v for p in rows for v in (p.ours, p.paper)]
    accuracy = rows[0].metric == "accuracy"
    if accuracy:
        pad = max(1.0, 0.1 * (max(values) - min(values)))
        low, high = min(values) - pad, min(100.0, max(values) + pad)
    else:
        low, high = min(values) / 1.15, max(values) * 1.15
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (80, 100, 150, ...)
            axis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    unit = "accuracy (%)" if accuracy else "perplexity"
    better = "above" if accuracy else "below"
    ax.set(xlabel=f"paper, test {unit}", ylabel=f"ours, test {unit}")
    ax.set_title(
        f"{_title(task)}\ndashed: equal; {better} it: ours is better",
        fontsize=8,
    )
    handles = [
        Line2D([], [], color=cell_color(c), marker="o", linestyle="", label=model_kind(c).label)
        for c in dict.fromkeys(p.cell for p in rows)
    ] + [
        Line2D([], [], color="grey", marker=_SIZE_MARKERS[i % len(_SIZE_MARKERS)],
               linestyle="", label=f"size {size}")
        for i, size in enumerate(sizes)
    ]  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def _plot_comparisons(points: Sequence[Comparison], out_dir: Path) -> list[Path]:
    """One figure per task (:func:`_comparison_figure`), as ``comparison_<task>``."""
    from .analysis.style import save_figure

    paths: list[Path] = []
    by_task: dict[str, list[Comparison]] = {}
    for p in points:
        by_task.setdefault(p.task, []).append(p)
    for task, rows in by_task.items():
        written = save_figure(_comparison_figure(task, rows), out_dir, f"comparison_{task}")
        paths.extend(p for p in written if p.suffix == ".png")
    return paths


# -- the report -------------------------------------------------------------------------


def _report_text(summaries: Sequence[RunSummary]) -> str:
    return "## Results beside Costa et al. 2017\n\n" + format_table(summaries)


def report_text(paths: Iterable[str | os.PathLike[str]]) -> str:
    """The Markdown of :func:`write_report` for the runs under ``paths``, writing nothing.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no run directory was found.
    """
    return _report_text(_summaries(paths))


def epoch_table_text(paths: Iterable[str | os.PathLike[str]]) -> str:
    """:func:`format_epoch_table` of the runs under ``paths`` (``epochs.md``), writing
    nothing; raises as :func:`report_text`."""
    return format_epoch_table(_summaries(paths))


def _summaries(paths: Iterable[str | os.PathLike[str]]) -> list[RunSummary]:
    return [summarize_run(run) for run in find_runs(paths)]


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`, and the Markdown text itself."""

    markdown: Path
    csv: Path
    epochs: Path  # epochs.md: :func:`format_epoch_table`
    figures: list[Path]
    text: str
    summaries: list[RunSummary]


def write_report(
    paths: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    plots: bool = True,
) -> ReportFiles:
    """Summarise every run under ``paths`` into ``out_dir``.

    Args:
        paths: run directories, or folders searched for them.
        out_dir: where ``results.md``, ``results.csv``, ``epochs.md`` (validation after
            each epoch, :func:`format_epoch_table`) and the curves go (created).
        plots: also draw the learning curves and the comparison with the paper.

    Returns:
        The files written, the Markdown text and the per-run summaries.
    """
    from .analysis.style import write_csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = _summaries(paths)
    text = _report_text(summaries)
    markdown = out_dir / "results.md"
    markdown.write_text(text, encoding="utf-8")
    epochs = out_dir / "epochs.md"
    epochs.write_text(format_epoch_table(summaries), encoding="utf-8")
    csv_path = write_csv(out_dir / "results.csv", CSV_COLUMNS, _csv_rows(summaries, out_dir))
    figures = []
    if plots:
        figures = _plot_curves(summaries, out_dir)
        figures += _plot_comparisons(comparisons(summaries), out_dir)
    return ReportFiles(markdown, csv_path, epochs, figures, text, summaries)
