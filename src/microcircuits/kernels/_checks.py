"""Checks shared by the fused kernels: whether a call's tensors qualify at all."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..cells import CellWeights, LSTMState


def call_tensors(
    x: Tensor, state: LSTMState, weights: CellWeights, update_mask: Tensor | None
) -> list[Tensor]:
    """Every tensor of a layer call (the input, the state, the weights present, the mask)."""
    tensors = [x, state.h, state.c, *[w for w in weights if w is not None]]
    return tensors if update_mask is None else [*tensors, update_mask]


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing now."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is enabled for ``x``'s device type (the fused kernels do not
    follow its casting rules; the reference path's ``F.linear`` does)."""
    try:
        return bool(torch.is_autocast_enabled(x.device.type))
    except TypeError:  # pragma: no cover - torch without the device_type argument
        if x.device.type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def functorch_wrapped(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is wrapped by a functorch transform (vmap/grad/jvp)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if check is None:  # pragma: no cover - older torch
        return False
    return any(check(t) for t in tensors)


def off_cpu_reason(tensors: Sequence[Tensor]) -> str | None:
    """``"a tensor is on DEVICE, not the CPU"`` for the first tensor off the CPU, or ``None``."""
    for t in tensors:
        if t.device.type != "cpu":
            return f"a tensor is on {t.device}, not the CPU"
    return None


def common_unsupported_reason(
    x: Tensor,
    tensors: Sequence[Tensor],
    lengths: Tensor | None,
    update_mask: Tensor | None,
    dtypes: tuple[torch.dtype, ...],
    traceable: bool = False,
) -> str | None:
    """Why a whole-sequence kernel cannot take the call (device aside), or ``None``: a mask
    with a gradient, mixed dtypes or layouts, an unsupported dtype, a bad shape or
    ``lengths``, ``torch.compile`` tracing (unless the kernel is ``traceable``: an ATen op
    that dynamo records as it is), autocast, functorch transforms."""
    if update_mask is not None and update_mask.requires_grad:
        return "update_mask requires grad"
    for t in tensors:
        if t.dtype != x.dtype:
            return f"mixed dtypes ({t.dtype} and {x.dtype})"
        if t.layout != torch.strided:
            return f"layout {t.layout} is not strided"
        if t.is_complex() or t.is_quantized:
            return "complex or quantized tensor"
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not " + "/".join(str(d).split(".")[-1] for d in dtypes)
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        return f"input shape {tuple(x.shape)} is not (T>0, B>0, I)"
    if lengths is not None and lengths.dtype.is_floating_point:
        return "lengths must be integers"
    if lengths is not None and tuple(lengths.shape) != (x.shape[1],):
        return f"lengths of shape {tuple(lengths.shape)} for a batch of {x.shape[1]}"
    tracing = compiling()
    if tracing and not traceable:
        return "torch.compile is tracing (the reference path traces into a graph)"
    if autocast_on(x):
        return "autocast is enabled (the reference path follows its casting rules)"
    if not tracing and functorch_wrapped(tensors):
        return "functorch-transformed tensors (vmap/grad/jvp)"
    return None
