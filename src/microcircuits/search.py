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
together they finish exactly ``n_trials`` trials (complete, pruned or failed). For that,
a worker takes a lock before it counts the study's trials and starts a new one
(:class:`_TrialClaim`: ``flock`` on a file beside a SQLite database, an advisory lock on
PostgreSQL or MySQL), so no two workers can both take the last slot.

Running trials send a heartbeat to the storage. A trial whose process died (killed,
machine lost) stops beating; after the grace period the next worker to start a trial
marks it failed and queues a retry with the same parameters, seed and run directory,
which resumes the dead trial's training from its last checkpoint. A trial whose worker
ran on this machine and is gone is treated so at once: by the command whose worker
died (it then finishes the study itself) and by a command started again. The retry
takes the dead trial's slot: a failed trial with a retry does not count towards
``n_trials`` (a retry that dies too is not retried again, and counts as failed).
Rerunning the command continues a study (``load_if_exists``).

Outputs, in ``<out>``: ``best_preset.toml`` (the best trial's values as a preset file
for ``microcircuits train TASK --preset``), ``optimization_history.png`` and
``param_importances.png`` (when at least two trials completed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import socket
import sys
import warnings
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
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
"""A trial in one of these states has taken one of the study's ``n_trials`` slots, unless
it failed and a retry replaces it."""

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
        if _sqlite_path(storage) == ":memory:":
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


def default_storage(out_dir: str | os.PathLike[str]) -> str:
    """The SQLite URL of ``<out_dir>/study.db`` (absolute, so that workers agree)."""
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def _sqlite_path(url: str) -> str | None:
    """The database file of a SQLite URL (``":memory:"`` for none), else ``None``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return parsed.database or ":memory:"


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# Optuna 4.9 renamed the retry callback and the storage argument that takes it.
_RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
_RETRY_ARGUMENT = "heartbeat_stale_trial_callback"
if _RETRY is None:  # pragma: no cover - Optuna < 4.9
    _RETRY = optuna.storages.RetryFailedTrialCallback
    _RETRY_ARGUMENT = "failed_trial_callback"


def open_storage(
    url: str, *, heartbeat_interval: int = 60, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats, whose dead trials are failed and retried once.

    Args:
        url: SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg://...``).
        heartbeat_interval: seconds between heartbeats of a running trial.
        grace_period: seconds of silence after which a running trial is dead
            (default: twice the interval).
    """
    engine_kwargs: dict[str, Any] = {}
    if _sqlite_path(url) is not None:
        # Concurrent writers wait for the file lock instead of failing after 5 s.
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
    from sqlalchemy.exc import ArgumentError, OperationalError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{_RETRY_ARGUMENT: _RETRY(max_retry=1, inherit_intermediate_values=True)},
            )
        except ArgumentError as exc:
            raise ValueError(
                f"storage {url!r} is not a database URL this installation can open ({exc}); "
                "use e.g. sqlite:///path/to/study.db or postgresql+psycopg://user@host/db"
            ) from exc
        except OperationalError as exc:
            raise ValueError(f"cannot open the storage {url!r}: {exc.orig or exc}") from exc


# -- claiming a trial -------------------------------------------------------------------


class _TrialClaim:
    """A lock shared by every worker of a study, held while one counts and starts a trial.

    Optuna numbers trials atomically but cannot "start a trial only if fewer than N
    exist". With this lock held from the count to the trial's creation, the workers
    together start exactly the trials that are missing. SQLite: ``flock`` on
    ``<database>.lock`` (processes of one machine, as SQLite itself requires);
    PostgreSQL: ``pg_advisory_lock``; MySQL: ``GET_LOCK``. Both database locks belong
    to a connection and vanish with a dead worker. Other databases: no lock, and up to
    one extra trial per concurrent worker may run (a warning says so).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self._held = False
        self._file = None
        self._engine = None
        self._connection = None
        self._dialect = None
        database = _sqlite_path(url)
        key = hashlib.sha256(f"microcircuits-search:{study_name}".encode()).digest()
        self._key = int.from_bytes(key[:8], "big", signed=True)  # pg: a signed 64-bit key
        self._name = f"mc-search-{key.hex()[:40]}"  # MySQL: at most 64 characters
        if database is not None:
            try:
                import fcntl  # noqa: F401 - POSIX only
            except ImportError:  # pragma: no cover - Windows
                self._warn_unlocked("sqlite without fcntl")
            else:
                self._file = open(f"{database}.lock", "a+b")  # noqa: SIM115 - kept open
            return
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._engine = create_engine(url, poolclass=NullPool)
        self._dialect = self._engine.dialect.name
        if self._dialect not in ("postgresql", "mysql", "mariadb"):
            self._warn_unlocked(self._dialect)

    @staticmethod
    def _warn_unlocked(what: str) -> None:
        logger.warning(
            "no lock between search workers for %s: concurrent workers may run up to one "
            "trial each beyond --trials", what,
        )  # fmt: skip

    def acquire(self) -> None:
        if self._held:
            return
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        elif self._dialect in ("postgresql", "mysql", "mariadb"):
            from sqlalchemy import text

            self._connection = self._engine.connect()
            if self._dialect == "postgresql":
                self._connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            else:
                self._connection.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": self._name})
        self._held = True

    def release(self) -> None:
        """Give the lock back (nothing happens when it is not held)."""
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        elif self._connection is not None:
            from sqlalchemy import text

            try:
                if self._dialect == "postgresql":
                    self._connection.execute(
                        text("SELECT pg_advisory_unlock(:k)"), {"k": self._key}
                    )
                else:
                    self._connection.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": self._name})
            finally:
                self._connection.close()  # a closed session releases its locks anyway
                self._connection = None

    def close(self) -> None:
        self.release()
        if self._file is not None:
            self._file.close()
        if self._engine is not None:
            self._engine.dispose()


def _counted_trials(study: optuna.Study) -> int:
    """Trials that take a slot: finished or running, less failed ones that a retry
    replaces (the retry, waiting or not, takes their slot instead)."""
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        replaced = {number for t in trials for number in _RETRY.retry_history(t)}
    return sum(
        t.state in COUNTED_STATES and not (t.state == TrialState.FAIL and t.number in replaced)
        for t in trials
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. no permission: it exists
        return True
    return True


def _fail_dead_trials(study: optuna.Study, dead_pids: Collection[int] = ()) -> None:
    """Fail the study's dead running trials and queue their retries (as Optuna's
    heartbeat check does), holding the trial claim.

    Dead: silent for the grace period, or run by a worker of this machine whose process
    is in ``dead_pids`` or no longer exists.
    """
    storage = study._storage
    host = socket.gethostname()
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        if trial.user_attrs.get("host") != host or not worker.startswith("pid "):
            continue
        try:
            pid = int(worker[len("pid ") :])
        except ValueError:
            continue
        if pid != os.getpid() and (pid in dead_pids or not _process_alive(pid)):
            orphans.append(trial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        get_retry = getattr(storage, "get_heartbeat_stale_trial_callback", None)
        retry = get_retry() if get_retry else storage.get_failed_trial_callback()
        for trial in orphans:
            try:
                if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process got there first
            logger.warning(
                "trial %d: its worker (%s) is gone; marked failed, a retry is queued",
                trial.number, trial.user_attrs["worker"],
            )  # fmt: skip
            if retry is not None:
                retry(study, storage.get_trial(trial._trial_id))
        optuna.storages.fail_stale_trials(study)


# -- one trial --------------------------------------------------------------------------


def _retried_trial_number(trial: optuna.Trial) -> int | None:
    """The first trial of the retry chain ``trial`` belongs to (``None``: not a retry)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _RETRY.retried_trial_number(frozen)


class _Objective:
    """Train one run per trial; return its best validation metric."""

    def __init__(self, spec: SearchSpec, space: SearchSpace) -> None:
        self.spec = spec
        self.space = space
        self.metric, _ = task_metric(spec.task)
        self.on_start: Callable[[], None] = lambda: None  # releases the trial claim

    def config(self, trial: optuna.Trial) -> tuple[ExperimentConfig, bool]:
        """The trial's run config, and whether it resumes a dead trial's checkpoint."""
        from .train import run_directory

        spec = self.spec
        params = {name: span.suggest(trial) for name, span in self.space.params.items()}
        original = _retried_trial_number(trial)
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
    claim = _TrialClaim(spec.storage, spec.study_name)
    objective.on_start = claim.release
    try:
        while True:
            claim.acquire()
            try:
                # Under the claim: fail dead trials (queueing their retries, which take
                # their slots), count, then take a queued retry or create a trial; the
                # objective releases the claim first.
                _fail_dead_trials(study, dead_pids)
                if _counted_trials(study) >= spec.n_trials:
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
            f"study {spec.study_name!r} in {_display_url(spec.storage)} was made for another "
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
        "study %r in %s: %d of %d trials taken; %d worker(s) here",
        spec.study_name, _display_url(spec.storage), _counted_trials(study), spec.n_trials,
        spec.workers,
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
    figures = _plot_history(study, out_dir)
    figures += _plot_importances(study, out_dir)
    return SearchResult(
        study_name=study.study_name,
        storage=_display_url(storage) if storage else "",
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


def _save_png(fig: Any, path: Path) -> Path:
    from .analysis.style import PNG_DPI

    temp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temp, dpi=PNG_DPI)
    os.replace(temp, path)  # a reader never sees half a file
    return path


def _plot_history(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Each finished trial's value against its number, and the best value so far."""
    from matplotlib.ticker import MaxNLocator

    from .analysis.style import new_figure, styled

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not done and not pruned:
        return []
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    metric = study.user_attrs.get("metric", "objective")

    @styled
    def plot() -> list[Path]:
        fig, axes = new_figure(1, width=4.5, height=3.0)
        ax = axes[0, 0]
        if done:
            ax.plot([t.number for t in done], [t.value for t in done], "o", color="#0072B2",
                    label="completed")  # fmt: skip
            best, running = [], None
            for t in done:
                better = running is None or (t.value > running if maximise else t.value < running)
                running = t.value if better else running
                best.append(running)
            ax.step(
                [t.number for t in done], best, where="post", color="#D55E00", label="best so far"
            )
        if pruned:
            last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
            ax.plot([t.number for t in pruned], last, "x", color="grey",
                    label="pruned (last report)")  # fmt: skip
        ax.set(xlabel="trial", ylabel=f"validation {metric}", title=study.study_name)
        if metric in ("perplexity", "mse"):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        return _save_png(fig, out_dir / "optimization_history.png")

    return [plot()]


def _plot_importances(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's parameter importances as bars; needs >= 2 completed trials."""
    from .analysis.style import new_figure, styled

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2:
        logger.info("parameter importances need >= 2 completed trials, have %d", len(completed))
        return []
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:  # e.g. no parameter varied
        logger.info("no parameter importances: %s", error)
        return []
    if not importances:
        return []

    @styled
    def plot() -> list[Path]:
        names = list(importances)[::-1]  # most important on top
        fig, axes = new_figure(1, width=4.5, height=0.4 * len(names) + 1.0)
        ax = axes[0, 0]
        ax.barh(names, [importances[n] for n in names], color="#0072B2")
        ax.set(xlabel="importance (share of the objective's variation)",
               title=f"{study.study_name}: {len(completed)} completed trials")  # fmt: skip
        return _save_png(fig, out_dir / "param_importances.png")

    return [plot()]
