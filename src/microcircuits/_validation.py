"""Argument checks shared by the public entry points; each raises a message that names
the argument, the value it got and what is allowed."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (bools refused), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


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
