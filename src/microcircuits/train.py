"""One training loop for every task: optimiser, clipping, schedule, checkpoints, resume.

``train(config)`` runs one experiment and writes its run directory::

    <out_dir>/<run_name>/
      config.json        the fully resolved ExperimentConfig
      meta.json          package version, git commit, seed, torch, threads, hardware
      task.json          what the task stores with the run (e.g. psMNIST's permutation)
      metrics.jsonl      one JSON record per line: "train" (every log_every steps),
                         "valid" (every validation), "epoch" (every epoch end), "error"
      tensorboard/       the same scalars as TensorBoard events
      train.log          the run's log messages
      checkpoints/last.safetensors   everything needed to resume (see below)
      checkpoints/best.safetensors   the model of the best validation so far
      results.json       written at the end: best validation metric, test metric of the
                         best-validation checkpoint, epochs/steps done, wall time

Exact resume: ``last.safetensors`` holds the model, optimiser, plateau/early-stopping state,
the position (epoch, step in epoch, global step), torch's RNG state (dropout masks),
the data generator's state at the start of the epoch, and the state carried between
batches (the LM's hidden state). ``train(config, resume=True)`` restores all of it,
replays the data generator to the same batch and goes on, so on CPU a resumed run ends
with the same numbers as an uninterrupted one. ``last.safetensors`` is written every
``checkpoint_every`` steps, at every epoch end and when ``max_steps`` stops the run.

A non-finite training loss stops the run with :class:`NonFiniteLossError`, naming the
step and the loss; no checkpoint is written after it, so ``last.safetensors`` stays the last
good one. So does a parameter or optimiser state that is not finite, or a parameter beyond
:data:`DIVERGED_MAGNITUDE`, found when a checkpoint is about to be written: no checkpoint
ever holds such values. The message says how to resume with a lower lr.

Observers: ``train(config, on_validation=callback)`` calls ``callback(step, epoch,
metric)`` after every validation (the hyperparameter search reports to its pruner this
way). An exception raised by the callback stops the run where it is (recorded as a
``"stopped"`` record in ``metrics.jsonl``) and propagates to the caller of ``train``.
Under torchrun the callback runs on every rank, with the same arguments; it must take
the same decision on all of them.

Several processes: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the run
is data-parallel, each rank training on its shard of every global batch, and only
rank 0 writes the run directory; see :mod:`microcircuits.distributed`. Checkpoints have
the same contents as a single process's (the whole batch's carried state, plus every
rank's random-number state), so a run resumes the same way, with any number of
processes that divides the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .cells import CELLS
from .checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .distributed import (
    DistributedContext,
    all_gather,
    gather_batch,
    join_process_group,
    mean_over_ranks,
    run_on_main,
    shard_batch,
    wrap_model,
)
from .tasks import Evaluation, Task, data_seed, make_task

__all__ = [
    "NonFiniteLossError",
    "RESUMABLE_CHANGES",
    "RunResult",
    "ValidationCallback",
    "add_weight_decay_and_clip_",
    "hardware_description",
    "make_optimizer",
    "resolve_device",
    "run_directory",
    "train",
]

logger = logging.getLogger(__name__)

RESUMABLE_CHANGES = frozenset(
    {
        "epochs", "max_steps", "device", "progress", "tensorboard", "num_threads",
        "checkpoint_every", "log_every", "data_dir", "download", "out_dir", "run_name",
        "lr", "clip_norm",
    }
)  # fmt: skip
"""Config fields that may differ between a run and its resumption: they change where
the run stops or how it is observed, or (``lr``, ``clip_norm``) are the remedies for a
diverged run, continued from its last good checkpoint. A changed ``lr`` replaces the
learning rate of the optimiser (including any plateau decay it had); the same ``lr``
keeps the optimiser's, so an unchanged resume stays exact."""

DIVERGED_MAGNITUDE = 1e10
"""A parameter whose magnitude exceeds this has diverged (no trained recurrent network's
weights come near it; a blown-up one's reach ~1e37 before overflowing to inf)."""


class NonFiniteLossError(RuntimeError):
    """The training loss or the parameters became NaN, infinite or diverged; the run stopped."""


ValidationCallback = Callable[[int, float, float], None]
"""``callback(step, epoch, metric)``, called after every validation: the global step,
the (fractional) epoch and the task's validation metric. Raising stops the run."""


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


# -- environment ------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of ['auto', 'cpu', 'cuda'], got {name!r}")
    return torch.device(name)


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


def _start_mean_square_at(optimizer: torch.optim.RMSprop, value: float) -> None:
    """Give every parameter RMSProp state whose running mean square starts at ``value``.

    ``torch.optim.RMSprop`` creates its state lazily, at zero, on the first step; state
    that already exists is used as it is, so filling it in here is all it takes.
    """
    if value == 0.0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["square_avg"] = torch.full_like(p, value, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def make_optimizer(
    config: ExperimentConfig, model: nn.Module, *, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``config`` over ``model``'s parameters.

    By default the optimiser applies ``config.weight_decay`` itself (torch's semantics:
    added to the gradient after any clipping). The training loop instead passes
    ``weight_decay=0`` and calls :func:`add_weight_decay_and_clip_` after backward, as the
    paper's L2 term in the loss would; do the same in a loop of your own to match it.

    Args:
        weight_decay: the optimiser's own L2 term instead of ``config.weight_decay``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = config.weight_decay if weight_decay is None else weight_decay
    if config.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(
            params,
            lr=config.lr,
            alpha=config.rmsprop_alpha,
            eps=config.eps,
            momentum=config.momentum,
            weight_decay=decay,
        )
        _start_mean_square_at(optimizer, config.rmsprop_initial_square_avg)
        return optimizer
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.eps,
            weight_decay=decay,
        )
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=decay)


def add_weight_decay_and_clip_(
    parameters: Iterable[Tensor], weight_decay: float, clip_norm: float | None
) -> Tensor | None:
    """``grad += weight_decay * w`` for every parameter with a gradient, then clip the
    global gradient norm to ``clip_norm`` (``None``: no clipping).

    The gradient of a loss with ``weight_decay / 2 * |w|^2`` added, clipped as one: what
    the paper's tooling optimises (DeepMind's ``lamb``); an optimiser's own
    ``weight_decay`` would add the term after clipping instead, unclipped.

    Returns:
        The total gradient norm before clipping, or ``None`` when not clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if weight_decay:
        with torch.no_grad():
            for p in params:
                p.grad.add_(p, alpha=weight_decay)
    if clip_norm is None:
        return None
    return nn.utils.clip_grad_norm_(params, clip_norm)


def run_directory(config: ExperimentConfig) -> Path:
    """``<out_dir>/<run_name>`` (default name ``<task>-<cell>-<size>-seed<seed>``)."""
    return Path(config.out_dir) / (config.run_name or config.default_run_name)


# -- bookkeeping ------------------------------------------------------------------------


@dataclass
class _Plateau:
    """Best validation so far, and the counters of plateau decay and early stopping."""

    best: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    since_decay: int = 0  # validations without improvement since the last decay/best
    since_best: int = 0  # validations without improvement since the best
    decays: int = 0

    def improved_by(self, value: float, higher_is_better: bool, threshold: float = 0.0) -> bool:
        """Whether ``value`` beats the best by more than ``threshold`` (a fraction of it)."""
        if self.best is None:
            return math.isfinite(value)
        gain = value - self.best if higher_is_better else self.best - value
        return gain > threshold * abs(self.best) if threshold > 0 else gain > 0


@dataclass
class _Position:
    """Where the loop is, and what must survive a resume to continue exactly."""

    epoch: int = 0  # index of the current epoch (= epochs completed)
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_generator_state: Tensor | None = None
    carry: tuple[Tensor, ...] | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    wall_time: float = 0.0


class _MetricsLog:
    """``metrics.jsonl`` plus optional TensorBoard events, resumable at a step."""

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
        _write_text(self.path, "".join(line + "\n" for line in kept))
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


class _NoMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    records = 0

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it (see _remove_stale_temp_files)."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _write_json(path: Path, payload: Any) -> None:
    _write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


_RUN_FILES = ("config.json", "meta.json", "task.json", "results.json", "metrics.jsonl")
_CHECKPOINT_NAMES = ("last", "best")


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temporary files an interrupted write of this run left behind.

    Only names that :func:`_write_text` (``.<file>.tmp``) and
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


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
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
def _warnings_only() -> Iterator[None]:
    """Ranks other than 0: keep their (duplicate) progress messages out of the console."""
    package_logger = logging.getLogger("microcircuits")
    previous_level = package_logger.level
    package_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package_logger.setLevel(previous_level)


def _prepare_run_dir(
    config: ExperimentConfig, run_dir: Path, *, resume: bool, overwrite: bool
) -> bool:
    """Create or check the run directory; return whether a checkpoint is resumed."""
    last = checkpoint_file(run_dir / "checkpoints", "last")
    saved_config = run_dir / "config.json"
    if resume and last.exists():
        if saved_config.exists():
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
        # The run goes on: the results of an earlier stage (e.g. ``--epochs k``) are no
        # longer its results; the report shows it in progress until it ends again.
        (run_dir / "results.json").unlink(missing_ok=True)
        _remove_stale_temp_files(run_dir)
        return True
    if resume:
        logger.info("no checkpoint in %s: starting a new run", run_dir)
    if saved_config.exists() and not resume:
        if not overwrite:
            raise FileExistsError(
                f"run directory {run_dir} already holds a run; resume it (--resume), replace "
                "it (--overwrite), or choose another --out/--name"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(run_dir)
    return False


# -- the loop ---------------------------------------------------------------------------


def train(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    task: Task | None = None,
    on_validation: ValidationCallback | None = None,
) -> RunResult:
    """Train and evaluate one experiment; write its run directory (see module docstring).

    Under torchrun (``WORLD_SIZE`` > 1) every process calls ``train`` with the same
    config; they train one model together and all return the same result.

    Args:
        config: the experiment (validated here).
        resume: continue from ``checkpoints/last.safetensors`` of the run directory if it exists
            (else start afresh); the config may differ only in :data:`RESUMABLE_CHANGES`.
        overwrite: replace an existing run directory instead of refusing.
        task: use this task instead of ``make_task(config, device)`` (e.g. a tiny corpus).
        on_validation: called as ``on_validation(step, epoch, metric)`` after every
            validation (see :data:`ValidationCallback`); an exception it raises stops
            the run and propagates.

    Returns:
        The :class:`RunResult` (also written as ``results.json``).

    Raises:
        ValueError: invalid config, or a resume with incompatible changes.
        FileExistsError: the run directory holds a run and neither ``resume`` nor
            ``overwrite`` was given.
        NonFiniteLossError: the training loss became NaN/inf.
        microcircuits.data.DataError: dataset files missing or corrupt.
        microcircuits.checkpoint.CheckpointError: the checkpoint cannot be read.
    """
    config.validate()
    context, device = join_process_group(resolve_device(config.device))
    if config.batch_size % context.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} cannot be split evenly over "
            f"{context.world_size} processes; use a multiple of {context.world_size}"
        )
    run_dir = run_directory(config)
    resuming = run_on_main(
        lambda: _prepare_run_dir(config, run_dir, resume=resume, overwrite=overwrite),
        context,
    )
    with _run_log(run_dir) if context.is_main else _warnings_only():
        trainer = _Trainer(
            config, run_dir, resuming, task,
            device=device, context=context, on_validation=on_validation,
        )  # fmt: skip
        return trainer.run()


class _Trainer:
    """State and steps of one run; :func:`train` is its public face."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path,
        resuming: bool,
        task: Task | None,
        *,
        device: torch.device,
        context: DistributedContext,
        on_validation: ValidationCallback | None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.context = context
        self.on_validation = on_validation
        self.checkpoints = run_dir / "checkpoints"
        self.last_path = checkpoint_file(self.checkpoints, "last")
        self.best_path = checkpoint_file(self.checkpoints, "best")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = device
        self.amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.amp:
            logger.warning("amp=True ignored: the run is on %s, autocast is CUDA-only", self.device)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.task = task if task is not None else make_task(config, self.device)
        try:
            self.model = self.task.build_model()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
                raise
            raise ValueError(
                f"not enough memory for the model with hidden_size={config.hidden_size} "
                f"({config.num_layers} layer(s)) on {self.device}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "use a smaller hidden_size"
            ) from exc
        # Forward/backward passes of training go through the wrapper (which averages the
        # gradients over the ranks); evaluation and state dicts use the bare model.
        self.train_model = wrap_model(self.model, context, self.device)
        if context.rank > 0:
            # Dropout masks of different shards must differ; rank 0 keeps the stream a
            # single process would use.
            torch.manual_seed(data_seed(config.seed, stream=1000 + context.rank))
        # The L2 penalty is part of the loss whose gradient is clipped (as in the paper's
        # tooling), so the loop adds its gradient before clipping, not the optimiser after.
        self.optimizer = make_optimizer(config, self.model, weight_decay=0.0)
        self.data_generator = torch.Generator().manual_seed(data_seed(config.seed))
        self.steps_per_epoch = self.task.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the {config.task} task has no training batch with batch_size="
                f"{config.batch_size}; lower batch_size (or bptt)"
            )
        self.position = _Position()
        self.plateau = _Plateau()
        self.pending: list[tuple[int, Tensor]] = []  # (step, loss) not yet logged
        self.last_valid: Evaluation | None = None
        self.resume_step: int | None = None
        self.resume_records: int | None = None  # lines of metrics.jsonl at the checkpoint
        if resuming:
            # Rank 0 reads the checkpoint and sends it to the others: the run directory
            # need not be on a file system that every machine sees.
            location = "cpu" if context.is_distributed else self.device
            payload = run_on_main(lambda: load_checkpoint(self.last_path, location), context)
            self._restore(payload)
        if context.is_main:
            self._write_run_files(resuming)

    # -- files --------------------------------------------------------------------------

    def _write_run_files(self, resuming: bool) -> None:
        _write_json(self.run_dir / "config.json", self.config.to_dict())
        meta_path = self.run_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if resuming and meta_path.exists() else {}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not meta:
            meta = {
                "package": "microcircuits",
                "version": __version__,
                "git": _git_commit(),
                "seed": self.config.seed,
                "created": now,
                "command": _command_line(),
                "device": str(self.device),
                "amp": self.amp,
                "hardware": hardware_description(self.device),
                "processes": self.context.world_size,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "resumes": [],
            }
        else:
            meta["resumes"].append(
                {
                    "at_step": self.position.global_step,
                    "time": now,
                    "version": __version__,
                    "git": _git_commit(),
                    "device": str(self.device),
                    "hardware": hardware_description(self.device),
                    "processes": self.context.world_size,
                }
            )
        _write_json(meta_path, meta)
        _write_json(self.run_dir / "task.json", self.task.artifacts())

    def _checkpoint_payload(self) -> dict[str, Any] | None:
        """What ``last.safetensors`` holds (collective under torchrun; ``None`` off rank 0)."""
        pos, context = self.position, self.context
        carry = None if pos.carry is None else list(pos.carry)
        extra: dict[str, Any] = {"world_size": context.world_size}
        if context.is_distributed:
            # The carried state of the whole batch (as one process would hold it), and
            # every rank's generators, so that dropout continues exactly on resume.
            if carry is not None:
                carry = list(gather_batch(carry, context))
            cuda = self.device.type == "cuda"
            cuda_state = torch.cuda.get_rng_state(self.device) if cuda else None
            extra["rank_rng_states"] = all_gather(
                {"torch": torch.get_rng_state(), "cuda": cuda_state}, context
            )
            if not context.is_main:
                return None
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        return {
            **extra,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch,
            "global_step": pos.global_step,
            "epoch_generator_state": pos.epoch_generator_state,
            "data_generator_state": self.data_generator.get_state(),
            "carry": carry,
            "epoch_loss": [pos.epoch_loss_sum, pos.epoch_loss_count],
            "wall_time": pos.wall_time + (time.perf_counter() - self.started),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": cuda_rng,
            "plateau": dataclasses.asdict(self.plateau),
            "metrics_records": self.metrics.records,
        }

    def _save_last(self) -> None:
        self._flush_losses()
        self._check_parameters()
        payload = self._checkpoint_payload()
        if payload is not None:
            save_checkpoint(self.last_path, payload)

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # checkpoints of versions whose optimiser
            group["weight_decay"] = 0.0  # applied the decay: the loop adds it now
        saved_lr = payload["config"].get("lr", self.config.lr)
        if saved_lr != self.config.lr:  # resumed with --set lr=...: it replaces the schedule's
            logger.info("lr changed on resume: %.3g -> %.3g", self._lr(), self.config.lr)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr
        pos = self.position
        pos.epoch = payload["epoch"]
        pos.step_in_epoch = payload["step_in_epoch"]
        pos.global_step = payload["global_step"]
        pos.epoch_generator_state = payload["epoch_generator_state"]
        self.data_generator.set_state(payload["data_generator_state"])
        carry = payload["carry"]
        if carry is not None:
            pos.carry = shard_batch([t.to(self.device) for t in carry], self.context)
        pos.epoch_loss_sum, pos.epoch_loss_count = payload["epoch_loss"]
        pos.wall_time = payload["wall_time"]
        self.plateau = _Plateau(**payload["plateau"])
        self._restore_rng(payload)
        self.resume_step = pos.global_step
        self.resume_records = payload.get("metrics_records")
        logger.info(
            "resuming %s at step %d (epoch %d, step %d of %d)",
            self.run_dir, pos.global_step, pos.epoch + 1, pos.step_in_epoch, self.steps_per_epoch,
        )  # fmt: skip

    def _restore_rng(self, payload: dict[str, Any]) -> None:
        context, cuda = self.context, self.device.type == "cuda"
        saved_world = payload.get("world_size", 1)
        if context.is_distributed and saved_world == context.world_size:
            state = payload["rank_rng_states"][context.rank]
            torch.set_rng_state(state["torch"].cpu())
            if cuda and state["cuda"] is not None:
                torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
            return
        if saved_world != context.world_size and context.is_main:
            logger.warning(
                "the checkpoint was written by %d process(es), this run has %d: training "
                "goes on with the same global batch, but dropout masks differ from those "
                "of an uninterrupted run", saved_world, context.world_size,
            )  # fmt: skip
        if context.rank > 0:
            seed = data_seed(self.config.seed, stream=1000 + context.rank) + payload["global_step"]
            torch.manual_seed(seed)
            return
        torch.set_rng_state(payload["torch_rng_state"].cpu())
        if payload["cuda_rng_state"] is not None and cuda:
            if context.is_distributed:
                torch.cuda.set_rng_state(payload["cuda_rng_state"][0].cpu(), self.device)
            else:
                torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng_state"]])

    # -- steps --------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _epoch_float(self) -> float:
        return self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch

    def _train_step(self, batch: tuple[Tensor, ...]) -> None:
        pos = self.position
        self.optimizer.zero_grad(set_to_none=True)
        batch = shard_batch(batch, self.context)
        with self._autocast():
            loss, pos.carry = self.task.train_loss(self.train_model, batch, pos.carry)
        scale = self._gradient_scale(batch)
        (loss if scale == 1.0 else loss * scale).backward()
        add_weight_decay_and_clip_(
            self.model.parameters(), self.config.weight_decay, self.config.clip_norm
        )
        self.optimizer.step()
        pos.global_step += 1
        pos.step_in_epoch += 1
        self.pending.append((pos.global_step, loss.detach()))

    def _gradient_scale(self, batch: tuple[Tensor, ...]) -> float:
        scale = getattr(self.task, "gradient_scale", None)  # optional in the Task protocol
        return 1.0 if scale is None else float(scale(batch))

    def _flush_losses(self) -> None:
        """Log the mean loss of the steps since the last flush; stop on a non-finite one.

        Losses stay on the device until here, so the loop does not wait for the device
        at every step.
        """
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        # Under torchrun: the mean over the ranks, i.e. the loss of the global batch,
        # the same on every rank (so a non-finite loss stops all of them together).
        losses = torch.stack([loss.float() for _, loss in self.pending])
        values = mean_over_ranks(losses, self.context).tolist()
        self.pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                self._fail(step, f"training loss became {value}", {"loss": str(value)})
        pos = self.position
        pos.epoch_loss_sum += sum(values)
        pos.epoch_loss_count += len(values)
        mean = sum(values) / len(values)
        self.metrics.write(
            {
                "kind": "train",
                "step": pos.global_step,
                "epoch": self._epoch_float(),
                "loss": mean,
                "lr": self._lr(),
                "steps": len(values),
                "time": self._elapsed(),
            }
        )
        postfix = {"loss": f"{mean:.4g}", "lr": f"{self._lr():.2g}"}
        if self.last_valid is not None:
            postfix[f"valid {self.task.metric}"] = f"{self.last_valid.metric:.4g}"
        self.bar.set_postfix(postfix, refresh=False)

    def _check_parameters(self) -> None:
        """Stop the run (see :meth:`_fail`) if a parameter or the optimiser's state is not
        finite, or a parameter has diverged: such a state must never be checkpointed.

        One reduction per tensor, at checkpoint time only. Parameters, not buffers: a
        model may hold constants that are infinite by design (the ELM's raw time
        constants), and training moves only the parameters.
        """
        for name, tensor in self.model.named_parameters():
            if tensor.is_floating_point() and tensor.numel():
                largest = tensor.detach().abs().amax().item()
                if not largest <= DIVERGED_MAGNITUDE:  # also NaN
                    self._fail(
                        self.position.global_step,
                        f"parameter {name} became {largest:g}"
                        if not math.isfinite(largest)
                        else f"parameter {name} reached {largest:g} (diverged)",
                        {"parameter": name, "magnitude": str(largest)},
                    )
        for index, state in enumerate(self.optimizer.state.values()):
            for key, tensor in state.items():
                if isinstance(tensor, Tensor) and tensor.is_floating_point():
                    if not bool(torch.isfinite(tensor).all()):
                        self._fail(
                            self.position.global_step,
                            f"the optimiser's {key} of parameter {index} became non-finite",
                            {"optimizer_state": key},
                        )

    def _fail(self, step: int, problem: str, details: dict[str, Any]) -> None:
        lower = f"{self._lr() / 10:.3g}"
        if self.last_path.exists():
            saved = load_checkpoint(self.last_path)["global_step"]
            kept = (
                f"the last good checkpoint {self.last_path} (step {saved}) is kept; resume "
                f"from it with a lower lr (the same command with --resume --set lr={lower}) "
                "or with a clip_norm (--set clip_norm=1)"
            )
        else:
            kept = (
                "no checkpoint had been written yet; start again with a lower lr "
                f"(--set lr={lower} --overwrite) or a clip_norm (--set clip_norm=1)"
            )
        message = f"{problem} at step {step} (epoch {self.position.epoch + 1}); stopping. {kept}."
        self.metrics.write({"kind": "error", "step": step, **details, "message": message})
        if self.context.is_main:
            logger.error(message)
        raise NonFiniteLossError(message)

    def _elapsed(self) -> float:
        return self.position.wall_time + (time.perf_counter() - self.started)

    def _validate(self) -> bool:
        """Evaluate on the validation split; update best/plateau; return True to stop early."""
        self._flush_losses()
        config, plateau, pos = self.config, self.plateau, self.position
        evaluation = self._evaluate("valid")
        self.last_valid = evaluation
        higher = self.task.higher_is_better
        # decided against the previous best, before it is updated
        significant = plateau.improved_by(evaluation.metric, higher, config.lr_decay_threshold)
        if plateau.improved_by(evaluation.metric, higher):
            self._check_parameters()  # never call diverged weights the best
            plateau.best, plateau.best_loss = evaluation.metric, evaluation.loss
            plateau.best_step, plateau.best_epoch = pos.global_step, self._epoch_float()
            plateau.since_best = 0
            if self.context.is_main:
                save_checkpoint(
                    self.best_path,
                    {
                        "model": self.model.state_dict(),
                        "config": config.to_dict(),
                        "global_step": pos.global_step,
                        "epoch": self._epoch_float(),
                        "valid_metric": evaluation.metric,
                        "valid_loss": evaluation.loss,
                    },
                )
        else:
            plateau.since_best += 1
        if significant:
            plateau.since_decay = 0
        else:
            plateau.since_decay += 1
            if config.lr_decay_factor < 1.0 and plateau.since_decay >= config.lr_decay_patience:
                plateau.since_decay = 0
                new_lr = max(self._lr() * config.lr_decay_factor, config.min_lr)
                if new_lr < self._lr():
                    plateau.decays += 1
                    for group in self.optimizer.param_groups:
                        group["lr"] = new_lr
                    logger.info("validation plateau: lr -> %.3g", new_lr)
        self.metrics.write(
            {
                "kind": "valid",
                "step": pos.global_step,
                "epoch": self._epoch_float(),
                "loss": evaluation.loss,
                self.task.metric: evaluation.metric,
                "best": plateau.best,
                "lr": self._lr(),
                "time": self._elapsed(),
            }
        )
        logger.info(
            "step %d (epoch %.2f): valid loss %.4f, %s %.4f (best %.4f)",
            pos.global_step, self._epoch_float(), evaluation.loss, self.task.metric,
            evaluation.metric, plateau.best if plateau.best is not None else math.nan,
        )  # fmt: skip
        if self.on_validation is not None:
            self._notify(evaluation)
        patience = config.early_stop_patience
        if patience is not None and plateau.since_best >= patience:
            logger.info("early stop: %d validations without improvement", plateau.since_best)
            return True
        return False

    def _evaluate(self, split: str) -> Evaluation:
        """The model's loss and metric on ``split``; under torchrun, rank 0's on every rank.

        Rank 0 evaluates the whole split while the others wait: every rank then takes
        the same decisions from the same numbers.
        """

        def evaluate() -> Evaluation:
            with self._autocast():
                evaluation = self.task.evaluate(self.model, split)
            self.model.train()
            return evaluation

        return run_on_main(evaluate, self.context)

    def _notify(self, evaluation: Evaluation) -> None:
        """Call the validation callback; record it if it stops the run, and re-raise."""
        pos = self.position
        try:
            self.on_validation(pos.global_step, self._epoch_float(), evaluation.metric)
        except BaseException as stop:
            self._flush_losses()
            self.metrics.write(
                {
                    "kind": "stopped",
                    "step": pos.global_step,
                    "epoch": self._epoch_float(),
                    "by": type(stop).__name__,
                    "message": str(stop),
                }
            )
            logger.info("stopped at step %d by the validation callback: %r", pos.global_step, stop)
            raise

    def _end_epoch(self) -> bool:
        """Validate, log the epoch, move to the next one, checkpoint; True to stop early."""
        stop = self._validate()
        pos = self.position
        mean_loss = pos.epoch_loss_sum / max(pos.epoch_loss_count, 1)
        valid = self.last_valid  # set by _validate
        self.metrics.write(
            {
                "kind": "epoch",
                "step": pos.global_step,
                "epoch": pos.epoch + 1,
                "train_loss": mean_loss,
                "valid_loss": valid.loss if valid is not None else None,
                f"valid_{self.task.metric}": valid.metric if valid is not None else None,
                "lr": self._lr(),
                "time": self._elapsed(),
            }
        )
        pos.epoch += 1
        pos.step_in_epoch = 0
        pos.carry = None
        pos.epoch_loss_sum, pos.epoch_loss_count = 0.0, 0
        self._save_last()
        return stop

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        """This epoch's remaining batches; on resume, replays the generator to the spot."""
        pos = self.position
        if pos.step_in_epoch == 0:
            pos.epoch_generator_state = self.data_generator.get_state()
        else:
            self.data_generator.set_state(pos.epoch_generator_state)
        batches = self.task.train_batches(self.data_generator)
        return itertools.islice(batches, pos.step_in_epoch, None)

    def _loop(self) -> str:
        config, pos = self.config, self.position

        def at_max_steps() -> bool:
            # Checked before a batch is drawn, so a stop leaves the generator untouched.
            return config.max_steps is not None and pos.global_step >= config.max_steps

        patience = config.early_stop_patience
        if patience is not None and self.plateau.since_best >= patience:
            return "early_stop"  # a resumed run that had already stopped early
        while pos.epoch < config.epochs:
            if at_max_steps():
                return "max_steps"
            batches = self._batches()
            while not at_max_steps():
                batch = next(batches, None)
                if batch is None:
                    break
                self._train_step(batch)
                self.bar.update(1)
                step = pos.global_step
                if step % config.log_every == 0:
                    self._flush_losses()
                if config.eval_every is not None and step % config.eval_every == 0:
                    if pos.step_in_epoch < self.steps_per_epoch and self._validate():
                        self._save_last()
                        return "early_stop"
                if config.checkpoint_every is not None and step % config.checkpoint_every == 0:
                    self._save_last()
            if pos.step_in_epoch < self.steps_per_epoch:
                return "max_steps"
            if self._end_epoch():
                return "early_stop"
        return "completed"

    def run(self) -> RunResult:
        config, pos = self.config, self.position
        self.started = time.perf_counter()
        self.metrics: _MetricsLog | _NoMetricsLog = _NoMetricsLog()
        if self.context.is_main:
            self.metrics = _MetricsLog(
                self.run_dir,
                resume_step=self.resume_step,
                resume_records=self.resume_records,
                tensorboard=config.tensorboard,
            )
        total = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=min(pos.global_step, total),
            disable=not (config.progress and self.context.is_main),
            desc=f"{config.task} {config.cell} {config.hidden_size}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )
        logger.info(
            "training %s with %s (%d units, %d layer(s), %d parameters) on %s; %d steps/epoch",
            config.task, config.cell, config.hidden_size, config.num_layers,
            sum(p.numel() for p in self.model.parameters()), self.device, self.steps_per_epoch,
        )  # fmt: skip
        try:
            self.model.train()
            try:
                stopped = self._loop()
                if stopped == "max_steps":
                    self._save_last()
            finally:
                self.bar.close()
            result = self._finish(stopped)
        finally:
            self.metrics.close()
        return result

    def _validate_at_stop(self) -> Evaluation:
        """Validate the model of a run that stopped (``max_steps``) before its first
        validation; save it as ``best.safetensors`` and log a ``"valid"`` record marked
        ``"final"``, so that its test, like every run's, is of the best-validation
        checkpoint. The plateau state is left alone, so that a resumed run goes on
        exactly as an uninterrupted one (its first validation replaces this checkpoint,
        and resuming drops the record, which follows the last checkpoint).
        """
        pos = self.position
        with self._autocast():
            valid = self.task.evaluate(self.model, "valid")
        self.model.train()
        save_checkpoint(
            self.best_path,
            {
                "model": self.model.state_dict(),
                "config": self.config.to_dict(),
                "global_step": pos.global_step,
                "epoch": self._epoch_float(),
                "valid_metric": valid.metric,
                "valid_loss": valid.loss,
            },
        )
        self.metrics.write(
            {
                "kind": "valid",
                "step": pos.global_step,
                "epoch": self._epoch_float(),
                "loss": valid.loss,
                self.task.metric: valid.metric,
                "best": valid.metric,
                "lr": self._lr(),
                "time": self._elapsed(),
                "final": True,
            }
        )
        return valid

    def _finish(self, stopped: str) -> RunResult:
        """Evaluate the best-validation checkpoint on validation and test; write results."""
        config, pos, plateau = self.config, self.position, self.plateau
        wall_time = self._elapsed()

        def evaluate() -> tuple[Evaluation, Evaluation, str]:
            if self.best_path.exists() and plateau.best is not None:
                best = load_checkpoint(self.best_path, self.device)
                self.model.load_state_dict(best["model"])
                # Its validation numbers were measured when it was saved: no second pass.
                valid = Evaluation(best["valid_loss"], best["valid_metric"], count=0)
            else:
                valid = self._validate_at_stop()
            with self._autocast():
                test = self.task.evaluate(self.model, "test")
            return valid, test, "best"

        valid, test, evaluated = run_on_main(evaluate, self.context)  # rank 0's on every rank
        result = RunResult(
            run_dir=self.run_dir,
            task=config.task,
            cell=config.cell,
            size=config.nominal_size,
            hidden_size=config.hidden_size,
            metric=self.task.metric,
            higher_is_better=self.task.higher_is_better,
            best_valid=valid.metric,
            best_valid_loss=valid.loss,
            best_step=pos.global_step if plateau.best is None else plateau.best_step,
            best_epoch=self._epoch_float() if plateau.best is None else plateau.best_epoch,
            test=test.metric,
            test_loss=test.loss,
            epochs_done=self._epoch_float(),
            steps_done=pos.global_step,
            wall_time_s=wall_time,
            stopped=stopped,
            parameters=sum(p.numel() for p in self.model.parameters()),
            evaluated=evaluated,
        )
        if self.context.is_main:
            _write_json(self.run_dir / "results.json", result.to_dict())
        logger.info(
            "%s %s: best valid %s %.4f, test %.4f (%s after %d steps, %.0f s)",
            config.task, config.cell, self.task.metric, valid.metric, test.metric,
            stopped, pos.global_step, wall_time,
        )  # fmt: skip
        return result


def compare_cells(
    task: str,
    cells: Sequence[str] = tuple(CELLS),
    *,
    size: int | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    preset: str | os.PathLike[str] | None = None,
) -> list[RunResult]:
    """Train one run per cell with the same seed and settings; return their results.

    Each cell gets its own preset row (LM tasks) and its run directory under
    ``overrides["out_dir"]``. A ``preset`` file's values apply to every cell. ``cells``
    may name any model of :data:`~microcircuits.model_registry.MODELS` (e.g. ``"elm"``);
    the default is the LSTM family.
    """
    from .config import load_config

    configs = [  # all checked first
        load_config(task, cell, size, overrides, preset=preset) for cell in cells
    ]
    return [train(config, resume=resume, overwrite=overwrite) for config in configs]
