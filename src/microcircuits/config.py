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

The presets (reading, writing and listing them) and :func:`load_config` are in
:mod:`microcircuits.presets`; their names are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._nn_parameters import check_chrono_max, check_recurrent_gain, check_weight_init
from .model_registry import LSTM_FAMILY, MODELS, ModelKind, model_kind
from .task_registry import TASK_FIELDS, TASK_KINDS, canonical_task_name

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
    # hierarchy: its nodes (>= 2, in cmc_levels levels); the MLP: its hidden units
    num_layers: int = 1  # stacked recurrent layers (paper: 1 for sMNIST, 2 for LM)
    embedding_size: int | None = None  # language models: word-vector size; None: the
    # hidden size (as in Zaremba et al.; the paper does not say)
    tie_embeddings: bool = False  # language models: the decoder's weight is the word
    # vectors (Press & Wolf 2017; the setup of Melis et al. 2017); needs embedding = hidden
    skip_connections: bool = False  # multi-layer stacks: the readout sees the sum of all
    # layers' outputs (lamb's SkipMultiRNNCell, tasks.models.SummedLayerStack)
    forget_bias: float = 1.0  # initial forget-gate bias (paper: 1); phi for fix-subLSTM
    weight_init: str = "glorot_gates"  # "Glorot" per gate block, or "glorot_fused": one
    # kernel from [x, h] to all gates, as TensorFlow's LSTMCell (microcircuits.nn)
    recurrent_gain: float = 1.0  # factor on the initial recurrent weights (after Glorot)
    chrono_max: float | None = None  # chrono init: forget biases log U(1, chrono_max - 1)
    # in place of forget_bias (the LSTM's input biases their negative); None: off

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
    cmc_levels: int | None = None  # hierarchy: levels of hidden_size / cmc_levels nodes
    # each, the image driving each node of the first; None: a chain of single nodes

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
        check_weight_init(self.weight_init)  # the modules' own checks: one rule
        check_recurrent_gain(self.recurrent_gain)
        check_chrono_max(self.chrono_max)
        _real("lr_decay_factor", self.lr_decay_factor, low=0.0, high=1.0, low_open=True)
        _real("lr_decay_threshold", self.lr_decay_threshold, low=0.0, high=1.0)
        _real("min_lr", self.min_lr, low=0.0)
        for name in ("input_dropout", "output_dropout", "update_dropout", "dropout"):
            _real(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        for name in (
            "download",
            "tensorboard",
            "progress",
            "amp",
            "tie_embeddings",
            "skip_connections",
        ):
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
        self._validate_task_fields()
        self._validate_model_fields(model)
        return self

    def _validate_task_fields(self) -> None:
        """Refuse task-specific fields the task does not read (they would change nothing)."""
        reads = TASK_KINDS[self.task].reads
        changed = self._changed_from_defaults(name for name in TASK_FIELDS if name not in reads)
        if changed:
            readers = "; ".join(
                f"{name} by {', '.join(k.name for k in TASK_KINDS.values() if name in k.reads)}"
                for name in changed
            )
            raise ValueError(
                f"{_settings(changed)}: task {self.task!r} does not read "
                f"{'these fields' if len(changed) > 1 else 'this field'} (read only: {readers}); "
                "drop it or leave it at its default"
            )

    def _validate_model_fields(self, model: ModelKind) -> None:
        """Refuse the fields of other model families; check the model's own."""
        for family, (names, what) in _FAMILY_FIELDS.items():
            changed = self._changed_from_defaults(names) if family != model.family else {}
            if changed:
                cells = " or ".join(n for n, k in MODELS.items() if k.family == family)
                raise ValueError(
                    f"{_settings(changed)}: the {family}_* fields shape {what} only; cell "
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
                f"{_settings(changed)}: cell {self.cell!r} ({model.label}) does not use these "
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
                    f"{_settings(changed)}: these make a Branch-ELM; use --cell branch_elm"
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
        if self.cmc_levels is not None:
            _integer("cmc_levels", self.cmc_levels, low=2)
        if self.cell == "cmc_hierarchy":
            _integer("hidden_size (the hierarchy's nodes)", self.hidden_size, low=2)
            if self.cmc_levels is not None and self.hidden_size % self.cmc_levels:
                raise ValueError(
                    f"cmc_levels={self.cmc_levels} must divide the hierarchy's "
                    f"hidden_size={self.hidden_size} nodes into equal levels"
                )
        else:
            for name, default in (("cmc_readout", "top"), ("cmc_levels", None)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r}: "
                        "an option of the hierarchy; use --cell cmc_hierarchy"
                    )

    def _changed_from_defaults(self, names: Iterable[str]) -> dict[str, object]:
        """The fields in ``names`` whose value differs from their default, with the value."""
        defaults = _field_defaults()
        return {n: getattr(self, n) for n in names if getattr(self, n) != defaults[n]}


def _settings(values: dict[str, object]) -> str:
    """``"name=value, ..."`` for an error message."""
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


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
    "num_layers", "forget_bias", "weight_init", "recurrent_gain", "chrono_max", "dropout",
    "input_dropout", "output_dropout", "update_dropout",
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


# -- presets and resolving a run's config (microcircuits.presets) -----------------------
#
# Imported last: microcircuits.presets builds on ExperimentConfig and the checks above.

from .presets import (  # noqa: E402
    PresetFile,
    PresetInfo,
    available_sizes,
    list_presets,
    load_config,
    preset_table,
    preset_task,
    read_preset_file,
    write_preset_file,
)
