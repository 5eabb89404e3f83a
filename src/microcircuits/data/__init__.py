"""Datasets of the paper's experiments: MNIST, Penn Treebank, WikiText-2, and the adding task.

Files are read from a data directory (:func:`resolve_data_dir`: an explicit argument or
``--data-dir``, else ``$MICROCIRCUITS_DATA``, else ``~/.cache/microcircuits``), gzip or
plain, and verified against published sha256 checksums; an absent file is downloaded
from its canonical address when ``download=True``. Problems raise
:class:`MissingDataError` or :class:`CorruptDataError`, whose messages name the file,
where it was looked for, what was expected and how to get it.

``python -m microcircuits.data verify [--data-dir DIR]`` checks every file.
"""

from .adding import ADDING_BASELINE_MSE, adding_batch
from .errors import CorruptDataError, DataError, MissingDataError
from .mnist import MNIST_SPLITS, load_mnist, parse_idx
from .registry import (
    DATA_ENV_VAR,
    FILES,
    DataFile,
    FileStatus,
    check_files,
    data_file,
    read_verified,
    resolve_data_dir,
)
from .text import (
    CORPORA,
    EOS,
    BPTTBatches,
    Corpus,
    Vocabulary,
    batchify,
    bptt_batches,
    corpus_from_texts,
    load_corpus,
    tokenize,
)

__all__ = [
    "ADDING_BASELINE_MSE",
    "BPTTBatches",
    "CORPORA",
    "Corpus",
    "CorruptDataError",
    "DATA_ENV_VAR",
    "DataError",
    "DataFile",
    "EOS",
    "FILES",
    "FileStatus",
    "MNIST_SPLITS",
    "MissingDataError",
    "Vocabulary",
    "adding_batch",
    "batchify",
    "bptt_batches",
    "check_files",
    "corpus_from_texts",
    "data_file",
    "load_corpus",
    "load_mnist",
    "parse_idx",
    "read_verified",
    "resolve_data_dir",
    "tokenize",
]
