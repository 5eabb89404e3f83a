"""Experiment configuration: one dataclass holding every hyperparameter, and its presets.

An experiment is an :class:`ExperimentConfig`. Presets are TOML files shipped inside the
package (``microcircuits/configs/<task>.toml``; ``microcircuits presets`` lists them); the
language-model presets carry the rows of the paper's Tables 2 (PTB) and 3 (WikiText-2),
keyed by cell and size, so that ``load_config("ptb", cell="sublstm", size=200)`` is the
paper's subLSTM-200 row.

A preset file of your own (``--preset FILE``, e.g. the ``best_preset.toml`` that
``microcircuits search`` writes, or an edited copy of a shipped preset) has the same
format as the shipped ones (see :func:`read_preset_file`). Values are layered, later
ones winning::

    dataclass defaults  <  the task's shipped preset  <  a preset file (--preset FILE)
                        <  overrides (e.g. --set lr=0.001 on the command line)

and within each preset ``[defaults] < [cell_defaults.<cell>] < [rows.<cell>.<size>]``.
The size sets ``hidden_size``: the units of the row or of ``[hidden_size.<cell>]`` (of
the latest preset that gives them), else the size itself.

A run's ``config.json`` (any ``.json`` file given as ``preset``) is the other way in: it
reruns that run's exact config, with only the overrides changed.

The fully resolved config is saved as ``config.json`` with every run, and
:meth:`ExperimentConfig.validate` checks all values in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import numbers
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .model_registry import LSTM_FAMILY, MODELS, ModelKind, model_kind
from .task_registry import TASK_KINDS, canonical_task_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has the same parser as the tomli package
    import tomli as tomllib

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "TASKS",
    "ExperimentConfig",
    "PresetFile",
    "PresetInfo",
    "available_sizes",
    "config_fields",
    "list_presets",
    "load_config",
    "parse_assignments",
    "preset_table",
    "preset_task",
    "read_preset_file",
    "write_preset_file",
]

TASKS = tuple(TASK_KINDS)
"""Task names, as accepted by :func:`load_config` and ``microcircuits train``
(:data:`microcircuits.task_registry.TASK_KINDS`)."""
OPTIMIZERS = ("rmsprop", "adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ExperimentConfig:
    """Every hyperparameter of one training run.

    The paper (Costa et al. 2017) fixes the architecture, the optimiser family (RMSProp
    with momentum), the sMNIST learning rate and the LM rows of Tables 2 and 3. What it
    leaves open (RMSProp's smoothing and momentum, clipping, epochs, batch size for
    sMNIST) has the defaults below and in the TOML presets, each with its reason.
    """

    # -- what is trained -------------------------------------------------------------
    task: str = "adding"  # one of TASKS
    cell: str = "lstm"  # a key of microcircuits.model_registry.MODELS: an LSTM-family
    # cell (microcircuits.cells.CELLS), the ELM neuron ("elm", "branch_elm"), the
    # canonical microcircuit ("cmc", "cmc_hierarchy") or the MLP baseline ("mlp")
    size: int | None = None  # the paper's nominal size (table key); None: = hidden_size
    hidden_size: int = 64  # units per layer (fix-subLSTM: the parameter-matched count);
    # the ELM: its memory units (the paper's d_m); the CMC node: its columns; the CMC
    # hierarchy: its nodes (>= 2, cmc_level_size per level); the MLP: its hidden units
    num_layers: int = 1  # stacked recurrent layers (paper: 1 for sMNIST, 2 for LM)
    embedding_size: int | None = None  # language models: word-vector size; None: the
    # hidden size (as in Zaremba et al.; the paper does not say)
    tie_embeddings: bool = False  # language models: the decoder's weight is the word
    # vectors (Press & Wolf 2017; the setup of Melis et al. 2017); needs embedding = hidden
    forget_bias: float = 1.0  # initial forget-gate bias (paper: 1); phi for fix-subLSTM

    # -- the ELM neuron (cells "elm" and "branch_elm"; Spieler et al., ICLR 2024) ------
    # Refused for the LSTM-family cells unless left at these defaults, which are those of
    # microcircuits.ELM and of the published code.
    elm_version: int = 1  # 1: a trace per synapse (the paper's equations, the released
    # models); 2: a trace per branch, memory gain 1 - exp(-lambda / tau_m)
    elm_mlp_hidden_size: int | None = None  # width of the MLP's hidden layers; None:
    # 2 * hidden_size
    elm_mlp_num_layers: int = 1  # hidden layers of the MLP (0: one linear map)
    elm_memory_tau_min: float = 1.0  # memory time constants, in steps, log-spaced from
    elm_memory_tau_max: float = 1000.0  # tau_min to tau_max (> tau_min)
    elm_learn_memory_tau: bool = False  # also train the memory time constants
    elm_lambda: float = 5.0  # lambda: how fast the memory is written relative to its decay
    elm_trace_tau: float = 5.0  # time constant of the input trace, in steps
    elm_num_branch: int | None = None  # Branch-ELM ("branch_elm" only): branches N; the
    # ELM ("elm") has one per input (None)
    elm_synapses_per_branch: int = 1  # Branch-ELM: synapses per branch
    elm_routing: str | None = None  # Branch-ELM: which input feeds each synapse, "random"
    # or "neuronio" (microcircuits.elm.routing)

    # -- the canonical microcircuit (cells "cmc", "cmc_hierarchy"; Douglas 2025) --------
    # hidden_size is the CMC node's columns (each with its own drive) or the hierarchy's
    # nodes. Refused for the other models unless left at these defaults, which are those
    # of microcircuits.CMCNode.
    cmc_input_scale: float = 1.0  # fixed factor on the encoder's drive; torch's encoder
    # initialisation gives |u| ~ 1, which keeps the sigmoid nearly linear
    cmc_integration_time: float = 0.1  # seconds integrated per image
    cmc_num_readout_times: int = 10  # voltages read out at this many evenly spaced times
    cmc_method: str = "rk4"  # torchdiffeq solver: fixed-step euler/midpoint/rk4 or
    # adaptive dopri5/dopri8/bosh3/fehlberg2/adaptive_heun
    cmc_step_size: float | None = 1e-3  # seconds per step of a fixed-step solver; None
    # for an adaptive one
    cmc_rtol: float = 1e-6  # tolerances of an adaptive solver
    cmc_atol: float = 1e-8
    cmc_adjoint: bool = False  # gradients by the adjoint method (memory constant in the
    # steps, about twice the compute) instead of backpropagation through the solver
    cmc_learn_dynamics: bool = True  # train SPM's log-scale time constants and strengths
    cmc_readout: str = "top"  # hierarchy: read out the last level ("top") or every node
    cmc_level_size: int = 1  # hierarchy: nodes per level (hidden_size / this = levels;
    # 1: a chain of single nodes); the image drives each node of the first level

    # -- data ------------------------------------------------------------------------
    batch_size: int = 50  # sequences per training step (paper LM: 20)
    eval_batch_size: int = 100  # batch for validation/test (LM: parallel streams)
    bptt: int = 35  # LM: truncated-BPTT segment length (paper: 35)
    seq_len: int = 50  # adding: steps per sequence
    steps_per_epoch: int | None = None  # cap on training steps per epoch; required
    # for the adding task (its data is endless); None elsewhere = the whole split
    valid_size: int = 1000  # adding: sequences in the fixed validation set
    test_size: int = 1000  # adding: sequences in the fixed test set
    data_dir: str | None = None  # dataset directory; None: $MICROCIRCUITS_DATA or cache
    download: bool = True  # fetch missing dataset files from their public address

    # -- schedule --------------------------------------------------------------------
    epochs: int = 10  # passes over the training data (adding: of steps_per_epoch)
    max_steps: int | None = None  # stop after this many optimiser steps in all
    early_stop_patience: int | None = None  # stop after this many validations without
    # improvement; None: never
    lr_decay_factor: float = 1.0  # multiply lr by this after lr_decay_patience
    # consecutive validations without improvement; 1.0: no decay
    lr_decay_patience: int = 1  # consecutive validations without improvement that
    # trigger one decay (the count restarts after it)
    min_lr: float = 0.0  # the plateau decay never goes below this
    lr_decay_threshold: float = 0.0  # a validation must improve the best by more than this
    # fraction to reset the decay count (the best checkpoint still follows any
    # improvement); 0: any improvement does. Lets the lr drop on a slow crawl, e.g. 0.01.

    # -- optimiser -------------------------------------------------------------------
    optimizer: str = "rmsprop"  # one of OPTIMIZERS; the paper uses RMSProp + momentum
    lr: float = 1e-3  # learning rate
    momentum: float = 0.9  # RMSProp/SGD momentum; not given in the paper, 0.9 is the
    # usual value of "RMSProp with momentum" (Tieleman & Hinton 2012, Graves 2013)
    rmsprop_alpha: float = 0.9  # RMSProp smoothing of the squared gradient; 0.9 is the
    # original (Tieleman & Hinton 2012) and TensorFlow default
    adam_beta1: float = 0.9  # Adam's smoothing of the gradient (its momentum); 0 makes
    # Adam a bias-corrected RMSProp (what DeepMind's LM code, lamb, calls "rmsprop")
    adam_beta2: float = 0.999  # Adam's smoothing of the squared gradient
    eps: float = 1e-8  # added to the RMS denominator (Adam: to sqrt(v))
    rmsprop_initial_square_avg: float = 1.0  # RMSProp's running mean square starts here.
    # TensorFlow's RMSPropOptimizer (the paper's 2017 tooling) starts it at 1; torch's
    # default 0 makes the first steps ~lr/sqrt(1 - alpha) per weight, which threw the
    # LMs at the paper's learning rates (~0.01) far off before they recovered.
    weight_decay: float = 0.0  # L2 penalty wd/2 * |theta|^2 added to the training loss:
    # its gradient wd * theta joins the data gradient before clipping (as in the paper's
    # tooling, DeepMind's lamb), so clipping scales both alike
    clip_norm: float | None = 5.0  # clip the global gradient norm to this; None: off
    loss_sum_over_time: bool = False  # language models: optimise the loss summed over the
    # BPTT steps and averaged over the batch, as the TensorFlow PTB code of Zaremba et al.
    # 2014 (the setup the paper follows) does; weight_decay and clip_norm then act on that
    # loss. Logged and evaluated losses stay per token. False: the per-token mean.

    # -- regularisation (Tables 2 and 3) ---------------------------------------------
    input_dropout: float = 0.0  # dropout on the recurrent stack's input (embeddings)
    output_dropout: float = 0.0  # dropout on its output (before the decoder/readout)
    update_dropout: float = 0.0  # dropout on the candidate update z (Semeniuta 2016)
    dropout: float = 0.0  # torch-style dropout between stacked layers (not in the paper)

    # -- logging, evaluation, checkpoints --------------------------------------------
    log_every: int = 10  # steps between training-loss records (metrics + progress)
    eval_every: int | None = None  # steps between validations; None: at epoch ends only
    checkpoint_every: int | None = 200  # steps between checkpoints/last.safetensors (also at
    # every epoch end); None: epoch ends only
    tensorboard: bool = True  # also write TensorBoard event files
    progress: bool = True  # tqdm progress bar on stderr

    # -- reproducibility and hardware ------------------------------------------------
    seed: int = 0  # seeds the weights, dropout, data order and generated data
    device: str = "auto"  # "cpu" | "cuda" | "auto" (cuda when available)
    amp: bool = False  # bfloat16 autocast on CUDA
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    out_dir: str = "runs"  # runs are written to <out_dir>/<run_name>
    run_name: str | None = None  # None: "<task>-<cell>-<size>-seed<seed>"

    # -- notes -----------------------------------------------------------------------
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with
    # the run (e.g. which preset row it came from); never read by training

    def __post_init__(self) -> None:
        self.task = _canonical_task(self.task)
        if isinstance(self.cell, str):
            try:
                self.cell = model_kind(self.cell).name
            except ValueError:
                pass  # validate() reports it with the field's name

    @property
    def nominal_size(self) -> int:
        """The size the paper's tables use for this run (``size``, else ``hidden_size``)."""
        return self.size if self.size is not None else self.hidden_size

    @property
    def default_run_name(self) -> str:
        return f"{self.task}-{self.cell}-{self.nominal_size}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a mapping such as a saved ``config.json``; unknown keys refused."""
        _check_known_keys(values, "config")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes`` applied (typed values; see :func:`load_config` for text)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> ExperimentConfig:
        """Check every field; return ``self`` so calls chain.

        Raises:
            ValueError/TypeError: naming the field, its value and what is allowed.
        """
        _choice("task", self.task, TASKS)
        try:
            model = model_kind(self.cell)
        except (ValueError, TypeError):
            _choice("cell", self.cell, MODELS)
            raise
        _check_model_task(model, self.task)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, DEVICES)
        for name in (
            "hidden_size", "num_layers", "batch_size", "eval_batch_size", "bptt",
            "epochs", "valid_size", "test_size", "log_every", "lr_decay_patience",
        ):  # fmt: skip
            _positive_int(name, getattr(self, name))
        for name in (
            "size", "steps_per_epoch", "max_steps", "early_stop_patience", "eval_every",
            "checkpoint_every", "num_threads", "embedding_size",
        ):  # fmt: skip
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _integer("seed", self.seed, low=0)
        if self.task == "adding":
            _integer("seq_len", self.seq_len, low=2)
            if self.steps_per_epoch is None:
                raise ValueError(
                    "steps_per_epoch must be set for the adding task (its data is generated "
                    "without end), got None; e.g. --set steps_per_epoch=100"
                )
        _real("lr", self.lr, low=0.0, low_open=True)
        _real("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _real("rmsprop_alpha", self.rmsprop_alpha, low=0.0, high=1.0, high_open=True)
        _real("adam_beta1", self.adam_beta1, low=0.0, high=1.0, high_open=True)
        _real("adam_beta2", self.adam_beta2, low=0.0, high=1.0, high_open=True)
        _real("eps", self.eps, low=0.0, low_open=True)
        _real("rmsprop_initial_square_avg", self.rmsprop_initial_square_avg, low=0.0)
        _real("weight_decay", self.weight_decay, low=0.0)
        if self.clip_norm is not None:
            _real("clip_norm", self.clip_norm, low=0.0, low_open=True)
        _real("forget_bias", self.forget_bias)
        _real("lr_decay_factor", self.lr_decay_factor, low=0.0, high=1.0, low_open=True)
        _real("lr_decay_threshold", self.lr_decay_threshold, low=0.0, high=1.0)
        _real("min_lr", self.min_lr, low=0.0)
        for name in ("input_dropout", "output_dropout", "update_dropout", "dropout"):
            _real(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        for name in ("download", "tensorboard", "progress", "amp", "tie_embeddings"):
            _boolean(name, getattr(self, name))
        if self.tie_embeddings and self.embedding_size not in (None, self.hidden_size):
            raise ValueError(
                f"tie_embeddings=True needs the word vectors as wide as the hidden state "
                f"(embedding_size None or {self.hidden_size}), got embedding_size="
                f"{self.embedding_size}"
            )
        if self.amp and self.device == "cpu":
            raise ValueError("amp=True needs a CUDA device, got device='cpu'; set amp=false")
        for name in ("data_dir", "run_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a non-empty string, got {self.out_dir!r}")
        if self.run_name is not None and ("/" in self.run_name or self.run_name in {".", ".."}):
            raise ValueError(f"run_name must be a plain name without '/', got {self.run_name!r}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")
        self._validate_model_fields(model)
        return self

    def _validate_model_fields(self, model: ModelKind) -> None:
        """Refuse the fields of other model families; check the model's own."""
        for family, (names, what) in _FAMILY_FIELDS.items():
            changed = self._changed_from_defaults(names) if family != model.family else []
            if changed:
                cells = " or ".join(n for n, k in MODELS.items() if k.family == family)
                raise ValueError(
                    f"{', '.join(changed)}: the {family}_* fields shape {what} only; cell "
                    f"{self.cell!r} ({model.label}) does not use them (choose --cell {cells}, "
                    "or drop them)"
                )
        if model.family == LSTM_FAMILY:
            return
        # The ELM, the CMC and the MLP have no gates: the LSTM-family options do not apply.
        changed = self._changed_from_defaults(_LSTM_ONLY_FIELDS)
        if changed:
            defaults = _field_defaults()
            kept = ", ".join(f"{name}={defaults[name]!r}" for name in _LSTM_ONLY_FIELDS)
            raise ValueError(
                f"{', '.join(changed)}: cell {self.cell!r} ({model.label}) does not use these "
                f"LSTM-family options ({_NO_LSTM_OPTIONS[model.family]}); leave {kept}"
            )
        if model.family == "cmc":
            self._validate_cmc_fields()
        if model.family != "elm":
            return
        _integer("elm_version", self.elm_version, low=1)
        _choice("elm_version", self.elm_version, (1, 2))
        if self.elm_mlp_hidden_size is not None:
            _positive_int("elm_mlp_hidden_size", self.elm_mlp_hidden_size)
        _integer("elm_mlp_num_layers", self.elm_mlp_num_layers, low=0)
        _real("elm_memory_tau_min", self.elm_memory_tau_min, low=0.0)
        tau_min = self.elm_memory_tau_min
        _real("elm_memory_tau_max", self.elm_memory_tau_max, low=tau_min, low_open=True)
        _boolean("elm_learn_memory_tau", self.elm_learn_memory_tau)
        _real("elm_lambda", self.elm_lambda, low=0.0, low_open=True)
        _real("elm_trace_tau", self.elm_trace_tau, low=0.0)
        _positive_int("elm_synapses_per_branch", self.elm_synapses_per_branch)
        _choice("elm_routing", self.elm_routing, _ELM_ROUTINGS)
        if self.cell == "branch_elm":
            if self.elm_num_branch is None or self.elm_routing is None:
                raise ValueError(
                    f"cell 'branch_elm' needs elm_num_branch and elm_routing, got "
                    f"elm_num_branch={self.elm_num_branch!r}, elm_routing={self.elm_routing!r}; "
                    "e.g. --set elm_num_branch=4 --set elm_routing=random"
                )
            _positive_int("elm_num_branch", self.elm_num_branch)
        else:
            changed = self._changed_from_defaults(_BRANCH_FIELDS)
            if changed:
                raise ValueError(
                    f"{', '.join(changed)}: these make a Branch-ELM; use --cell branch_elm"
                )

    def _validate_cmc_fields(self) -> None:
        _real("cmc_input_scale", self.cmc_input_scale, low=0.0, low_open=True)
        _real("cmc_integration_time", self.cmc_integration_time, low=0.0, low_open=True)
        _positive_int("cmc_num_readout_times", self.cmc_num_readout_times)
        _choice("cmc_method", self.cmc_method, _CMC_FIXED_STEP + _CMC_ADAPTIVE)
        if self.cmc_method in _CMC_FIXED_STEP:
            if self.cmc_step_size is None:
                raise ValueError(
                    f"cmc_method={self.cmc_method!r} is fixed-step: set cmc_step_size "
                    "(seconds), e.g. --set cmc_step_size=0.001"
                )
            _real(
                "cmc_step_size", self.cmc_step_size, low=0.0, high=self.cmc_integration_time,
                low_open=True,
            )  # fmt: skip
        elif self.cmc_step_size is not None:
            raise ValueError(
                f"cmc_step_size={self.cmc_step_size!r}: the adaptive cmc_method="
                f"{self.cmc_method!r} chooses its steps from cmc_rtol and cmc_atol; set "
                "cmc_step_size=none"
            )
        _real("cmc_rtol", self.cmc_rtol, low=0.0, low_open=True)
        _real("cmc_atol", self.cmc_atol, low=0.0, low_open=True)
        _boolean("cmc_adjoint", self.cmc_adjoint)
        _boolean("cmc_learn_dynamics", self.cmc_learn_dynamics)
        _choice("cmc_readout", self.cmc_readout, _CMC_READOUTS)
        _integer("cmc_level_size", self.cmc_level_size, low=1)
        if self.cell == "cmc_hierarchy":
            _integer("hidden_size (the hierarchy's nodes)", self.hidden_size, low=2)
            levels, rest = divmod(self.hidden_size, self.cmc_level_size)
            if rest or levels < 2:
                raise ValueError(
                    f"cmc_level_size={self.cmc_level_size} must divide the hierarchy's "
                    f"hidden_size={self.hidden_size} nodes into at least 2 levels"
                )
        else:
            for name, default in (("cmc_readout", "top"), ("cmc_level_size", 1)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r}: "
                        "an option of the hierarchy; use --cell cmc_hierarchy"
                    )

    def _changed_from_defaults(self, names: Iterable[str]) -> list[str]:
        """``"name=value"`` of each field in ``names`` that differs from its default."""
        defaults = _field_defaults()
        return [f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n) != defaults[n]]


def _check_model_task(model: ModelKind, task: str) -> None:
    if model.tasks is not None and task not in model.tasks:
        raise ValueError(
            f"cell {model.name!r} ({model.label}) has a model for the tasks "
            f"{list(model.tasks)} only, got task {task!r}"
        )


_ELM_FIELDS = tuple(
    f.name for f in dataclasses.fields(ExperimentConfig) if f.name.startswith("elm_")
)
_CMC_FIELDS = tuple(
    f.name for f in dataclasses.fields(ExperimentConfig) if f.name.startswith("cmc_")
)
# Each family's own fields (refused for the others unless at their defaults) and what
# they shape, for the message.
_FAMILY_FIELDS = {
    "elm": (_ELM_FIELDS, "the ELM neuron"),
    "cmc": (_CMC_FIELDS, "the canonical microcircuit"),
}
_NO_LSTM_OPTIONS = {
    "elm": "one neuron, no gates, no dropout",
    "cmc": "neural-mass columns, no gates, no dropout",
    "mlp": "one hidden layer, no gates, no dropout",
}
_CMC_FIXED_STEP = ("euler", "midpoint", "rk4")  # microcircuits.cmc.models.FIXED_STEP_METHODS
_CMC_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # ADAPTIVE_METHODS
_CMC_READOUTS = ("top", "all")  # microcircuits.cmc.models.READOUTS
_LSTM_ONLY_FIELDS = (
    "num_layers", "forget_bias", "dropout", "input_dropout", "output_dropout", "update_dropout",
)  # fmt: skip
_BRANCH_FIELDS = ("elm_num_branch", "elm_synapses_per_branch", "elm_routing")
_ELM_ROUTINGS = (None, "random", "neuronio")  # microcircuits.elm.routing.ROUTINGS


def _field_defaults() -> dict[str, Any]:
    fields = dataclasses.fields(ExperimentConfig)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


# -- field checks -----------------------------------------------------------------------


def _canonical_task(task: object) -> object:
    return canonical_task_name(task) if isinstance(task, str) else task


def _choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _integer(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _positive_int(name: str, value: object) -> None:
    _integer(name, value, low=1)


def _real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number in {interval}, got {type(value).__name__} ({value!r})"
        )
    value = float(value)
    inside = (
        math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not inside:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {type(value).__name__} ({value!r})")


# -- typed overrides --------------------------------------------------------------------


def config_fields() -> dict[str, Any]:
    """Field name -> resolved type annotation of :class:`ExperimentConfig`."""
    hints = typing.get_type_hints(ExperimentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ExperimentConfig)}


def _check_known_keys(values: Mapping[str, Any], what: str) -> None:
    known = config_fields()
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys: {', '.join(sorted(known))}")


_NONE_WORDS = {"none", "null", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert ``value`` (text from the command line, or a TOML value) to the field's type."""
    args = typing.get_args(annotation)
    optional = (
        typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    )
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if not isinstance(value, str):
        if annotation is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        return value  # typed already (TOML); validate() checks it
    text = value.strip()
    try:
        if annotation is bool:
            if text.lower() in _TRUE_WORDS:
                return True
            if text.lower() in _FALSE_WORDS:
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        kind = {bool: "true/false", int: "an int", float: "a number"}[annotation]
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None
    if annotation is str:
        return text
    raise ValueError(f"{name} cannot be set from text (type {annotation}); got {value!r}")


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """Parse ``["key=value", ...]`` (``--set`` arguments) into a dict of raw text values.

    Raises:
        ValueError: an item has no ``=`` or an empty key, or a key is not a config field
            (the message lists the valid keys).
    """
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        parsed[key] = value
    _check_known_keys(parsed, "--set")
    return parsed


# -- presets ----------------------------------------------------------------------------
#
# One format for the shipped presets (configs/<task>.toml) and the files of --preset:
# see read_preset_file. Both are read by _check_preset, layered by load_config.

_PRESET_TABLES = ("extends", "preset", "defaults", "cell_defaults", "hidden_size", "rows")
_PRESET_HEADER = ("source", "default_cell", "default_size")
_SELECTORS = ("task", "cell", "size")  # choose the preset and its row; not config values
_PRESET_FORMAT = (
    "[preset] (source, default_cell, default_size), [defaults] (task = ... and config "
    "fields), optional [cell_defaults.<cell>], [hidden_size.<cell>] and "
    "[rows.<cell>.<size>] tables, as in the shipped presets (`microcircuits presets ptb` "
    "prints one)"
)


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` refined by ``child`` key by key, nested tables merged (a new dict)."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table, got {type(value).__name__} ({value!r})")
    return dict(value)


def _size_key(key: object, where: str) -> str:
    """A table key that is a size (``"100"``), checked, as the canonical text."""
    try:
        size = int(str(key))
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{where}: sizes must be positive integers, got {key!r}")
    return str(size)


def _config_table(value: object, where: str, *, extra_keys: Iterable[str] = ()) -> dict:
    """A table of config fields (``task``/``cell``/``size`` refused: they select)."""
    values = _table(value, where)
    allowed = {k: v for k, v in values.items() if k not in set(extra_keys)}
    _check_known_keys(allowed, where)
    fixed = sorted(set(allowed) & set(_SELECTORS))
    if fixed:
        raise ValueError(
            f"{fixed} in {where}: task, cell and size select the preset and its row; give "
            "the task in [defaults], the cell and size as [preset] default_cell/default_size "
            "or as tables ([rows.<cell>.<size>])"
        )
    return values


def _cell_tables(value: object, name: str, where: str) -> dict[str, dict[str, Any]]:
    """The ``[name.<cell>]`` tables of a preset as ``{cell: table}``, cell names canonical."""
    tables = {}
    for cell, table in _table(value, f"[{name}] of {where}").items():
        try:
            canonical = model_kind(cell).name
        except ValueError as error:
            raise ValueError(f"[{name}.{cell}] of {where}: {error}") from None
        tables[canonical] = _table(table, f"[{name}.{cell}] of {where}")
    return tables


def _check_preset(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a preset's tables (``extends`` already resolved); return them with canonical
    cell names and sizes, the task in ``[defaults]`` canonical.

    Raises:
        ValueError: an unknown table or key, a bad cell or size, or no task (named).
    """
    unknown = sorted(set(table) - set(_PRESET_TABLES))
    if unknown:
        hint = ""
        if "config" in table:
            hint = (
                " (the [config] table of earlier preset files is now [defaults], with the "
                "task in it; [preset] cell/size are now default_cell/default_size)"
            )
        raise ValueError(
            f"unknown table(s) {unknown} in {where}{hint}; a preset holds {_PRESET_FORMAT}"
        )
    checked: dict[str, Any] = {}
    header = _table(table.get("preset", {}), f"[preset] of {where}")
    bad = sorted(set(header) - set(_PRESET_HEADER))
    if bad:
        raise ValueError(
            f"unknown key(s) {bad} in [preset] of {where}; allowed: {list(_PRESET_HEADER)} "
            "(the task goes in [defaults])"
        )
    if header.get("default_cell") is not None:
        header["default_cell"] = model_kind(header["default_cell"]).name
    if header.get("default_size") is not None:
        _positive_int(f"[preset] default_size of {where}", header["default_size"])
    checked["preset"] = header
    defaults = _config_table(
        table.get("defaults", {}), f"[defaults] of {where}", extra_keys=("task",)
    )
    task = defaults.get("task")
    task = _canonical_task(task)
    if task not in TASKS:
        raise ValueError(
            f"[defaults] task of {where} must be one of {list(TASKS)}, got {task!r}; a preset "
            f"holds {_PRESET_FORMAT}"
        )
    defaults["task"] = task
    checked["defaults"] = defaults
    cell_defaults = _cell_tables(table.get("cell_defaults", {}), "cell_defaults", where)
    checked["cell_defaults"] = {
        cell: _config_table(values, f"[cell_defaults.{cell}] of {where}")
        for cell, values in cell_defaults.items()
    }
    matched: dict[str, dict[str, int]] = {}
    for cell, sizes in _cell_tables(table.get("hidden_size", {}), "hidden_size", where).items():
        where_cell = f"[hidden_size.{cell}] of {where}"
        matched[cell] = {}
        for size, units in sizes.items():
            _positive_int(f"{where_cell}, size {size}", units)
            matched[cell][_size_key(size, where_cell)] = units
    checked["hidden_size"] = matched
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for cell, sizes in _cell_tables(table.get("rows", {}), "rows", where).items():
        rows[cell] = {}
        for size, row in sizes.items():
            key = _size_key(size, f"[rows.{cell}] of {where}")
            rows[cell][key] = _config_table(
                row, f"[rows.{cell}.{size}] of {where}", extra_keys=("note",)
            )
    checked["rows"] = rows
    return checked


def _extended(table: dict[str, Any], where: str) -> dict[str, Any]:
    """``table`` on top of the shipped preset it ``extends`` (if any), key by key."""
    parent = table.pop("extends", None)
    if parent is None:
        return table
    name = _canonical_task(parent)
    if name not in TASKS:
        raise ValueError(
            f"extends of {where} must name a shipped preset, one of {list(TASKS)}, got {parent!r}"
        )
    return _merge(_shipped_preset(name), table)


@functools.cache
def _shipped_preset(name: str) -> dict[str, Any]:
    """The checked tables of ``configs/<name>.toml`` (cached: do not change them)."""
    where = f"preset {name}.toml"
    text = resources.files("microcircuits").joinpath("configs", f"{name}.toml").read_text("utf-8")
    table = _check_preset(_extended(tomllib.loads(text), where), where)
    if table["defaults"]["task"] != name:
        raise ValueError(f"{where} is for task {table['defaults']['task']!r}, not {name!r}")
    return table


def preset_table(task: str) -> dict[str, Any]:
    """The shipped preset of ``task``, checked (``[preset]``, ``[defaults]``,
    ``[cell_defaults]``, ``[hidden_size]``, ``[rows]``; cell names canonical)."""
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    return copy.deepcopy(_shipped_preset(task))


def available_sizes(task: str, cell: str) -> list[int]:
    """Sizes that have a row in ``task``'s preset for ``cell`` (empty: any size allowed)."""
    rows = preset_table(task)["rows"].get(model_kind(cell).name, {})
    return sorted(int(size) for size in rows)


@dataclass(frozen=True)
class PresetInfo:
    """One shipped preset as ``microcircuits presets`` lists it.

    Attributes:
        name: the preset's (and its task's) name.
        source: where its values come from, as the file says.
        default_cell, default_size: what ``train NAME`` trains without ``--cell``/``--size``
            (``default_size``: the nominal size), with ``hidden_size`` units.
        cells: every model the task has a head for -> the sizes of its rows (empty: any
            size; the size is then the hidden size).
        matched: cell -> {size: units} where the units are not the size (the preset
            matches a cell's parameter count to the LSTM's at that size).
        path: the TOML file.
    """

    name: str
    source: str
    default_cell: str
    default_size: int
    hidden_size: int
    cells: dict[str, tuple[int, ...]]
    matched: dict[str, dict[int, int]]
    path: str


def list_presets() -> list[PresetInfo]:
    """The shipped presets, in the order of :data:`TASKS`."""
    infos = []
    for name in TASKS:
        table = preset_table(name)
        default = load_config(name)
        cells = {
            cell: tuple(sorted(int(s) for s in table["rows"].get(cell, {})))
            for cell, kind in MODELS.items()
            if kind.tasks is None or name in kind.tasks
        }
        matched: dict[str, dict[int, int]] = {}
        for cell, sizes in table["hidden_size"].items():
            matched[cell] = {int(size): units for size, units in sizes.items()}
        for cell, rows in table["rows"].items():
            for size, row in rows.items():
                if row.get("hidden_size", int(size)) != int(size):
                    matched.setdefault(cell, {})[int(size)] = row["hidden_size"]
        path = resources.files("microcircuits").joinpath("configs", f"{name}.toml")
        infos.append(
            PresetInfo(
                name=name,
                source=table["preset"].get("source", ""),
                default_cell=default.cell,
                default_size=default.nominal_size,
                hidden_size=default.hidden_size,
                cells=cells,
                matched=matched,
                path=str(path),
            )
        )
    return infos


# -- preset files -----------------------------------------------------------------------


@dataclass(frozen=True)
class PresetFile:
    """A preset file's contents (see :func:`read_preset_file`).

    Attributes:
        task: the task it is for (``[defaults] task``).
        cell: the cell it was made for (``[preset] default_cell``; ``None``: any).
        size: the nominal size it was made for (``[preset] default_size``; ``None``: any).
        config: its ``[defaults]`` config fields but the task (TOML-typed).
        source: where the values come from, as the file says.
        tables: all its checked tables (``config`` is ``tables["defaults"]`` less the
            task), layered after the task's shipped preset by :func:`load_config`.
        path: the file it was read from.
    """

    task: str
    cell: str | None
    size: int | None
    config: dict[str, Any]
    source: str | None = None
    tables: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def read_preset_file(path: str | os.PathLike[str]) -> PresetFile:
    """Read a preset file: a TOML file in the format of the shipped presets::

        extends = "ptb"           # optional: start from this shipped preset, key by key

        [preset]                  # optional
        source = "..."            # where the values come from (a note)
        default_cell = "sublstm"  # the cell of runs that give no --cell
        default_size = 100        # their size (no --size)

        [defaults]                # config fields of every run of the preset
        task = "ptb"              # required (here or through extends)
        lr = 0.0118
        input_dropout = 0.39

        [cell_defaults.sublstm]   # optional: one cell's fields at every size
        forget_bias = 3.0

        [hidden_size.fix_sublstm] # optional: a cell's units at a size ("size" = units),
        "100" = 115               # e.g. parameter-matched to the LSTM's

        [rows.sublstm.100]        # optional: one cell's fields at one size (the paper's
        lr = 0.01186              # table rows); a cell with rows takes only their sizes
        note = "..."              # a row may carry a note (saved with the run)

    Its values are layered after the task's shipped preset, each preset in the order
    ``[defaults] < [cell_defaults] < [rows]`` (see :func:`load_config`); the size sets
    ``hidden_size`` (a row's or ``[hidden_size.<cell>]``'s units, else the size itself).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not TOML, or an unknown table or key, a bad cell or size, or no task
            (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        hint = " (a run's config.json must end in .json)" if path.suffix != ".toml" else ""
        raise ValueError(f"preset file {path} is not valid TOML{hint}: {error}") from None
    where = f"preset file {path}"
    tables = _check_preset(_extended(table, where), where)
    header = tables["preset"]
    config = {k: v for k, v in tables["defaults"].items() if k != "task"}
    return PresetFile(
        task=tables["defaults"]["task"],
        cell=header.get("default_cell"),
        size=header.get("default_size"),
        config=config,
        source=header.get("source"),
        tables=tables,
        path=str(path),
    )


def _is_run_config(preset: object) -> bool:
    """Whether ``preset`` names a run's ``config.json`` (any ``.json`` file)."""
    return isinstance(preset, (str, os.PathLike)) and Path(preset).suffix.lower() == ".json"


def _read_run_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """A run's saved config (``config.json``), checked field by field, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"run config {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "task" not in values:
        raise ValueError(
            f"run config {path} must be a JSON object of config fields with a task (a run's "
            f"config.json), got {type(values).__name__}"
        )
    _check_known_keys(values, f"run config {path}")
    return ExperimentConfig.from_dict(values)


def preset_task(preset: str | os.PathLike[str] | PresetFile) -> str:
    """The task a preset file (or a run's ``config.json``) is for."""
    if isinstance(preset, PresetFile):
        return preset.task
    if _is_run_config(preset):
        return _read_run_config(preset).task
    return read_preset_file(preset).task


def _toml_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if value is None:
        return '"none"'  # read back as None by the Optional fields
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"{name}: cannot write a {type(value).__name__} into a preset file")


def write_preset_file(
    path: str | os.PathLike[str],
    *,
    task: str,
    config: Mapping[str, Any],
    cell: str | None = None,
    size: int | None = None,
    source: str | None = None,
    comment: str = "",
) -> Path:
    """Write a preset file that :func:`read_preset_file` and ``--preset`` read.

    Args:
        path: the file to write (its folder is created).
        task: ``[defaults] task``.
        config: config field -> value (bool, int, float, str or None), written as
            ``[defaults]``: they apply to every cell and size, after the task's rows.
        cell, size: ``[preset] default_cell`` and ``default_size``. A ``hidden_size`` in
            ``config`` other than ``size`` is also written as ``[hidden_size.<cell>]``, so
            that it is the units at that size (the size would otherwise set them).
        source: ``[preset] source``.
        comment: text written at the top as ``#`` comment lines.

    Returns:
        The path written.
    """
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    values = dict(config)
    _check_known_keys(values, "config")
    cell = None if cell is None else model_kind(cell).name
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    header = {"source": source, "default_cell": cell, "default_size": size}
    lines.append("[preset]")
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in header.items() if v is not None]
    lines += ["", "[defaults]", f"task = {_toml_value('task', task)}"]
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in values.items()]
    units = values.get("hidden_size")
    if cell is not None and size is not None and units is not None and units != size:
        lines += ["", f"[hidden_size.{cell}]", f'"{size}" = {_toml_value("hidden_size", units)}']
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temp, path)
    read_preset_file(path)  # what is written must read back
    return path


# -- resolving a run's config -----------------------------------------------------------


def _refuse_selector_overrides(overrides: Mapping[str, Any]) -> None:
    # task, cell and size choose the preset and its row: overriding them afterwards would
    # train one experiment with another's hyperparameters
    for key, argument in (("task", "the task"), ("cell", "--cell"), ("size", "--size")):
        if key in overrides:
            raise ValueError(
                f"{key} cannot be overridden (got {key}={overrides[key]!r}): it selects the "
                f"preset and its row; give it as {argument} instead"
            )


def _rerun_config(
    path: str | os.PathLike[str],
    task: str | None,
    cell: str | None,
    size: int | None,
    overrides: Mapping[str, Any],
) -> ExperimentConfig:
    """A run's ``config.json`` as it was, ``overrides`` applied (see :func:`load_config`)."""
    saved = _read_run_config(path)
    given = {
        "task": None if task is None else _canonical_task(task),
        "cell": None if cell is None else model_kind(cell).name,
        "size": size,
    }
    have = {"task": saved.task, "cell": saved.cell, "size": saved.nominal_size}
    for name, value in given.items():
        if value is not None and value != have[name]:
            raise ValueError(
                f"{name} {value!r} differs from the {name} {have[name]!r} of run config {path}: "
                f"a run's config is rerun as it was (drop the {name}, or start from a preset "
                "TOML to change it)"
            )
    if saved.data_dir is not None and not Path(saved.data_dir).is_dir():
        saved = saved.replace(data_dir=None)  # moved, or another machine's: the default
    fields = config_fields()
    changes = {name: _coerce(name, fields[name], value) for name, value in overrides.items()}
    return saved.replace(**changes).validate()


def load_config(
    task: str | None,
    cell: str | None = None,
    size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    preset: str | os.PathLike[str] | PresetFile | None = None,
) -> ExperimentConfig:
    """Resolve the config of one run from the task's preset, its table row and overrides.

    Args:
        task: one of :data:`TASKS`, or an alias such as ``wt2``
            (:data:`~microcircuits.task_registry.TASK_KINDS`); ``None``: the task of
            ``preset``.
        cell: ``"lstm"``, ``"sublstm"``, ``"fix_sublstm"``, ``"elm"``, ``"branch_elm"``,
            ``"cmc"``, ``"cmc_hierarchy"`` or ``"mlp"``, or an alias such as ``fix-sublstm``
            (:data:`~microcircuits.model_registry.MODELS`).
            ``None``: the preset file's ``default_cell``, else the task preset's
            (``"cmc"`` for ``mnist``), else ``"lstm"``.
        size: the paper's nominal size. For PTB and WikiText-2 it selects the row of
            Table 2/3 (10, 100, 200 or 650; fix-subLSTM then gets the parameter-matched
            11/115/230/750 units); elsewhere it sets ``hidden_size``. ``None``: the
            preset file's ``default_size``, else the task preset's.
        overrides: field -> value, applied last; text values (from ``--set``) are
            converted to the field's type.
        preset: a preset file (path, or as read by :func:`read_preset_file`) layered
            after the task's shipped preset, before ``overrides``; or a run's
            ``config.json`` (a ``.json`` path), which is taken as it is (``task``,
            ``cell`` and ``size``, if given, must be its own), ``overrides`` applied.

    Returns:
        The validated config.

    Raises:
        ValueError: unknown task, cell or override key, a size the table lacks, a
            preset file for another task, or an invalid value (naming field, value and
            allowed range).
        FileNotFoundError: no such preset file.
    """
    overrides = dict(overrides or {})
    _check_known_keys(overrides, "override")
    _refuse_selector_overrides(overrides)
    if _is_run_config(preset):
        return _rerun_config(preset, task, cell, size, overrides)
    user = None
    if preset is not None:
        user = preset if isinstance(preset, PresetFile) else read_preset_file(preset)
        if task is not None and _canonical_task(task) != user.task:
            where = user.path or "preset file"
            raise ValueError(f"{where} is for task {user.task!r}, not {task!r}")
        task = user.task
        cell = cell if cell is not None else user.cell
        size = size if size is not None else user.size
    if task is None:
        raise ValueError(f"a task is needed, one of {list(TASKS)} (or a preset file naming one)")
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    layers = [preset_table(task)]
    if user is not None:
        layers.append(user.tables)
    header: dict[str, Any] = {}
    for layer in layers:
        header.update(layer["preset"])
    kind = model_kind(cell if cell is not None else header.get("default_cell", "lstm"))
    _check_model_task(kind, task)
    if size is None:
        size = header.get("default_size")
    if size is not None:
        _positive_int("size", size)
    row_sizes = sorted({int(s) for layer in layers for s in layer["rows"].get(kind.name, {})})
    if row_sizes and size not in row_sizes:
        sources = " and ".join(
            dict.fromkeys(
                layer["preset"].get("source", "the preset")
                for layer in layers
                if layer["rows"].get(kind.name)
            )
        )
        raise ValueError(
            f"size must be one of {row_sizes} for {task} with cell {kind.name!r} (the rows of "
            f"{sources}), got {size}"
        )

    values: dict[str, Any] = {"task": task, "cell": kind.name}
    extra: dict[str, Any] = {"preset": task}
    notes = []
    for layer in layers:
        values.update(layer["defaults"])
        values.update(layer["cell_defaults"].get(kind.name, {}))
        row = dict(layer["rows"].get(kind.name, {}).get(str(size), {}))
        notes.append(row.pop("note", None))
        values.update(row)
    if size is not None:
        # the size is the hidden size, except where a row gives the units or the preset
        # matches a cell's parameter count to the LSTM's at that size
        # ([hidden_size.<cell>] "<size>" = units)
        values["size"] = size
        units, how = size, None
        for layer in layers:
            matched = layer["hidden_size"].get(kind.name, {})
            if str(size) in matched:
                units, how = matched[str(size)], "matched"
            row = layer["rows"].get(kind.name, {}).get(str(size))
            if row is not None:
                units, how = row.get("hidden_size", units), "row"
        values["hidden_size"] = units
        if how == "row":
            extra["row"] = f"{kind.name} {size}"
        elif how == "matched":
            extra["row"] = f"{kind.name} {size}: {units} units, parameter-matched"
    note = next((n for n in reversed(notes) if n), None)
    if note:
        extra["note"] = note
    if user is not None:
        if user.path is not None and not isinstance(preset, PresetFile):
            extra["preset_file"] = str(preset)
        if user.source:
            extra["preset_source"] = user.source
    fields = config_fields()
    for name, value in list(values.items()):
        if name != "extra":
            values[name] = _coerce(name, fields[name], value)
    for name, value in overrides.items():
        values[name] = _coerce(name, fields[name], value)
    values["extra"] = {**extra, **values.get("extra", {})}
    return ExperimentConfig(**values).validate()
