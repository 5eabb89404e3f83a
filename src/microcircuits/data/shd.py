"""The Spiking Heidelberg Digits (Cramer et al. 2020): verified files, spike trains, binning.

SHD holds spoken digits 0-9 in English and German (20 classes) encoded by an artificial
cochlea as spikes on 700 channels. The published files (CC BY 4.0) are HDF5::

    spikes/times   ragged: per sample the spike times, seconds (float)
    spikes/units   ragged: per sample the channel of each spike, 0..699 (uint16)
    labels         per sample the class, 0..19: the ten digits in one language, then
                   in the other (their names in extra/keys); ``label % 10`` is the
                   digit's value, which SHD-Adding sums
    extra/...      keys, speaker, meta_info (optional; extra/speaker is read if present)

They are served gzip-compressed from https://zenkelab.org/datasets/ (the canonical
listing of their md5 sums is ``md5sums.txt`` there; they were first served from
https://compneuro.net/datasets/). :data:`SHD_FILES` holds the md5 of each ``.h5.gz``
and of the ``.h5`` inside it. They could not be read from ``md5sums.txt`` here (no
internet); they are the sums that published SHD loaders check: the ``.gz`` sums agree
across several independent ones (one of them citing ``md5sums.txt``), the ``.h5`` sums
come from one (a ``SpikingHeidelbergDigitsDataset`` that checks the extracted files).

Files live in the data directory (:func:`~.registry.resolve_data_dir`) as
``shd/shd_train.h5`` (HDF5 needs the uncompressed file) or ``shd/shd_train.h5.gz``,
which is decompressed once beside itself (or, where that folder is read-only, into
``$MICROCIRCUITS_CACHE/shd``). An absent file is downloaded with ``download=True``
through the registry's download path: the ``.gz`` to a temporary file, its md5 checked,
decompressed to a temporary file whose md5 is checked, then renamed into place.

The registry's :data:`~.registry.FILES` lists files by the sha256 of copies the project
verified itself; no copy of SHD could be fetched here (no internet), so SHD keeps its
two entries here, with the published md5 sums, and ``python -m microcircuits.data
verify`` does not list them.

Binning (:class:`BinnedSHD`) follows the ELM paper (Spieler et al., ICLR 2024,
appendix; its published loader ``shd_data_loader.py``): each digit is cut to its first
second and its spikes are counted in bins of ``bin`` seconds, bin ``k`` holding the
spikes with ``k * bin <= t < (k + 1) * bin`` (``np.digitize`` against those edges, as
the published loader); a spike at or after the cut is dropped. The paper's default bin
is 2 ms: 500 steps per digit. Counts, not 0/1: two spikes of one channel in one bin
count 2, as the published loader's sparse-to-dense sum does.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from .._validation import check_bool
from . import registry
from .errors import CorruptDataError, DataError, MissingDataError

__all__ = [
    "BinnedSHD",
    "SHD_BASE_URL",
    "SHD_CHANNELS",
    "SHD_CLASSES",
    "SHD_FILES",
    "SHDFile",
    "SHDSpikes",
    "bin_spikes",
    "load_shd",
    "read_shd_file",
    "shd_path",
]

logger = logging.getLogger(__name__)

SHD_BASE_URL = "https://zenkelab.org/datasets/"
SHD_MD5SUMS_URL = f"{SHD_BASE_URL}md5sums.txt"
SHD_CHANNELS = 700
SHD_CLASSES = 20
DATASET = "shd"  # folder under the data directory
REQUIRED_KEYS = ("spikes/times", "spikes/units", "labels")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SHDFile:
    """One published SHD file.

    Attributes:
        split: ``"train"`` or ``"test"``.
        name: the HDF5 file's name (``shd_train.h5``).
        gz_md5: md5 of the published ``NAME.gz``.
        raw_md5: md5 of the HDF5 file inside it.
    """

    split: str
    name: str
    gz_md5: str
    raw_md5: str

    @property
    def url(self) -> str:
        return f"{SHD_BASE_URL}{self.name}.gz"

    @property
    def relpath(self) -> str:
        return f"{DATASET}/{self.name}"

    def expected(self) -> str:
        return (
            f"md5 {self.raw_md5} (the published {self.name}), or for {self.name}.gz md5 "
            f"{self.gz_md5} (as listed in {SHD_MD5SUMS_URL})"
        )


SHD_FILES: Mapping[str, SHDFile] = MappingProxyType(
    {
        "train": SHDFile(
            "train", "shd_train.h5",
            gz_md5="d47c9825dee33347913e8ce0f2be08b0",
            raw_md5="8e9877c85f29a28dd353ea6a54402667",
        ),
        "test": SHDFile(
            "test", "shd_test.h5",
            gz_md5="3062a80ec0c5719404d5b02e166543b1",
            raw_md5="207ad1295a0ab611e22d1734989c254e",
        ),
    }
)  # fmt: skip
"""The two files: split -> :class:`SHDFile` (read-only)."""


# -- the spikes -----------------------------------------------------------------------


@dataclass(frozen=True)
class SHDSpikes:
    """The spike trains of one SHD file, flat: sample ``i`` has the spikes
    ``offsets[i]:offsets[i + 1]`` of ``times`` and ``units``.

    Attributes:
        times: ``(S,)`` spike times in seconds (the file's float type).
        units: ``(S,)`` their channels, 0..699 (uint16).
        offsets: ``(N + 1,)`` int64 start of each sample's spikes, then ``S``.
        labels: ``(N,)`` int64 classes, 0..19.
        speakers: ``(N,)`` int64 speaker of each sample (``extra/speaker``), if the file
            has it.
        source: where the spikes were read from (for messages).
    """

    times: np.ndarray
    units: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Spike times and channels of sample ``index``."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.times[start:stop], self.units[start:stop]

    def subset(self, index: np.ndarray | Sequence[int]) -> SHDSpikes:
        """The samples ``index`` (in that order) as their own :class:`SHDSpikes`."""
        index = np.asarray(index, dtype=np.int64)
        starts, stops = self.offsets[index], self.offsets[index + 1]
        lengths = stops - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather the spikes of every chosen sample in one indexing operation
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SHDSpikes(
            self.times[gather],
            self.units[gather],
            offsets,
            self.labels[index],
            None if self.speakers is None else self.speakers[index],
            self.source,
        )


def _layout_error(path: Path, what: str) -> CorruptDataError:
    return CorruptDataError(
        f"{path} is not an SHD file of the published layout ({', '.join(REQUIRED_KEYS)}, "
        f"optional extra/...): {what}"
    )


def _keys(handle) -> list[str]:
    found: list[str] = []
    handle.visit(found.append)
    return sorted(found)


def read_shd_file(path: str | os.PathLike[str]) -> SHDSpikes:
    """Read an HDF5 file of the SHD layout, without checksum (see :func:`load_shd`).

    Raises:
        MissingDataError: ``path`` does not exist.
        CorruptDataError: not HDF5, a required key missing (named), or spikes that do not
            fit the layout (lengths, channels outside 0..699, negative or non-finite times,
            labels outside 0..19).
        ImportError: h5py is not installed.
    """
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise ImportError("reading SHD needs h5py: pip install h5py") from exc
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"SHD file {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CorruptDataError(f"{path} is not a readable HDF5 file ({exc})") from None
    with handle:
        missing = [key for key in REQUIRED_KEYS if key not in handle]
        if missing:
            raise _layout_error(path, f"the key {missing[0]!r} is missing (found: {_keys(handle)})")
        times_ds, units_ds = handle["spikes/times"], handle["spikes/units"]
        if not all(isinstance(d, h5py.Dataset) for d in (times_ds, units_ds, handle["labels"])):
            raise _layout_error(path, "spikes/times, spikes/units and labels must be datasets")
        times_list = list(times_ds[()])
        units_list = list(units_ds[()])
        labels = np.asarray(handle["labels"][()]).astype(np.int64).reshape(-1)
        speakers = None
        if "extra/speaker" in handle:
            speakers = np.asarray(handle["extra/speaker"][()]).astype(np.int64).reshape(-1)
    count = len(labels)
    if len(times_list) != count or len(units_list) != count:
        raise _layout_error(
            path,
            f"{len(times_list)} spike-time arrays, {len(units_list)} unit arrays and "
            f"{count} labels; one of each per sample expected",
        )
    lengths = np.array([np.size(t) for t in times_list], dtype=np.int64)
    unit_lengths = np.array([np.size(u) for u in units_list], dtype=np.int64)
    if not np.array_equal(lengths, unit_lengths):
        bad = int(np.flatnonzero(lengths != unit_lengths)[0])
        raise _layout_error(
            path,
            f"sample {bad} has {lengths[bad]} spike times but {unit_lengths[bad]} units",
        )
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    times = _concatenate(times_list, np.float64)
    if not np.issubdtype(times.dtype, np.floating):
        times = times.astype(np.float64)
    units_raw = _concatenate(units_list, np.int64)
    if units_raw.size and (units_raw.min() < 0 or units_raw.max() >= SHD_CHANNELS):
        raise _layout_error(
            path,
            f"spikes/units must lie in [0, {SHD_CHANNELS - 1}], got "
            f"[{units_raw.min()}, {units_raw.max()}]",
        )
    if times.size and not (np.isfinite(times).all() and times.min() >= 0):
        raise _layout_error(path, "spikes/times must be finite and >= 0 (seconds)")
    if count and (labels.min() < 0 or labels.max() >= SHD_CLASSES):
        raise _layout_error(
            path, f"labels must lie in [0, {SHD_CLASSES - 1}], got [{labels.min()}, {labels.max()}]"
        )
    if speakers is not None and len(speakers) != count:
        speakers = None  # not one per sample: ignore the optional key
    return SHDSpikes(
        times, units_raw.astype(np.uint16), offsets, labels, speakers, source=str(path)
    )


def _concatenate(arrays: list, dtype) -> np.ndarray:
    parts = [np.asarray(a).reshape(-1) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# -- binning --------------------------------------------------------------------------


def _check_binning(num_bins: int, bin_seconds: float) -> tuple[int, float]:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    bin_seconds = float(bin_seconds)
    if not (np.isfinite(bin_seconds) and bin_seconds > 0):
        raise ValueError(f"bin_seconds must be a finite number > 0, got {bin_seconds!r}")
    return int(num_bins), bin_seconds


def _bin_index(times: np.ndarray, num_bins: int, bin_seconds: float) -> np.ndarray:
    """Bin of each spike (``-1``: at or after the cut ``num_bins * bin_seconds``)."""
    edges = np.arange(num_bins + 1, dtype=np.float64) * bin_seconds
    index = np.digitize(times, edges) - 1  # k for edges[k] <= t < edges[k + 1]
    index[index >= num_bins] = -1
    return index


def bin_spikes(
    times: np.ndarray | Sequence[float],
    units: np.ndarray | Sequence[int],
    *,
    num_bins: int = 500,
    bin_seconds: float = 0.002,
    channels: int = SHD_CHANNELS,
) -> Tensor:
    """Spike counts ``(num_bins, channels)`` float32 of one spike train.

    Bin ``k`` counts the spikes with ``k * bin_seconds <= t < (k + 1) * bin_seconds``;
    spikes at or after ``num_bins * bin_seconds`` are dropped (the defaults: the ELM
    paper's 2 ms bins over the first second).
    """
    num_bins, bin_seconds = _check_binning(num_bins, bin_seconds)
    times = np.asarray(times).reshape(-1)
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    if times.shape != units.shape:
        raise ValueError(f"times and units must match, got {times.shape} and {units.shape}")
    if units.size and (units.min() < 0 or units.max() >= channels):
        raise ValueError(f"units must lie in [0, {channels - 1}]")
    index = _bin_index(times, num_bins, bin_seconds)
    keep = index >= 0
    cells = torch.from_numpy(index[keep] * channels + units[keep])
    counts = torch.bincount(cells, minlength=num_bins * channels)
    return counts.to(torch.float32).view(num_bins, channels)


class BinnedSHD:
    """The spikes of an :class:`SHDSpikes` in time bins, made dense batch by batch.

    The bin of every spike is computed once; :meth:`dense` then counts a batch's spikes
    into ``(B, num_bins, 700)``. Only the binned cells are kept (int32), not the times.

    Args:
        spikes: the samples.
        num_bins: bins per sample (the paper: 500).
        bin_seconds: width of a bin (the paper: 0.002).
    """

    def __init__(self, spikes: SHDSpikes, num_bins: int = 500, bin_seconds: float = 0.002):
        self.num_bins, self.bin_seconds = _check_binning(num_bins, bin_seconds)
        self.channels = SHD_CHANNELS
        index = _bin_index(spikes.times, self.num_bins, self.bin_seconds)
        cells = index * self.channels + spikes.units.astype(np.int64)
        cells[index < 0] = -1
        self._cells = cells.astype(np.int32 if self.num_bins * self.channels < 2**31 else np.int64)
        self._offsets = spikes.offsets
        self.labels = torch.from_numpy(spikes.labels.astype(np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dense(self, index: Tensor | np.ndarray | Sequence[int]) -> Tensor:
        """Spike counts ``(B, num_bins, 700)`` float32 of the samples ``index``."""
        index = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64).reshape(-1)
        size = self.num_bins * self.channels
        parts = []
        for row, sample in enumerate(index):
            cells = self._cells[self._offsets[sample] : self._offsets[sample + 1]]
            cells = cells[cells >= 0].astype(np.int64)
            parts.append(cells + row * size)
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        counts = torch.bincount(torch.from_numpy(flat), minlength=len(index) * size)
        return counts.to(torch.float32).view(len(index), self.num_bins, self.channels)


# -- finding, verifying and fetching the files ----------------------------------------


def _md5_file(path: Path) -> tuple[str, int]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _cache_folder() -> Path:
    """``$MICROCIRCUITS_CACHE/shd`` (else ``~/.cache/microcircuits/shd``): where a ``.gz``
    in a read-only data directory is decompressed."""
    root = os.environ.get("MICROCIRCUITS_CACHE", "")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        root = str(base / "microcircuits")
    return Path(root).expanduser().absolute() / DATASET


def _corrupt_hint(spec: SHDFile) -> str:
    return (
        "Replace it with a good copy, or delete it and load again with download=True to "
        f"fetch it from {spec.url}."
    )


def _verify_plain(path: Path, spec: SHDFile) -> Path:
    """Check an uncompressed ``.h5`` against the published md5 (once per process)."""
    key = registry._stat_key(path, path.stat())
    if key in registry._VERIFIED:
        return path
    got, size = _md5_file(path)
    if got != spec.raw_md5:
        raise CorruptDataError(
            f"{path}: checksum mismatch for {spec.relpath}: got md5 {got} ({size:,} bytes); "
            f"expected {spec.expected()}. {_corrupt_hint(spec)}"
        )
    registry._VERIFIED.add(key)
    return path


def _check_gz(path: Path, spec: SHDFile, where: str, hint: str) -> None:
    got, size = _md5_file(path)
    if got != spec.gz_md5:
        raise CorruptDataError(
            f"{where}: checksum mismatch for {spec.relpath}.gz: got md5 {got} ({size:,} "
            f"bytes); expected {spec.expected()}. {hint}"
        )


def _gunzip_to(archive: Path, final: Path, spec: SHDFile, where: str, hint: str) -> Path:
    """Decompress a verified ``.gz`` to ``final`` (temp file, md5 of the content, rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = registry._temp_path(final.parent, final.name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with gzip.open(archive, "rb") as source, open(temp, "wb") as out:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != spec.raw_md5:
            raise CorruptDataError(
                f"{where}: the decompressed content has md5 {digest.hexdigest()}; expected "
                f"{spec.expected()}. {hint}"
            )
        os.replace(temp, final)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # other OSErrors propagate
        raise CorruptDataError(f"{where}: not a valid gzip file ({exc}). {hint}") from None
    finally:
        temp.unlink(missing_ok=True)
    registry._VERIFIED.add(registry._stat_key(final, final.stat()))
    return final


def _from_gz(gz: Path, spec: SHDFile) -> Path:
    """The ``.h5`` of a local ``.gz``: checked, decompressed beside it or into the cache."""
    hint = _corrupt_hint(spec)
    _check_gz(gz, spec, str(gz), hint)
    try:
        return _gunzip_to(gz, gz.with_name(spec.name), spec, str(gz), hint)
    except PermissionError:
        cached = _cache_folder() / spec.name
        logger.info("%s is read-only: decompressing %s into %s", gz.parent, gz.name, cached)
        return _gunzip_to(gz, cached, spec, str(gz), hint)


def _download(spec: SHDFile, root: Path) -> Path:
    """Fetch ``spec``'s ``.gz`` into ``root/shd``, check it, keep the verified ``.h5``."""
    folder = root / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    archive = registry._temp_path(folder, f"{spec.name}.gz")
    hint = "Nothing unverified was written; the copy served there is not the published one."
    where = f"download of {spec.url}"
    try:
        logger.info("downloading %s from %s into %s", spec.relpath, spec.url, folder)
        registry._download_to(spec.url, archive)
        _check_gz(archive, spec, where, hint)
        return _gunzip_to(archive, folder / spec.name, spec, where, hint)
    finally:
        archive.unlink(missing_ok=True)


def _missing_message(
    spec: SHDFile, root: Path, origin: str, looked: Sequence[Path], failure: str | None
) -> str:
    get_it = (
        f"Pass --data-dir (data_dir= in Python) or set ${registry.DATA_ENV_VAR} to a "
        f"directory holding {spec.relpath} or {spec.relpath}.gz"
    )
    if failure is None:
        get_it += f", or allow the download from {spec.url} (download=True)."
    else:
        get_it += (
            f". Downloading it from {spec.url} into {root / DATASET} failed: {failure}; "
            "with internet access and a writable data directory, retry, or fetch it "
            f"yourself and put it at {root / DATASET / (spec.name + '.gz')}."
        )
    return (
        f"SHD file {spec.name!r} not found in the data directory {root} ({origin}): looked "
        f"for {', '.join(str(p) for p in looked)}. Expected {spec.expected()}. {get_it}"
    )


def shd_path(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> Path:
    """The verified ``.h5`` of ``split`` (``"train"`` or ``"test"``), fetched if absent.

    Looked for, in order: ``DATA/shd/NAME`` (md5 checked), ``$MICROCIRCUITS_CACHE/shd/NAME``
    (a copy decompressed earlier), ``DATA/shd/NAME.gz`` (md5 checked, then decompressed).

    Raises:
        ValueError: an unknown split.
        MissingDataError: the file is absent and ``download`` is false or failed.
        CorruptDataError: a file (or the download) does not match the published md5.
    """
    if split not in SHD_FILES:
        raise ValueError(f"SHD split must be one of {list(SHD_FILES)}, got {split!r}")
    check_bool("download", download)
    spec = SHD_FILES[split]
    root, origin = registry._resolve(data_dir)
    plain = root / DATASET / spec.name
    cached = _cache_folder() / spec.name
    gz = root / DATASET / f"{spec.name}.gz"
    if plain.is_file():
        return _verify_plain(plain, spec)
    if cached.is_file():
        try:
            return _verify_plain(cached, spec)
        except CorruptDataError:
            logger.warning("ignoring %s: it does not match the published md5", cached)
    if gz.is_file():
        return _from_gz(gz, spec)
    looked = (plain, gz, cached)
    if not download:
        raise MissingDataError(_missing_message(spec, root, origin, looked, None))
    try:
        return _download(spec, root)
    except DataError:
        raise
    except OSError as exc:  # urllib.error.URLError and timeouts are OSErrors too
        raise MissingDataError(_missing_message(spec, root, origin, looked, str(exc))) from exc


def load_shd(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> SHDSpikes:
    """The spikes of the verified SHD ``split`` (``"train"``: 8,156 samples, ``"test"``:
    2,264); see :func:`shd_path` for where the file is found and :func:`read_shd_file`
    for what is checked."""
    return read_shd_file(shd_path(split, data_dir, download=download))
