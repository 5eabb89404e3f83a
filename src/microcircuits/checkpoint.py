"""Checkpoints: safetensors + JSON, written atomically, read without running code.

A checkpoint is one ``.safetensors`` file: its tensors are the payload's tensors, and its
header's metadata holds the rest of the payload as JSON (numbers, strings, lists, dicts,
with a reference in place of each tensor). Nothing in the file is ever executed on
loading, the file is portable across machines and torch versions, and it is small
enough to commit for a run that must continue elsewhere (``results/<task>/<run>/``).

Writing goes to a temporary file in the destination's directory, which is flushed and
fsync'ed, then renamed over the destination with :func:`os.replace` (atomic on POSIX
and Windows), and finally the directory entry is synced. A crash at any point leaves
either the old checkpoint or the new one, never a half-written file.

Checkpoints of earlier versions (``.pt``, torch's zip format) are still read, with
``torch.load(..., weights_only=True)``: a file holding any Python object other than
tensors and plain containers is refused with :class:`CheckpointError`, unexecuted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

__all__ = [
    "CheckpointError",
    "checkpoint_file",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 2  # 2: safetensors + JSON; 1: torch.save (read only)
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
_FORMAT_NAME = "microcircuits-checkpoint"
# JSON cannot say "tensor", "tuple", "non-finite float" or "dict with non-string keys"
# (an optimiser's state is keyed by parameter index): such values become one-key
# objects with these tags, and no plain dict of the payload may use a tag as a key.
_TENSOR, _TUPLE, _FLOAT, _ITEMS = "__tensor__", "__tuple__", "__float__", "__items__"
_TAGS = frozenset((_TENSOR, _TUPLE, _FLOAT, _ITEMS))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written: absent, corrupt, or not ours."""


def checkpoint_file(directory: str | os.PathLike[str], name: str) -> Path:
    """``directory/<name>.safetensors``, or the ``.pt`` of an older version if only it exists."""
    directory = Path(directory)
    current = directory / f"{name}{SUFFIX}"
    legacy = directory / f"{name}{LEGACY_SUFFIX}"
    return legacy if legacy.is_file() and not current.is_file() else current


# -- payload <-> (tensors, JSON) ---------------------------------------------------------


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], seen: set) -> Any:
    """The JSON form of ``value``; its tensors go to ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied weights): store copies
        storage = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        key = where if where not in tensors else f"{where}#{len(tensors)}"
        tensors[key] = tensor
        return {_TENSOR: key}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, f"{where}/{k}", tensors, seen) for k, v in value.items()}
        return {
            _ITEMS: [
                [
                    _encode(k, f"{where}/key{i}", tensors, seen),
                    _encode(v, f"{where}/{k}", tensors, seen),
                ]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise CheckpointError(
        f"cannot store {where or 'the payload'} in a checkpoint: {type(value).__name__} is "
        "not a tensor, number, string, None, list, tuple or dict"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _FLOAT:
            return float(inner)
        if tag == _ITEMS:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


# -- files -------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically, as safetensors + JSON.

    Args:
        path: destination file (by convention ``*.safetensors``); its directory is
            created if needed.
        payload: tensors, numbers, strings, ``None`` and lists/tuples/dicts of them
            (what :func:`load_checkpoint` gives back, with the same types). A
            ``format_version`` key is added.

    Returns:
        The destination path.

    Raises:
        CheckpointError: the payload holds another kind of object (named by its path).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    content = {"format_version": FORMAT_VERSION, **payload}
    skeleton = _encode(content, "", tensors, set())
    metadata = {"format": _FORMAT_NAME, "payload": json.dumps(skeleton, allow_nan=False)}
    _write_atomically(path, safetensors_save(tensors, metadata=metadata))
    return path


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with the header's length (8 bytes) and then ``{``."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} (truncated or corrupt?)"
        ) from exc
    if metadata.get("format") != _FORMAT_NAME or "payload" not in metadata:
        raise CheckpointError(
            f"{path} is not a microcircuits checkpoint (a safetensors file without the "
            "checkpoint's JSON header)"
        )
    try:
        skeleton = json.loads(metadata["payload"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: its JSON header is corrupt ({exc})"
        ) from exc
    if map_location is not None and torch.device(map_location).type != "cpu":
        tensors = {key: t.to(map_location) for key, t in tensors.items()}
    try:
        return _decode(skeleton, tensors)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: its JSON header names a tensor the file lacks ({exc})"
        ) from exc


def _load_legacy(path: Path, map_location: str | torch.device | None) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain "
            "containers, which could run code when unpickled; only checkpoints written by "
            f"microcircuits are accepted (detail: {str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} "
            "(truncated or not a checkpoint?)"
        ) from exc


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a ``.pt`` of version 1).

    Args:
        path: the checkpoint file.
        map_location: where to put the tensors (as in ``torch.load``).

    Returns:
        The payload dict, with its ``format_version``.

    Raises:
        CheckpointError: the file is missing, unreadable or truncated, is not a
            microcircuits checkpoint, is of a newer format, or (an old ``.pt``) holds
            objects other than tensors and plain containers (refused unexecuted).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        payload = _load_safetensors(path, map_location)
    else:
        payload = _load_legacy(path, map_location)
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a microcircuits checkpoint (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, newer than this "
            f"version of microcircuits reads ({FORMAT_VERSION}); upgrade microcircuits"
        )
    return payload
