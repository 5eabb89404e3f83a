"""Spiking Heidelberg Digits and SHD-Adding on small synthetic files of the published
layout: reading, binning (by hand and against the published loader's algorithm), the
verified lookup and download with its errors, the adding construction, and training."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from microcircuits.config import ExperimentConfig
from microcircuits.data import CorruptDataError, MissingDataError
from microcircuits.data import shd as shd_data
from microcircuits.data.shd import (
    SHD_FILES,
    BinnedSHD,
    SHDFile,
    bin_spikes,
    load_shd,
    read_shd_file,
    shd_path,
)
from microcircuits.task_registry import TASK_KINDS
from microcircuits.tasks.shd import SHDAddingTask, SHDTask, published_split
from tests._downloads import serve as _serve

h5py = pytest.importorskip("h5py")
CPU = torch.device("cpu")


# -- synthetic files ----------------------------------------------------------------------


def _random_samples(count: int, seed: int, *, classes: int = 20, max_time: float = 1.3):
    """``count`` samples of random spikes (float16 times, as the published files), each
    class at least once when ``count >= classes``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        n = int(rng.integers(5, 60))
        times = np.sort(rng.uniform(0.0, max_time, n)).astype(np.float16)
        units = rng.integers(0, 700, n).astype(np.uint16)
        samples.append((times, units, i % classes if i < classes else int(rng.integers(classes))))
    return samples


def write_shd_file(path: Path, samples, *, drop: str | None = None, speakers=True) -> Path:
    """An HDF5 file of the SHD layout; ``drop`` leaves one key out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        if drop != "spikes/times":
            times = handle.create_dataset(
                "spikes/times", (len(samples),), dtype=h5py.vlen_dtype(np.dtype("float16"))
            )
            for i, (t, _, _) in enumerate(samples):
                times[i] = t
        if drop != "spikes/units":
            units = handle.create_dataset(
                "spikes/units", (len(samples),), dtype=h5py.vlen_dtype(np.dtype("uint16"))
            )
            for i, (_, u, _) in enumerate(samples):
                units[i] = u
        if drop != "labels":
            handle.create_dataset("labels", data=np.array([s[2] for s in samples], np.uint16))
        if speakers:
            handle.create_dataset("extra/speaker", data=np.arange(len(samples)) % 3)
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shd")
    return {
        "train": write_shd_file(folder / "train.h5", _random_samples(60, seed=1)),
        "test": write_shd_file(folder / "test.h5", _random_samples(24, seed=2)),
    }


@pytest.fixture
def published_as_synthetic(monkeypatch, synthetic):
    """Make the synthetic files the 'published' ones: their md5 in SHD_FILES."""
    specs = {}
    for split, path in synthetic.items():
        gz = path.with_suffix(".h5.gz")
        gz.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        name = SHD_FILES[split].name
        specs[split] = SHDFile(split, name, gz_md5=_md5(gz), raw_md5=_md5(path))
    monkeypatch.setattr(shd_data, "SHD_FILES", specs)
    monkeypatch.setenv("MICROCIRCUITS_CACHE", str(synthetic["train"].parent / "cache"))
    return specs


# -- reading and binning ------------------------------------------------------------------


def test_read_returns_the_samples_of_the_file(synthetic):
    samples = _random_samples(60, seed=1)
    spikes = read_shd_file(synthetic["train"])
    assert len(spikes) == 60 and spikes.offsets[-1] == sum(len(s[0]) for s in samples)
    for i in (0, 17, 59):
        times, units = spikes.sample(i)
        np.testing.assert_array_equal(times, samples[i][0])
        np.testing.assert_array_equal(units, samples[i][1])
        assert spikes.labels[i] == samples[i][2]
    np.testing.assert_array_equal(spikes.speakers, np.arange(60) % 3)
    part = spikes.subset([5, 2])
    np.testing.assert_array_equal(part.sample(1)[0], samples[2][0])
    np.testing.assert_array_equal(part.labels, [samples[5][2], samples[2][2]])


def test_binning_by_hand():
    times = [0.0, 0.0019, 0.002, 0.0105, 0.0105, 0.999, 1.0, 1.2]
    units = [3, 3, 5, 699, 699, 0, 1, 2]
    dense = bin_spikes(times, units, num_bins=500, bin_seconds=0.002)
    assert dense.shape == (500, 700) and dense.dtype == torch.float32
    expected = torch.zeros(500, 700)
    expected[0, 3] = 2  # 0 and 1.9 ms: the first 2 ms bin, counted twice
    expected[1, 5] = 1  # 2 ms opens the second bin
    expected[5, 699] = 2  # 10.5 ms, two spikes of one channel: a count of 2
    expected[499, 0] = 1  # 999 ms: the last bin; 1.0 s and later are cut off
    torch.testing.assert_close(dense, expected)
    coarse = bin_spikes(times, units, num_bins=2, bin_seconds=0.5)
    assert coarse.sum() == 6 and coarse[1, 0] == 1 and coarse[0, 699] == 2


def _published_loader_dense(spikes, index, bin_ms: int) -> torch.Tensor:
    """The ELM paper's published SHD loader (shd_data_loader.py), re-implemented: digitize
    against arange(0, 1 + step, step), a sparse COO tensor summed to dense, last bin cut."""
    step = bin_ms / 1000
    time_bins = np.arange(0, 1.0 + step, step)
    coo = [[], [], []]
    for row, sample in enumerate(index):
        times, units = spikes.sample(sample)
        bins = np.digitize(times, time_bins) - 1
        coo[0].extend([row] * len(bins))
        coo[1].extend(bins)
        coo[2].extend(units)
    dense = torch.sparse_coo_tensor(
        torch.tensor(np.array(coo, dtype=np.int64)),
        torch.ones(len(coo[0])),
        (len(index), len(time_bins), 700),
        check_invariants=True,
    ).to_dense()
    return dense[:, :-1]


@pytest.mark.parametrize("bin_ms", [2, 10])
def test_binning_matches_the_published_loader(synthetic, bin_ms):
    spikes = read_shd_file(synthetic["train"])
    binned = BinnedSHD(spikes, num_bins=1000 // bin_ms, bin_seconds=bin_ms / 1000)
    index = [0, 7, 7, 33]
    torch.testing.assert_close(binned.dense(index), _published_loader_dense(spikes, index, bin_ms))
    for row, sample in enumerate(index):  # and per sample as bin_spikes does it
        times, units = spikes.sample(sample)
        single = bin_spikes(times, units, num_bins=1000 // bin_ms, bin_seconds=bin_ms / 1000)
        torch.testing.assert_close(binned.dense(index)[row], single)


@pytest.mark.parametrize("key", ["spikes/times", "spikes/units", "labels"])
def test_a_missing_key_is_named(tmp_path, key):
    path = write_shd_file(tmp_path / "bad.h5", _random_samples(4, seed=3), drop=key)
    with pytest.raises(CorruptDataError, match=f"the key '{key}' is missing"):
        read_shd_file(path)


def test_bad_layouts_are_refused(tmp_path):
    samples = _random_samples(3, seed=4)
    samples[1] = (samples[1][0], samples[1][1][:-1], 0)  # one unit fewer than times
    with pytest.raises(CorruptDataError, match="sample 1 has"):
        read_shd_file(write_shd_file(tmp_path / "a.h5", samples))
    not_hdf5 = tmp_path / "b.h5"
    not_hdf5.write_bytes(b"no hdf5 here")
    with pytest.raises(CorruptDataError, match="not a readable HDF5 file"):
        read_shd_file(not_hdf5)
    with pytest.raises(MissingDataError):
        read_shd_file(tmp_path / "absent.h5")


# -- the verified files -------------------------------------------------------------------


def test_a_file_with_another_checksum_is_refused(tmp_path, synthetic):
    folder = tmp_path / "data" / "shd"
    folder.mkdir(parents=True)
    shutil.copy(synthetic["test"], folder / "shd_test.h5")
    with pytest.raises(CorruptDataError) as info:
        load_shd("test", tmp_path / "data", download=False)
    message = str(info.value)
    assert "checksum mismatch for shd/shd_test.h5" in message
    assert f"got md5 {_md5(synthetic['test'])}" in message
    assert SHD_FILES["test"].raw_md5 in message and SHD_FILES["test"].gz_md5 in message
    assert "https://zenkelab.org/datasets/shd_test.h5.gz" in message


def test_a_missing_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(MissingDataError) as info:
        shd_path("train", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "shd" / "shd_train.h5") in message
    assert "https://zenkelab.org/datasets/shd_train.h5.gz" in message
    assert "MICROCIRCUITS_DATA" in message and "download=True" in message


def test_no_internet_gives_a_missing_data_error(monkeypatch, tmp_path):
    calls = _serve(monkeypatch, {})
    with pytest.raises(MissingDataError) as info:
        load_shd("train", tmp_path)
    assert calls == ["https://zenkelab.org/datasets/shd_train.h5.gz"]
    assert "failed: <urlopen error no network in tests>" in str(info.value)
    assert list((tmp_path / "shd").iterdir()) == []  # nothing partial left


def test_download_checks_and_decompresses(monkeypatch, tmp_path, synthetic, published_as_synthetic):
    gz = synthetic["train"].with_suffix(".h5.gz")
    calls = _serve(monkeypatch, {published_as_synthetic["train"].url: gz})
    spikes = load_shd("train", tmp_path)
    assert calls == ["https://zenkelab.org/datasets/shd_train.h5.gz"] and len(spikes) == 60
    assert sorted(p.name for p in (tmp_path / "shd").iterdir()) == ["shd_train.h5"]
    assert _md5(tmp_path / "shd" / "shd_train.h5") == published_as_synthetic["train"].raw_md5
    load_shd("train", tmp_path, download=False)  # found now, without the network


def test_a_download_with_the_wrong_checksum_leaves_nothing(
    monkeypatch, tmp_path, synthetic, published_as_synthetic
):
    wrong = synthetic["test"].with_suffix(".h5.gz")  # the test file served as train
    _serve(monkeypatch, {published_as_synthetic["train"].url: wrong})
    with pytest.raises(CorruptDataError, match="checksum mismatch for shd/shd_train.h5.gz"):
        load_shd("train", tmp_path)
    assert list((tmp_path / "shd").iterdir()) == []


def test_a_local_gz_is_decompressed_once(tmp_path, synthetic, published_as_synthetic):
    folder = tmp_path / "shd"
    folder.mkdir()
    shutil.copy(synthetic["test"].with_suffix(".h5.gz"), folder / "shd_test.h5.gz")
    path = shd_path("test", tmp_path, download=False)
    assert path == folder / "shd_test.h5" and _md5(path) == _md5(synthetic["test"])


# -- the tasks ----------------------------------------------------------------------------


def _config(task: str, **overrides) -> ExperimentConfig:
    values = dict(
        task=task, cell="elm", hidden_size=4, seq_len=50, batch_size=4, eval_batch_size=16,
        steps_per_epoch=3 if task == "shd_adding" else None,
        elm_memory_tau_min=0.5, elm_memory_tau_max=50.0, elm_learn_memory_tau=True,
    )  # fmt: skip
    if task == "shd_adding":  # the sizes of its drawn evaluation sets
        values |= dict(valid_size=10, test_size=12)
    return ExperimentConfig(**(values | overrides)).validate()


@pytest.fixture(scope="module")
def spikes(synthetic):
    return {split: read_shd_file(path) for split, path in synthetic.items()}


def test_the_published_validation_split():
    held_out = published_split(8156)
    # the published loader: default_rng(0).binomial(1, 0.2, N) marks the validation set
    expected = np.random.default_rng(0).binomial(1, 0.2, size=8156).astype(bool)
    np.testing.assert_array_equal(held_out, expected)
    assert 1500 < held_out.sum() < 1800


def test_shd_batches_are_the_binned_digits(spikes):
    task = SHDTask(_config("shd"), CPU, spikes=spikes, input_dropout=0.0)
    held_out = published_split(60)
    assert [len(task.splits[s]) for s in ("train", "valid", "test")] == [
        int((~held_out).sum()), int(held_out.sum()), 24,
    ]  # fmt: skip
    assert task.steps_per_epoch() == int((~held_out).sum()) // 4
    x, y = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert x.shape == (50, 4, 700) and y.shape == (4,)
    order = torch.randperm(len(task.splits["train"]), generator=torch.Generator().manual_seed(0))
    train = spikes["train"].subset(np.flatnonzero(~held_out))
    for b, sample in enumerate(order[:4].tolist()):
        times, units = train.sample(sample)
        torch.testing.assert_close(x[:, b], bin_spikes(times, units, num_bins=50, bin_seconds=0.02))
        assert y[b] == train.labels[sample]


def test_input_dropout_drops_half_and_scales_the_rest(spikes):
    task = SHDTask(_config("shd", seq_len=10), CPU, spikes=spikes)
    kept = SHDTask(_config("shd", seq_len=10), CPU, spikes=spikes, input_dropout=0.0)
    x, _ = next(task.train_batches(torch.Generator().manual_seed(0)))
    clean, _ = next(kept.train_batches(torch.Generator().manual_seed(0)))
    nonzero = clean > 0
    survived = x[nonzero] > 0
    torch.testing.assert_close(x[nonzero][survived], 2 * clean[nonzero][survived])
    assert 0.3 < survived.float().mean() < 0.7 and (x[~nonzero] == 0).all()


def test_shd_adding_concatenates_two_digits_and_sums_their_values(spikes):
    config = _config("shd_adding")
    task = SHDAddingTask(config, CPU, spikes=spikes, input_dropout=0.0)
    assert task.classes == 19 and task.steps_per_epoch() == 3
    x, y = next(task.train_batches(torch.Generator().manual_seed(5)))
    assert x.shape == (100, 4, 700)
    drawn = torch.randint(
        len(task.splits["train"]), (8,), generator=torch.Generator().manual_seed(5)
    )
    first, second = drawn[:4], drawn[4:]
    train = task.splits["train"]
    torch.testing.assert_close(x[:50], train.dense(first).transpose(0, 1))
    torch.testing.assert_close(x[50:], train.dense(second).transpose(0, 1))
    torch.testing.assert_close(y, train.labels[first] % 10 + train.labels[second] % 10)
    # the fixed evaluation pairs: as many as asked, the same in every task, sums in 0..18
    pairs = task.evaluation_index("test")
    assert [p.numel() for p in pairs] == [12, 12]
    again = SHDAddingTask(config, CPU, spikes=spikes).evaluation_index("test")
    assert all(torch.equal(a, b) for a, b in zip(pairs, again))
    sums = task.targets("test", *pairs)
    assert int(sums.min()) >= 0 and int(sums.max()) <= 18
    with pytest.raises(ValueError, match="steps_per_epoch must be set for shd_adding"):
        SHDAddingTask(_config("shd_adding", steps_per_epoch=None), CPU, spikes=spikes)


def test_seq_len_must_be_bins(spikes):
    with pytest.raises(ValueError, match="number of time bins per digit"):
        SHDTask(_config("shd", seq_len=0), CPU, spikes=spikes)


@pytest.mark.parametrize("name", ["shd", "shd_adding"])
def test_one_training_step_of_the_elm_on_the_synthetic_file(spikes, name):
    config = _config(name)
    task = (SHDTask if name == "shd" else SHDAddingTask)(config, CPU, spikes=spikes)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.elm.input_size == 700 and model.elm.output_size == task.classes
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = task.train_loss(model.train(), batch, None)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    evaluation = task.evaluate(model, "valid")
    assert 0.0 <= evaluation.metric <= 1.0
    assert evaluation.count == (len(task.splits["valid"]) if name == "shd" else 10)
    x, _ = task.probe(model, 3)
    assert x.shape == (50 * task.digits, 3, 700)


@pytest.mark.skipif(
    "shd" not in TASK_KINDS, reason="the shd tasks are not registered (task_registry)"
)
@pytest.mark.parametrize("name", ["shd", "shd_adding"])
def test_train_command_on_the_synthetic_files(
    tmp_path, synthetic, published_as_synthetic, monkeypatch, name
):
    from microcircuits.cli import main

    folder = tmp_path / "data" / "shd"
    folder.mkdir(parents=True)
    for split, path in synthetic.items():
        shutil.copy(path, folder / published_as_synthetic[split].name)
    args = [
        "-q", "train", name, "--cell", "elm", "--size", "4", "--max-steps", "2",
        "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--no-progress",
        "--set", "seq_len=20", "--set", "steps_per_epoch=2", "--set", "tensorboard=false",
    ]  # fmt: skip
    if name == "shd_adding":  # its evaluation pairs (SHD's splits are the files' own)
        args += ["--set", "valid_size=8", "--set", "test_size=8"]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "results.json").is_file()
