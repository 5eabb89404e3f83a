"""The files of a run directory: created, checked, written atomically, read back on resume.

:func:`microcircuits.train.train` writes one directory per run::

    <out_dir>/<run_name>/
      config.json        the fully resolved ExperimentConfig
      meta.json          package version, git commit, seed, torch, threads, hardware
      task.json          what the task stores with the run (e.g. psMNIST's permutation)
      metrics.jsonl      one JSON record per line: "train" (every log_every steps),
                         "valid" (every validation), "epoch" (every epoch end),
                         "error", "stopped"
      tensorboard/       the same scalars as TensorBoard events
      train.log          the run's log messages
      checkpoints/last.safetensors   everything needed to resume (microcircuits.resume)
      checkpoints/best.safetensors   the model of the best validation so far
      results.json       written at the end (:class:`RunResult`)

Every JSON file is written through a temporary file renamed over it, so a reader (or a
resumed run) never sees half a file; what an interrupted write left behind is removed
when the run starts or resumes. :mod:`microcircuits.runs` reads finished runs back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import checkpoint_file
from .config import ExperimentConfig

__all__ = [
    "RESUMABLE_CHANGES",
    "MetricsLog",
    "NoMetricsLog",
    "RunResult",
    "hardware_description",
    "prepare_run_dir",
    "remove_stale_temp_files",
    "run_directory",
    "run_log",
    "warnings_only",
    "write_json",
    "write_run_files",
    "write_text",
]

logger = logging.getLogger(__name__)

RESUMABLE_CHANGES = frozenset(
    {
        "epochs", "max_steps", "device", "progress", "tensorboard", "num_threads",
        "checkpoint_every", "log_every", "data_dir", "download", "out_dir", "run_name",
        "lr", "clip_norm", "lr_decay_factor", "lr_decay_patience", "lr_decay_threshold",
        "min_lr", "early_stop_patience",
    }
)  # fmt: skip
"""Config fields that may differ between a run and its resumption: they change where
the run stops or how it is observed; or (``lr``, ``clip_norm``) are the remedies for a
diverged run, continued from its last good checkpoint; or they set the plateau schedule
from here on (the decay and early stopping rules: a run that stalls at its learning
rate takes a schedule without starting again; the counters it has kept carry over). A
changed ``lr`` replaces the learning rate of the optimiser (including any plateau decay
it had); the same ``lr`` keeps the optimiser's, so an unchanged resume stays exact."""

_RUN_FILES = ("config.json", "meta.json", "task.json", "results.json", "metrics.jsonl")
_CHECKPOINT_NAMES = ("last", "best")


@dataclass
class RunResult:
    """Outcome of one run (also written as ``results.json``).

    Attributes:
        run_dir: the run directory.
        task, cell, size, hidden_size: what was trained (``size``: the paper's nominal size).
        metric: the task's metric name; ``higher_is_better`` its direction.
        best_valid: best validation metric seen (of the checkpoint ``best.safetensors``).
        best_valid_loss: validation loss of that checkpoint.
        best_step, best_epoch: where it was reached.
        test: test metric of the best-validation checkpoint.
        test_loss: its test loss.
        epochs_done: epochs completed (fractional when stopped mid-epoch).
        steps_done: optimiser steps done.
        wall_time_s: training time, summed over resumptions.
        stopped: ``"completed"``, ``"early_stop"`` or ``"max_steps"``.
        parameters: number of trainable parameters.
        evaluated: ``"best"``: test/valid are of ``best.safetensors`` (a run stopped by
            ``max_steps`` before any validation is validated at the stop, and that model
            saved as its best). ``"last"`` in results of earlier versions: of the model
            at the stop, with no best checkpoint.
    """

    run_dir: Path
    task: str
    cell: str
    size: int
    hidden_size: int
    metric: str
    higher_is_better: bool
    best_valid: float | None
    best_valid_loss: float | None
    best_step: int | None
    best_epoch: float | None
    test: float | None
    test_loss: float | None
    epochs_done: float
    steps_done: int
    wall_time_s: float
    stopped: str
    parameters: int
    evaluated: str

    @property
    def completed(self) -> bool:
        return self.stopped in ("completed", "early_stop")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["run_dir"] = str(self.run_dir)
        values["completed"] = self.completed
        return values

    def write(self) -> None:
        """Write ``results.json`` into the run directory."""
        write_json(self.run_dir / "results.json", self.to_dict())


def run_directory(config: ExperimentConfig) -> Path:
    """``<out_dir>/<run_name>`` (default name ``<task>-<cell>-<size>-seed<seed>``)."""
    return Path(config.out_dir) / (config.run_name or config.default_run_name)


# -- writing files ----------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it (see remove_stale_temp_files)."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temporary files an interrupted write of this run left behind.

    Only names that :func:`write_text` (``.<file>.tmp``) and
    :func:`~microcircuits.checkpoint.save_checkpoint` (``.<name>.safetensors.*.tmp``)
    create for the run's own files are removed; anything else is left alone.
    """
    stale = [run_dir / f".{name}.tmp" for name in _RUN_FILES]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for name in _CHECKPOINT_NAMES:
            stale.extend(checkpoints.glob(f".{name}.safetensors.*.tmp"))
    for path in stale:
        if path.is_file():
            logger.info("removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)


def _check_resumable(config: ExperimentConfig, run_dir: Path) -> None:
    """Refuse a resume whose config differs from the saved one beyond RESUMABLE_CHANGES."""
    saved_config = run_dir / "config.json"
    if not saved_config.exists():
        return
    saved = json.loads(saved_config.read_text())
    current = config.to_dict()
    changed = sorted(
        key
        for key in current
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != current[key]
    )
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {run_dir} with a different config ({details}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change on resume"
        )


def prepare_run_dir(
    config: ExperimentConfig, run_dir: Path, *, resume: bool, overwrite: bool
) -> bool:
    """Create or check the run directory; return whether a checkpoint is resumed.

    Raises:
        ValueError: a resume with a config that differs beyond :data:`RESUMABLE_CHANGES`.
        FileExistsError: the directory holds a run and neither ``resume`` nor
            ``overwrite`` was given.
    """
    last = checkpoint_file(run_dir / "checkpoints", "last")
    if resume and last.exists():
        _check_resumable(config, run_dir)
        # The run goes on: the results of an earlier stage (e.g. ``--epochs k``) are no
        # longer its results; the report shows it in progress until it ends again.
        (run_dir / "results.json").unlink(missing_ok=True)
        remove_stale_temp_files(run_dir)
        return True
    if resume:
        logger.info("no checkpoint in %s: starting a new run", run_dir)
    if (run_dir / "config.json").exists() and not resume:
        if not overwrite:
            raise FileExistsError(
                f"run directory {run_dir} already holds a run; resume it (--resume), replace "
                "it (--overwrite), or choose another --out/--name"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(run_dir)
    return False


# -- meta.json: what ran where ------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware_description(device: torch.device | None = None) -> dict[str, Any]:
    """The machine, without its name: CPU model and cores, threads, CUDA device."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" else None
        info["cuda_device"] = torch.cuda.get_device_name(index)
        info["cuda_version"] = torch.version.cuda
    return info


def _git_commit() -> dict[str, Any] | None:
    """Commit of the source tree the package runs from, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _command_line() -> str:
    """The command that started this process, without the path of the executable."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":
        program = "python -m microcircuits"
    return " ".join([program, *sys.argv[1:]])


def write_run_files(
    run_dir: Path,
    config: ExperimentConfig,
    task_artifacts: dict[str, Any],
    *,
    resuming: bool,
    device: torch.device,
    amp: bool,
    processes: int,
    parameters: int,
    global_step: int,
) -> None:
    """Write ``config.json``, ``meta.json`` (a resume is appended to its ``"resumes"``)
    and ``task.json``. ``global_step``: where a resumed run goes on."""
    write_json(run_dir / "config.json", config.to_dict())
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if resuming and meta_path.exists() else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not meta:
        meta = {
            "package": "microcircuits",
            "version": __version__,
            "git": _git_commit(),
            "seed": config.seed,
            "created": now,
            "command": _command_line(),
            "device": str(device),
            "amp": amp,
            "hardware": hardware_description(device),
            "processes": processes,
            "parameters": parameters,
            "resumes": [],
        }
    else:
        meta["resumes"].append(
            {
                "at_step": global_step,
                "time": now,
                "version": __version__,
                "git": _git_commit(),
                "device": str(device),
                "hardware": hardware_description(device),
                "processes": processes,
            }
        )
    write_json(meta_path, meta)
    write_json(run_dir / "task.json", task_artifacts)


# -- train.log ----------------------------------------------------------------------------


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Copy the package's log records into ``train.log`` for the duration of the run."""
    package_logger = logging.getLogger("microcircuits")
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous_level = package_logger.level
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
        handler.close()


@contextlib.contextmanager
def warnings_only() -> Iterator[None]:
    """Ranks other than 0: keep their (duplicate) progress messages out of the console."""
    package_logger = logging.getLogger("microcircuits")
    previous_level = package_logger.level
    package_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package_logger.setLevel(previous_level)


# -- metrics.jsonl ------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` plus optional TensorBoard events, resumable at a step.

    Args:
        run_dir: the run directory.
        resume_step: the global step of the checkpoint being resumed (``None``: a fresh
            start, which logs afresh).
        tensorboard: also write TensorBoard events.
        resume_records: lines of ``metrics.jsonl`` the checkpoint had seen (``None``:
            a checkpoint of an earlier version, which did not record it).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        resume_step: int | None,
        tensorboard: bool,
        resume_records: int | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint: those steps are redone.
            kept = self._logged_before(resume_step, resume_records)
        # A fresh start (even in a directory whose run never checkpointed) logs afresh.
        write_text(self.path, "".join(line + "\n" for line in kept))
        self.records = len(kept)  # lines written so far; checkpoints store it
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._writer = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=resume_step
            )

    def _logged_before(self, resume_step: int, resume_records: int | None) -> list[str]:
        """The lines of the file that the checkpoint being resumed had seen.

        Checkpoints record how many lines were logged when they were written: exactly
        those are kept (records written after it, even at its step, such as a
        validation whose checkpoint write failed, are redone). Older checkpoints did
        not; then records of later steps are dropped. A last line cut off by a kill
        mid-write is dropped either way.
        """
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line]
        if resume_records is not None:
            lines = lines[:resume_records]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines):  # torn by a kill mid-write
                    logger.warning("%s: dropping its cut-off last line", self.path)
                    break
                raise ValueError(
                    f"cannot resume: {self.path} line {number} is not JSON ({exc}); "
                    "remove or repair that line"
                ) from None
            if resume_records is not None or record.get("step", 0) <= resume_step:
                kept.append(line)
        return kept

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records += 1
        if self._writer is not None:
            kind, step = record["kind"], record.get("step", 0)
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    if not isinstance(value, bool):
                        self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


class NoMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    records = 0

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
