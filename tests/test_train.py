"""The training loop on tiny runs: run files, exact resume, divergence, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from microcircuits.checkpoint import load_checkpoint
from microcircuits.config import load_config
from microcircuits.data import corpus_from_texts
from microcircuits.tasks import AddingTask, Evaluation, LanguageModelTask
from microcircuits.train import NonFiniteLossError, RunResult, train


def _adding(out: Path, name: str = "run", cell: str = "lstm", **overrides):
    values = {
        "hidden_size": 6,
        "seq_len": 8,
        "batch_size": 8,
        "eval_batch_size": 50,
        "valid_size": 50,
        "test_size": 50,
        "steps_per_epoch": 6,
        "epochs": 3,
        "lr": 0.01,
        # Dropout draws from torch's global RNG, so resuming must restore it.
        "input_dropout": 0.2,
        "update_dropout": 0.3,
        "lr_decay_factor": 0.5,
        "log_every": 2,
        "checkpoint_every": 4,
        "progress": False,
        "tensorboard": False,
        "out_dir": str(out),
        "run_name": name,
    }
    return load_config("adding", cell, overrides=values | overrides)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_directory(tmp_path: Path) -> None:
    config = _adding(tmp_path, tensorboard=True)
    result = train(config)
    run = tmp_path / "run"
    assert result.run_dir == run
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == config.seed and meta["version"]
    assert {"cpu", "cpu_count", "torch_threads", "torch"} <= set(meta["hardware"])
    assert "hostname" not in json.dumps(meta).lower()
    results = json.loads((run / "results.json").read_text())
    assert results["steps_done"] == 18 and results["epochs_done"] == 3
    assert results["stopped"] == "completed" and results["completed"] is True
    assert results["test"] == result.test and results["metric"] == "mse"
    records = _records(run)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "train"][:3] == [2, 4, 6]
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert (run / "checkpoints" / "best.safetensors").is_file()
    assert any((run / "tensorboard").iterdir())
    assert "valid" in (run / "train.log").read_text()


def test_best_checkpoint_is_the_one_tested(tmp_path: Path) -> None:
    result = train(_adding(tmp_path))
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert best["global_step"] == result.best_step
    valid = [r for r in _records(tmp_path / "run") if r["kind"] == "valid"]
    assert result.best_valid == pytest.approx(min(r["mse"] for r in valid), rel=1e-6)
    task = AddingTask(_adding(tmp_path), torch.device("cpu"))
    model = task.build_model()
    model.load_state_dict(best["model"])
    assert task.evaluate(model, "test").metric == pytest.approx(result.test, rel=1e-6)


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.safetensors")["model"]


def _comparable(result: RunResult) -> dict:
    values = result.to_dict()
    for key in ("run_dir", "wall_time_s"):
        values.pop(key)
    return values


@pytest.mark.parametrize("stop_at", [4, 6, 9])  # at a checkpoint, an epoch end, mid-epoch
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, stop_at: int) -> None:
    whole = train(_adding(tmp_path, "whole"))

    stopped = train(_adding(tmp_path, "split", max_steps=stop_at))
    assert stopped.stopped == "max_steps" and stopped.steps_done == stop_at
    resumed = train(_adding(tmp_path, "split"), resume=True)

    assert _comparable(resumed) == _comparable(whole)
    whole_state, resumed_state = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert whole_state.keys() == resumed_state.keys()
    for key in whole_state:
        assert torch.equal(whole_state[key], resumed_state[key]), key
    meta = json.loads((tmp_path / "split" / "meta.json").read_text())
    assert [r["at_step"] for r in meta["resumes"]] == [stop_at]
    # The metrics of the resumed run continue those of the first part, without repeats.
    steps = [r["step"] for r in _records(tmp_path / "split") if r["kind"] == "valid"]
    assert steps == [r["step"] for r in _records(tmp_path / "whole") if r["kind"] == "valid"]


def test_a_resumed_stage_drops_the_earlier_stages_results(tmp_path: Path) -> None:
    """``--epochs 1`` then ``--epochs 3 --resume``: while the second stage runs (here:
    killed by the validation callback), results.json no longer claims the run ended."""
    train(_adding(tmp_path, "staged", epochs=1))
    run = tmp_path / "staged"
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 1

    def interrupt(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_adding(tmp_path, "staged", epochs=3), resume=True, on_validation=interrupt)
    assert not (run / "results.json").exists()
    finished = train(_adding(tmp_path, "staged", epochs=3), resume=True)
    assert json.loads((run / "results.json").read_text())["epochs_done"] == finished.epochs_done


def test_lr_decay_threshold_decays_on_a_slow_crawl_but_keeps_the_best(tmp_path: Path) -> None:
    """Improvements below the threshold (a fraction of the best) count as a plateau for
    the lr decay; the best checkpoint still follows every improvement."""
    lrs = {}
    for threshold in (0.0, 0.99):
        name = f"t{threshold}"
        result = train(
            _adding(tmp_path, name, lr_decay_factor=0.5, lr_decay_patience=1,
                    lr_decay_threshold=threshold, epochs=4)
        )  # fmt: skip
        valid = [r for r in _records(tmp_path / name) if r["kind"] == "valid"]
        lrs[threshold] = [r["lr"] for r in valid]
        mses = [r["mse"] for r in valid]
        assert result.best_valid == pytest.approx(min(mses), rel=1e-9)
        assert result.best_step == valid[mses.index(min(mses))]["step"]
        if threshold == 0.0:  # halves exactly after the validations that did not improve
            expected, lr, best = [], 0.01, math.inf
            for mse in mses:
                lr = lr if mse < best else lr / 2
                best = min(best, mse)
                expected.append(lr)
            assert lrs[0.0] == pytest.approx(expected)
    assert lrs[0.99] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])  # after each but the first
    assert lrs[0.99] != lrs[0.0]


def test_resume_without_restoring_the_rng_would_differ(tmp_path: Path, monkeypatch) -> None:
    """Guards the test above: it notices a resume that skips part of the state."""
    whole = train(_adding(tmp_path, "whole"))
    train(_adding(tmp_path, "split", max_steps=9))
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # dropout masks differ
    broken = train(_adding(tmp_path, "split"), resume=True)
    assert broken.steps_done == whole.steps_done
    assert _comparable(broken) != _comparable(whole)


TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n" * 6


def test_language_model_resume_restores_the_carried_state(tmp_path: Path) -> None:
    lines = TEXT.splitlines(keepends=True)
    corpus = corpus_from_texts("tiny", TEXT, "".join(lines[:8]), "".join(lines[3:12]))
    overrides = {
        "hidden_size": 5, "batch_size": 3, "bptt": 4, "eval_batch_size": 2, "epochs": 2,
        "checkpoint_every": 3, "log_every": 1, "progress": False, "tensorboard": False,
        "out_dir": str(tmp_path),
    }  # fmt: skip

    def run(name: str, **extra) -> RunResult:
        config = load_config("ptb", "sublstm", 10, overrides | {"run_name": name} | extra)
        task = LanguageModelTask(config, torch.device("cpu"), corpus=corpus)
        return train(config, task=task, resume=not extra)

    whole = run("whole", seed=0)
    run("split", seed=0, max_steps=7)  # mid-epoch: the hidden state is carried
    split_last = tmp_path / "split" / "checkpoints" / "last.safetensors"
    assert load_checkpoint(split_last)["carry"] is not None
    config = load_config("ptb", "sublstm", 10, overrides | {"run_name": "split"})
    resumed = train(
        config, resume=True, task=LanguageModelTask(config, torch.device("cpu"), corpus=corpus)
    )
    assert _comparable(resumed) == _comparable(whole)
    assert resumed.metric == "perplexity"


class _DivergingAdding(AddingTask):
    """The adding task whose loss becomes NaN from training step ``bad_step`` on."""

    bad_step = 6

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def train_loss(self, model, batch, carry):
        self.calls += 1
        loss, carry = super().train_loss(model, batch, carry)
        return (loss * float("nan") if self.calls >= self.bad_step else loss), carry


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = _adding(tmp_path, log_every=1)
    task = _DivergingAdding(config, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 6 .*step 4\) is kept"):
        train(config, task=task)
    run = tmp_path / "run"
    last = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert last["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (run / "results.json").exists()
    assert _records(run)[-1]["kind"] == "error"


class _WorseningAdding(AddingTask):
    """Validation gets worse every time: exercises plateau decay and early stopping."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validations = 0

    def evaluate(self, model, split):
        self.validations += 1
        return Evaluation(loss=float(self.validations), metric=float(self.validations), count=1)


def test_plateau_decays_the_lr_and_early_stopping_stops(tmp_path: Path) -> None:
    config = _adding(tmp_path, epochs=10, early_stop_patience=2, lr_decay_patience=1)
    result = train(config, task=_WorseningAdding(config, torch.device("cpu")))
    assert result.stopped == "early_stop"
    assert result.epochs_done == 3 and result.steps_done == 18
    assert result.best_step == 6  # the first validation stayed the best
    lrs = [r["lr"] for r in _records(tmp_path / "run") if r["kind"] == "valid"]
    assert lrs == pytest.approx([0.01, 0.005, 0.0025])
    again = train(config, resume=True, task=_WorseningAdding(config, torch.device("cpu")))
    assert (again.stopped, again.steps_done) == ("early_stop", 18)  # stays stopped


def test_the_plateau_schedule_decides_and_checkpoints_its_state_under_the_same_keys() -> None:
    from microcircuits.plateau import PlateauSchedule

    def schedule() -> PlateauSchedule:
        return PlateauSchedule(
            False, decay_factor=0.5, decay_patience=1, min_lr=0.03, early_stop_patience=3
        )

    plateau = schedule()
    first = plateau.observe(1.0, 2.0, lr=0.1, step=5, epoch=1.0)
    assert (first.best, first.lr, first.stop) == (True, None, False)
    worse = plateau.observe(1.5, 2.5, lr=0.1, step=10, epoch=2.0)
    assert (worse.best, worse.lr, worse.stop) == (False, 0.05, False)
    floor = plateau.observe(1.2, 2.2, lr=0.05, step=15, epoch=3.0)
    assert (floor.best, floor.lr, floor.stop) == (False, 0.03, False)  # min_lr
    at_min = plateau.observe(1.1, 2.1, lr=0.03, step=20, epoch=4.0)
    assert (at_min.best, at_min.lr, at_min.stop) == (False, None, True)
    state = plateau.state_dict()
    # the "plateau" entry of checkpoints that running experiments resume from
    assert state == {
        "best": 1.0, "best_loss": 2.0, "best_step": 5, "best_epoch": 1.0,
        "since_decay": 0, "since_best": 3, "decays": 2,
    }  # fmt: skip
    resumed = schedule()
    resumed.load_state_dict(state)
    assert resumed.exhausted and resumed.state_dict() == state


def test_an_existing_run_is_neither_overwritten_nor_resumed_silently(tmp_path: Path) -> None:
    train(_adding(tmp_path, epochs=1))
    with pytest.raises(FileExistsError, match=r"already holds a run; resume it \(--resume\)"):
        train(_adding(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"different config \(hidden_size: 6 -> 7\)"):
        train(_adding(tmp_path, epochs=1, hidden_size=7), resume=True)
    more = train(_adding(tmp_path, epochs=2), resume=True)  # more epochs: allowed
    assert more.epochs_done == 2
    fresh = train(_adding(tmp_path, epochs=1, lr=0.02), overwrite=True)
    assert fresh.steps_done == 6


def test_every_cell_trains(tmp_path: Path) -> None:
    for cell in ("sublstm", "fix_sublstm"):
        result = train(_adding(tmp_path, cell, cell=cell, epochs=1))
        assert result.cell == cell and result.test is not None


class _LinearLossAdding(AddingTask):
    """One parameter ``w`` and the loss ``d . w``: a known data gradient ``d``."""

    def build_model(self):
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        self.model = model
        return model

    def train_loss(self, model, batch, carry):
        return (model.w * torch.tensor([6.0, 8.0])).sum(), carry

    def evaluate(self, model, split):
        return Evaluation(loss=1.0, metric=1.0, count=1)


def test_weight_decay_is_clipped_with_the_data_gradient(tmp_path: Path) -> None:
    """The L2 penalty is part of the loss: clip(d + wd w), not clip(d) + wd w."""
    config = _adding(
        tmp_path, optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=1.0, clip_norm=5.0,
        steps_per_epoch=1, epochs=1, input_dropout=0.0, update_dropout=0.0,
    )  # fmt: skip
    task = _LinearLossAdding(config, torch.device("cpu"))
    train(config, task=task)
    # d + wd w = (6, 8) + (3, 4) = (9, 12), norm 15, clipped to norm 5: (3, 4)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * torch.tensor([3.0, 4.0])
    torch.testing.assert_close(task.model.w.detach(), expected)


def test_add_weight_decay_and_clip_for_a_loop_of_ones_own() -> None:
    """The public helper: clip(d + wd w), hand-derived; parameters without a gradient are
    left alone; no clipping returns None and only adds the decay."""
    from microcircuits.train import add_weight_decay_and_clip_

    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    frozen = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad = torch.tensor([6.0, 8.0])
    norm = add_weight_decay_and_clip_([w, frozen], weight_decay=1.0, clip_norm=5.0)
    assert norm.item() == pytest.approx(15.0)  # |(9, 12)|
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]))
    assert frozen.grad is None
    w.grad = torch.tensor([6.0, 8.0])
    assert add_weight_decay_and_clip_([w], weight_decay=0.5, clip_norm=None) is None
    torch.testing.assert_close(w.grad, torch.tensor([7.5, 10.0]))


# -- a run directory left by a crash -----------------------------------------------------


def test_resume_tolerates_a_torn_last_line_of_metrics(tmp_path: Path) -> None:
    whole = train(_adding(tmp_path, "whole"))
    train(_adding(tmp_path, "split", max_steps=9))
    with (tmp_path / "split" / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 10, "lo')  # killed mid-write
    resumed = train(_adding(tmp_path, "split"), resume=True)
    assert _comparable(resumed) == _comparable(whole)
    records = _records(tmp_path / "split")  # every line parses
    assert [r["step"] for r in records if r["kind"] == "valid"] == [
        r["step"] for r in _records(tmp_path / "whole") if r["kind"] == "valid"
    ]


def test_a_failed_checkpoint_write_does_not_duplicate_records(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint at step 6 is written mid-epoch, then the epoch ends (validation)
    and its checkpoint write fails: the resume redoes the epoch end, logged once."""
    import microcircuits.train as train_module

    whole = train(_adding(tmp_path, "whole", checkpoint_every=6))
    real_save = train_module.save_checkpoint
    writes = []

    def full_disk(path, payload):
        if Path(path).name == "last.safetensors":
            writes.append(payload["global_step"])
            if len(writes) == 2:
                raise OSError(28, "No space left on device", str(path))
        return real_save(path, payload)

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(_adding(tmp_path, "split", checkpoint_every=6))
    assert writes == [6, 6]
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train(_adding(tmp_path, "split", checkpoint_every=6), resume=True)
    assert _comparable(resumed) == _comparable(whole)
    for kind in ("valid", "epoch", "train"):
        steps = [r["step"] for r in _records(tmp_path / "split") if r["kind"] == kind]
        assert steps == [r["step"] for r in _records(tmp_path / "whole") if r["kind"] == kind]


def test_stale_temporary_files_of_the_run_are_removed_on_resume(tmp_path: Path) -> None:
    train(_adding(tmp_path, max_steps=4))
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ours = [
        checkpoints / ".last.safetensors.x1y2z3.tmp",
        checkpoints / ".best.safetensors.abc_9.tmp",
        run / ".results.json.tmp",
        run / ".metrics.jsonl.tmp",
    ]
    others = [checkpoints / ".notes.tmp", run / "mine.tmp", checkpoints / "last.safetensors.tmp"]
    for path in ours + others:
        path.write_bytes(b"half")
    train(_adding(tmp_path), resume=True)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in others)


# -- diverged parameters -----------------------------------------------------------------


class _BlownUpAdding(AddingTask):
    """One recurrent weight jumps to 1e20 before training step 5: the loss stays finite
    (the gate it feeds saturates), the weights have diverged."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def train_loss(self, model, batch, carry):
        self.calls += 1
        if self.calls == 5:
            name, weight = next((n, p) for n, p in model.named_parameters() if "hh" in n)
            with torch.no_grad():
                weight[0, 0] = 1e20
        return super().train_loss(model, batch, carry)


def test_diverged_parameters_are_never_checkpointed(tmp_path: Path) -> None:
    config = _adding(tmp_path, log_every=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"reached 1e\+20 \(diverged\) at step [68] .*\(step 4\) is kept; resume from it "
        r"with a lower lr \(the same command with --resume --set lr=0\.001\)",
    ):
        train(config, task=_BlownUpAdding(config, torch.device("cpu")))
    run = tmp_path / "run"
    for name in ("last", "best"):
        path = run / "checkpoints" / f"{name}.safetensors"
        if path.exists():
            model = load_checkpoint(path)["model"]
            assert all(t.abs().max() < 1e3 for t in model.values()), name
    assert load_checkpoint(run / "checkpoints" / "last.safetensors")["global_step"] == 4
    assert _records(run)[-1]["kind"] == "error"
    # The advice works: the run goes on from step 4 with the lower lr.
    resumed = train(_adding(tmp_path, log_every=1, lr=0.001), resume=True)
    assert resumed.completed and math.isfinite(resumed.test)


def test_a_non_finite_parameter_stops_the_run(tmp_path: Path) -> None:
    class _Inf(_BlownUpAdding):
        def train_loss(self, model, batch, carry):
            loss, carry = super().train_loss(model, batch, carry)
            if self.calls == 4:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("inf")
                loss = loss.detach().requires_grad_()  # the loss of this step was finite
            return loss, carry

    config = _adding(tmp_path, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"became inf at step 4 .*\(step 2\) is kept"):
        train(config, task=_Inf(config, torch.device("cpu")))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_a_resume_may_change_the_lr(tmp_path: Path) -> None:
    train(_adding(tmp_path, max_steps=4))
    train(_adding(tmp_path, max_steps=5, lr=0.002), resume=True)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert last["global_step"] == 5
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == [0.002]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.002


# -- runs stopped by max_steps ------------------------------------------------------------


def test_a_run_stopped_before_any_validation_tests_its_best_checkpoint(tmp_path: Path) -> None:
    result = train(_adding(tmp_path, max_steps=4))
    run = tmp_path / "run"
    assert result.stopped == "max_steps" and result.evaluated == "best"
    best = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert best["global_step"] == result.best_step == 4
    final = [r for r in _records(run) if r["kind"] == "valid"]
    assert [(r["step"], r.get("final")) for r in final] == [(4, True)]
    assert final[0]["mse"] == result.best_valid
    task = AddingTask(_adding(tmp_path), torch.device("cpu"))
    model = task.build_model()
    model.load_state_dict(best["model"])
    assert task.evaluate(model, "test").metric == pytest.approx(result.test, rel=1e-6)


@pytest.mark.parametrize(("clip_norm", "clipped"), [(1e-9, 1.0), (1e9, 0.0), (None, None)])
def test_training_records_log_the_gradient_norm_before_clipping(tmp_path, clip_norm, clipped):
    """Each training record gives the mean and largest global gradient norm of its steps
    before clipping and the fraction the clip shrank; nothing without clipping."""
    train(_adding(tmp_path, clip_norm=clip_norm))
    records = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert records
    for record in records:
        if clipped is None:
            assert not {"grad_norm", "grad_norm_max", "clipped"} & set(record)
            continue
        assert record["clipped"] == clipped
        assert 0 < record["grad_norm"] <= record["grad_norm_max"] < math.inf


def test_a_resume_may_set_a_plateau_schedule(tmp_path: Path) -> None:
    """A run without decay, resumed with one (a stalled run takes a schedule without
    starting again): the learning rate decays from the resumed validations on."""
    first = _adding(tmp_path, epochs=2, lr_decay_factor=1.0)
    train(first, task=_WorseningAdding(first, torch.device("cpu")))
    later = _adding(tmp_path, epochs=4, lr_decay_factor=0.5, lr_decay_patience=1)
    result = train(later, resume=True, task=_WorseningAdding(later, torch.device("cpu")))
    assert result.epochs_done == 4
    lrs = [r["lr"] for r in _records(tmp_path / "run") if r["kind"] == "valid"]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.0025])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr_decay_factor"] == 0.5
