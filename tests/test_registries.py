"""Every layer resolves cells through ``cells.CELLS`` and tasks through ``TASK_KINDS``:
each name and alias the tables hold is accepted, with the same meaning, everywhere."""

from __future__ import annotations

import functools

import pytest

from microcircuits import cli, make_cell, make_rnn, tasks
from microcircuits.cells import CELLS, cell_kind
from microcircuits.config import ExperimentConfig, load_config
from microcircuits.model_registry import LSTM_FAMILY, MODEL_FAMILIES, MODELS, model_kind
from microcircuits.task_registry import TASK_KINDS, task_kind


def _spellings(kind) -> list[str]:
    return [kind.name, f" {kind.name.upper()} ", *kind.aliases]


@pytest.mark.parametrize("name", list(CELLS))
def test_every_cell_spelling_means_the_same_cell_everywhere(name):
    kind = CELLS[name]
    for spelling in _spellings(kind):
        assert cell_kind(spelling) is kind
        assert ExperimentConfig(cell=spelling, steps_per_epoch=1).validate().cell == name
        assert load_config("adding", spelling, 8).cell == name
        assert cli._parse_cells(f"{spelling},") == [name]
        assert make_rnn(spelling, 2, 3).cell is kind
        assert make_cell(spelling, 2, 3).cell is kind


def test_an_unknown_cell_is_refused_naming_every_cell():
    with pytest.raises(ValueError, match="'lstm', 'sublstm', 'fix_sublstm'"):
        ExperimentConfig(cell="gru").validate()
    with pytest.raises(ValueError, match="gru"):
        cli._parse_cells("lstm,gru")


def test_the_cli_offers_every_cell_and_task():
    parser = cli.build_parser()
    args = parser.parse_args(["compare", "adding"])
    assert cli._parse_cells(args.cells) == list(CELLS)
    for task in TASK_KINDS:
        assert parser.parse_args(["train", task]).task == task


def test_kernel_codes_are_distinct():
    """The compiled kernels tell the cells apart by ``code`` alone."""
    assert len({kind.code for kind in CELLS.values()}) == len(CELLS)


@pytest.mark.parametrize("name", list(TASK_KINDS))
def test_every_task_spelling_means_the_same_task_everywhere(name):
    kind = TASK_KINDS[name]
    for spelling in _spellings(kind):
        assert task_kind(spelling) is kind
        assert load_config(spelling).task == name
        cell = load_config(name).cell  # the task's default model (lstm; mnist: cmc)
        config = ExperimentConfig(task=spelling, cell=cell, steps_per_epoch=1)
        assert config.validate().task == name


@pytest.mark.parametrize("name", list(TASK_KINDS))
def test_every_task_has_a_class_that_reports_the_registered_metric(name):
    build = tasks._TASK_CLASSES[name]
    task_class = build.func if isinstance(build, functools.partial) else build
    kind = TASK_KINDS[name]
    assert (task_class.metric, task_class.higher_is_better) == (
        kind.metric,
        kind.higher_is_better,
    )


def test_an_unknown_task_is_refused_naming_every_task():
    with pytest.raises(
        ValueError,
        match=r"\['adding', 'smnist', 'psmnist', 'mnist', 'ptb', 'wikitext2', "
        r"'shd', 'shd_adding'\]",
    ):
        task_kind("cifar")
    with pytest.raises(ValueError, match="task must be one of"):
        load_config("cifar")
    with pytest.raises(TypeError, match="str"):
        task_kind(3)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_spelling_means_the_same_model_in_config_and_cli(name):
    kind = MODELS[name]
    task = "adding" if kind.tasks is None else kind.tasks[0]
    for spelling in _spellings(kind):
        assert model_kind(spelling) is kind
        assert load_config(task, spelling).cell == name
        assert cli._parse_cells(f"{spelling},") == [name]
    assert name in cli.CELL_NAMES


def test_the_lstm_family_models_are_the_cells_and_every_family_has_a_builder():
    assert [n for n, k in MODELS.items() if k.family == LSTM_FAMILY] == list(CELLS)
    assert {k.family for k in MODELS.values()} == set(MODEL_FAMILIES)
    builders = {**tasks.models.LAST_STEP_BUILDERS, **tasks.models.IMAGE_BUILDERS}
    assert set(builders) == set(MODEL_FAMILIES)
    # each family builds through one table, the one of the tasks it supports
    image_families = {k.family for k in MODELS.values() if k.tasks == ("mnist",)}
    assert set(tasks.models.IMAGE_BUILDERS) == image_families
    assert not image_families & set(tasks.models.LAST_STEP_BUILDERS)
