"""Canonical microcircuits (CMC) as neural ODEs (Douglas, arXiv:2508.06501).

:mod:`.dynamics` holds the equations of SPM's CMC neural mass (``spm_fx_cmc``) as pure
functions, one column (:func:`cmc_dynamics`) or several coupled by extrinsic connections
(:func:`cmc_network_dynamics`); :mod:`.models` the trainable classifiers integrated with
torchdiffeq, :class:`CMCNode` (one column) and :class:`CMCHierarchy` (several).
"""

from .dynamics import (
    EXTRINSIC_NAMES,
    STATE_NAMES,
    cmc_dynamics,
    cmc_network_dynamics,
    extrinsic_strengths,
    firing,
    intrinsic_matrix,
)
from .models import CMCHierarchy, CMCNode

__all__ = [
    "CMCHierarchy",
    "CMCNode",
    "EXTRINSIC_NAMES",
    "STATE_NAMES",
    "cmc_dynamics",
    "cmc_network_dynamics",
    "extrinsic_strengths",
    "firing",
    "intrinsic_matrix",
]
