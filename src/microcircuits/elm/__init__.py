"""The Expressive Leaky Memory (ELM) neuron and Branch-ELM (Spieler et al., ICLR 2024).

:mod:`.equations` holds the step functions, :mod:`.routing` the input-to-synapse maps
and :mod:`.module` the :class:`ELM` module, which also loads the published models
(:meth:`ELM.from_reference_state_dict`).
"""

from .equations import ELMState, ELMWeights, elm_readout, elm_state_step, elm_step
from .module import ELM

__all__ = ["ELM", "ELMState", "ELMWeights", "elm_readout", "elm_state_step", "elm_step"]
