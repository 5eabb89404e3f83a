"""Which input feeds which synapse of a Branch-ELM.

A Branch-ELM has ``num_branch`` branches of ``num_synapse_per_branch`` synapses each,
laid out branch by branch. Without routing, synapse ``j`` receives input ``j`` (so there
must be exactly one synapse per input). A routing gives each synapse an input index and
a 0/1 mask (a masked synapse receives nothing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ROUTINGS", "neuronio_routing", "random_routing"]

ROUTINGS = (None, "random", "neuronio")


def random_routing(
    input_size: int, num_branch: int, num_synapse_per_branch: int
) -> tuple[Tensor, Tensor]:
    """Each synapse draws its input uniformly (with replacement) from the global generator.

    Returns:
        ``(index, mask)``, each ``(num_branch * num_synapse_per_branch,)``; ``index`` int64,
        ``mask`` all true.
    """
    index = torch.randint(input_size, (num_branch * num_synapse_per_branch,))
    return index, torch.ones_like(index, dtype=torch.bool)


def neuronio_routing(
    input_size: int, num_branch: int, num_synapse_per_branch: int
) -> tuple[Tensor, Tensor]:
    """The routing of the NeuronIO Branch-ELM: neighbouring inputs share a branch.

    NeuronIO's inputs are excitatory synapses (first half) then inhibitory ones (second
    half), each half ordered along the dendrites. The inputs are first interleaved
    (E0, I0, E1, I1, ...), then branch ``k`` takes ``num_synapse_per_branch`` consecutive
    interleaved inputs starting at ``k * ceil(input_size / num_branch)``, so windows
    overlap when there are more synapses than that stride. Window positions past the
    last input are masked out.

    For an odd ``input_size`` the interleaving (kept as in the published models) repeats
    input ``input_size // 2`` and never uses the last input.

    Returns:
        ``(index, mask)``, each ``(num_branch * num_synapse_per_branch,)``; ``index``
        int64, ``mask`` bool.
    """
    position = torch.arange(input_size)
    interleaved = (position % 2) * (input_size // 2) + position // 2
    stride = math.ceil(input_size / num_branch)
    window = torch.arange(num_branch).unsqueeze(1) * stride + torch.arange(num_synapse_per_branch)
    mask = window < input_size
    index = interleaved[window.clamp(max=input_size - 1)]
    return index.flatten(), mask.flatten()
