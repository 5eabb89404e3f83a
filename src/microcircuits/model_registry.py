"""The models an experiment can train: the one table of the names ``--cell`` accepts.

A model belongs to a *family*, which decides how the tasks build it:

============  ==========================================  ===============================
family        models                                      built by
============  ==========================================  ===============================
lstm_family   ``lstm``, ``sublstm``, ``fix_sublstm``       :func:`microcircuits.make_rnn`,
              (the cells of :data:`~.cells.CELLS`)        a stack with gate blocks
elm           ``elm``, ``branch_elm``                     :class:`microcircuits.ELM`, from
                                                          the config's ``elm_*`` fields
cmc           ``cmc``, ``cmc_hierarchy``                  :class:`microcircuits.CMCNode`,
                                                          :class:`microcircuits.CMCHierarchy`,
                                                          from the ``cmc_*`` fields
mlp           ``mlp``                                     one hidden layer (a baseline of
                                                          the CMC's parameter count)
============  ==========================================  ===============================

The LSTM-family entries are read from :data:`~microcircuits.cells.CELLS` (names,
labels, aliases), so a cell added there is a model here too; other families add their
entries below and a builder per family in :mod:`microcircuits.tasks.models`. The config
(validation), the CLI (``--cell``, ``--cells``), the report (labels, order) and the
figures' colours all look names up here. :data:`~.cells.CELLS` itself stays the table of
the cells with gate blocks and kernel codes, which the ELM does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import lookup_name
from .cells import CELLS

__all__ = ["LSTM_FAMILY", "MODELS", "MODEL_FAMILIES", "ModelKind", "model_kind"]

LSTM_FAMILY = "lstm_family"
MODEL_FAMILIES = (LSTM_FAMILY, "elm", "cmc", "mlp")
"""Every family, each with a model builder in :mod:`microcircuits.tasks.models`."""


@dataclass(frozen=True)
class ModelKind:
    """What the experiments need to know about a model before building it.

    Attributes:
        name: registry key, as in configs, run directories and ``--cell``.
        label: name for tables and plots (``"Branch-ELM"``).
        family: one of :data:`MODEL_FAMILIES`: how tasks build it, which config
            fields shape it.
        tasks: the tasks it has a model head for; ``None``: every task.
        aliases: other spellings :func:`model_kind` accepts (besides any case).
    """

    name: str
    label: str
    family: str
    tasks: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()


# The ELM reads the task's output at the last step, so it has a head for the
# last-step tasks; the language models' heads carry an LSTM's (h, c) between segments.
_LAST_STEP_TASKS = ("adding", "smnist", "psmnist", "shd", "shd_adding")
# The recurrent cells read sequences; the CMC and the MLP classify whole images.
_SEQUENCE_TASKS = (*_LAST_STEP_TASKS, "ptb", "wikitext2")
_IMAGE_TASKS = ("mnist",)

_KINDS = (
    *(
        ModelKind(k.name, k.label, LSTM_FAMILY, tasks=_SEQUENCE_TASKS, aliases=k.aliases)
        for k in CELLS.values()
    ),
    ModelKind("elm", "ELM", "elm", tasks=_LAST_STEP_TASKS),
    ModelKind("branch_elm", "Branch-ELM", "elm", tasks=_LAST_STEP_TASKS, aliases=("branch-elm",)),
    ModelKind("cmc", "CMC node", "cmc", tasks=_IMAGE_TASKS, aliases=("cmc_node", "cmc-node")),
    ModelKind(
        "cmc_hierarchy", "CMC hierarchy", "cmc", tasks=_IMAGE_TASKS, aliases=("cmc-hierarchy",)
    ),
    ModelKind("mlp", "MLP", "mlp", tasks=_IMAGE_TASKS),
)
MODELS: dict[str, ModelKind] = {kind.name: kind for kind in _KINDS}
"""Every model by name, in the order tables, plots and ``--cell`` help list them."""
_ALIASES = {alias: kind.name for kind in _KINDS for alias in kind.aliases}


def model_kind(name: str) -> ModelKind:
    """Look a model up by name (case-insensitive; aliases such as ``fix-sublstm`` work too).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: naming the valid choices when ``name`` is unknown.
    """
    return lookup_name(name, MODELS, _ALIASES, what="cell", choices=MODELS)
