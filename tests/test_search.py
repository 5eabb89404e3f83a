"""Hyperparameter search (Optuna) on tiny adding-task studies: counts, crashes, outputs."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from microcircuits.cli import main
from microcircuits.config import load_config, read_preset_file
from microcircuits.search import (
    ParamRange,
    SearchSpec,
    load_search_space,
    make_pruner,
    run_search,
    write_study_outputs,
)
from microcircuits.train import NonFiniteLossError, train

TINY = {
    "hidden_size": 4, "seq_len": 6, "batch_size": 8, "steps_per_epoch": 3, "valid_size": 20,
    "test_size": 20, "epochs": 2, "tensorboard": False, "device": "cpu", "num_threads": 1,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_optuna():
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(previous)


def _load(out_dir: Path, name: str = "adding-lstm-4") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out_dir / 'study.db'}")


def _check_complete_numbering(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))  # none lost, none twice
    assert all(t.state.is_finished() for t in trials)
    return trials


# -- two workers on one SQLite study ----------------------------------------------------


@pytest.fixture(scope="module")
def two_worker_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    spec = SearchSpec("adding", n_trials=6, workers=2, out_dir=str(out), overrides=TINY, seed=10)
    return out, run_search(spec)


def test_two_workers_finish_exactly_the_trials_asked_for(two_worker_study) -> None:
    out, result = two_worker_study
    trials = _check_complete_numbering(_load(out), 6)
    assert sum(result.states.values()) == 6
    # Both workers ran trials, each in its own run directory with its own fixed seed.
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6
    for t in trials:
        assert t.user_attrs["seed"] == 10 + t.number
        config = json.loads((Path(t.user_attrs["run_dir"]) / "config.json").read_text())
        assert config["seed"] == 10 + t.number
        assert (
            config["lr"] == t.params["lr"]
            and config["update_dropout"] == t.params["update_dropout"]
        )
        if t.state == TrialState.COMPLETE:
            results = json.loads((Path(t.user_attrs["run_dir"]) / "results.json").read_text())
            assert results["best_valid"] == pytest.approx(t.value)
    assert {p.name for p in result.figures} >= {"optimization_history.png"}


def test_the_command_again_adds_only_the_missing_trials(two_worker_study, capsys) -> None:
    out, _ = two_worker_study
    settings = [f"--set={k}={v}" for k, v in TINY.items()]
    assert (
        main(["search", "adding", "--trials", "7", "--out", str(out), "--seed", "10", *settings])
        == 0
    )
    trials = _check_complete_numbering(_load(out), 7)
    printed = capsys.readouterr().out
    assert f"study 'adding-lstm-4' (sqlite:///{out / 'study.db'})" in printed
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) in printed
    assert f"preset: {out / 'best_preset.toml'}" in printed


def test_the_best_preset_trains(two_worker_study, tmp_path: Path) -> None:
    out, result = two_worker_study
    best = _load(out).best_trial
    preset = read_preset_file(out / "best_preset.toml")
    assert (preset.task, preset.cell, preset.size) == ("adding", "lstm", 4)
    for name, value in best.params.items():
        assert preset.config[name] == pytest.approx(value, rel=1e-12)
    assert "epochs" not in preset.config  # the search's budget is left out
    config = load_config("adding", preset=out / "best_preset.toml", overrides={
        "epochs": 1, "out_dir": str(tmp_path), "progress": False, "tensorboard": False,
    })  # fmt: skip
    assert config.lr == pytest.approx(best.params["lr"]) and config.hidden_size == 4
    assert train(config).steps_done == 3


def test_a_study_refuses_a_command_for_another_experiment(two_worker_study) -> None:
    out, _ = two_worker_study
    spec = SearchSpec("adding", n_trials=9, out_dir=str(out), overrides=TINY | {"seq_len": 7})
    with pytest.raises(ValueError, match=r"made for another experiment \(overrides"):
        run_search(spec)


# -- failures ---------------------------------------------------------------------------


def test_a_failing_trial_is_recorded_as_failed(tmp_path: Path, monkeypatch) -> None:
    import microcircuits.train as training

    calls = []

    def diverging_second_run(config, **kwargs):
        calls.append(config.seed)
        if len(calls) == 2:
            raise NonFiniteLossError("training loss became nan at step 2")
        return train(config, **kwargs)

    monkeypatch.setattr(training, "train", diverging_second_run)
    result = run_search(SearchSpec("adding", n_trials=3, out_dir=str(tmp_path), overrides=TINY))
    trials = _check_complete_numbering(_load(tmp_path), 3)
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    failed = trials[1]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["error"] == "NonFiniteLossError: training loss became nan at step 2"
    assert result.states.get("FAIL") == 1


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_killed_search_resumes_and_retries_the_dead_trial(tmp_path: Path) -> None:
    trials = TINY | {"steps_per_epoch": 100, "epochs": 3}
    # Checkpoints every 5 steps: each trial of the first command then lasts a second or
    # two, long enough to be caught running; a checkpoint interval may change on resume.
    settings = [f"--set={k}={v}" for k, v in (trials | {"checkpoint_every": 5}).items()]
    # Killed in its last trial: every slot is taken, one by a dead running trial.
    command = [
        sys.executable, "-m", "microcircuits", "-q", "search", "adding", "--trials", "2",
        "--out", str(tmp_path), "--heartbeat", "1", "--pruner", "none", *settings,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "trials" / "trial-0001" / "checkpoints" / "last.safetensors"
    try:
        _wait_for(lambda: checkpoint.exists() or process.poll() is not None, 120, "trial 1")
        process.send_signal(signal.SIGKILL)  # no chance to clean up: a crash
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    before = {t.number: t.state for t in _load(tmp_path).get_trials()}
    assert before == {0: TrialState.COMPLETE, 1: TrialState.RUNNING}, "trial 1 was not caught"

    # At once (no grace period to wait for): the dead process was of this machine.
    spec = SearchSpec(
        "adding", n_trials=2, out_dir=str(tmp_path), heartbeat_interval=60, pruner="none",
        overrides=trials | {"checkpoint_every": 50},
    )  # fmt: skip
    result = run_search(spec)
    trials = _check_complete_numbering(_load(tmp_path), 3)
    # The retry takes the dead trial's slot.
    assert [t.state for t in trials] == [
        TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE
    ]  # fmt: skip
    dead, retry = trials[1], trials[2]
    assert retry.system_attrs["failed_trial"] == 1
    assert retry.params == dead.params and retry.user_attrs["seed"] == dead.user_attrs["seed"] == 1
    # The retry continued the dead trial's training from its checkpoint.
    assert retry.user_attrs["run_dir"] == dead.user_attrs["run_dir"]
    meta = json.loads((Path(dead.user_attrs["run_dir"]) / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["at_step"] >= 5
    assert retry.user_attrs["steps"] == 300
    assert result.states == {"COMPLETE": 2, "FAIL": 1}


def test_a_killed_worker_is_retried_by_its_command(tmp_path: Path) -> None:
    trials = TINY | {"steps_per_epoch": 100, "epochs": 3, "checkpoint_every": 5}
    settings = [f"--set={k}={v}" for k, v in trials.items()]
    command = [
        sys.executable, "-m", "microcircuits", "-q", "search", "adding", "--trials", "3",
        "--workers", "2", "--out", str(tmp_path), "--pruner", "none", *settings,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    # The last trial: once it runs, every slot is taken.
    checkpoint = tmp_path / "trials" / "trial-0002" / "checkpoints" / "last.safetensors"
    killed = None
    try:
        _wait_for(lambda: checkpoint.exists() or process.poll() is not None, 180, "trial 2")
        last = next(t for t in _load(tmp_path).get_trials() if t.number == 2)
        if last.state == TrialState.RUNNING:
            killed = int(last.user_attrs["worker"].removeprefix("pid "))
            os.kill(killed, signal.SIGKILL)  # no chance to clean up: a crash
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert killed is not None, "trial 2 was not caught running"
    errors = stderr.decode()
    assert process.returncode == 0, errors[-3000:]
    assert "Traceback" not in errors and f"(pid {killed}) is gone" in errors
    trials = _check_complete_numbering(_load(tmp_path), 4)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    dead, retry = trials[2], trials[3]
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == 2
    assert retry.params == dead.params and retry.user_attrs["seed"] == dead.user_attrs["seed"]
    assert retry.user_attrs["run_dir"] == dead.user_attrs["run_dir"]
    meta = json.loads((Path(dead.user_attrs["run_dir"]) / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["at_step"] >= 5
    assert retry.user_attrs["steps"] == 300
    assert "3 complete, 1 fail" in stdout.decode()

    # The same command again: the study is done, nothing is added.
    again = subprocess.run(command, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert len(_load(tmp_path).get_trials()) == 4


# -- the space and the outputs ----------------------------------------------------------


def test_the_default_space_is_the_papers_five_hyperparameters() -> None:
    space = load_search_space("ptb", "sublstm")
    assert set(space.params) == {
        "input_dropout", "output_dropout", "update_dropout", "lr", "weight_decay"
    }  # fmt: skip
    assert space.params["lr"].log and space.params["weight_decay"].log
    assert not space.params["input_dropout"].log
    # The ranges hold every value of the paper's Table 2 row for subLSTM-650.
    row = load_config("ptb", "sublstm", 650)
    for name, span in space.params.items():
        assert span.low <= getattr(row, name) <= span.high, name
    assert load_search_space("smnist", "lstm").params["lr"] == ParamRange("lr", 1e-5, 1e-3, True)


def test_pruners_and_bad_settings() -> None:
    pruners = load_search_space("adding", "lstm").pruners
    assert isinstance(make_pruner("median", pruners), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("halving", pruners), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner("none", pruners), optuna.pruners.NopPruner)
    for bad, message in [
        ({"n_trials": 0}, "n_trials must be an int >= 1, got 0"),
        ({"workers": 1.5}, "workers must be an int >= 1, got 1.5"),
        ({"pruner": "hyperband"}, "pruner must be one of ['median', 'halving', 'none']"),
        ({"storage": "sqlite://"}, "storage must be a database that outlives a connection"),
        ({"cell": "gru"}, "unknown cell 'gru'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            SearchSpec("adding", **bad).resolved()


def test_space_files_layer_and_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(
        "[params.lr]\nlow = 0.001\nhigh = 0.1\nlog = true\n"
        "[params.input_dropout]\nlow = 0.0\nhigh = 0.5\n"
        "[cells.sublstm.input_dropout]\nsearch = false\n"
        "[cells.sublstm.lr]\nhigh = 0.01\n"
    )
    assert set(load_search_space("adding", "lstm", path).params) == {"lr", "input_dropout"}
    sub = load_search_space("adding", "sublstm", path).params
    assert sub == {"lr": ParamRange("lr", 0.001, 0.01, True)}
    path.write_text("[params.hidden_size]\nlow = 2\nhigh = 8\n")
    with pytest.raises(ValueError, match="'hidden_size' is not a float config field"):
        load_search_space("adding", "lstm", path)
    path.write_text("[params.lr]\nlow = 0.0\nhigh = 0.1\nlog = true\n")
    with pytest.raises(ValueError, match="the log range of 'lr' needs low > 0, got 0.0"):
        load_search_space("adding", "lstm", path)
    path.write_text("[params.lr]\nlow = 0.1\nhigh = 0.01\n")
    with pytest.raises(ValueError, match=r"needs finite low <= high, got \[0.1, 0.01\]"):
        load_search_space("adding", "lstm", path)


def test_a_space_that_makes_invalid_configs_is_refused_before_any_trial(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text("[params.update_dropout]\nlow = 0.5\nhigh = 1.0\n")
    spec = SearchSpec(
        "adding", n_trials=2, out_dir=str(tmp_path), overrides=TINY, space_file=str(path)
    )
    with pytest.raises(ValueError, match=r"high ends give an invalid config: update_dropout"):
        run_search(spec)
    assert not (tmp_path / "study.db").exists()


def test_outputs_with_a_single_completed_trial(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="tiny", direction="minimize")
    for key, value in {"task": "adding", "cell": "sublstm", "size": 4, "metric": "mse",
                       "overrides": {"hidden_size": "4", "epochs": "2"}}.items():  # fmt: skip
        study.set_user_attr(key, value)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    study.add_trial(optuna.create_trial(params={"lr": 0.0123}, distributions={"lr": lr}, value=0.5))
    result = write_study_outputs(study, tmp_path)
    assert [p.name for p in result.figures] == ["optimization_history.png"]  # no importances
    preset = read_preset_file(result.preset)
    assert preset.config == {"hidden_size": 4, "lr": 0.0123}
    assert (result.best_trial, result.best_value) == (0, 0.5)


# -- PostgreSQL -------------------------------------------------------------------------


def _postgres_unavailable() -> str | None:
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        return "PostgreSQL server programs (initdb, pg_ctl; Debian package postgresql) not found"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no PostgreSQL driver for SQLAlchemy (pip install 'psycopg[binary]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start the server as 'postgres'"
    return None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a free local port, for one test."""
    reason = _postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parents are private to us, the server's user
    # could not enter them.
    folder = Path(tempfile.mkdtemp(prefix="mc-pg-"))
    data = folder / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def run(*command: str) -> None:
        done = subprocess.run([*as_postgres, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.skip(f"could not start PostgreSQL ({command[0]}): {done.stderr.strip()[-500:]}")

    try:
        run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url: str, tmp_path: Path) -> None:
    spec = SearchSpec(
        "adding", n_trials=4, workers=2, out_dir=str(tmp_path), storage=postgres_url,
        overrides=TINY,
    )  # fmt: skip
    result = run_search(spec)
    study = optuna.load_study(study_name="adding-lstm-4", storage=postgres_url)
    trials = _check_complete_numbering(study, 4)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert sum(result.states.values()) == 4
    assert not (tmp_path / "study.db").exists()


def test_trial_states_counts_each_state():
    """The start-of-search log names the states behind "N of M taken", so a running trial
    (perhaps of a dead worker, retried when a worker starts) is visible."""
    from microcircuits.search_trials import trial_states

    study = optuna.create_study()
    assert trial_states(study) == "none yet"
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(value=value, state=TrialState.COMPLETE))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.ask()  # a running trial
    assert trial_states(study) == "2 complete, 1 pruned, 1 running"
