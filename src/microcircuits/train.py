"""One training loop for every task: steps, validations, checkpoints, the stop.

``train(config)`` runs one experiment and writes its run directory
(:mod:`microcircuits.run_dir`): optimiser steps with the L2 term clipped with the
gradient (:mod:`microcircuits.optim`); a validation every epoch (and every
``eval_every`` steps), after which the plateau schedule (:mod:`microcircuits.plateau`)
keeps or decays the learning rate or stops the run; ``checkpoints/last.safetensors``
every ``checkpoint_every`` steps, at every epoch end and at a ``max_steps`` stop, from
which ``train(config, resume=True)`` continues exactly (:mod:`microcircuits.resume`);
at the end, the test of the best-validation checkpoint.

A non-finite training loss stops the run with :class:`NonFiniteLossError`, naming the
step, as does a parameter or optimiser state that is not finite (or a parameter beyond
:data:`DIVERGED_MAGNITUDE`) found when a checkpoint is about to be written: no
checkpoint ever holds such values, and the message says how to resume with a lower lr.

``train(config, on_validation=callback)`` calls ``callback(step, epoch, metric)`` after
every validation (the hyperparameter search reports to its pruner this way); an
exception it raises stops the run (a ``"stopped"`` record in ``metrics.jsonl``) and
propagates. Under ``torchrun`` the run is data-parallel, only rank 0 writes files
(:mod:`microcircuits.distributed`), and the callback must decide alike on every rank.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cells import CELLS
from .checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .distributed import (
    DistributedContext,
    join_process_group,
    mean_over_ranks,
    run_on_main,
    shard_batch,
    wrap_model,
)
from .kernels import native
from .optim import add_weight_decay_and_clip_, make_optimizer
from .plateau import PlateauSchedule
from .resume import Position, checkpoint_payload, restore_rng, restore_training_state
from .run_dir import (
    RESUMABLE_CHANGES,
    MetricsLog,
    NoMetricsLog,
    RunResult,
    hardware_description,
    prepare_run_dir,
    run_directory,
    run_log,
    warnings_only,
    write_run_files,
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

DIVERGED_MAGNITUDE = 1e10
"""A parameter whose magnitude exceeds this has diverged (no trained recurrent network's
weights come near it; a blown-up one's reach ~1e37 before overflowing to inf)."""


class NonFiniteLossError(RuntimeError):
    """The training loss or the parameters became NaN, infinite or diverged; the run stopped."""


ValidationCallback = Callable[[int, float, float], None]
"""``callback(step, epoch, metric)``, called after every validation: the global step,
the (fractional) epoch and the task's validation metric. Raising stops the run."""


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of ['auto', 'cpu', 'cuda'], got {name!r}")
    return torch.device(name)


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
        lambda: prepare_run_dir(config, run_dir, resume=resume, overwrite=overwrite),
        context,
    )
    with run_log(run_dir) if context.is_main else warnings_only():
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
        self.last_path = checkpoint_file(run_dir / "checkpoints", "last")
        self.best_path = checkpoint_file(run_dir / "checkpoints", "best")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = device
        self.amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.amp:
            logger.warning("amp=True ignored: the run is on %s, autocast is CUDA-only", self.device)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.task = task if task is not None else make_task(config, self.device)
        self.model = self._build_model()
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
        self.position = Position()
        self.schedule = PlateauSchedule.from_config(config, self.task.higher_is_better)
        # (step, loss, gradient norm before clipping or None) not yet logged
        self.pending: list[tuple[int, Tensor, Tensor | None]] = []
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
            write_run_files(
                run_dir, config, self.task.artifacts(),
                resuming=resuming, device=self.device, amp=self.amp,
                processes=context.world_size, parameters=self._parameter_count(),
                global_step=self.position.global_step,
            )  # fmt: skip

    def _build_model(self) -> torch.nn.Module:
        """The task's model; running out of memory for it is a config error."""
        config = self.config
        try:
            return self.task.build_model()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
                raise
            raise ValueError(
                f"not enough memory for the model with hidden_size={config.hidden_size} "
                f"({config.num_layers} layer(s)) on {self.device}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "use a smaller hidden_size"
            ) from exc

    # -- checkpoints --------------------------------------------------------------------

    def _save_last(self) -> None:
        self._flush_losses()
        self._check_parameters()
        payload = checkpoint_payload(
            config=self.config, model=self.model, optimizer=self.optimizer,
            position=self.position, data_generator=self.data_generator,
            plateau=self.schedule.state_dict(), metrics_records=self.metrics.records,
            wall_time=self._elapsed(), context=self.context, device=self.device,
        )  # fmt: skip
        if payload is not None:
            save_checkpoint(self.last_path, payload)

    def _save_best(self, evaluation: Evaluation) -> None:
        save_checkpoint(
            self.best_path,
            {
                "model": self.model.state_dict(),
                "config": self.config.to_dict(),
                "global_step": self.position.global_step,
                "epoch": self._epoch_float(),
                "valid_metric": evaluation.metric,
                "valid_loss": evaluation.loss,
            },
        )

    def _restore(self, payload: dict[str, Any]) -> None:
        pos = self.position
        restore_training_state(
            payload, config=self.config, model=self.model, optimizer=self.optimizer,
            position=pos, data_generator=self.data_generator, context=self.context,
            device=self.device,
        )  # fmt: skip
        self.schedule.load_state_dict(payload["plateau"])
        restore_rng(payload, seed=self.config.seed, context=self.context, device=self.device)
        self.resume_step = pos.global_step
        self.resume_records = payload.get("metrics_records")
        logger.info(
            "resuming %s at step %d (epoch %d, step %d of %d)",
            self.run_dir, pos.global_step, pos.epoch + 1, pos.step_in_epoch, self.steps_per_epoch,
        )  # fmt: skip

    # -- steps --------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _epoch_float(self) -> float:
        return self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch

    def _elapsed(self) -> float:
        return self.position.wall_time + (time.perf_counter() - self.started)

    def _parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _train_step(self, batch: tuple[Tensor, ...]) -> None:
        pos = self.position
        self.optimizer.zero_grad(set_to_none=True)
        batch = shard_batch(batch, self.context)
        with self._autocast():
            loss, pos.carry = self.task.train_loss(self.train_model, batch, pos.carry)
        scale = self._gradient_scale(batch)
        (loss if scale == 1.0 else loss * scale).backward()
        norm = add_weight_decay_and_clip_(
            self.model.parameters(), self.config.weight_decay, self.config.clip_norm
        )
        self.optimizer.step()
        pos.global_step += 1
        pos.step_in_epoch += 1
        self.pending.append((pos.global_step, loss.detach(), norm))

    def _gradient_norms(self) -> dict[str, float]:
        """The pending steps' global gradient norms before clipping (the clipped gradient's
        norm is ``min(norm, clip_norm)``): their mean and largest, and the fraction of
        steps the clip shrank; empty without clipping. The gradients are already reduced
        over ranks under torchrun, so every rank logs the same."""
        norms = [norm for _, _, norm in self.pending if norm is not None]
        if not norms:
            return {}
        values = torch.stack([n.float() for n in norms]).tolist()
        clip = self.config.clip_norm
        return {
            "grad_norm": sum(values) / len(values),
            "grad_norm_max": max(values),
            "clipped": sum(v > clip for v in values) / len(values),
        }

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
        steps = [step for step, _, _ in self.pending]
        # Under torchrun: the mean over the ranks, i.e. the loss of the global batch,
        # the same on every rank (so a non-finite loss stops all of them together).
        losses = torch.stack([loss.float() for _, loss, _ in self.pending])
        values = mean_over_ranks(losses, self.context).tolist()
        norms = self._gradient_norms()
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
                **norms,
            }
        )
        postfix = {"loss": f"{mean:.4g}", "lr": f"{self._lr():.2g}"}
        if self.last_valid is not None:
            postfix[f"valid {self.task.metric}"] = f"{self.last_valid.metric:.4g}"
        self.bar.set_postfix(postfix, refresh=False)

    # -- divergence ---------------------------------------------------------------------

    def _check_parameters(self) -> None:
        """Stop the run (:meth:`_fail`) if a parameter or the optimiser's state is not
        finite, or a parameter has diverged: such a state must never be checkpointed.
        Parameters, not buffers: a model may hold constants that are infinite by design
        (the ELM's raw time constants), and training moves only the parameters."""
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

    # -- validation ---------------------------------------------------------------------

    def _validate(self) -> bool:
        """Evaluate on the validation split; act on the schedule; return True to stop early."""
        self._flush_losses()
        pos = self.position
        evaluation = self._evaluate("valid")
        self.last_valid = evaluation
        decision = self.schedule.observe(
            evaluation.metric, evaluation.loss,
            lr=self._lr(), step=pos.global_step, epoch=self._epoch_float(),
        )  # fmt: skip
        if decision.best:
            self._check_parameters()  # never call diverged weights the best
            if self.context.is_main:
                self._save_best(evaluation)
        if decision.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = decision.lr
            logger.info("validation plateau: lr -> %.3g", decision.lr)
        best = self.schedule.state.best
        self._write_valid(evaluation, best)
        logger.info(
            "step %d (epoch %.2f): valid loss %.4f, %s %.4f (best %.4f)",
            pos.global_step, self._epoch_float(), evaluation.loss, self.task.metric,
            evaluation.metric, best if best is not None else math.nan,
        )  # fmt: skip
        if self.on_validation is not None:
            self._notify(evaluation)
        if decision.stop:
            logger.info(
                "early stop: %d validations without improvement", self.schedule.state.since_best
            )
            return True
        return False

    def _write_valid(self, evaluation: Evaluation, best: float | None, **extra: Any) -> None:
        self.metrics.write(
            {
                "kind": "valid",
                "step": self.position.global_step,
                "epoch": self._epoch_float(),
                "loss": evaluation.loss,
                self.task.metric: evaluation.metric,
                "best": best,
                "lr": self._lr(),
                "time": self._elapsed(),
                **extra,
            }
        )

    def _evaluate(self, split: str) -> Evaluation:
        """The model's loss and metric on ``split``; under torchrun rank 0 evaluates the
        whole split and every rank gets its numbers (and so takes the same decisions)."""

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

    # -- the loop -----------------------------------------------------------------------

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

        if self.schedule.exhausted:
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

    def _progress_bar(self) -> Any:
        """The tqdm bar of the run's steps (disabled without ``progress`` and off rank 0)."""
        config = self.config
        total = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=min(self.position.global_step, total),
            disable=not (config.progress and self.context.is_main),
            desc=f"{config.task} {config.cell} {config.hidden_size}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def run(self) -> RunResult:
        config = self.config
        if self.device.type == "cpu":
            native.step_loops()  # build (once) or load the C++ loops before the clock starts
        self.started = time.perf_counter()
        self.metrics: MetricsLog | NoMetricsLog = NoMetricsLog()
        if self.context.is_main:
            self.metrics = MetricsLog(
                self.run_dir,
                resume_step=self.resume_step,
                resume_records=self.resume_records,
                tensorboard=config.tensorboard,
            )
        self.bar = self._progress_bar()
        logger.info(
            "training %s with %s (%d units, %d layer(s), %d parameters) on %s; %d steps/epoch",
            config.task, config.cell, config.hidden_size, config.num_layers,
            self._parameter_count(), self.device, self.steps_per_epoch,
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

    # -- the end ------------------------------------------------------------------------

    def _validate_at_stop(self) -> Evaluation:
        """Validate a run stopped (``max_steps``) before its first validation, save that
        model as ``best.safetensors`` and log a ``"final"`` valid record, so that every
        test is of a best-validation checkpoint. The schedule is left alone: a resumed run
        goes on exactly (its first validation replaces the checkpoint and the record)."""
        with self._autocast():
            valid = self.task.evaluate(self.model, "valid")
        self.model.train()
        self._save_best(valid)
        self._write_valid(valid, valid.metric, final=True)
        return valid

    def _finish(self, stopped: str) -> RunResult:
        """Evaluate the best-validation checkpoint on validation and test; write results."""
        config, pos, plateau = self.config, self.position, self.schedule.state
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
            parameters=self._parameter_count(),
            evaluated=evaluated,
        )
        if self.context.is_main:
            result.write()
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
