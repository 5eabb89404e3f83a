"""Data-parallel training (torchrun / DistributedDataParallel, gloo on CPU) on tiny runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from microcircuits.checkpoint import load_checkpoint
from microcircuits.cli import main
from microcircuits.config import load_config
from microcircuits.data import corpus_from_texts
from microcircuits.distributed import DistributedContext, environment, shard_batch
from microcircuits.tasks import LanguageModelTask
from microcircuits.train import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with the gloo backend",
)

TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n" * 6
LM_SETTINGS = {
    "hidden_size": 5, "batch_size": 4, "bptt": 4, "eval_batch_size": 2, "epochs": 2,
    # Dropout off: the ranks draw their masks from their own generators, so only
    # without it can two processes compute exactly what one does.
    "input_dropout": 0.0, "output_dropout": 0.0, "update_dropout": 0.0,
    "checkpoint_every": 3, "log_every": 1, "progress": False, "tensorboard": False,
    "num_threads": 1,
}  # fmt: skip


def _tiny_corpus():
    lines = TEXT.splitlines(keepends=True)
    return corpus_from_texts("tiny", TEXT, "".join(lines[:8]), "".join(lines[3:12]))


class _RecordingLanguageModel(LanguageModelTask):
    """The language-model task, remembering the input tokens of every training batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[torch.Tensor] = []

    def train_loss(self, model, batch, carry):
        self.inputs.append(batch[0].clone())
        return super().train_loss(model, batch, carry)


def _train_language_model(out_dir: Path, name: str) -> None:
    config = load_config(
        "ptb", "sublstm", 10, LM_SETTINGS | {"out_dir": str(out_dir), "run_name": name}
    )
    task = _RecordingLanguageModel(config, torch.device("cpu"), corpus=_tiny_corpus())
    train(config, task=task)
    torch.save(task.inputs, out_dir / f"{name}-inputs.pt")


ADDING = [
    "--set", "hidden_size=4", "--set", "seq_len=6", "--set", "batch_size=8",
    "--set", "steps_per_epoch=4", "--set", "valid_size=20", "--set", "test_size=20",
    "--set", "tensorboard=false", "--set", "update_dropout=0.3", "--set", "checkpoint_every=2",
    "--epochs", "2", "--no-progress", "--device", "cpu", "--threads", "1",
]  # fmt: skip


def _ddp_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank, placed by environment variables as torchrun places it, doing all the
    multi-process runs of this module in one process group (starting processes is slow)."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
        RANK=str(rank), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.distributed.init_process_group("gloo")  # used, and left open, by train()
    try:
        # Each rank is given its own output folder: rank 1 must leave its one untouched.
        _train_language_model(Path(folder) / f"rank{rank}", "ddp")
        # The command line, with dropout on, stopped mid-epoch and resumed.
        command = ["train", "adding", *ADDING, "--out", str(Path(folder) / "adding")]
        assert main([*command, "--name", "whole"]) == 0
        assert main([*command, "--name", "split", "--max-steps", "3"]) == 0
        stopped = Path(folder) / "adding" / "split" / "checkpoints" / "last.safetensors"
        if rank == 0:
            torch.save(load_checkpoint(stopped), Path(folder) / "stopped.pt")
        assert main([*command, "--name", "split", "--resume"]) == 0
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The runs of :func:`_ddp_worker`, made by two processes; their folder."""
    folder = tmp_path_factory.mktemp("ddp")
    for rank in range(2):
        (folder / f"rank{rank}").mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(folder)), nprocs=2)
    return folder


def _train_losses(run_dir: Path) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_two_processes_train_the_parameters_one_process_does(tmp_path, two_ranks) -> None:
    _train_language_model(tmp_path, "one")
    ranks = [two_ranks / "rank0", two_ranks / "rank1"]

    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.safetensors")
    two = load_checkpoint(ranks[0] / "ddp" / "checkpoints" / "last.safetensors")
    assert one["global_step"] == two["global_step"] > 10
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-6)
    # The logged training loss is that of the global batch (the mean over the ranks).
    assert _train_losses(ranks[0] / "ddp") == pytest.approx(_train_losses(tmp_path / "one"))
    # Each rank trained on its half of every global batch of the single process.
    whole = torch.load(tmp_path / "one-inputs.pt")
    halves = [torch.load(rank / "ddp-inputs.pt") for rank in ranks]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for full, first, second in zip(whole, *halves):
        assert first.shape == second.shape == (full.shape[0], full.shape[1] // 2)
        assert torch.equal(torch.cat([first, second], dim=1), full)
    # Only rank 0 wrote a run directory.
    assert sorted(p.name for p in ranks[1].iterdir()) == ["ddp-inputs.pt"]
    assert (ranks[0] / "ddp" / "results.json").is_file()


def test_a_multi_process_run_resumes_exactly(two_ranks) -> None:
    """With dropout on: every rank's generator is saved and restored with the checkpoint."""
    runs = two_ranks / "adding"
    stopped = torch.load(two_ranks / "stopped.pt")
    assert stopped["global_step"] == 3 and stopped["world_size"] == 2
    assert len(stopped["rank_rng_states"]) == 2
    assert not torch.equal(*(s["torch"] for s in stopped["rank_rng_states"]))

    whole = load_checkpoint(runs / "whole" / "checkpoints" / "last.safetensors")
    resumed = load_checkpoint(runs / "split" / "checkpoints" / "last.safetensors")
    assert whole["global_step"] == resumed["global_step"] == 8
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    results = [
        json.loads((runs / name / "results.json").read_text()) for name in ("whole", "split")
    ]
    assert results[0]["test"] == results[1]["test"]
    meta = json.loads((runs / "split" / "meta.json").read_text())
    assert [r["at_step"] for r in meta["resumes"]] == [3]
    assert meta["processes"] == meta["resumes"][0]["processes"] == 2


def test_torchrun_launches_the_same_training(tmp_path, two_ranks) -> None:
    """``torchrun -m microcircuits train`` computes what the processes above computed."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "microcircuits", "train", "adding", *ADDING, "--out", str(tmp_path), "--name", "tr",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = load_checkpoint(tmp_path / "tr" / "checkpoints" / "last.safetensors")
    spawned = load_checkpoint(two_ranks / "adding" / "whole" / "checkpoints" / "last.safetensors")
    for key, value in spawned["model"].items():
        difference = (launched["model"][key] - value).abs().max().item()
        assert torch.equal(launched["model"][key], value), (key, difference)
    assert done.stdout.count("run directory:") == 2  # both ranks return the result


# -- without a process group ------------------------------------------------------------


def test_environment_is_read_and_checked(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert environment() == DistributedContext(1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert environment() == DistributedContext(4, 3, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=4\), got 4"):
        environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'x'"):
        environment()


def test_shards_are_contiguous_slices_of_the_batch_dimension() -> None:
    x = torch.arange(3 * 6 * 2).reshape(3, 6, 2)  # (T, B, features)
    y = torch.arange(6)  # (B,)
    parts = [shard_batch((x, y), DistributedContext(3, rank)) for rank in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(parts[2][0], x[:, 4:6])
    with pytest.raises(ValueError, match="batch size 6 cannot be split evenly over 4 processes"):
        shard_batch((x, y), DistributedContext(4, 0))


def test_a_batch_that_does_not_divide_is_refused_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    config = load_config(
        "adding", overrides={"batch_size": 8, "out_dir": str(tmp_path), "device": "cpu"}
    )
    with pytest.raises(ValueError, match="batch_size 8 cannot be split evenly over 3 processes"):
        train(config)
    assert not any(tmp_path.iterdir())
