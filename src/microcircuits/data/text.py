"""Word-level language-modelling corpora (Penn Treebank, WikiText-2) and their batching.

A text becomes tokens line by line: the line's whitespace-separated words, then
``<eos>``. The vocabulary is built from the training split in order of first
appearance; the validation and test splits of these corpora use no other words.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import SupportsIndex, overload

import torch
from torch import Tensor

from .._validation import check_bool, check_positive_int, check_tensor
from .errors import CorruptDataError
from .registry import read_verified

__all__ = [
    "CORPORA",
    "EOS",
    "BPTTBatches",
    "Corpus",
    "Vocabulary",
    "batchify",
    "bptt_batches",
    "corpus_from_texts",
    "load_corpus",
    "tokenize",
]

EOS = "<eos>"
"""The end-of-line token appended to every line."""

SPLITS = ("train", "valid", "test")

# corpus name -> (dataset folder, file-name pattern); "wikitext-2" is an alias.
_CORPUS_FILES = {
    "ptb": ("ptb", "ptb.{}.txt"),
    "wikitext2": ("wikitext-2", "wiki.{}.tokens"),
}
_ALIASES = {"wikitext-2": "wikitext2"}
CORPORA = (*_CORPUS_FILES, *_ALIASES)
"""Names :func:`load_corpus` accepts."""


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line: str.splitlines would also split at characters such as
    # U+2028 or U+0085, which WikiText-2 may contain inside a line.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def tokenize(text: str) -> list[str]:
    """The tokens of ``text``: for every line, ``line.split()`` followed by ``<eos>``.

    A final newline does not start an extra (empty) line; blank lines give a lone
    ``<eos>``.
    """
    tokens: list[str] = []
    for line in _lines(text):
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


class Vocabulary:
    """A bijection between words and ids ``0 .. len - 1``, in order of first appearance.

    ``vocab["word"]`` (or ``vocab.index("word")``) gives the id, ``vocab[id]`` (or
    ``vocab.words[id]``) the word.

    Args:
        words: words to add in order; repeats are ignored.
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        self._ids: dict[str, int] = {}
        self._words: list[str] = []
        self._frozen_words: tuple[str, ...] | None = None  # cache of ``words``
        for word in dict.fromkeys(words):  # first appearances, in order; fast on long streams
            self.add(word)

    def add(self, word: str) -> int:
        """Add ``word`` if new; return its id."""
        if not isinstance(word, str):
            raise TypeError(f"a word must be a str, got {type(word).__name__} ({word!r})")
        known = self._ids.get(word)
        if known is not None:
            return known
        self._ids[word] = len(self._words)
        self._words.append(word)
        self._frozen_words = None
        return len(self._words) - 1

    def index(self, word: str) -> int:
        """The id of ``word``; ``KeyError`` naming it if it is not in the vocabulary."""
        try:
            return self._ids[word]
        except KeyError:
            raise KeyError(f"word {word!r} is not in the vocabulary ({len(self)} words)") from None

    @overload
    def __getitem__(self, key: str) -> int: ...
    @overload
    def __getitem__(self, key: SupportsIndex) -> str: ...
    def __getitem__(self, key: str | SupportsIndex) -> int | str:
        if isinstance(key, str):
            return self.index(key)
        return self._words[operator.index(key)]

    @property
    def words(self) -> Sequence[str]:
        """All words, the word with id ``i`` at position ``i`` (read-only)."""
        if self._frozen_words is None:
            self._frozen_words = tuple(self._words)
        return self._frozen_words

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._words == other._words

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, tokens: Iterable[str]) -> Tensor:
        """Ids of ``tokens`` as a 1-D int64 tensor; ``KeyError`` on an unknown word."""
        ids = self._ids
        try:
            return torch.tensor([ids[t] for t in tokens], dtype=torch.int64)
        except KeyError as exc:
            raise KeyError(
                f"word {exc.args[0]!r} is not in the vocabulary ({len(self)} words)"
            ) from None

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Words of ``ids`` (a 1-D tensor or any iterable of ints)."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        return [self._words[i] for i in ids]


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: the training vocabulary and each split as token ids.

    Attributes:
        name: ``"ptb"``, ``"wikitext2"`` or the name given to :func:`corpus_from_texts`.
        vocab: built from the training split; ``<eos>`` included.
        train, valid, test: 1-D int64 tensors of token ids, the splits' lines in order.
    """

    name: str
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor

    def split(self, split: str) -> Tensor:
        """The tokens of ``split`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.split(s).numel():,}" for s in SPLITS)
        return f"Corpus(name={self.name!r}, vocab={len(self.vocab):,} words, tokens: {sizes})"


def _encode_split(vocab: Vocabulary, text: str, tokens: list[str], source: str) -> Tensor:
    try:
        return vocab.encode(tokens)
    except KeyError:
        for number, line in enumerate(_lines(text), start=1):
            unknown = [w for w in line.split() if w not in vocab]
            if unknown:
                raise CorruptDataError(
                    f"{source}, line {number}: word {unknown[0]!r} does not occur in the "
                    "training split, so it has no id; a word-level LM corpus must map rare "
                    "words to <unk> in every split (is this the right file?)"
                ) from None
        raise  # unreachable: every token but <eos> comes from some line


def corpus_from_texts(
    name: str,
    train: str,
    valid: str,
    test: str,
    *,
    sources: Mapping[str, str] | None = None,
) -> Corpus:
    """Tokenise three texts into a :class:`Corpus` with the vocabulary of ``train``.

    Args:
        name: the corpus's name.
        train, valid, test: the splits' full texts.
        sources: how to name each split in error messages (e.g. file names).

    Raises:
        CorruptDataError: ``train`` has no tokens, or ``valid``/``test`` has a word that
            ``train`` lacks.
    """
    sources = {s: f"{name} {s} split" for s in SPLITS} | dict(sources or {})
    texts = {"train": train, "valid": valid, "test": test}
    for split, text in texts.items():
        if not isinstance(text, str):
            raise TypeError(f"{split} must be a str, got {type(text).__name__}")
    train_tokens = tokenize(train)
    vocab = Vocabulary(train_tokens)
    if not train_tokens:
        raise CorruptDataError(f"{sources['train']}: empty, so the vocabulary would be empty")
    ids = {"train": vocab.encode(train_tokens)}
    for split in ("valid", "test"):
        ids[split] = _encode_split(vocab, texts[split], tokenize(texts[split]), sources[split])
    return Corpus(name, vocab, ids["train"], ids["valid"], ids["test"])


def load_corpus(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> Corpus:
    """Load a word-level LM corpus: ``"ptb"`` (Mikolov's Penn Treebank) or ``"wikitext2"``.

    Files are read from ``<data_dir>/ptb/ptb.{train,valid,test}.txt`` or
    ``<data_dir>/wikitext-2/wiki.{train,valid,test}.tokens`` (gzip or plain; checksums
    verified).

    Args:
        name: ``"ptb"``, ``"wikitext2"`` or ``"wikitext-2"``.
        data_dir: the data directory; see :func:`~microcircuits.data.resolve_data_dir`.
        download: fetch absent files from the public address into ``data_dir``.

    Raises:
        MissingDataError: a file is absent and could not be downloaded.
        CorruptDataError: a file fails its checksum or cannot be tokenised.
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in _CORPUS_FILES:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    check_bool("download", download)
    dataset, pattern = _CORPUS_FILES[canonical]
    texts: dict[str, str] = {}
    for split in SPLITS:
        file_name = pattern.format(split)
        raw = read_verified(dataset, file_name, data_dir, download=download)
        try:
            texts[split] = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptDataError(f"{dataset}/{file_name}: not UTF-8 text ({exc})") from None
    sources = {s: f"{dataset}/{pattern.format(s)}" for s in SPLITS}
    return corpus_from_texts(canonical, **texts, sources=sources)


# -- batching for truncated backpropagation through time ------------------------------


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """Cut a token stream into ``batch_size`` parallel streams, time-major.

    Column ``b`` of the result is the contiguous piece ``tokens[b * T : (b + 1) * T]``
    with ``T = len(tokens) // batch_size``; the last ``len(tokens) % batch_size`` tokens
    are dropped.

    Args:
        tokens: 1-D integer tensor ``(N,)``.
        batch_size: number of streams, ``1 <= batch_size <= N``.

    Returns:
        A new contiguous tensor ``(N // batch_size, batch_size)``, same dtype and device.
    """
    check_tensor("tokens", tokens)
    batch_size = check_positive_int("batch_size", batch_size)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (N,), got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    steps = tokens.numel() // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size ({batch_size}) exceeds the number of tokens ({tokens.numel()})"
        )
    return tokens[: steps * batch_size].view(batch_size, steps).t().contiguous()  # (T, B)


class BPTTBatches:
    """Iterator over ``(inputs, targets)`` segments of a batchified stream.

    Made by :func:`bptt_batches`; ``len()`` is the number of segments still to come.
    """

    def __init__(self, data: Tensor, bptt: int) -> None:
        self._data = data
        self._bptt = bptt
        self._start = 0

    def __iter__(self) -> BPTTBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        last = self._data.size(0) - 1  # the last step has no target
        if self._start >= last:
            raise StopIteration
        start = self._start
        length = min(self._bptt, last - start)
        self._start += length
        return self._data[start : start + length], self._data[start + 1 : start + 1 + length]

    def __len__(self) -> int:
        return math.ceil(max(self._data.size(0) - 1 - self._start, 0) / self._bptt)


def bptt_batches(data: Tensor, bptt: int) -> BPTTBatches:
    """Consecutive segments of ``data`` for truncated BPTT, each with next-token targets.

    Segment ``k`` holds steps ``k * bptt`` to ``k * bptt + T - 1`` of every stream as
    inputs and the following step of each as targets, so ``targets[t] == inputs[t + 1]``
    within a segment and the segments tile ``data[:-1]`` (inputs) and ``data[1:]``
    (targets) exactly. All segments have ``T = bptt`` steps except possibly the last.

    Args:
        data: ``(N, B)``, e.g. from :func:`batchify`; needs ``N >= 2``.
        bptt: segment length, a positive int.

    Returns:
        An iterator of ``(inputs, targets)``, each ``(T, B)`` (views of ``data``), with
        ``len()`` = ``ceil((N - 1) / bptt)`` segments.
    """
    check_tensor("data", data)
    bptt = check_positive_int("bptt", bptt)
    if data.dim() != 2:
        raise ValueError(f"data must be 2-D (steps, batch), got shape {tuple(data.shape)}")
    if data.size(0) < 2:
        raise ValueError(
            f"data needs at least 2 steps (an input and its target), got {data.size(0)}"
        )
    return BPTTBatches(data, bptt)
