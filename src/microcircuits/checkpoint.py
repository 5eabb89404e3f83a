"""Checkpoints: written atomically, read without ever executing code from the file.

Writing goes to a temporary file in the destination's directory, which is flushed and
fsync'ed, then renamed over the destination with :func:`os.replace` (atomic on POSIX
and Windows), and finally the directory entry is synced. A crash at any point leaves
either the old checkpoint or the new one, never a half-written file.

Reading uses ``torch.load(..., weights_only=True)``: only tensors, primitive values and
containers of them are accepted. A file holding any other Python object (which plain
pickle would construct, possibly running code) is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: absent, corrupt, or holding disallowed objects."""


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically.

    Args:
        path: destination file; its directory is created if needed.
        payload: tensors, numbers, strings, ``None`` and lists/tuples/dicts of them
            (what :func:`load_checkpoint` will accept back). A ``format_version`` key
            is added.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"format_version": FORMAT_VERSION, **payload}
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, safely.

    Args:
        path: the checkpoint file.
        map_location: where to put the tensors (as in ``torch.load``).

    Returns:
        The payload dict.

    Raises:
        CheckpointError: the file is missing, unreadable or truncated, holds objects
            other than tensors and plain containers (a pickle that could run code is
            refused without running it), or is not a microcircuits checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain "
            "containers, which could run code when unpickled; only checkpoints written by "
            f"microcircuits are accepted (detail: {str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} "
            "(truncated or not a torch checkpoint?)"
        ) from exc
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a microcircuits checkpoint (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, newer than this "
            f"version of microcircuits reads ({FORMAT_VERSION}); upgrade microcircuits"
        )
    return payload
