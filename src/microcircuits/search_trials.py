"""A search's storage and its trial slots: who may start a trial, and what a dead one leaves.

Optuna numbers trials atomically but cannot "start a trial only if fewer than N exist".
The workers of a study (processes of one machine, or of several sharing a database)
therefore take :class:`TrialClaim`, one lock per study, from counting the study's trials
(:func:`counted_trials`) to creating the next one; together they start exactly the
missing trials.

Running trials send heartbeats to the storage (:func:`open_storage`). A trial whose
process died stops beating; after the grace period, or at once when its worker ran on
this machine and is gone, the next worker to claim a slot fails it and queues a retry
with the same parameters, seed and run directory (:func:`fail_dead_trials`), which
resumes the dead trial's training from its last checkpoint (a search whose worker
process died thus fails and retries that worker's trial itself, and so does the same
command started again). A failed trial with a retry does not count towards the study's
trials; a retry that dies too is not retried again, and counts as failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = [
    "COUNTED_STATES",
    "TrialClaim",
    "counted_trials",
    "default_storage",
    "display_url",
    "fail_dead_trials",
    "open_storage",
    "retried_trial_number",
    "sqlite_path",
]

logger = logging.getLogger(__name__)

COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
"""A trial in one of these states has taken one of the study's ``n_trials`` slots, unless
it failed and a retry replaces it."""


# -- storage ------------------------------------------------------------------------------


def default_storage(out_dir: str | os.PathLike[str]) -> str:
    """The SQLite URL of ``<out_dir>/study.db`` (absolute, so that workers agree)."""
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def sqlite_path(url: str) -> str | None:
    """The database file of a SQLite URL (``":memory:"`` for none), else ``None``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return parsed.database or ":memory:"


def display_url(url: str) -> str:
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
    if sqlite_path(url) is not None:
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


class TrialClaim:
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
        database = sqlite_path(url)
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


def counted_trials(study: optuna.Study) -> int:
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


def trial_states(study: optuna.Study) -> str:
    """The study's trials by state, e.g. ``"4 complete, 1 pruned, 1 running"`` (a running
    trial whose worker died is failed and retried when a worker starts)."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        name = trial.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    order = ("complete", "pruned", "fail", "running", "waiting")
    parts = [f"{counts[name]} {name}" for name in order if counts.get(name)]
    return ", ".join(parts) or "none yet"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. no permission: it exists
        return True
    return True


def fail_dead_trials(study: optuna.Study, dead_pids: Collection[int] = ()) -> None:
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


def retried_trial_number(trial: optuna.Trial) -> int | None:
    """The first trial of the retry chain ``trial`` belongs to (``None``: not a retry)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _RETRY.retried_trial_number(frozen)
