"""The C++ step loops of the fused CPU kernel (``csrc/step_loops.cpp``), built on first use.

:mod:`.cpu_fused` runs a layer's recurrence one step at a time. From Python every step
costs a dozen op calls of 3-8 us each on top of its arithmetic, which on small layers
(LM-200: a ~80 us GEMM per step) is as much again as the work; the C++ loops make the
same GEMM calls and do the rest of a step in one or two passes. They are compiled with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; about a minute, once per torch
version and source change) into ``$MICROCIRCUITS_CACHE/native`` (without that variable
``$XDG_CACHE_HOME/microcircuits/native`` or ``~/.cache/microcircuits/native``) and loaded
from there afterwards; the build is locked, so parallel processes build it once.

``MICROCIRCUITS_NATIVE=0`` turns them off (the Python loops run, with the same results
up to floating-point rounding). Where the build fails (no compiler) the Python loops run
and one warning says why. ``microcircuits build-native`` builds them now and reports
where they are (``make`` runs it on setup).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["NATIVE_ENV_VAR", "build_directory", "step_loops"]

NATIVE_ENV_VAR = "MICROCIRCUITS_NATIVE"
CACHE_ENV_VAR = "MICROCIRCUITS_CACHE"
# step_loops.cpp holds the extension's Python module; elm_loops.cpp registers the ELM
# neuron's loops as torch operators (torch.ops.microcircuits_elm, see elm.fused).
_SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("step_loops.cpp", "elm_loops.cpp")
)
_OFF = ("0", "off", "false", "no")

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the C++ loops may be used (``$MICROCIRCUITS_NATIVE`` is not ``0``/``off``)."""
    return os.environ.get(NATIVE_ENV_VAR, "1").strip().lower() not in _OFF


def _module_name() -> str:
    """A name unique to this source and torch build: a change of either rebuilds."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    return f"microcircuits_step_loops_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    """Where the extension is built and cached."""
    root = os.environ.get(CACHE_ENV_VAR, "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        root = str(base / "microcircuits")
    return Path(root).expanduser().absolute() / "native" / _module_name()


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from ``PATH``; the ``ninja`` package (a dependency) installs it
    beside the interpreter, which is not on ``PATH`` when a venv is not activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


@functools.lru_cache(maxsize=1)
def step_loops() -> ModuleType | None:
    """The compiled module (``forward_steps``, ``backward_steps``), or ``None`` when
    turned off or unbuildable. Builds it on the first call of a process if needed."""
    if not enabled():
        return None
    name = _module_name()
    directory = build_directory()
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / f"{name}.so").exists():
            log.info("building the C++ step loops once (about a minute) in %s", directory)
        return load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            build_directory=str(directory),
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"microcircuits: the C++ step loops could not be built in {directory} "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); the fused CPU kernel runs "
            f"its Python loops instead (same results, slower on small layers). Set "
            f"{NATIVE_ENV_VAR}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def main() -> int:
    """Build the step loops now; print where they are, or why not."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = step_loops()
    if module is None:
        reason = caught[0].message if caught else f"turned off by ${NATIVE_ENV_VAR}"
        print(f"C++ step loops not available: {reason}")
        return 0  # not an error: the Python loops run
    print(f"C++ step loops ready: {module.__file__}")
    return 0
