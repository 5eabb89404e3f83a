"""The canonical microcircuit in the experiments: the static-MNIST task, its models (CMC
node, CMC hierarchy, MLP baseline), the preset, training and resume, the report and the
cmc-phase figure.

Training runs on a small synthetic MNIST (class-coded blobs in place of the verified
files, which the task reads through ``load_mnist``), so these tests need no data set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from microcircuits import CMCHierarchy, CMCNode, cli
from microcircuits.analysis import make_figure
from microcircuits.analysis.trained import trained_figure
from microcircuits.checkpoint import load_checkpoint
from microcircuits.config import ExperimentConfig, load_config
from microcircuits.report import write_report
from microcircuits.tasks import MLPClassifier, make_task
from microcircuits.tasks import mnist as mnist_tasks
from microcircuits.train import RunResult, train

IMAGE_MODELS = ("cmc", "cmc_hierarchy", "mlp")


def _synthetic_mnist(split: str, data_dir=None, *, download: bool = True):
    """Digits as a bright 6x6 square whose place codes the class, plus noise."""
    count = {"train": 420, "test": 100}[split]
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(count) % 10
    pixels = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for digit in range(10):
        row, col = 2 + 10 * (digit // 4), 2 + 8 * (digit % 4)
        pixels[labels == digit, row : row + 6, col : col + 6] += 180
    return pixels.clamp(max=255).to(torch.uint8), labels


@pytest.fixture
def tiny_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    # the MNIST tasks read the files and cut the split in their shared base
    monkeypatch.setattr(mnist_tasks, "load_mnist", _synthetic_mnist)
    monkeypatch.setattr(mnist_tasks, "VALIDATION_SIZE", 100)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- names, presets, refusals -----------------------------------------------------------


@pytest.mark.parametrize("cell", IMAGE_MODELS)
def test_the_image_models_are_cells_of_mnist_only(cell: str) -> None:
    args = cli.build_parser().parse_args(["train", "mnist", "--cell", cell])
    assert load_config(args.task, args.cell).cell == cell
    for task in ("smnist", "adding", "ptb"):
        with pytest.raises(ValueError, match=rf"cell '{cell}' .* tasks \['mnist'\] only"):
            load_config(task, cell)


def test_the_recurrent_cells_are_refused_for_static_mnist_by_name(capsys) -> None:
    with pytest.raises(ValueError, match=r"cell 'lstm' \(LSTM\) has a model for the tasks"):
        load_config("mnist", "lstm")
    assert cli.main(["train", "mnist", "--cell", "elm"]) == 2
    err = capsys.readouterr().err
    assert "'elm' (ELM) has a model for the tasks" in err and "Traceback" not in err


def test_smnist_keeps_its_name_and_mnist_is_the_static_task() -> None:
    assert load_config("smnist", "lstm").task == "smnist"
    assert load_config("mnist", "cmc").task == "mnist"


def test_the_preset_builds_a_node_and_an_mlp_of_about_its_parameter_count(tiny_mnist) -> None:
    counts = {}
    for cell in IMAGE_MODELS:
        config = load_config("mnist", cell)
        model = make_task(config, "cpu").build_model()
        counts[cell] = _parameters(model)
        assert model(torch.rand(3, 28, 28)).shape == (3, 10)
    node = load_config("mnist", "cmc")
    assert isinstance(make_task(node, "cpu").build_model(), CMCNode)
    assert node.hidden_size == 64 and node.cmc_input_scale == 300.0
    assert load_config("mnist", "mlp").hidden_size == 96
    assert counts["cmc"] == 784 * 64 + 64 + 10 * 4 * 64 * 10 + 10 + 64 * 10  # 76,490
    assert abs(counts["mlp"] - counts["cmc"]) / counts["cmc"] < 0.01
    hierarchy = make_task(load_config("mnist", "cmc_hierarchy"), "cpu").build_model()
    assert isinstance(hierarchy, CMCHierarchy) and hierarchy.levels == (43, 43)
    links = 4 * 43 * 43  # forward sp->ss, sp->dp up; backward dp->sp, dp->ii down
    encoder, readout, dynamics = 784 * 43 + 43, 10 * 4 * 86 * 10 + 10, 86 * 10
    assert sum(p.numel() for p in hierarchy.parameters()) == encoder + readout + links + dynamics
    assert abs(encoder + readout + links + dynamics - counts["cmc"]) / counts["cmc"] < 0.01


@pytest.mark.parametrize(
    ("cell", "overrides", "message"),
    [
        ("cmc", {"forget_bias": "2"}, r"forget_bias=2.0: cell 'cmc' \(CMC node\) does not use"),
        ("mlp", {"cmc_input_scale": "5"}, r"cmc_input_scale=5.0: the cmc_\* fields shape"),
        ("cmc", {"elm_lambda": "2"}, r"elm_lambda=2.0: the elm_\* fields shape the ELM"),
        ("cmc", {"cmc_readout": "all"}, "an option of the hierarchy; use --cell cmc_hierarchy"),
        ("cmc", {"cmc_levels": "2"}, "an option of the hierarchy; use --cell cmc_hierarchy"),
        ("cmc_hierarchy", {"hidden_size": "6", "cmc_levels": "4"}, "must divide"),
        (
            "cmc_hierarchy",
            {"hidden_size": "4", "cmc_levels": "1"},
            r"cmc_levels must be an int >= 2",
        ),
        ("cmc", {"cmc_method": "dopri5"}, "adaptive cmc_method='dopri5' chooses its steps"),
        ("cmc", {"cmc_step_size": "none"}, "fixed-step: set cmc_step_size"),
        ("cmc", {"cmc_step_size": "0.5"}, r"cmc_step_size must be in \(0, 0.1\]"),
        ("cmc", {"cmc_method": "heun"}, r"cmc_method must be one of \['euler'"),
        ("cmc", {"cmc_input_scale": "0"}, r"cmc_input_scale must be in \(0, inf\], got 0.0"),
        ("cmc_hierarchy", {"hidden_size": "1"}, r"hidden_size \(the hierarchy's nodes\)"),
    ],
)
def test_bad_cmc_options_are_refused_by_name(cell: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("mnist", cell, overrides=overrides)


def test_the_config_knows_the_cmc_solvers() -> None:
    from microcircuits import config
    from microcircuits.cmc import models

    methods = models.FIXED_STEP_METHODS + models.ADAPTIVE_METHODS
    assert config._CMC_FIXED_STEP + config._CMC_ADAPTIVE == methods
    assert config._CMC_READOUTS == models.READOUTS
    adaptive = load_config(
        "mnist", "cmc", overrides={"cmc_method": "dopri5", "cmc_step_size": "none"}
    )
    assert adaptive.cmc_step_size is None


def test_the_input_scale_multiplies_the_drive() -> None:
    torch.manual_seed(0)
    plain = CMCNode(16, 3, num_columns=2)
    scaled = CMCNode(16, 3, num_columns=2, input_scale=30.0)
    scaled.load_state_dict(plain.state_dict())
    x = torch.rand(4, 16)
    torch.testing.assert_close(scaled._encode(x), 30.0 * plain._encode(x))
    with pytest.raises(ValueError, match="input_scale must be a finite number > 0"):
        CMCNode(16, 3, input_scale=0.0)


def test_a_trajectory_at_given_times_is_the_one_the_readout_sees() -> None:
    torch.manual_seed(0)
    node = CMCNode(16, 3, num_columns=2, integration_time=0.02, step_size=2e-3)
    x = torch.rand(4, 16)
    fine = node.trajectory(x, torch.linspace(0.0, 0.02, 21))  # every ms
    torch.testing.assert_close(fine[::2], node.trajectory(x))  # 0 and every 2 ms
    with pytest.raises(ValueError, match="start at 0"):
        node.trajectory(x, torch.tensor([0.01, 0.02]))
    with pytest.raises(ValueError, match="increase strictly"):
        node.trajectory(x, torch.tensor([0.0, 0.02, 0.01]))


# -- training ---------------------------------------------------------------------------


def _tiny(out: Path, name: str, cell: str, **overrides) -> ExperimentConfig:
    values = {
        "batch_size": 20, "eval_batch_size": 100, "epochs": 3, "steps_per_epoch": 4,
        "lr": 0.01, "log_every": 2, "checkpoint_every": 3, "progress": False,
        "tensorboard": False, "out_dir": str(out), "run_name": name, "early_stop_patience":
        "none", "lr_decay_factor": 0.5, "lr_decay_patience": 1,
    }  # fmt: skip
    if cell == "cmc":
        values |= {"hidden_size": 3, "cmc_integration_time": 0.02, "cmc_step_size": 0.004,
                   "cmc_num_readout_times": 2}  # fmt: skip
    elif cell == "cmc_hierarchy":
        values |= {"hidden_size": 4, "cmc_levels": 2, "cmc_integration_time": 0.02,
                   "cmc_step_size": 0.004, "cmc_num_readout_times": 2}  # fmt: skip
    else:
        values |= {"hidden_size": 8}
    return load_config("mnist", cell, overrides=values | overrides)


def _comparable(result: RunResult) -> dict:
    values = result.to_dict()
    for key in ("run_dir", "wall_time_s"):
        values.pop(key)
    return values


@pytest.mark.parametrize("cell", ["mlp", "cmc"])
def test_a_small_model_learns_the_synthetic_digits(tiny_mnist, tmp_path: Path, cell) -> None:
    """60 steps: both far above chance (10%) on the held-out synthetic test images."""
    config = _tiny(tmp_path, cell, cell, epochs=4, steps_per_epoch=15, lr=0.03)
    result = train(config)
    assert result.completed and result.steps_done == 60
    assert result.test > 0.5
    saved = json.loads((tmp_path / cell / "results.json").read_text())
    assert saved["parameters"] == _parameters(make_task(config, "cpu").build_model())


@pytest.mark.parametrize(("cell", "stop_at"), [("cmc", 5), ("cmc_hierarchy", 8), ("mlp", 6)])
def test_an_image_run_resumes_exactly(tiny_mnist, tmp_path: Path, cell: str, stop_at) -> None:
    whole = train(_tiny(tmp_path, "whole", cell))
    stopped = train(_tiny(tmp_path, "split", cell, max_steps=stop_at))
    assert stopped.stopped == "max_steps" and stopped.steps_done == stop_at
    resumed = train(_tiny(tmp_path, "split", cell), resume=True)

    assert _comparable(resumed) == _comparable(whole)
    last = {
        run: load_checkpoint(tmp_path / run / "checkpoints" / "last.safetensors")["model"]
        for run in ("whole", "split")
    }
    assert last["whole"].keys() == last["split"].keys()
    for key in last["whole"]:
        assert torch.equal(last["whole"][key], last["split"][key]), key


def test_report_lists_the_node_beside_the_mlp_with_parameters(tiny_mnist, tmp_path) -> None:
    runs = [train(_tiny(tmp_path, cell, cell)).run_dir for cell in ("mlp", "cmc")]
    report = write_report(runs, tmp_path / "report", plots=False)
    with (tmp_path / "report" / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["cell"] for row in table] == ["cmc", "mlp"]  # the registry's order
    assert all(int(row["parameters"]) > 0 for row in table)
    assert "CMC node" in report.text and "MLP" in report.text


# -- the phase-space figure -------------------------------------------------------------


def test_cmc_phase_writes_its_files_for_a_trained_node(tiny_mnist, tmp_path, capsys) -> None:
    run = train(_tiny(tmp_path, "node", "cmc")).run_dir
    out = tmp_path / "figures"
    args = ["figure", "cmc-phase", "--runs", str(run), "--out", str(out)]
    assert cli.main([*args, "--set", "points=11", "--set", "classes=(0, 5, 9)"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cmc-phase.csv", "cmc-phase.pdf", "cmc-phase.png",
    ]  # fmt: skip
    assert (out / "cmc-phase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "cmc-phase.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 11 and {row["label"] for row in rows} == {"0", "5", "9"}
    start = [row for row in rows if float(row["time_s"]) == 0.0]
    assert all(float(row[f"v_{p}"]) == 0.0 for row in start for p in ("ss", "sp", "ii", "dp"))
    # the trajectories differ between classes by the end of the window
    end = {row["label"]: float(row["v_ss"]) for row in rows if row["time_s"] == "0.02"}
    assert len(set(end.values())) == 3


def test_cmc_phase_refuses_other_runs_and_no_run(tiny_mnist, tmp_path: Path) -> None:
    mlp = train(_tiny(tmp_path, "mlp", "mlp")).run_dir
    with pytest.raises(ValueError, match=r"trained cell 'mlp' \(MLP\); give a run of --cell cmc"):
        trained_figure("cmc-phase", [mlp], tmp_path / "fig")
    tiny_lstm = {
        "hidden_size": 2, "seq_len": 4, "batch_size": 4, "steps_per_epoch": 1, "epochs": 1,
        "valid_size": 4, "test_size": 4, "progress": False, "tensorboard": False,
        "out_dir": str(tmp_path), "run_name": "lstm",
    }  # fmt: skip
    lstm = train(load_config("adding", "lstm", overrides=tiny_lstm)).run_dir
    with pytest.raises(ValueError, match=r"trained cell 'lstm' \(LSTM\)"):
        trained_figure("cmc-phase", [lstm], tmp_path / "fig")
    with pytest.raises(ValueError, match="give --runs RUN_DIR"):
        make_figure("cmc-phase", tmp_path / "fig")
    # and the gate analyses name why a CMC run cannot be measured
    with pytest.raises(ValueError, match="LSTM-family cells.*MLP"):
        trained_figure("gradients", [mlp], tmp_path / "fig")


def test_mlp_classifier_is_one_hidden_layer() -> None:
    model = MLPClassifier(784, 96, 10)
    assert [type(m).__name__ for m in model.children()] == ["Linear", "Linear"]
    assert _parameters(model) == 784 * 96 + 96 + 96 * 10 + 10
