"""The tasks of the paper's experiments: the one table of their names, titles and metrics.

:mod:`microcircuits.config` validates task names against it, the CLI offers them,
:mod:`microcircuits.report` and :mod:`microcircuits.search` read each task's metric
and title, and the task classes of :mod:`microcircuits.tasks` declare their metric
from it. It imports nothing of the package, so that the config (upstream of the
tasks, which read the config) can read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASK_FIELDS", "TASK_KINDS", "TaskKind", "canonical_task_name", "task_kind"]

TASK_FIELDS = ("seq_len", "valid_size", "test_size", "bptt")
"""Config fields that only some tasks read (sequence length of generated data, sizes of
generated or drawn evaluation sets, the language models' BPTT segment)."""
_GENERATED = ("seq_len", "valid_size", "test_size")


@dataclass(frozen=True)
class TaskKind:
    """What the rest of the package needs to know about a task without loading it.

    Attributes:
        name: registry key, as in configs and run directories (``"ptb"``).
        title: name for report headings and plots (``"Penn Treebank"``).
        metric: the metric its evaluation reports (``"mse"``, ``"accuracy"``,
            ``"perplexity"``), also the key of that metric in ``metrics.jsonl``.
        higher_is_better: whether a larger metric is better (accuracy) or not.
        aliases: other spellings the config accepts (besides any case).
        reads: which of the task-specific config fields (:data:`TASK_FIELDS`) it reads;
            the config refuses the others away from their defaults, since they would
            change nothing.
    """

    name: str
    title: str
    metric: str
    higher_is_better: bool
    aliases: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()


_KINDS = (
    TaskKind("adding", "Delayed addition", "mse", higher_is_better=False, reads=_GENERATED),
    TaskKind("smnist", "Sequential MNIST", "accuracy", higher_is_better=True),
    TaskKind("psmnist", "Permuted sequential MNIST", "accuracy", higher_is_better=True),
    TaskKind("mnist", "MNIST", "accuracy", higher_is_better=True),
    TaskKind("ptb", "Penn Treebank", "perplexity", higher_is_better=False, reads=("bptt",)),
    TaskKind(
        "wikitext2",
        "WikiText-2",
        "perplexity",
        higher_is_better=False,
        aliases=("wikitext-2", "wt2"),
        reads=("bptt",),
    ),
    TaskKind(
        "shd", "Spiking Heidelberg Digits", "accuracy", higher_is_better=True, reads=("seq_len",)
    ),
    TaskKind(
        "shd_adding",
        "SHD-Adding",
        "accuracy",
        higher_is_better=True,
        aliases=("shd-adding",),
        reads=_GENERATED,
    ),
)
TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in _KINDS}
"""Every task by name, in the order the CLI and reports list them."""
_ALIASES = {alias: kind.name for kind in _KINDS for alias in kind.aliases}


def canonical_task_name(name: str) -> str:
    """``name`` stripped and lower-cased, an alias replaced by its task's name.

    Not checked: an unknown name comes back as it is (stripped, lower-cased), for the
    caller to report with its own context.
    """
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def task_kind(name: str) -> TaskKind:
    """Look a task up by name (case-insensitive; aliases such as ``wt2`` work too).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: naming the valid choices when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    key = canonical_task_name(name)
    if key not in TASK_KINDS:
        raise ValueError(f"task must be one of {list(TASK_KINDS)}, got {name!r}")
    return TASK_KINDS[key]
