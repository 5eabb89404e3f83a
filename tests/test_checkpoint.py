"""Checkpoints: safetensors + JSON round trip, refusal of pickled code, atomic replacement."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from microcircuits import checkpoint
from microcircuits.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_keeps_tensors_states_and_plain_values(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(4)
    payload = {
        "model": model.state_dict(),
        "generator": generator.get_state(),
        "carry": [torch.ones(2, 3), torch.zeros(2, 3)],
        "epoch": 3,
        "best": None,
        "pair": (1, 2.5),
        "floats": [float("inf"), float("-inf"), 0.1],
        "by_index": {0: "a", 7: torch.tensor(2.0)},
        "config": {"lr": 0.1, "cell": "sublstm", "extra": {"note": "x", "flag": True}},
    }
    path = save_checkpoint(tmp_path / "sub" / "last.safetensors", payload)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    restored = torch.Generator()
    restored.set_state(loaded["generator"])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))
    assert loaded["epoch"] == 3 and loaded["best"] is None
    assert loaded["pair"] == (1, 2.5) and isinstance(loaded["pair"], tuple)
    assert loaded["floats"][:2] == [float("inf"), float("-inf")]
    assert loaded["by_index"][0] == "a" and torch.equal(loaded["by_index"][7], torch.tensor(2.0))
    assert loaded["config"] == payload["config"]
    assert math.isnan(load_checkpoint(save_checkpoint(path, {"x": math.nan}))["x"])


def test_the_file_is_plain_safetensors_with_a_json_header(tmp_path: Path) -> None:
    """Any safetensors reader opens it; the non-tensor state is JSON; nothing is pickled."""
    weights = torch.arange(6.0).reshape(2, 3)
    path = save_checkpoint(tmp_path / "c.safetensors", {"model": {"w": weights}, "step": 5})
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["payload"])
        assert torch.equal(handle.get_tensor(header["model"]["w"]["__tensor__"]), weights)
    assert header["step"] == 5
    assert b"torch._utils" not in path.read_bytes()  # no pickle opcodes of torch.save


def test_an_optimiser_resumes_exactly_from_a_checkpoint(tmp_path: Path) -> None:
    """Adam's state (int-keyed, tuple betas, 0-d step tensors) survives: the same next steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.randn(8, 4)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        m(data).pow(2).sum().backward()
        opt.step()

    for _ in range(3):
        step(model, optimizer)
    path = save_checkpoint(
        tmp_path / "last.safetensors",
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
    )
    twin = torch.nn.Linear(4, 3)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.5)
    saved = load_checkpoint(path)
    twin.load_state_dict(saved["model"])
    twin_optimizer.load_state_dict(saved["optimizer"])
    for _ in range(3):
        step(model, optimizer)
        step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tied_weights_are_stored_and_restored(tmp_path: Path) -> None:
    """Tensors sharing memory (tied embeddings), refused by safetensors as they are, round-trip."""
    embedding = torch.nn.Embedding(5, 3)
    decoder = torch.nn.Linear(3, 5, bias=False)
    decoder.weight = embedding.weight
    state = {"encoder.weight": embedding.weight, "decoder.weight": decoder.weight}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "tied.safetensors", {"model": state}))
    assert torch.equal(loaded["model"]["encoder.weight"], embedding.weight.detach())
    assert torch.equal(loaded["model"]["decoder.weight"], embedding.weight.detach())


def test_unstorable_objects_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot store /config/when.*set"):
        save_checkpoint(tmp_path / "c.safetensors", {"config": {"when": {1, 2}}})
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_of_version_1_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"format_version": 1, "step": 4, "w": torch.ones(2)}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.ones(2))
    assert checkpoint.checkpoint_file(tmp_path, "last") == path
    save_checkpoint(tmp_path / "last.safetensors", {"step": 5})
    assert checkpoint.checkpoint_file(tmp_path, "last") == tmp_path / "last.safetensors"
    assert checkpoint.checkpoint_file(tmp_path, "best") == tmp_path / "best.safetensors"


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_a_pickle_payload_is_refused_without_running_it(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"format_version": 1, "model": _CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*could run code"):
        load_checkpoint(path)
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})

    def fail(fd: int) -> None:  # the new file is written, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(5)})
    monkeypatch.undo()

    loaded = load_checkpoint(path)
    assert loaded["step"] == 1
    assert torch.equal(loaded["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temp file


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_and_missing_files_give_clear_errors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    if suffix == ".pt":
        torch.save({"format_version": 1, "weights": torch.randn(100)}, path)
    else:
        save_checkpoint(path, {"weights": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint .*c\{suffix}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / f"absent{suffix}")


def test_files_that_are_not_our_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(2)}, path)  # safe content, but no format_version
    with pytest.raises(CheckpointError, match="not a microcircuits checkpoint"):
        load_checkpoint(path)
    torch.save({"format_version": 99}, path)
    with pytest.raises(CheckpointError, match="newer than this version"):
        load_checkpoint(path)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weights": torch.ones(2)}, str(foreign))  # someone else's safetensors
    with pytest.raises(CheckpointError, match="not a microcircuits checkpoint"):
        load_checkpoint(foreign)
    header = {"format_version": 2, "w": {"__tensor__": "/absent"}}
    meta = {"format": "microcircuits-checkpoint", "payload": json.dumps(header)}
    save_file({"weights": torch.ones(2)}, str(foreign), metadata=meta)
    with pytest.raises(CheckpointError, match="names a tensor the file lacks"):
        load_checkpoint(foreign)
    meta["payload"] = "{not json"
    save_file({"weights": torch.ones(2)}, str(foreign), metadata=meta)
    with pytest.raises(CheckpointError, match="JSON header is corrupt"):
        load_checkpoint(foreign)
    meta["payload"] = json.dumps({"format_version": 99})
    save_file({"weights": torch.ones(2)}, str(foreign), metadata=meta)
    with pytest.raises(CheckpointError, match="newer than this version"):
        load_checkpoint(foreign)
