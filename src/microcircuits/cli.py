"""The ``microcircuits`` command: parse arguments, call the library, report errors plainly.

::

    microcircuits train TASK [--cell C] [--size N] [--epochs N] [--set key=value ...]
                             [--data-dir DIR] [--out DIR] [--name NAME] [--resume]
                             [--device cpu|cuda|auto] [--seed N] [--no-progress]
                             [--preset FILE | --config RUN/config.json] [--dry-run]
    microcircuits compare TASK [--cells lstm,sublstm,fix_sublstm,elm] [same options]
    microcircuits presets [NAME]
    microcircuits report RUNS... [--out DIR]
    microcircuits search TASK [--cell C] [--size N] --trials N [--workers K]
                              [--storage URL] [--study-name NAME] [--out DIR]
                              [--pruner median|halving|none] [--seed N] [--set key=value ...]

``train`` and ``compare`` take ``--preset FILE``: a TOML file in the format of the
shipped presets (``microcircuits presets NAME`` prints one; a search's
``best_preset.toml`` is one), layered over the task's preset; it names the task, so TASK
may be left out. ``train --config RUN/config.json`` reruns a run's exact config, and
``train ... --dry-run`` prints the resolved config without training. Under
``torchrun --nproc_per_node K -m microcircuits train ...`` the run is data-parallel over
K processes (see :mod:`microcircuits.distributed`).

Every subcommand is one ``add_<name>_command(subparsers)`` function that adds its
parser and sets ``handler``, a function ``(args) -> exit status``. More subcommands
(``figure``, ``bench``, ``search``) are added with :func:`register_command`.
``python -m microcircuits`` is the same command (as torchrun needs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .cells import CELLS
from .config import DEVICES, TASKS
from .model_registry import LSTM_FAMILY, MODELS, model_kind

__all__ = [
    "COMMANDS",
    "add_compare_command",
    "add_presets_command",
    "add_report_command",
    "add_search_command",
    "add_train_command",
    "build_parser",
    "main",
    "register_command",
]

logger = logging.getLogger("microcircuits.cli")

CommandAdder = Callable[[Any], None]
"""Adds one subcommand to the ``subparsers`` object of :func:`build_parser`."""

CELL_NAMES = tuple(MODELS)
"""What ``--cell`` and ``--cells`` accept (:data:`~microcircuits.model_registry.MODELS`)."""
COMPARED_CELLS = tuple(CELLS)
"""What ``compare`` trains unless ``--cells`` says otherwise: the LSTM-family cells."""


# -- shared options ---------------------------------------------------------------------


def _add_experiment_options(
    parser: argparse.ArgumentParser, runs: str, *, task_optional: bool = False
) -> None:
    """The task and the options that shape one training run, shared by ``train``,
    ``compare`` and ``search``; ``runs`` names what they apply to in the help texts.
    ``task_optional``: TASK may be left out (a preset file names it)."""
    if task_optional:
        parser.add_argument(
            "task",
            nargs="?",
            choices=TASKS,
            help="the experiment (default: the one --preset/--config names)",
        )
    else:
        parser.add_argument("task", choices=TASKS, help="the experiment")
    parser.add_argument(
        "--size",
        type=int,
        help="the paper's size: for ptb/wikitext2 the row of Table 2/3 (10, 100, 200, 650; "
        "fix-subLSTM then gets 11/115/230/750 units), elsewhere the hidden size",
    )
    parser.add_argument("--epochs", type=int, help=f"epochs of {runs} (overrides the preset)")
    parser.add_argument(
        "--max-steps", type=int, help=f"stop {runs} after this many optimiser steps"
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any config field of {runs}, e.g. --set lr=0.001 --set clip_norm=none "
        "(repeatable; see microcircuits.config.ExperimentConfig for the fields)",
    )
    parser.add_argument(
        "--data-dir", help="dataset directory (default: $MICROCIRCUITS_DATA, else a cache)"
    )
    parser.add_argument("--device", choices=DEVICES, help=f"device of {runs} (default: auto)")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads of {runs}")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare``."""
    _add_experiment_options(parser, "the run", task_optional=True)
    parser.add_argument(
        "--preset",
        metavar="FILE",
        help="a preset file in the format of the shipped presets (`microcircuits presets "
        "NAME` prints one; best_preset.toml of `microcircuits search` is one), layered over "
        "the task's preset and under --set; it names the task and gives the default --cell "
        "and --size. A run's config.json (.json) is rerun as it was (as --config)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: 0)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output directory from its last checkpoint",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in the output directory"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. for log files)"
    )


def _overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """``--set`` assignments, then the dedicated flags (which win)."""
    from .config import parse_assignments

    values: dict[str, Any] = dict(parse_assignments(args.assignments))
    flags = {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "data_dir": args.data_dir,
        "device": args.device,
        "seed": args.seed,
        "num_threads": args.threads,
        **extra,
    }
    values.update({key: value for key, value in flags.items() if value is not None})
    if args.no_progress:
        values["progress"] = False
    return values


def _parse_cells(text: str) -> list[str]:
    cells = [model_kind(name).name for name in text.split(",") if name.strip()]
    if not cells:
        raise ValueError(f"--cells must name at least one of {list(CELL_NAMES)}, got {text!r}")
    return cells


# -- train ------------------------------------------------------------------------------


def add_train_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one model on one task",
        description="Train one model with the task's preset (the paper's hyperparameters), "
        "evaluate the best-validation checkpoint on the test set, and write the run "
        "directory (config, metrics, TensorBoard events, checkpoints, results.json).",
    )
    _add_run_options(parser)
    parser.add_argument(
        "--cell",
        help=f"one of {list(CELL_NAMES)} (default: the --preset file's, else the task's: "
        "cmc for mnist, lstm for the others)",
    )
    parser.add_argument(
        "--config",
        metavar="RUN_CONFIG",
        help="rerun a run's exact config: its config.json or its run directory (--set and "
        "the flags still apply; TASK, --cell and --size, if given, must be its own)",
    )
    parser.add_argument("--out", default="runs", help="parent directory of the run")
    parser.add_argument("--name", help="run directory name (default: TASK-CELL-SIZE-seedSEED)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config (JSON, as config.json; stdout) and the parameter "
        "count (stderr), then exit without training or creating the run directory",
    )
    parser.set_defaults(handler=_run_train)


def _run_config_path(text: str) -> str:
    """``--config``'s file: a run's ``config.json``, or the one in a run directory."""
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--config {text}: the directory has no config.json")
    elif path.suffix.lower() != ".json":
        raise ValueError(
            f"--config takes a run's config.json or its run directory, got {text!r} (a "
            "preset TOML goes to --preset)"
        )
    return str(path)


def _parameter_count(config: Any) -> tuple[int | None, str]:
    """The parameters of ``config``'s model, built on the CPU from the task's data as
    found locally (nothing is downloaded); ``None`` and the reason when it is missing."""
    from .data import DataError
    from .tasks import make_task

    try:
        task = make_task(config.replace(download=False), "cpu")
    except DataError as error:
        return None, str(error)
    model = task.build_model()
    return sum(p.numel() for p in model.parameters()), ""  # as results.json counts


def _dry_run(config: Any) -> int:
    """Print ``config`` as ``config.json`` holds it and its parameter count."""
    import json

    print(json.dumps(config.to_dict(), indent=2))
    count, reason = _parameter_count(config)
    run_dir = Path(config.out_dir) / (config.run_name or config.default_run_name)
    if count is None:
        print(f"parameters: unknown ({reason})", file=sys.stderr)
    else:
        kind = model_kind(config.cell)
        shape = f"{kind.label}, {config.hidden_size} units"
        if kind.family == LSTM_FAMILY:
            shape += f", {config.num_layers} layer{'s' if config.num_layers > 1 else ''}"
        print(f"parameters: {count:,} ({shape}, {config.task})", file=sys.stderr)
    print(f"run directory (not created): {run_dir}", file=sys.stderr)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config

    preset = args.preset
    if args.config is not None:
        if preset is not None:
            raise ValueError(
                f"give --preset or --config, not both (got --preset {preset} and --config "
                f"{args.config})"
            )
        preset = _run_config_path(args.config)
    overrides = _overrides(args, out_dir=args.out, run_name=args.name)
    config = load_config(args.task, args.cell, args.size, overrides, preset=preset)
    if args.dry_run:
        return _dry_run(config)

    from .report import format_table, summarize_run
    from .train import train

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    print(format_table([summarize_run(result.run_dir)]))
    print(f"run directory: {result.run_dir}")
    return 0


# -- compare ----------------------------------------------------------------------------


def add_compare_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train LSTM, subLSTM and fix-subLSTM (or --cells) with the same seed; print a table",
        description="Train each cell on TASK with the same seed and settings (each with "
        "its own preset row), then print and write a results table and learning curves. "
        "`microcircuits compare adding` is the quick demonstration (a few minutes on 2 CPU "
        "cores).",
    )
    _add_run_options(parser)
    parser.add_argument(
        "--cells",
        default=",".join(COMPARED_CELLS),
        help=f"comma-separated cells to train, of {list(CELL_NAMES)} (default: "
        f"{','.join(COMPARED_CELLS)})",
    )
    parser.add_argument(
        "--out",
        help="directory for the runs and the report (default: runs/compare-TASK-<time>)",
    )
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .config import preset_task
    from .report import write_report
    from .train import compare_cells

    if args.task is None:
        if args.preset is None:
            raise ValueError(f"compare needs TASK (one of {list(TASKS)}) or a --preset naming it")
        args.task = preset_task(args.preset)
    if args.out is None:
        if args.resume:
            raise ValueError("--resume needs --out: the directory of the comparison to resume")
        args.out = str(Path("runs") / f"compare-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    cells = _parse_cells(args.cells)
    overrides = _overrides(args, out_dir=args.out)
    results = compare_cells(
        args.task,
        cells,
        size=args.size,
        overrides=overrides,
        resume=args.resume,
        overwrite=args.overwrite,
        preset=args.preset,
    )
    files = write_report([r.run_dir for r in results], args.out)
    print(files.text)
    print(f"runs, table ({files.markdown.name}, {files.csv.name}) and curves in {args.out}")
    return 0


# -- report -----------------------------------------------------------------------------


def add_report_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tabulate runs beside the paper's numbers; plot learning curves",
        description="Find the run directories under RUNS and print a Markdown table of "
        "their results beside the paper's, one row per run (named in the run column). With "
        "--out, also write results.md, results.csv, the learning curves "
        "curves_<task>_<size>.png, comparison_<task>.png and epochs.md (validation after "
        "each epoch) there. Unfinished runs are shown as in progress.",
    )
    parser.add_argument("runs", nargs="+", help="run directories or folders holding them")
    parser.add_argument(
        "--out", help="where to write the report (default: print the table only, write nothing)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the figures (with --out)")
    parser.add_argument(
        "--per-epoch",
        action="store_true",
        help="print each run's validation metric after each epoch instead (a row per run; "
        "* where the schedule lowered the lr after that validation)",
    )
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report import epoch_table_text, report_text, write_report

    if args.out is None:
        print(epoch_table_text(args.runs) if args.per_epoch else report_text(args.runs))
        return 0
    files = write_report(args.runs, args.out, plots=not args.no_plots)
    print(files.epochs.read_text() if args.per_epoch else files.text)
    written = [files.markdown, files.csv, files.epochs, *files.figures]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# -- presets ----------------------------------------------------------------------------


def add_presets_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list the shipped presets (or print one)",
        description="List the presets shipped with the package: name (the task), default "
        "cell and size, the cells with their sizes, and where the values come from. With "
        "NAME, print that preset's TOML: a copy, edited, is a preset file for "
        "`train --preset FILE` (the format is the same).",
    )
    parser.add_argument("name", nargs="?", choices=TASKS, help="print this preset's file")
    parser.set_defaults(handler=_run_presets)


def _preset_cells(info: Any) -> str:
    """The cells of a preset, those with the same sizes together: ``lstm sublstm
    fix_sublstm (10: 11, 100: 115) at 10/100`` (size: units where they differ)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for cell, sizes in info.cells.items():
        matched = info.matched.get(cell)
        name = cell
        if matched:
            name += " (" + ", ".join(f"{s}: {u}" for s, u in matched.items()) + ")"
        groups.setdefault(sizes, []).append(name)
    return "; ".join(
        " ".join(names) + (f" at {'/'.join(map(str, sizes))}" if sizes else "")
        for sizes, names in groups.items()
    )


def _run_presets(args: argparse.Namespace) -> int:
    from importlib import resources

    from .config import list_presets

    if args.name is not None:
        text = resources.files("microcircuits").joinpath("configs", f"{args.name}.toml")
        print(text.read_text("utf-8"), end="")
        return 0
    infos = list_presets()
    rows = [("name", "default", "cells (size: units where parameter-matched)", "source")]
    for info in infos:
        default = f"{info.default_cell} {info.default_size}"
        if info.hidden_size != info.default_size:
            default += f" ({info.hidden_size} units)"
        rows.append((info.name, default, _preset_cells(info), info.source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(text.ljust(width) for text, width in zip(row, widths)) + "  " + row[3])
    folder = Path(infos[0].path).parent
    print(
        f"\nfiles: {folder}. `microcircuits presets NAME` prints one; an edited copy is a "
        "preset file for `microcircuits train --preset FILE` (layered over the task's preset)."
    )
    return 0


def add_figure_command(subparsers: Any) -> None:
    from .analysis import FIGURES

    names = "; ".join(f"{name}: {text}" for name, text in FIGURES.items())
    parser = subparsers.add_parser(
        "figure",
        help="write a figure of the biology (PNG, PDF and the data as CSV)",
        description=f"Compute and plot one analysis. {names}. With --runs (gradients, "
        "balance), the trained networks of those run directories are measured beside "
        "themselves at initialisation, on their task's test data.",
    )
    parser.add_argument("name", choices=sorted(FIGURES), help="the figure")
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="trained runs to measure")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="with --runs"
    )
    parser.add_argument("--batch", type=int, default=32, help="test sequences per run")
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the analysis function, e.g. --set trials=4 (repeatable)",
    )
    parser.set_defaults(handler=_run_figure)


def _figure_options(items: Sequence[str]) -> dict[str, Any]:
    import ast

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key.strip()] = text
    return options


def _run_figure(args: argparse.Namespace) -> int:
    from .analysis import make_figure
    from .analysis.trained import trained_figure

    options = _figure_options(args.options)
    if args.runs:
        paths = trained_figure(
            args.name, args.runs, args.out, checkpoint=args.checkpoint, batch=args.batch, **options
        )
    else:
        paths = make_figure(args.name, args.out, **options)
    for path in paths:
        print(path)
    return 0


# -- search -----------------------------------------------------------------------------


def add_search_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search",
        help="tune dropouts, learning rate and weight decay with Optuna",
        description="Search the paper's hyperparameters (input, output and update dropout, "
        "learning rate, weight decay) for one task, cell and size on the validation set, "
        "with Optuna: one training run per trial, hopeless trials pruned. The study is "
        "stored in --storage (default: OUT/study.db, SQLite); rerun the command to continue "
        "it, or start more commands with the same --storage and --study-name (on other "
        "machines: a PostgreSQL URL) to work on it together. Writes OUT/best_preset.toml "
        "(for train --preset) and the plots optimization_history.png, param_importances.png.",
    )
    _add_experiment_options(parser, "every trial")
    parser.add_argument("--cell", default="lstm", help=f"one of {list(CELL_NAMES)}")
    parser.add_argument(
        "--trials",
        type=int,
        required=True,
        help="trials the study holds when done (complete, pruned or failed, all workers and "
        "earlier commands counted)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes on this machine (default: 1)"
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage URL, e.g. postgresql+psycopg://user:pass@host/db "
        "(default: sqlite:///OUT/study.db)",
    )
    parser.add_argument("--study-name", help="default: TASK-CELL-SIZE")
    parser.add_argument(
        "--out", help="folder of the outputs and trial runs (default: runs/search-STUDY)"
    )
    parser.add_argument(
        "--pruner",
        choices=("median", "halving", "none"),
        default="median",
        help="stop hopeless trials at a validation: median rule or successive halving "
        "(default: median)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="trial n trains with seed SEED + n (default: 0)"
    )
    parser.add_argument(
        "--sampler-seed", type=int, help="seed of the TPE sampler (default: fresh randomness)"
    )
    parser.add_argument("--space", help="search space TOML (default: configs/search_space.toml)")
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between a running trial's heartbeats; a trial silent for twice as "
        "long is failed and retried from its checkpoint (default: 60)",
    )
    parser.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    import optuna

    from .config import parse_assignments
    from .search import SearchSpec, run_search

    if args.quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides: dict[str, Any] = dict(parse_assignments(args.assignments))
    flags = {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "data_dir": args.data_dir,
        "device": args.device,
        "num_threads": args.threads,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    spec = SearchSpec(
        task=args.task,
        cell=args.cell,
        size=args.size,
        n_trials=args.trials,
        out_dir=args.out,
        storage=args.storage,
        study_name=args.study_name,
        workers=args.workers,
        pruner=args.pruner,
        seed=args.seed,
        sampler_seed=args.sampler_seed,
        overrides=overrides,
        space_file=args.space,
        heartbeat_interval=args.heartbeat,
    )
    result = run_search(spec)
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.states.items()))
    print(f"study {result.study_name!r} ({result.storage}): {states}")
    if result.best_trial is None:
        print("no trial has completed yet")
    else:
        print(
            f"best: trial {result.best_trial}, validation {result.metric} "
            f"{result.best_value:.6g} ({result.best_run_dir})"
        )
        for name, value in result.best_params.items():
            print(f"  {name} = {value:.6g}")
    if result.preset is not None:
        print(
            f"preset: {result.preset}  (microcircuits train {args.task} --preset {result.preset})"
        )
    for figure in result.figures:
        print(f"figure: {figure}")
    return 0


# -- build-native -----------------------------------------------------------------------


def add_build_native_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-native",
        help="compile the C++ step loops of the CPU kernel now",
        description="Compile the C++ step loops of the fused CPU kernel (about a minute, "
        "once per torch version; they are otherwise built on first use) and say where "
        "they are, or why they are not available (then the Python loops run). "
        "MICROCIRCUITS_NATIVE=0 turns them off, MICROCIRCUITS_CACHE moves the cache.",
    )
    parser.set_defaults(handler=_run_build_native)


def _run_build_native(args: argparse.Namespace) -> int:
    from .kernels import native

    return native.main()


# -- the parser and main ----------------------------------------------------------------

COMMANDS: list[CommandAdder] = [
    add_train_command,
    add_compare_command,
    add_report_command,
    add_presets_command,
    add_figure_command,
    add_search_command,
    add_build_native_command,
]
"""The subcommands, in the order ``--help`` lists them."""


def register_command(adder: CommandAdder) -> CommandAdder:
    """Add a subcommand (usable as a decorator); its parser must set ``handler``."""
    if adder not in COMMANDS:
        COMMANDS.append(adder)
    return adder


def build_parser(commands: Sequence[CommandAdder] | None = None) -> argparse.ArgumentParser:
    """The ``microcircuits`` argument parser with ``commands`` (default: :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="microcircuits",
        description="subLSTM and fix-subLSTM (Costa et al., NIPS 2017): train, compare, report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS if commands is None else commands:
        add(subparsers)
    return parser


class _TqdmHandler(logging.Handler):
    """Log lines written around the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(args: argparse.Namespace) -> tuple[logging.Handler, int]:
    """Send the package's log records to stderr; return the handler and the old level."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("microcircuits")
    previous = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    return handler, previous


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import NonFiniteLossError

    return (
        ValueError,
        TypeError,
        KeyError,
        FileExistsError,
        FileNotFoundError,
        DataError,
        CheckpointError,
        NonFiniteLossError,
    )


def _os_error_in(error: BaseException) -> OSError | None:
    """The operating system's error behind ``error`` (itself, or what it was raised from):
    a full disk, a read-only or missing directory, a file where a folder should be."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _describe_os_error(error: OSError) -> str:
    """``<path>: <strerror>`` (``[Errno 28] No space left on device``), else the message."""
    if error.strerror is None:
        return str(error)
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    reason = f"{error.strerror} (errno {error.errno})" if error.errno else error.strerror
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue the interrupted command."""
    if getattr(args, "command", None) == "search":
        return "rerun the same command to continue the search (its storage keeps the trials)"
    return "continue with the same command and --resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Errors a user can fix (bad values, missing data, an existing run directory, a
    diverged run) print one line ``microcircuits: error: ...`` and return 2 (1 for a
    diverged run), without a traceback unless ``--traceback`` is given.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler, previous_level = _configure_logging(args)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(
            "microcircuits: interrupted; " + _resume_hint(args),
            file=sys.stderr,
        )
        return 130
    except _user_errors() as error:
        if args.traceback:
            raise
        from .train import NonFiniteLossError

        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"microcircuits: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, NonFiniteLossError) else 2
    except Exception as error:
        cause = _os_error_in(error)
        if cause is None or args.traceback:
            raise
        print(f"microcircuits: error: {_describe_os_error(cause)}", file=sys.stderr)
        return 2
    finally:
        package_logger = logging.getLogger("microcircuits")
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
