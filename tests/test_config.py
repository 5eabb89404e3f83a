"""Experiment configs: the paper's presets, typed overrides, and validation messages."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from microcircuits import LSTM, FixSubLSTM, SubLSTM
from microcircuits.config import (
    TASKS,
    ExperimentConfig,
    available_sizes,
    list_presets,
    load_config,
    parse_assignments,
    preset_task,
    read_preset_file,
    write_preset_file,
)

# Rows copied by hand from the paper's Table 2 (PTB) and Table 3 (WikiText-2):
# (task, cell, size) -> (hidden units, input, output, update dropout, lr, weight decay).
PAPER_ROWS = {
    ("ptb", "lstm", 10): (10, 0.026, 0.047, 0.002, 0.01186, 0.000020),
    ("ptb", "sublstm", 200): (200, 0.337, 0.373, 0.439, 0.01534, 0.000076),
    ("ptb", "fix_sublstm", 200): (230, 0.394, 0.472, 0.161, 0.00382, 0.000066),
    ("ptb", "fix_sublstm", 650): (750, 0.662, 0.730, 0.530, 0.00347, 0.000136),
    ("ptb", "lstm", 650): (650, 0.607, 0.630, 0.083, 0.00568, 0.000145),
    ("wikitext2", "lstm", 10): (10, 0.015, 0.039, 0.0, 0.01235, 0.000013),
    ("wikitext2", "sublstm", 10): (10, 0.002, 0.030, 0.390, 0.00859, 0.0),
    ("wikitext2", "fix_sublstm", 100): (115, 0.130, 0.187, 0.0, 0.00541, 0.000172),
    ("wikitext2", "sublstm", 650): (650, 0.633, 0.567, 0.257, 0.00300, 0.000142),
}


@pytest.mark.parametrize(("task", "cell", "size"), sorted(PAPER_ROWS))
def test_language_presets_are_the_paper_rows(task: str, cell: str, size: int) -> None:
    hidden, input_dropout, output_dropout, update_dropout, lr, weight_decay = PAPER_ROWS[
        (task, cell, size)
    ]
    config = load_config(task, cell, size)
    assert config.hidden_size == hidden
    assert config.size == size
    assert config.input_dropout == input_dropout
    assert config.output_dropout == output_dropout
    assert config.update_dropout == update_dropout
    assert config.lr == lr
    assert config.weight_decay == weight_decay
    # Section 4.2: two layers, BPTT 35, batch 20, RMSProp with momentum (here Adam: a
    # bias-corrected RMSProp whose first moment is the momentum).
    assert (config.num_layers, config.bptt, config.batch_size) == (2, 35, 20)
    assert config.optimizer == "adam" and config.adam_beta1 > 0
    assert config.loss_sum_over_time


def test_fix_sublstm_sizes_are_parameter_matched_units() -> None:
    hidden = [load_config("ptb", "fix_sublstm", s).hidden_size for s in (10, 100, 200, 650)]
    assert hidden == [11, 115, 230, 750]
    assert load_config("wikitext2", "fix-sublstm", 200).hidden_size == 230  # alias spelling


def test_every_cell_has_every_paper_size() -> None:
    for task in ("ptb", "wikitext2"):
        for cell in ("lstm", "sublstm", "fix_sublstm"):
            assert available_sizes(task, cell) == [10, 100, 200, 650]


def test_missing_wikitext_weight_decay_is_recorded() -> None:
    config = load_config("wikitext2", "fix_sublstm", 10)
    assert config.weight_decay == 0.0
    assert "missing" in config.extra["note"]


def test_sequential_mnist_preset_follows_section_4_1() -> None:
    for task in ("smnist", "psmnist"):
        for cell in ("lstm", "sublstm", "fix_sublstm"):
            config = load_config(task, cell)
            assert config.task == task
            units = 115 if cell == "fix_sublstm" else 100  # parameter-matched, as below
            # "RMSProp with momentum (0.9) and lr 1e-4" as Adam (bias-corrected) with its
            # step: RMSProp's ~lr / (1 - 0.9) a step, Adam's ~lr
            assert (config.hidden_size, config.num_layers, config.lr) == (units, 1, 1e-3)
            assert config.optimizer == "adam" and config.adam_beta1 == 0.9
            assert config.recurrent_gain == 0.5  # one initialisation for the family
    assert load_config("smnist", "elm").lr == 1e-4  # the ELM keeps its run's step


def test_sequential_mnist_fix_sublstm_has_the_others_parameter_count() -> None:
    """Section 4's rule: fix-subLSTM gets the units that hold the parameter count constant."""

    def parameters(cell: str) -> int:
        config = load_config("smnist", cell, 100)
        module = {"lstm": LSTM, "sublstm": SubLSTM, "fix_sublstm": FixSubLSTM}[cell]
        rnn = module(1, config.hidden_size)
        readout = torch.nn.Linear(config.hidden_size, 10)
        return sum(p.numel() for m in (rnn, readout) for p in m.parameters())

    lstm, fix = parameters("lstm"), parameters("fix_sublstm")
    assert lstm == parameters("sublstm") == 42_210
    assert abs(fix - lstm) / lstm < 0.01  # 41,985: the nearest unit count
    assert load_config("smnist", "fix_sublstm", 64).hidden_size == 64  # other sizes as given


def test_cell_defaults_apply_to_one_cell_at_every_size_and_yield_to_overrides() -> None:
    # sMNIST: the LSTM's memory starts chrono-initialised, the subtractive cells' at 3
    memory = {
        c: (load_config("smnist", c, 100).forget_bias, load_config("smnist", c, 100).chrono_max)
        for c in ("lstm", "sublstm", "fix_sublstm")
    }
    assert memory == {"lstm": (1.0, 784), "sublstm": (3.0, None), "fix_sublstm": (3.0, None)}
    assert load_config("psmnist", "fix-subLSTM", 64).forget_bias == 3.0
    assert load_config("smnist", "sublstm", 100, {"forget_bias": "1"}).forget_bias == 1.0
    assert load_config("ptb", "sublstm", 100).forget_bias == 1.0  # only where a preset says so


def test_size_sets_hidden_units_where_there_is_no_table() -> None:
    assert load_config("adding", "sublstm", 24).hidden_size == 24
    assert load_config("smnist", "lstm", 64).hidden_size == 64


def test_unknown_size_names_the_table_sizes() -> None:
    with pytest.raises(ValueError, match=r"size must be one of \[10, 100, 200, 650\].*got 300"):
        load_config("ptb", "lstm", 300)


def test_unknown_task_and_cell() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        load_config("imagenet")
    with pytest.raises(ValueError, match="unknown cell 'gru'"):
        load_config("adding", "gru")


def test_text_overrides_take_the_field_type() -> None:
    overrides = parse_assignments(
        ["lr=0.01", "epochs=3", "clip_norm=none", "tensorboard=false", "max_steps=7"]
    )
    config = load_config("adding", "lstm", overrides=overrides)
    assert config.lr == 0.01 and isinstance(config.lr, float)
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.clip_norm is None
    assert config.tensorboard is False
    assert config.max_steps == 7


def test_overrides_win_over_the_table_row() -> None:
    config = load_config("ptb", "sublstm", 200, {"lr": "0.5", "hidden_size": 7})
    assert (config.lr, config.hidden_size, config.size) == (0.5, 7, 200)


def test_unknown_override_key_lists_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown --set key\(s\) \['learning_rate'\].*lr,"):
        parse_assignments(["learning_rate=0.1"])
    with pytest.raises(ValueError, match="expects key=value"):
        parse_assignments(["lr"])
    with pytest.raises(ValueError, match=r"unknown override key\(s\) \['foo'\]"):
        load_config("adding", overrides={"foo": 1})


def test_untypable_override_names_field_and_value() -> None:
    with pytest.raises(ValueError, match="epochs must be an int, got 'three'"):
        load_config("adding", overrides={"epochs": "three"})
    with pytest.raises(ValueError, match="amp must be true/false, got 'maybe'"):
        load_config("adding", overrides={"amp": "maybe"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 0, r"hidden_size must be an int >= 1, got 0"),
        ("epochs", -2, r"epochs must be an int >= 1, got -2"),
        ("lr", 0.0, r"lr must be in \(0, inf\], got 0.0"),
        ("lr", float("nan"), r"lr must be in \(0, inf\], got nan"),
        ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1.0"),
        ("input_dropout", 1.0, r"input_dropout must be in \[0, 1\), got 1.0"),
        ("update_dropout", -0.1, r"update_dropout must be in \[0, 1\), got -0.1"),
        ("weight_decay", -1e-5, r"weight_decay must be in \[0, inf\], got -1e-05"),
        ("clip_norm", 0.0, r"clip_norm must be in \(0, inf\], got 0.0"),
        ("lr_decay_factor", 1.5, r"lr_decay_factor must be in \(0, 1\], got 1.5"),
        ("optimizer", "adagrad", r"optimizer must be one of \['rmsprop', 'adam', 'sgd'\]"),
        ("device", "tpu", r"device must be one of \['auto', 'cpu', 'cuda'\], got 'tpu'"),
        ("seq_len", 1, r"seq_len must be an int >= 2, got 1"),
        ("steps_per_epoch", None, r"steps_per_epoch must be set for the adding task"),
        ("seed", -1, r"seed must be an int >= 0, got -1"),
        ("weight_init", "he", r"weight_init must be one of \['glorot_gates', 'glorot_fused'\]"),
        ("run_name", "a/b", r"run_name must be a plain name"),
    ],
)
def test_validation_names_field_value_and_range(field: str, value: object, message: str) -> None:
    config = load_config("adding")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_wrong_types_raise_type_error() -> None:
    config = load_config("adding")
    config.batch_size = 2.5
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got float \(2.5\)"):
        config.validate()
    config = load_config("adding")
    config.progress = "yes"
    with pytest.raises(TypeError, match="progress must be true or false"):
        config.validate()


def test_amp_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
        load_config("adding", overrides={"amp": "true", "device": "cpu"})


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        ("mnist", {"valid_size": 2000}, r"valid_size=2000: task 'mnist' does not read this "
         r"field \(read only: valid_size by adding, shd_adding\)"),
        ("smnist", {"seq_len": 3, "bptt": 5}, r"seq_len=3, bptt=5: task 'smnist' does not "
         r"read these fields \(read only: seq_len by adding, shd, shd_adding; bptt by ptb, "
         r"wikitext2\)"),
        ("ptb", {"test_size": 10}, r"test_size=10: task 'ptb' does not read"),
        ("shd", {"valid_size": 10}, r"valid_size=10: task 'shd' does not read"),
    ],
)  # fmt: skip
def test_fields_the_task_does_not_read_are_refused(
    task: str, overrides: dict, message: str
) -> None:
    """A value the task would silently ignore is an error, not a no-op."""
    with pytest.raises(ValueError, match=message):
        load_config(task, overrides=overrides)


def test_weight_init_reaches_the_recurrent_stack() -> None:
    """The config's weight_init builds the task's stack with it (bound of the fused
    kernel (400, 1 + 100): sqrt(6 / 501)); other models refuse it."""
    from microcircuits.tasks.models import make_recurrent_stack

    config = load_config("smnist", "sublstm", 100, {"weight_init": "glorot_fused"})
    stack = make_recurrent_stack(config, 1)
    assert stack.weight_init == "glorot_fused"
    assert stack.weight_hh_l0.abs().max().item() <= (6 / 501) ** 0.5
    assert (
        make_recurrent_stack(load_config("smnist", "sublstm", 100, {"recurrent_gain": 1}), 1)
        .weight_hh_l0.abs()
        .max()
        > 0.15
    )
    with pytest.raises(ValueError, match=r"weight_init='glorot_fused': cell 'elm'"):
        load_config("smnist", "elm", 100, {"weight_init": "glorot_fused"})


def test_recurrent_gain_reaches_the_recurrent_stack() -> None:
    """The config's recurrent_gain scales the stack's weight_hh (Glorot bound of a
    (100, 100) gate block sqrt(6 / 200), times the gain); other models refuse it."""
    from microcircuits.tasks.models import make_recurrent_stack

    config = load_config("smnist", "sublstm", 100, {"recurrent_gain": "0.25"})
    stack = make_recurrent_stack(config, 1)
    assert config.recurrent_gain == 0.25 and stack.recurrent_gain == 0.25
    assert stack.weight_hh_l0.abs().max().item() <= 0.25 * (6 / 200) ** 0.5
    with pytest.raises(ValueError, match=r"recurrent_gain must be a finite number > 0"):
        load_config("smnist", "lstm", 100, {"recurrent_gain": 0})
    with pytest.raises(ValueError, match=r"recurrent_gain=0.5: cell 'elm'"):
        load_config("smnist", "elm", 100, {"recurrent_gain": 0.5})


def test_chrono_max_reaches_the_recurrent_stack() -> None:
    from microcircuits.tasks.models import make_recurrent_stack

    config = load_config("smnist", "lstm", 100, {"chrono_max": 784})
    stack = make_recurrent_stack(config, 1)
    forget, inputs = stack.bias_ih_l0.detach().view(4, 100)[[1, 0]]
    assert stack.chrono_max == 784.0 and forget.std() > 0.5
    torch.testing.assert_close(inputs, -forget)
    with pytest.raises(ValueError, match=r"chrono_max must be None or a number of steps > 2"):
        load_config("smnist", "lstm", 100, {"chrono_max": 1})
    with pytest.raises(ValueError, match=r"chrono_max=784.0: cell 'elm'"):
        load_config("smnist", "elm", 100, {"chrono_max": 784})


def test_fields_the_task_reads_are_accepted() -> None:
    assert load_config("shd", overrides={"seq_len": 100}).seq_len == 100
    assert load_config("shd_adding", overrides={"valid_size": 8}).valid_size == 8
    assert load_config("wikitext2", overrides={"bptt": 70}).bptt == 70


def test_config_round_trips_through_json() -> None:
    config = load_config("wikitext2", "fix_sublstm", 10, {"seed": 3})
    again = ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bogus'\]"):
        ExperimentConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_every_task_has_a_valid_preset() -> None:
    for task in TASKS:
        assert load_config(task).task == task


@pytest.mark.parametrize("key", ["task", "cell", "size"])
def test_overrides_cannot_change_what_selects_the_preset(key: str) -> None:
    """``--set task=ptb`` on an adding run would train PTB with the adding preset."""
    value = {"task": "ptb", "cell": "sublstm", "size": 100}[key]
    with pytest.raises(ValueError, match=rf"{key} cannot be overridden .*{key}="):
        load_config("adding", "lstm", 32, {key: value})


# -- preset files: the format of the shipped presets ------------------------------------


def _shipped_text(task: str) -> str:
    return resources.files("microcircuits").joinpath("configs", f"{task}.toml").read_text("utf-8")


def _without_file_notes(config: ExperimentConfig) -> dict:
    values = config.to_dict()
    values["extra"] = {
        k: v for k, v in values["extra"].items() if k not in ("preset_file", "preset_source")
    }
    return values


@pytest.mark.parametrize("task", TASKS)
def test_a_copy_of_a_shipped_preset_is_a_preset_file(tmp_path: Path, task: str) -> None:
    """One format: every shipped preset, copied, reads as --preset and resolves the same
    for every cell it has and its sizes; the file names its task."""
    path = tmp_path / f"{task}.toml"
    path.write_text(_shipped_text(task))
    assert preset_task(path) == task
    [info] = [i for i in list_presets() if i.name == task]
    for cell, sizes in info.cells.items():
        for size in sizes or (None, 24):
            ours = load_config(None, cell, size, preset=path)
            assert _without_file_notes(ours) == load_config(task, cell, size).to_dict()
            assert ours.extra["preset_file"] == str(path)


def test_a_preset_file_refines_the_task_preset_table_by_table(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        "[preset]\n"
        'source = "my PTB"\n'
        'default_cell = "sublstm"\n'
        "[defaults]\n"
        'task = "ptb"\n'
        "epochs = 3\n"
        "weight_decay = 0.0\n"  # a [defaults] of the file beats the paper's row
        "[cell_defaults.sublstm]\n"
        "forget_bias = 2.0\n"
        "[hidden_size.fix_sublstm]\n"
        '"300" = 345\n'
        "[rows.sublstm.100]\n"
        "lr = 0.02\n"  # refines the paper's row: its other values stay
        "[rows.sublstm.300]\n"
        "lr = 0.004\n"
        "[rows.fix_sublstm.300]\n"
        "lr = 0.003\n"
    )
    config = load_config(None, preset=path)  # task and cell from the file, size the task's
    paper = load_config("ptb", "sublstm", 100)
    selected = (config.task, config.cell, config.size, config.hidden_size)
    assert selected == ("ptb", "sublstm", 100, 100)
    assert (config.epochs, config.weight_decay, config.forget_bias) == (3, 0.0, 2.0)
    assert config.lr == 0.02
    assert config.input_dropout == paper.input_dropout and config.num_layers == 2
    assert config.extra["preset_source"] == "my PTB" and config.extra["row"] == "sublstm 100"
    # a size that only the file has a row for; the file's parameter-matched units
    assert load_config("ptb", "sublstm", 300, preset=path).hidden_size == 300
    fix = load_config("ptb", "fix_sublstm", 300, preset=path)
    assert (fix.hidden_size, fix.lr, fix.forget_bias) == (345, 0.003, 1.0)
    with pytest.raises(ValueError, match=r"size must be one of \[10, 100, 200, 650\] .*'lstm'"):
        load_config("ptb", "lstm", 300, preset=path)  # no lstm row at 300 anywhere
    with pytest.raises(ValueError, match=r"one of \[10, 100, 200, 300, 650\] .* and my PTB\)"):
        load_config("ptb", "sublstm", 400, preset=path)
    with pytest.raises(ValueError, match="is for task 'ptb', not 'adding'"):
        load_config("adding", preset=path)


def test_the_size_sets_the_units_over_a_files_defaults(tmp_path: Path) -> None:
    """An edited copy of smnist.toml ([defaults] hidden_size = 100) with --size 50 trains
    50 units, as the shipped preset does; without --size, its default size."""
    path = tmp_path / "smnist.toml"
    path.write_text(_shipped_text("smnist").replace("lr = 1e-3 ", "lr = 3e-4 "))
    assert load_config(None, "lstm", 50, preset=path).hidden_size == 50
    config = load_config(None, "fix_sublstm", preset=path)
    assert (config.hidden_size, config.lr, config.forget_bias) == (115, 3e-4, 3.0)


def test_what_a_search_writes_reads_back(tmp_path: Path) -> None:
    path = write_preset_file(
        tmp_path / "best.toml", task="smnist", cell="sublstm", size=100,
        config={"lr": 0.002, "hidden_size": 50, "clip_norm": None}, source="a search",
        comment="best trial",
    )  # fmt: skip
    text = path.read_text()
    assert text.startswith("# best trial\n[preset]\n") and "\n[defaults]\ntask = " in text
    preset = read_preset_file(path)
    assert (preset.task, preset.cell, preset.size) == ("smnist", "sublstm", 100)
    assert preset.config == {"lr": 0.002, "hidden_size": 50, "clip_norm": "none"}
    config = load_config("smnist", preset=path)
    # hidden_size 50 at size 100 is kept as the units of that size
    assert (config.cell, config.size, config.hidden_size) == ("sublstm", 100, 50)
    assert (config.lr, config.clip_norm, config.forget_bias) == (0.002, None, 3.0)
    # the values apply to every cell (as compare --preset trains them)
    assert load_config("smnist", "lstm", preset=path).lr == 0.002


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[preset]\ntask = "adding"\n[config]\nlr = 0.1\n',
            r"unknown table\(s\) \['config'\].*now \[defaults\], with the task in it",
        ),
        ("[defaults]\nlr = 0.1\n", r"\[defaults\] task of .* must be one of .*got None"),
        ('[defaults]\ntask = "adding"\nspeed = 1\n', r"unknown \[defaults\] of .*\['speed'\]"),
        ('[defaults]\ntask = "adding"\ncell = "sublstm"\n', r"\['cell'\] in \[defaults\]"),
        ('[preset]\ncell = "lstm"\n[defaults]\ntask = "adding"\n', r"\['cell'\] in \[preset\]"),
        ('[defaults]\ntask = "ptb"\n[rows.gru.10]\nlr = 0.1\n', r"\[rows.gru\] of .*'gru'"),
        ('[defaults]\ntask = "ptb"\n[rows.lstm.big]\nlr = 0.1\n', r"sizes must be .*'big'"),
        ('extends = "cifar"\n', r"extends of .* must name a shipped preset.*'cifar'"),
        ("lr = ", "is not valid TOML"),
    ],
)
def test_bad_preset_files_name_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(None, preset=path)


def test_a_run_config_is_rerun_as_it_was(tmp_path: Path) -> None:
    saved = load_config("ptb", "fix_sublstm", 200, {"seed": 4, "data_dir": "/nowhere/data"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved.to_dict()))
    again = load_config(None, preset=path)
    assert again.data_dir is None  # another machine's data folder: the default instead
    assert again == saved.replace(data_dir=None)
    assert again.extra == saved.extra  # notes too: a resume compares them
    changed = load_config("ptb", "fix-subLSTM", 200, {"epochs": "2"}, preset=path)
    assert changed == saved.replace(data_dir=None, epochs=2)
    with pytest.raises(ValueError, match=r"cell 'lstm' differs from the cell 'fix_sublstm'"):
        load_config("ptb", "lstm", preset=path)
    with pytest.raises(ValueError, match=r"size 100 differs from the size 200"):
        load_config(None, size=100, preset=path)
    with pytest.raises(ValueError, match="lr must be a number, got 'x'"):  # typed as ever
        load_config(None, overrides={"lr": "x"}, preset=path)
    with pytest.raises(ValueError, match="task cannot be overridden"):
        load_config(None, overrides={"task": "adding"}, preset=path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object of config fields"):
        load_config(None, preset=tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(None, preset=tmp_path / "absent.json")


def test_presets_are_listed_with_their_cells_and_sizes() -> None:
    infos = {info.name: info for info in list_presets()}
    assert list(infos) == list(TASKS)
    ptb = infos["ptb"]
    assert (ptb.default_cell, ptb.default_size, ptb.source) == (
        "lstm", 100, "Table 2 of Costa et al. 2017",
    )  # fmt: skip
    assert ptb.cells == {c: (10, 100, 200, 650) for c in ("lstm", "sublstm", "fix_sublstm")}
    assert ptb.matched == {"fix_sublstm": {10: 11, 100: 115, 200: 230, 650: 750}}
    assert infos["mnist"].default_cell == "cmc" and "mlp" in infos["mnist"].cells
    assert infos["smnist"].matched["fix_sublstm"] == {100: 115}
    assert infos["adding"].cells["sublstm"] == () and infos["adding"].hidden_size == 32
