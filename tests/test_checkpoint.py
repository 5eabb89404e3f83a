"""Checkpoints: round trip, refusal of pickled code, atomic replacement."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

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
        "config": {"lr": 0.1, "cell": "sublstm", "extra": {"note": "x"}},
    }
    path = save_checkpoint(tmp_path / "sub" / "last.pt", payload)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    restored = torch.Generator()
    restored.set_state(loaded["generator"])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))
    assert loaded["epoch"] == 3 and loaded["best"] is None
    assert loaded["config"] == payload["config"]


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
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})

    real_save = torch.save

    def save_half_then_fail(obj, handle) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(5)})
    monkeypatch.undo()

    loaded = load_checkpoint(path)
    assert loaded["step"] == 1
    assert torch.equal(loaded["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_truncated_and_missing_files_give_clear_errors(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {"weights": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*c\.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_files_that_are_not_our_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(2)}, path)  # safe content, but no format_version
    with pytest.raises(CheckpointError, match="not a microcircuits checkpoint"):
        load_checkpoint(path)
    torch.save({"format_version": 99}, path)
    with pytest.raises(CheckpointError, match="newer than this version"):
        load_checkpoint(path)
