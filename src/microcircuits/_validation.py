"""Argument checks shared by the public entry points; each raises a message that names
the argument, the value it got and what is allowed.

Besides the scalar checks: the checks of a recurrent module's forward inputs
(:func:`check_input`, :func:`check_pair`, :func:`check_shaped`), shared by
:mod:`microcircuits.nn` and :class:`microcircuits.ELM` so that they say the same, and
the name lookup of the cell and model tables (:func:`lookup_name`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

_V = TypeVar("_V")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    return int(value)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (bools refused), else raise."""
    number = _check_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return number


def check_count(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 0 (bools refused), else raise."""
    number = _check_int(name, value)
    if number < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return number


def check_probability(name: str, value: object) -> float:
    """Return ``value`` if it is a real number in [0, 1), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} ({value!r})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    return float(value)


def check_finite_real(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number (no nan/inf), else raise."""
    number = check_real(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return number


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_matches_parameters(name: str, tensor: Tensor, reference: Tensor) -> None:
    """Raise if ``tensor`` is not floating point or differs from the parameters in dtype/device."""
    if not torch.is_floating_point(tensor):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but the module's parameters are {reference.dtype}; "
            f"convert one of them (e.g. module.to({tensor.dtype}))"
        )
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on device {tensor.device} but the module's parameters are on "
            f"{reference.device}; move one of them (e.g. module.to({str(tensor.device)!r}))"
        )


def check_float_dtype(dtype: object) -> None:
    """Raise unless ``dtype`` (a module's ``dtype`` argument) is ``None`` or a
    floating-point ``torch.dtype``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


# -- a recurrent module's forward inputs -------------------------------------------------


def check_input_size(size: int, input_size: int) -> None:
    """Raise unless the input's last dimension ``size`` equals the module's ``input_size``."""
    if size != input_size:
        raise ValueError(f"input.size(-1) must be equal to input_size={input_size}, got {size}")


def check_input(input: object, input_size: int, reference: Tensor, batched_dim: int) -> bool:
    """Check a module's ``input``: a tensor of ``batched_dim`` dimensions (batched) or one
    fewer (unbatched), floating point like ``reference`` (a parameter: dtype, device),
    with ``input_size`` features last. Returns whether it is batched."""
    tensor = check_tensor("input", input)
    if tensor.dim() not in (batched_dim, batched_dim - 1):
        raise ValueError(
            f"input must be {batched_dim}-D (batched) or {batched_dim - 1}-D (unbatched), "
            f"got {tensor.dim()}-D of shape {tuple(tensor.shape)}"
        )
    check_matches_parameters("input", tensor, reference)
    check_input_size(tensor.shape[-1], input_size)
    return tensor.dim() == batched_dim


def check_pair(name: str, value: object, what: str) -> tuple[object, object]:
    """Return ``value`` if it is a tuple or list of two items (a state such as
    ``(h, c)``; ``what`` describes it: ``"a tuple (h_0, c_0)"``), else raise."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        got = type(value).__name__
        if isinstance(value, (tuple, list)):
            got += f" of length {len(value)}"
        raise TypeError(f"{name} must be {what} of two tensors, got {got}")
    return value[0], value[1]


def check_shaped(
    name: str, value: object, expected: tuple[int, ...], reference: Tensor, layout: str = ""
) -> Tensor:
    """Return ``value`` if it is a tensor of shape ``expected``, floating point like
    ``reference`` (dtype, device), else raise; ``layout`` names the dimensions in the
    message (``"batch, hidden_size"``)."""
    tensor = check_tensor(name, value)
    if tuple(tensor.shape) != expected:
        named = f" ({layout})" if layout else ""
        raise ValueError(f"{name} must have shape {expected}{named}, got {tuple(tensor.shape)}")
    check_matches_parameters(name, tensor, reference)
    return tensor


# -- names of the cell and model tables -------------------------------------------------


def lookup_name(
    name: object,
    table: Mapping[str, _V],
    aliases: Mapping[str, str],
    *,
    what: str,
    choices: Iterable[str],
) -> _V:
    """``table``'s entry for ``name``: stripped, any case, an alias (``aliases``: alias ->
    key) replaced by its key. Raises ``TypeError`` for a non-str, ``ValueError`` naming
    ``choices`` for an unknown name; ``what`` is the kind of name (``"cell"``)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {list(choices)}")
    return table[key]
