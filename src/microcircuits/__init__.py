"""microcircuits: biologically grounded gated recurrent networks for PyTorch.

The subtractively gated LSTM (subLSTM) and fix-subLSTM of Costa et al., "Cortical
microcircuits as gated-recurrent neural networks" (NIPS 2017), with an LSTM of the same
structure, as drop-in replacements for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``.
"""

from .cells import CELLS, CellWeights, LSTMState, cell_kind
from .cmc import CMCHierarchy, CMCNode
from .elm import ELM, ELMState
from .kernels import set_kernel, use_kernel
from .model_registry import MODELS, model_kind
from .nn import (
    LSTM,
    FixSubLSTM,
    FixSubLSTMCell,
    LSTMCell,
    SubLSTM,
    SubLSTMCell,
    make_cell,
    make_rnn,
)

__version__ = "0.1.0"

__all__ = [
    "CELLS",
    "CMCHierarchy",
    "CMCNode",
    "CellWeights",
    "ELM",
    "ELMState",
    "FixSubLSTM",
    "FixSubLSTMCell",
    "LSTM",
    "LSTMCell",
    "LSTMState",
    "MODELS",
    "SubLSTM",
    "SubLSTMCell",
    "__version__",
    "cell_kind",
    "make_cell",
    "make_rnn",
    "model_kind",
    "set_kernel",
    "use_kernel",
]
