"""The C++ step loops of the fused CPU kernel (``csrc/step_loops.cpp``), built on first use.

:mod:`.cpu_fused` runs a layer's recurrence one step at a time. From Python every step
costs a dozen op calls of 3-8 us each on top of its arithmetic, which on small layers
(LM-200: a ~80 us GEMM per step) is as much again as the work; the C++ loops make the
same GEMM calls and do the rest of a step in one or two passes. They are compiled with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; about a minute) into
``$MICROCIRCUITS_CACHE/native`` (without that variable
``$XDG_CACHE_HOME/microcircuits/native`` or ``~/.cache/microcircuits/native``) and loaded
from there afterwards; the build is locked, so parallel processes build it once.

One build serves every copy of the package: the build directory is named by a hash of
the sources' contents, the torch build (version and installation) and the compiler
(command, path and version), and the sources are copied into it before the build, so
``build.ninja`` names the same paths whichever checkout, worktree or installed copy
asks (with the original paths, ninja would rebuild for each). A change of any of these
builds anew, in a directory of its own; a line on stderr says so when a build starts.
Programs that time themselves call :func:`step_loops` before their clocks start.

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
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["NATIVE_ENV_VAR", "build_directory", "step_loops"]

NATIVE_ENV_VAR = "MICROCIRCUITS_NATIVE"
CACHE_ENV_VAR = "MICROCIRCUITS_CACHE"
# step_loops.cpp holds the extension's Python module; direct_steps.cpp the direct path
# it registers (declared in step_loops.h); elm_loops.cpp registers the ELM neuron's loops
# as torch operators (torch.ops.microcircuits_elm, see elm.fused).
_SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in ("step_loops.cpp", "direct_steps.cpp", "elm_loops.cpp")
)
# Headers beside the sources are copied (and hashed) with them.
_HEADER_SUFFIXES = (".h", ".hpp", ".hh", ".inc")
_CFLAGS = ("-O3",)
_OFF = ("0", "off", "false", "no")

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the C++ loops may be used (``$MICROCIRCUITS_NATIVE`` is not ``0``/``off``)."""
    return os.environ.get(NATIVE_ENV_VAR, "1").strip().lower() not in _OFF


def _source_files() -> list[Path]:
    """The compiled sources, then the headers in their directories, in a fixed order."""
    headers = {
        path
        for directory in {source.parent for source in _SOURCES}
        for path in directory.iterdir()
        if path.suffix in _HEADER_SUFFIXES and path.is_file()
    }
    return [*_SOURCES, *sorted(headers - set(_SOURCES))]


def _compiler() -> str:
    """The C++ compiler command torch's build runs (``$CXX``, else ``c++``)."""
    return os.environ.get("CXX", "") or "c++"


@functools.cache
def _compiler_identity(command: str) -> str:
    """``command``, the file it resolves to and the first line of its ``--version``
    (what tells compilers apart), or why it could not be asked."""
    path = shutil.which(command)
    if path is None:
        return f"{command}: not found"
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        version = (done.stdout or done.stderr).strip().splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as exc:
        version = [f"--version failed ({type(exc).__name__})"]
    return f"{command} -> {os.path.realpath(path)}: {' '.join(version)}"


def _module_name() -> str:
    """A name unique to the sources, the torch build and the compiler, not to where the
    sources are: a change of any of the three builds anew, in a directory of its own."""
    digest = hashlib.sha256()
    for source in _source_files():
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    for part in (torch.__version__, torch_dir, _compiler_identity(_compiler()), *_CFLAGS):
        digest.update(part.encode() + b"\0")
    return f"microcircuits_step_loops_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    """Where the extension is built and cached."""
    root = os.environ.get(CACHE_ENV_VAR, "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        root = str(base / "microcircuits")
    return Path(root).expanduser().absolute() / "native" / _module_name()


def _stage_sources(directory: Path) -> list[Path]:
    """Copy the sources (and headers) into ``directory/src`` unless they are there already
    with the same contents; return the compiled ones there.

    The build reads these copies, so ``build.ninja`` names the same paths for every copy
    of the package; a file that is already right is left alone (ninja compares times).
    Written to a temporary name and linked into place, so that a parallel process never
    reads half a file and the first complete copy stays.
    """
    staged = directory / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for source in _source_files():
        data = source.read_bytes()
        target = staged / source.name
        if target.is_file() and target.read_bytes() == data:
            continue
        fd, temporary = tempfile.mkstemp(dir=staged, prefix=f".{source.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                os.link(temporary, target)  # fails if another process was first
            except FileExistsError:
                if target.read_bytes() != data:  # not ours and not the same: replace it
                    os.replace(temporary, target)
            except OSError:  # no hard links on this file system
                os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return [staged / source.name for source in _SOURCES]


def _announce_build(directory: Path, name: str) -> None:
    """One line on stderr when a build starts here (or another process's is awaited):
    a minute's pause should not look like a hang, whatever the logging setup."""
    if (directory / f"{name}.so").exists():
        return
    if (directory / "lock").exists():
        what = "waiting for another process that builds"
    else:
        what = "building (once per source, torch and compiler; about a minute)"
    print(f"microcircuits: {what} the C++ step loops in {directory}", file=sys.stderr, flush=True)


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
    directory: Path | str = "the cache"
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        name = directory.name  # _module_name()

        _put_ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        sources = _stage_sources(directory)
        _announce_build(directory, name)
        module = load(
            name=name,
            sources=[str(source) for source in sources],
            build_directory=str(directory),
            extra_cflags=list(_CFLAGS),
            verbose=False,
        )
        log.debug("C++ step loops loaded from %s", directory)
        return module
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
