"""Hyperparameter search with Optuna: the paper's search, resumable, on many processes.

Costa et al. (2017) tuned every row of their Tables 2 and 3 on the validation set over
input, output and update dropout, the learning rate and the weight decay.
:func:`run_search` redoes that search for one task, cell and size:

- the space is read from ``configs/search_space.toml`` (or a file of the same form):
  one range per config field, log-uniform for the learning rate and weight decay;
- each trial is one :func:`microcircuits.train.train` run with the proposed values and
  its own fixed seed (``seed + trial number``, stored in the trial's user attributes);
  its run directory is ``<out>/trials/trial-<number>``; the objective is the run's best
  validation metric, minimised or maximised as the task's metric asks;
- every validation is reported to the pruner (median or successive halving) at its
  global training step; a hopeless trial stops there and is recorded as pruned;
- a trial whose training raises (a diverged loss, say) is recorded as failed with the
  error in its user attributes, and the search goes on.

Storage, concurrency, crashes. The study lives in an Optuna RDB storage: by default a
SQLite file ``<out>/study.db``; any SQLAlchemy URL (e.g. ``postgresql+psycopg://...``)
lets processes on several machines share it. ``workers=K`` starts K processes on this
machine, and more ``microcircuits search`` commands may join the same study at any time;
together they finish exactly ``n_trials`` trials (complete, pruned or failed), each
taking a lock before it counts the trials and starts one. A trial whose process died is
failed and retried once, resuming its training from its last checkpoint; the retry takes
its slot. Both are :mod:`microcircuits.search_trials`. Rerunning the command continues
a study (``load_if_exists``).

Outputs, in ``<out>``: ``best_preset.toml`` (the best trial's values as a preset file
for ``microcircuits train TASK --preset``), ``optimization_history.png`` and
``param_importances.png`` (when at least two trials completed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .checkpoint import checkpoint_file
from .config import ExperimentConfig, config_fields, load_config, write_preset_file
from .model_registry import model_kind
from .run_dir import run_directory
from .search_plots import plot_history, plot_importances
from .search_trials import (
    TrialClaim,
    counted_trials,
    default_storage,
    display_url,
    fail_dead_trials,
    open_storage,
    retried_trial_number,
    sqlite_path,
    trial_states,
)
from .task_registry import TASK_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PRUNERS",
    "ParamRange",
    "SearchResult",
    "SearchSpace",
    "SearchSpec",
    "load_search_space",
    "make_pruner",
    "open_storage",
    "run_search",
    "task_metric",
    "write_study_outputs",
]

logger = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
# Overrides that say where and how a run is observed, not what it computes: a command
# joining a study may change them, and the best preset leaves them out.
_RUN_CONTROL = frozenset(
    {
        "device", "num_threads", "data_dir", "download", "progress", "tensorboard",
        "out_dir", "run_name", "seed", "log_every", "checkpoint_every", "amp",
    }
)  # fmt: skip
# The search's training budget: not a hyperparameter of the best preset either.
_BUDGET = frozenset({"epochs", "max_steps", "eval_every", "early_stop_patience"})


# -- the search space -------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRange:
    """The range searched for one config field.

    Attributes:
        name: an :class:`~microcircuits.config.ExperimentConfig` float field.
        low, high: the bounds (both included).
        log: sample log-uniformly (``low`` must then be > 0).
    """

    name: str
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> float:
        """The value ``trial`` proposes for this field."""
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched for one task and cell, and the sampler and pruner settings."""

    params: dict[str, ParamRange]
    sampler: dict[str, Any] = field(default_factory=dict)
    pruners: dict[str, dict[str, Any]] = field(default_factory=dict)


_RANGE_KEYS = {"low", "high", "log", "search"}


def _merge_ranges(merged: dict[str, dict[str, Any]], table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of [field] tables, got {table!r}")
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}.{name} must be a table (low, high, log), got {entry!r}")
        unknown = sorted(set(entry) - _RANGE_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}.{name}; allowed: {_RANGE_KEYS}")
        merged[name] = {**merged.get(name, {}), **entry}


def _param_range(name: str, entry: dict[str, Any], source: str) -> ParamRange:
    fields = config_fields()
    if name not in fields or fields[name] is not float:
        floats = sorted(n for n, t in fields.items() if t is float)
        raise ValueError(f"{source}: {name!r} is not a float config field; searchable: {floats}")
    try:
        low, high = float(entry["low"]), float(entry["high"])
    except KeyError as missing:
        raise ValueError(f"{source}: the range of {name!r} has no {missing.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{source}: low/high of {name!r} must be numbers, got {entry}") from None
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{source}: log of {name!r} must be true or false, got {log!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{source}: {name!r} needs finite low <= high, got [{low}, {high}]")
    if log and low <= 0:
        raise ValueError(f"{source}: the log range of {name!r} needs low > 0, got {low}")
    return ParamRange(name, low, high, log)


def load_search_space(
    task: str, cell: str, path: str | os.PathLike[str] | None = None
) -> SearchSpace:
    """The search space of ``task`` and ``cell`` from ``path`` (default: the package's
    ``configs/search_space.toml``; see that file for its form).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a malformed file, or a range of a field that is not a float.
    """
    cell = model_kind(cell).name  # the key of its [cells.<cell>] tables
    if path is None:
        source = "search_space.toml"
        text = resources.files("microcircuits").joinpath("configs", source).read_text("utf-8")
    else:
        source = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"search space file {path} does not exist")
        text = Path(path).read_text(encoding="utf-8")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"search space file {source} is not valid TOML: {error}") from None
    unknown = sorted(set(table) - {"params", "tasks", "cells", "sampler", "pruner"})
    if unknown:
        raise ValueError(f"unknown table(s) {unknown} in {source}")
    merged: dict[str, dict[str, Any]] = {}
    _merge_ranges(merged, table.get("params", {}), "params")
    _merge_ranges(merged, table.get("tasks", {}).get(task, {}), f"tasks.{task}")
    _merge_ranges(merged, table.get("cells", {}).get(cell, {}), f"cells.{cell}")
    params = {
        name: _param_range(name, entry, source)
        for name, entry in merged.items()
        if entry.get("search", True)
    }
    if not params:
        raise ValueError(f"{source} leaves nothing to search for task {task!r}, cell {cell!r}")
    return SearchSpace(params, dict(table.get("sampler", {})), dict(table.get("pruner", {})))


def make_pruner(name: str, settings: Mapping[str, Mapping[str, Any]] | None = None):
    """The Optuna pruner ``name`` (one of :data:`PRUNERS`) with ``settings[name]``."""
    if name not in PRUNERS:
        raise ValueError(f"pruner must be one of {list(PRUNERS)}, got {name!r}")
    options = dict((settings or {}).get(name, {}))
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    return optuna.pruners.NopPruner()


def _make_sampler(settings: Mapping[str, Any], seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, **dict(settings))


def task_metric(task: str) -> tuple[str, bool]:
    """``(metric, higher_is_better)`` of a task, without loading its data."""
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {sorted(TASK_KINDS)}, got {task!r}")
    return TASK_KINDS[task].metric, TASK_KINDS[task].higher_is_better


# -- the settings of one search ---------------------------------------------------------


@dataclass
class SearchSpec:
    """Everything :func:`run_search` needs; picklable, so that workers receive it.

    Attributes:
        task, cell, size: what is tuned (as for :func:`~microcircuits.config.load_config`;
            ``size=None``: the task preset's default).
        n_trials: trials the study should hold in the end (complete, pruned or failed),
            counting those it already has.
        out_dir: folder of the study's outputs and trial runs (default
            ``runs/search-<study_name>``).
        storage: Optuna RDB URL (default: SQLite file ``<out_dir>/study.db``).
        study_name: default ``<task>-<cell>-<size>``.
        workers: processes started on this machine, all working on the study.
        pruner: one of :data:`PRUNERS`.
        seed: trial ``n`` trains with seed ``seed + n``.
        sampler_seed: seed of the TPE sampler (worker ``i`` gets ``sampler_seed + i``);
            ``None``: fresh entropy (the usual choice when several processes propose).
        overrides: config values shared by every trial (text from ``--set`` allowed),
            e.g. a shorter ``epochs`` budget for the search.
        space_file: search space TOML (default: the package's ``search_space.toml``).
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without a heartbeat after which a running trial counts
            as dead (default: twice the interval).
    """

    task: str
    cell: str = "lstm"
    size: int | None = None
    n_trials: int = 20
    out_dir: str | None = None
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    pruner: str = "median"
    seed: int = 0
    sampler_seed: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    space_file: str | None = None
    heartbeat_interval: int = 60
    grace_period: int | None = None

    def resolved(self) -> SearchSpec:
        """A copy with defaults filled in and every value checked.

        Raises:
            ValueError: a bad value, naming the field.
        """
        base = load_config(self.task, self.cell, self.size, self.overrides)
        for name in ("n_trials", "workers", "heartbeat_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.grace_period is not None and (
            not isinstance(self.grace_period, int) or self.grace_period <= self.heartbeat_interval
        ):
            raise ValueError(
                f"grace_period must be an int > heartbeat_interval ({self.heartbeat_interval}), "
                f"got {self.grace_period!r}"
            )
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {list(PRUNERS)}, got {self.pruner!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        study_name = self.study_name or f"{base.task}-{base.cell}-{base.nominal_size}"
        out_dir = self.out_dir or str(Path("runs") / f"search-{study_name}")
        storage = self.storage or default_storage(out_dir)
        if sqlite_path(storage) == ":memory:":
            raise ValueError(
                f"storage must be a database that outlives a connection, got {storage!r}; "
                "give a SQLite file (sqlite:///path/study.db) or a server URL"
            )
        return dataclasses.replace(
            self,
            task=base.task,
            cell=base.cell,
            size=base.nominal_size,
            study_name=study_name,
            out_dir=out_dir,
            storage=storage,
            overrides=dict(self.overrides),
        )


# -- one trial --------------------------------------------------------------------------


class _Objective:
    """Train one run per trial; return its best validation metric."""

    def __init__(self, spec: SearchSpec, space: SearchSpace) -> None:
        self.spec = spec
        self.space = space
        self.metric, _ = task_metric(spec.task)
        self.on_start: Callable[[], None] = lambda: None  # releases the trial claim

    def config(self, trial: optuna.Trial) -> tuple[ExperimentConfig, bool]:
        """The trial's run config, and whether it resumes a dead trial's checkpoint."""
        spec = self.spec
        params = {name: span.suggest(trial) for name, span in self.space.params.items()}
        original = retried_trial_number(trial)
        number = trial.number if original is None else original
        # A retry inherits the user attributes of the trial it repeats: same seed.
        seed = int(trial.user_attrs.get("seed", spec.seed + trial.number))
        overrides = {
            **spec.overrides,
            **params,
            "seed": seed,
            "out_dir": str(Path(spec.out_dir) / "trials"),
            "run_name": f"trial-{number:04d}",
            "progress": False,
        }
        if spec.workers > 1 and "num_threads" not in spec.overrides:
            overrides["num_threads"] = max(1, (os.cpu_count() or 1) // spec.workers)
        config = load_config(spec.task, spec.cell, spec.size, overrides)
        run_dir = run_directory(config)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("worker", f"pid {os.getpid()}")
        trial.set_user_attr("host", socket.gethostname())
        resumes = original is not None and checkpoint_file(run_dir / "checkpoints", "last").exists()
        return config, resumes

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_start()
        from .train import train

        config, resumes = self.config(trial)
        if resumes:
            logger.info("trial %d resumes the run of the trial it retries", trial.number)

        def report(step: int, epoch: float, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"validation {self.metric} {value:.6g} at step {step} (epoch {epoch:.2f})"
                )

        try:
            result = train(config, resume=resumes, overwrite=not resumes, on_validation=report)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            raise
        trial.set_user_attr("test", result.test)
        trial.set_user_attr("stopped", result.stopped)
        trial.set_user_attr("steps", result.steps_done)
        if result.best_valid is None or not math.isfinite(result.best_valid):
            raise ValueError(f"the run ended without a finite validation {self.metric}")
        return result.best_valid


# -- workers ----------------------------------------------------------------------------


def _optimise(spec: SearchSpec, worker: int, dead_pids: Collection[int] = ()) -> None:
    """Run trials of the study until it holds ``spec.n_trials`` of them.

    ``dead_pids``: processes of this machine known dead, whose running trials are
    failed and retried (as are those of any other vanished process of this machine).
    """
    space = load_search_space(spec.task, spec.cell, spec.space_file)
    storage = open_storage(
        spec.storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period
    )
    sampler_seed = None if spec.sampler_seed is None else spec.sampler_seed + worker
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=_make_sampler(space.sampler, sampler_seed),
        pruner=make_pruner(spec.pruner, space.pruners),
    )
    objective = _Objective(spec, space)
    claim = TrialClaim(spec.storage, spec.study_name)
    objective.on_start = claim.release
    try:
        while True:
            claim.acquire()
            try:
                # Under the claim: fail dead trials (queueing their retries, which take
                # their slots), count, then take a queued retry or create a trial; the
                # objective releases the claim first.
                fail_dead_trials(study, dead_pids)
                if counted_trials(study) >= spec.n_trials:
                    return
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            finally:
                claim.release()
    finally:
        claim.close()


def _gpu_for_worker(worker: int) -> str | None:
    """The GPU (``CUDA_VISIBLE_DEVICES`` entry) worker ``worker`` should use, if any."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        ids = (
            [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        )
    return ids[worker % len(ids)] if len(ids) > 1 else None


def _worker_main(spec: SearchSpec, worker: int, level: int, gpu: str | None) -> None:
    """Entry point of a worker process."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
    handler.setLevel(level)  # a run raises the logger to INFO for its train.log
    package_logger = logging.getLogger("microcircuits")
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    optuna.logging.set_verbosity(logging.INFO if level <= logging.INFO else logging.WARNING)
    _optimise(spec, worker)


def _run_workers(spec: SearchSpec) -> None:
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger("microcircuits").getEffectiveLevel()
    uses_cpu = str(spec.overrides.get("device", "auto")).strip().lower() == "cpu"
    processes = [
        context.Process(
            target=_worker_main,
            args=(spec, i, level, None if uses_cpu else _gpu_for_worker(i)),
            name=f"search-worker-{i}",
        )
        for i in range(spec.workers)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:  # our own children: stop them with us
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        raise
    failed = [(p.name, p.exitcode) for p in processes if p.exitcode != 0]
    if not failed:
        return
    # A worker killed (or failed) mid-trial leaves that trial running: fail it, queue
    # its retry (from its last checkpoint) and finish the study here.
    logger.warning("search worker(s) %s stopped early; their trials are retried here", failed)
    try:
        _optimise(spec, spec.workers, {p.pid for p in processes if p.exitcode != 0})
    except Exception as error:
        raise RuntimeError(
            f"search worker(s) {failed} exited with an error (see their messages above), "
            f"and finishing the study here failed ({type(error).__name__}: {error}); "
            "the study is kept: run the same command again to continue it"
        ) from error


# -- the study --------------------------------------------------------------------------


def _study_record(spec: SearchSpec) -> dict[str, Any]:
    """What a study remembers of the command that created it."""
    metric, higher = task_metric(spec.task)
    computed = {k: str(v) for k, v in spec.overrides.items() if k not in _RUN_CONTROL}
    return {
        "task": spec.task,
        "cell": spec.cell,
        "size": spec.size,
        "metric": metric,
        "higher_is_better": higher,
        "overrides": computed,
        "seed": spec.seed,
    }


def _open_study(spec: SearchSpec) -> optuna.Study:
    """Create the study, or load it and check that it was made for the same experiment."""
    _, higher = task_metric(spec.task)
    storage = open_storage(
        spec.storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period
    )
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=storage,
        direction="maximize" if higher else "minimize",
        load_if_exists=True,
    )
    record = _study_record(spec)
    saved = study.user_attrs
    if "task" not in saved:
        for key, value in record.items():
            study.set_user_attr(key, value)
        return study
    differences = {
        key: (saved.get(key), value)
        for key, value in record.items()
        if key != "seed" and saved.get(key) != value
    }
    if differences:
        details = ", ".join(f"{k}: study {a!r}, command {b!r}" for k, (a, b) in differences.items())
        raise ValueError(
            f"study {spec.study_name!r} in {display_url(spec.storage)} was made for another "
            f"experiment ({details}); choose another --study-name or the same settings"
        )
    return study


def _check_ranges(spec: SearchSpec, space: SearchSpace) -> None:
    """Every corner of the space must make a valid config (e.g. dropout < 1)."""
    for corner in ("low", "high"):
        values = {name: getattr(span, corner) for name, span in space.params.items()}
        try:
            load_config(spec.task, spec.cell, spec.size, {**spec.overrides, **values})
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"the search space's {corner} ends give an invalid config: {error}"
            ) from None


def _check_data(spec: SearchSpec) -> None:
    """Load the task's data once, so that missing data stops the search, not every trial."""
    import torch

    from .tasks import make_task

    config = load_config(spec.task, spec.cell, spec.size, {**spec.overrides, "device": "cpu"})
    make_task(config, torch.device("cpu"))


@dataclass
class SearchResult:
    """Where a study stands after :func:`run_search`.

    Attributes:
        study_name, storage: the study (``storage`` with any password hidden).
        out_dir: the folder of its outputs and trial runs.
        metric, direction: the objective (``"minimize"``/``"maximize"``).
        states: number of trials per state (``"COMPLETE"``, ``"PRUNED"``, ``"FAIL"``, ...).
        best_trial, best_value, best_params: the best completed trial (``None``: none).
        best_run_dir: its run directory.
        preset: the best preset file written (``None`` without a completed trial).
        figures: PNG files written.
    """

    study_name: str
    storage: str
    out_dir: Path
    metric: str
    direction: str
    states: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, float]
    best_run_dir: str | None
    preset: Path | None
    figures: list[Path]


def run_search(spec: SearchSpec) -> SearchResult:
    """Run (or continue, or join) the study of ``spec`` until it holds ``spec.n_trials``
    trials; write the best preset and the plots.

    Raises:
        ValueError: bad settings, a search space that gives invalid configs, or a
            study of that name made for another experiment.
        microcircuits.data.DataError: the task's data is missing or corrupt.
        RuntimeError: a worker process failed and its trials could not be finished by
            this process (the study is kept).
    """
    spec = spec.resolved()
    space = load_search_space(spec.task, spec.cell, spec.space_file)
    _check_ranges(spec, space)
    _check_data(spec)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _open_study(spec)
    logger.info(
        "study %r in %s: %d of %d trials taken (%s); %d worker(s) here",
        spec.study_name, display_url(spec.storage), counted_trials(study), spec.n_trials,
        trial_states(study), spec.workers,
    )  # fmt: skip
    if spec.workers == 1:
        _optimise(spec, 0)
    else:
        _run_workers(spec)
    return write_study_outputs(study, out_dir, storage=spec.storage)


# -- outputs ----------------------------------------------------------------------------


def write_study_outputs(
    study: optuna.Study, out_dir: str | os.PathLike[str], *, storage: str = ""
) -> SearchResult:
    """Write ``best_preset.toml`` and the plots of ``study`` into ``out_dir``.

    The preset holds the best trial's searched values plus the study's shared overrides
    that change what is computed (not its budget: ``epochs``, ``max_steps``, ...).

    Args:
        study: the study (as :func:`run_search` leaves it, with its user attributes).
        out_dir: where to write.
        storage: the storage URL, for the result (its password is hidden).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    preset = None
    if best is not None and "task" in record:
        preset = _write_best_preset(study, best, out_dir / "best_preset.toml")
    figures = plot_history(study, out_dir)
    figures += plot_importances(study, out_dir)
    return SearchResult(
        study_name=study.study_name,
        storage=display_url(storage) if storage else "",
        out_dir=out_dir,
        metric=record.get("metric", "value"),
        direction=study.direction.name.lower(),
        states=states,
        best_trial=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_run_dir=None if best is None else best.user_attrs.get("run_dir"),
        preset=preset,
        figures=figures,
    )


def _write_best_preset(study: optuna.Study, best: optuna.trial.FrozenTrial, path: Path) -> Path:
    record = study.user_attrs
    shared = {k: v for k, v in record.get("overrides", {}).items() if k not in _BUDGET}
    config = load_config(record["task"], record["cell"], record["size"], {**shared, **best.params})
    values = {name: getattr(config, name) for name in [*shared, *best.params]}
    left_out = sorted(k for k in record.get("overrides", {}) if k in _BUDGET)
    metric = record.get("metric", "value")
    source = f"microcircuits search: study {study.study_name!r}, trial {best.number}"
    comment = (
        f"Best hyperparameters of study {study.study_name!r}: trial {best.number}, "
        f"validation {metric} {best.value:.6g} (seed {best.user_attrs.get('seed')}).\n"
        f"Train with: microcircuits train {record['task']} --preset {path.name}"
    )
    if left_out:
        comment += f"\nThe search's training budget ({', '.join(left_out)}) is not included."
    return write_preset_file(
        path,
        task=record["task"],
        cell=record["cell"],
        size=record["size"],
        config=values,
        source=source,
        comment=comment,
    )
