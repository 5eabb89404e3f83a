"""MNIST from the original idx files (LeCun et al.), as uint8 images and int64 labels."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .._validation import check_bool
from .errors import CorruptDataError
from .registry import read_verified

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "MNIST_SPLITS", "load_mnist", "parse_idx"]

IDX_IMAGES_MAGIC = 2051
"""idx magic of a 3-d unsigned-byte array (0x00000803): the image files."""
IDX_LABELS_MAGIC = 2049
"""idx magic of a 1-d unsigned-byte array (0x00000801): the label files."""

MNIST_SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


def parse_idx(data: bytes, *, magic: int, source: str = "idx data") -> Tensor:
    """Decode an idx file of unsigned bytes into a uint8 tensor of its stated shape.

    The idx header is a big-endian 32-bit magic number, ``0x0000`` then the element
    type (``0x08``, unsigned byte) then the number of dimensions, followed by one
    big-endian 32-bit size per dimension; the elements follow in C order.

    Args:
        data: the whole (uncompressed) file.
        magic: the magic number required (:data:`IDX_IMAGES_MAGIC` or
            :data:`IDX_LABELS_MAGIC`; any ``0x08nn`` works).
        source: how to name the data in error messages (e.g. its file name).

    Returns:
        A new uint8 tensor whose shape is the header's dimensions.

    Raises:
        CorruptDataError: the magic differs, or the data is shorter or longer than the
            header says.
    """
    if (magic >> 8) != _UBYTE:
        raise ValueError(f"magic must describe an unsigned-byte idx array (0x08nn), got {magic}")
    if len(data) < 4:
        raise CorruptDataError(
            f"{source}: truncated idx file ({len(data)} bytes, shorter than its 4-byte magic)"
        )
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise CorruptDataError(
            f"{source}: bad idx header: magic number {got} (0x{got:08x}), expected {magic} "
            f"(0x{magic:08x}); is this the right file?"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(
            f"{source}: truncated idx header ({len(data)} bytes, the header of a "
            f"{ndim}-d array takes {header})"
        )
    shape = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptDataError(
            f"{source}: {state}: the header declares shape {tuple(shape)}, so {expected:,} "
            f"bytes in all, but the file has {len(data):,}"
        )
    # bytearray: torch wants a writable buffer; the tensor then owns that copy.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)


def load_mnist(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> tuple[Tensor, Tensor]:
    """One split of MNIST: 60,000 training or 10,000 test digits.

    Files are read from ``<data_dir>/mnist/`` (gzip or plain idx files, checksums
    verified; see :mod:`microcircuits.data.registry`).

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: the data directory; see :func:`~microcircuits.data.resolve_data_dir`.
        download: fetch absent files from the public mirror into ``data_dir``.

    Returns:
        ``(images, labels)``: images uint8 ``(N, 28, 28)`` with pixel values 0..255,
        labels int64 ``(N,)`` with digits 0..9.

    Raises:
        MissingDataError: a file is absent and could not be downloaded.
        CorruptDataError: a file fails its checksum or is not a valid idx file.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    check_bool("download", download)
    prefix = _FILE_PREFIX[split]
    image_file, label_file = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    images = parse_idx(
        read_verified("mnist", image_file, data_dir, download=download),
        magic=IDX_IMAGES_MAGIC,
        source=f"mnist/{image_file}",
    )
    labels = parse_idx(
        read_verified("mnist", label_file, data_dir, download=download),
        magic=IDX_LABELS_MAGIC,
        source=f"mnist/{label_file}",
    )
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"mnist {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "do not form N 28x28 digits with N labels"
        )
    return images, labels.long()
