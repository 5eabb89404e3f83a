"""Presets: the TOML files that set an experiment's values, and resolving a run's config.

One format for the presets shipped inside the package (``microcircuits/configs/<task>.toml``)
and a preset file of your own (``--preset FILE``; see :func:`read_preset_file`); both are
checked by one reader, listed by :func:`list_presets`, written by :func:`write_preset_file`
and layered by :func:`load_config`, which resolves a run's config from the task's preset,
its table row, a preset file (or a run's ``config.json``) and overrides (see
:mod:`microcircuits.config` for the layering). Every name here is also importable from
:mod:`microcircuits.config`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .model_registry import MODELS, model_kind

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has the same parser as the tomli package
    import tomli as tomllib

__all__ = [
    "PresetFile",
    "PresetInfo",
    "available_sizes",
    "list_presets",
    "load_config",
    "preset_table",
    "preset_task",
    "read_preset_file",
    "write_preset_file",
]

# -- presets ----------------------------------------------------------------------------
#
# One format for the shipped presets (configs/<task>.toml) and the files of --preset:
# see read_preset_file. Both are read by _check_preset, layered by load_config.

_PRESET_TABLES = ("extends", "preset", "defaults", "cell_defaults", "hidden_size", "rows")
_PRESET_HEADER = ("source", "default_cell", "default_size")
_SELECTORS = ("task", "cell", "size")  # choose the preset and its row; not config values
_PRESET_FORMAT = (
    "[preset] (source, default_cell, default_size), [defaults] (task = ... and config "
    "fields), optional [cell_defaults.<cell>], [hidden_size.<cell>] and "
    "[rows.<cell>.<size>] tables, as in the shipped presets (`microcircuits presets ptb` "
    "prints one)"
)


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` refined by ``child`` key by key, nested tables merged (a new dict)."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table, got {type(value).__name__} ({value!r})")
    return dict(value)


def _size_key(key: object, where: str) -> str:
    """A table key that is a size (``"100"``), checked, as the canonical text."""
    try:
        size = int(str(key))
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{where}: sizes must be positive integers, got {key!r}")
    return str(size)


def _config_table(value: object, where: str, *, extra_keys: Iterable[str] = ()) -> dict:
    """A table of config fields (``task``/``cell``/``size`` refused: they select)."""
    values = _table(value, where)
    allowed = {k: v for k, v in values.items() if k not in set(extra_keys)}
    _check_known_keys(allowed, where)
    fixed = sorted(set(allowed) & set(_SELECTORS))
    if fixed:
        raise ValueError(
            f"{fixed} in {where}: task, cell and size select the preset and its row; give "
            "the task in [defaults], the cell and size as [preset] default_cell/default_size "
            "or as tables ([rows.<cell>.<size>])"
        )
    return values


def _cell_tables(value: object, name: str, where: str) -> dict[str, dict[str, Any]]:
    """The ``[name.<cell>]`` tables of a preset as ``{cell: table}``, cell names canonical."""
    tables = {}
    for cell, table in _table(value, f"[{name}] of {where}").items():
        try:
            canonical = model_kind(cell).name
        except ValueError as error:
            raise ValueError(f"[{name}.{cell}] of {where}: {error}") from None
        tables[canonical] = _table(table, f"[{name}.{cell}] of {where}")
    return tables


def _check_preset(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a preset's tables (``extends`` already resolved); return them with canonical
    cell names and sizes, the task in ``[defaults]`` canonical.

    Raises:
        ValueError: an unknown table or key, a bad cell or size, or no task (named).
    """
    unknown = sorted(set(table) - set(_PRESET_TABLES))
    if unknown:
        hint = ""
        if "config" in table:
            hint = (
                " (the [config] table of earlier preset files is now [defaults], with the "
                "task in it; [preset] cell/size are now default_cell/default_size)"
            )
        raise ValueError(
            f"unknown table(s) {unknown} in {where}{hint}; a preset holds {_PRESET_FORMAT}"
        )
    checked: dict[str, Any] = {}
    header = _table(table.get("preset", {}), f"[preset] of {where}")
    bad = sorted(set(header) - set(_PRESET_HEADER))
    if bad:
        raise ValueError(
            f"unknown key(s) {bad} in [preset] of {where}; allowed: {list(_PRESET_HEADER)} "
            "(the task goes in [defaults])"
        )
    if header.get("default_cell") is not None:
        header["default_cell"] = model_kind(header["default_cell"]).name
    if header.get("default_size") is not None:
        _positive_int(f"[preset] default_size of {where}", header["default_size"])
    checked["preset"] = header
    defaults = _config_table(
        table.get("defaults", {}), f"[defaults] of {where}", extra_keys=("task",)
    )
    task = defaults.get("task")
    task = _canonical_task(task)
    if task not in TASKS:
        raise ValueError(
            f"[defaults] task of {where} must be one of {list(TASKS)}, got {task!r}; a preset "
            f"holds {_PRESET_FORMAT}"
        )
    defaults["task"] = task
    checked["defaults"] = defaults
    cell_defaults = _cell_tables(table.get("cell_defaults", {}), "cell_defaults", where)
    checked["cell_defaults"] = {
        cell: _config_table(values, f"[cell_defaults.{cell}] of {where}")
        for cell, values in cell_defaults.items()
    }
    matched: dict[str, dict[str, int]] = {}
    for cell, sizes in _cell_tables(table.get("hidden_size", {}), "hidden_size", where).items():
        where_cell = f"[hidden_size.{cell}] of {where}"
        matched[cell] = {}
        for size, units in sizes.items():
            _positive_int(f"{where_cell}, size {size}", units)
            matched[cell][_size_key(size, where_cell)] = units
    checked["hidden_size"] = matched
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for cell, sizes in _cell_tables(table.get("rows", {}), "rows", where).items():
        rows[cell] = {}
        for size, row in sizes.items():
            key = _size_key(size, f"[rows.{cell}] of {where}")
            rows[cell][key] = _config_table(
                row, f"[rows.{cell}.{size}] of {where}", extra_keys=("note",)
            )
    checked["rows"] = rows
    return checked


def _extended(table: dict[str, Any], where: str) -> dict[str, Any]:
    """``table`` on top of the shipped preset it ``extends`` (if any), key by key."""
    parent = table.pop("extends", None)
    if parent is None:
        return table
    name = _canonical_task(parent)
    if name not in TASKS:
        raise ValueError(
            f"extends of {where} must name a shipped preset, one of {list(TASKS)}, got {parent!r}"
        )
    return _merge(_shipped_preset(name), table)


@functools.cache
def _shipped_preset(name: str) -> dict[str, Any]:
    """The checked tables of ``configs/<name>.toml`` (cached: do not change them)."""
    where = f"preset {name}.toml"
    text = resources.files("microcircuits").joinpath("configs", f"{name}.toml").read_text("utf-8")
    table = _check_preset(_extended(tomllib.loads(text), where), where)
    if table["defaults"]["task"] != name:
        raise ValueError(f"{where} is for task {table['defaults']['task']!r}, not {name!r}")
    return table


def preset_table(task: str) -> dict[str, Any]:
    """The shipped preset of ``task``, checked (``[preset]``, ``[defaults]``,
    ``[cell_defaults]``, ``[hidden_size]``, ``[rows]``; cell names canonical)."""
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    return copy.deepcopy(_shipped_preset(task))


def available_sizes(task: str, cell: str) -> list[int]:
    """Sizes that have a row in ``task``'s preset for ``cell`` (empty: any size allowed)."""
    rows = preset_table(task)["rows"].get(model_kind(cell).name, {})
    return sorted(int(size) for size in rows)


@dataclass(frozen=True)
class PresetInfo:
    """One shipped preset as ``microcircuits presets`` lists it.

    Attributes:
        name: the preset's (and its task's) name.
        source: where its values come from, as the file says.
        default_cell, default_size: what ``train NAME`` trains without ``--cell``/``--size``
            (``default_size``: the nominal size), with ``hidden_size`` units.
        cells: every model the task has a head for -> the sizes of its rows (empty: any
            size; the size is then the hidden size).
        matched: cell -> {size: units} where the units are not the size (the preset
            matches a cell's parameter count to the LSTM's at that size).
        path: the TOML file.
    """

    name: str
    source: str
    default_cell: str
    default_size: int
    hidden_size: int
    cells: dict[str, tuple[int, ...]]
    matched: dict[str, dict[int, int]]
    path: str


def list_presets() -> list[PresetInfo]:
    """The shipped presets, in the order of :data:`TASKS`."""
    infos = []
    for name in TASKS:
        table = preset_table(name)
        default = load_config(name)
        cells = {
            cell: tuple(sorted(int(s) for s in table["rows"].get(cell, {})))
            for cell, kind in MODELS.items()
            if kind.tasks is None or name in kind.tasks
        }
        matched: dict[str, dict[int, int]] = {}
        for cell, sizes in table["hidden_size"].items():
            matched[cell] = {int(size): units for size, units in sizes.items()}
        for cell, rows in table["rows"].items():
            for size, row in rows.items():
                if row.get("hidden_size", int(size)) != int(size):
                    matched.setdefault(cell, {})[int(size)] = row["hidden_size"]
        path = resources.files("microcircuits").joinpath("configs", f"{name}.toml")
        infos.append(
            PresetInfo(
                name=name,
                source=table["preset"].get("source", ""),
                default_cell=default.cell,
                default_size=default.nominal_size,
                hidden_size=default.hidden_size,
                cells=cells,
                matched=matched,
                path=str(path),
            )
        )
    return infos


# -- preset files -----------------------------------------------------------------------


@dataclass(frozen=True)
class PresetFile:
    """A preset file's contents (see :func:`read_preset_file`).

    Attributes:
        task: the task it is for (``[defaults] task``).
        cell: the cell it was made for (``[preset] default_cell``; ``None``: any).
        size: the nominal size it was made for (``[preset] default_size``; ``None``: any).
        config: its ``[defaults]`` config fields but the task (TOML-typed).
        source: where the values come from, as the file says.
        tables: all its checked tables (``config`` is ``tables["defaults"]`` less the
            task), layered after the task's shipped preset by :func:`load_config`.
        path: the file it was read from.
    """

    task: str
    cell: str | None
    size: int | None
    config: dict[str, Any]
    source: str | None = None
    tables: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def read_preset_file(path: str | os.PathLike[str]) -> PresetFile:
    """Read a preset file: a TOML file in the format of the shipped presets::

        extends = "ptb"           # optional: start from this shipped preset, key by key

        [preset]                  # optional
        source = "..."            # where the values come from (a note)
        default_cell = "sublstm"  # the cell of runs that give no --cell
        default_size = 100        # their size (no --size)

        [defaults]                # config fields of every run of the preset
        task = "ptb"              # required (here or through extends)
        lr = 0.0118
        input_dropout = 0.39

        [cell_defaults.sublstm]   # optional: one cell's fields at every size
        forget_bias = 3.0

        [hidden_size.fix_sublstm] # optional: a cell's units at a size ("size" = units),
        "100" = 115               # e.g. parameter-matched to the LSTM's

        [rows.sublstm.100]        # optional: one cell's fields at one size (the paper's
        lr = 0.01186              # table rows); a cell with rows takes only their sizes
        note = "..."              # a row may carry a note (saved with the run)

    Its values are layered after the task's shipped preset, each preset in the order
    ``[defaults] < [cell_defaults] < [rows]`` (see :func:`load_config`); the size sets
    ``hidden_size`` (a row's or ``[hidden_size.<cell>]``'s units, else the size itself).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not TOML, or an unknown table or key, a bad cell or size, or no task
            (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        hint = " (a run's config.json must end in .json)" if path.suffix != ".toml" else ""
        raise ValueError(f"preset file {path} is not valid TOML{hint}: {error}") from None
    where = f"preset file {path}"
    tables = _check_preset(_extended(table, where), where)
    header = tables["preset"]
    config = {k: v for k, v in tables["defaults"].items() if k != "task"}
    return PresetFile(
        task=tables["defaults"]["task"],
        cell=header.get("default_cell"),
        size=header.get("default_size"),
        config=config,
        source=header.get("source"),
        tables=tables,
        path=str(path),
    )


def _is_run_config(preset: object) -> bool:
    """Whether ``preset`` names a run's ``config.json`` (any ``.json`` file)."""
    return isinstance(preset, (str, os.PathLike)) and Path(preset).suffix.lower() == ".json"


def _read_run_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """A run's saved config (``config.json``), checked field by field, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"run config {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "task" not in values:
        raise ValueError(
            f"run config {path} must be a JSON object of config fields with a task (a run's "
            f"config.json), got {type(values).__name__}"
        )
    _check_known_keys(values, f"run config {path}")
    return ExperimentConfig.from_dict(values)


def preset_task(preset: str | os.PathLike[str] | PresetFile) -> str:
    """The task a preset file (or a run's ``config.json``) is for."""
    if isinstance(preset, PresetFile):
        return preset.task
    if _is_run_config(preset):
        return _read_run_config(preset).task
    return read_preset_file(preset).task


def _toml_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if value is None:
        return '"none"'  # read back as None by the Optional fields
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"{name}: cannot write a {type(value).__name__} into a preset file")


def write_preset_file(
    path: str | os.PathLike[str],
    *,
    task: str,
    config: Mapping[str, Any],
    cell: str | None = None,
    size: int | None = None,
    source: str | None = None,
    comment: str = "",
) -> Path:
    """Write a preset file that :func:`read_preset_file` and ``--preset`` read.

    Args:
        path: the file to write (its folder is created).
        task: ``[defaults] task``.
        config: config field -> value (bool, int, float, str or None), written as
            ``[defaults]``: they apply to every cell and size, after the task's rows.
        cell, size: ``[preset] default_cell`` and ``default_size``. A ``hidden_size`` in
            ``config`` other than ``size`` is also written as ``[hidden_size.<cell>]``, so
            that it is the units at that size (the size would otherwise set them).
        source: ``[preset] source``.
        comment: text written at the top as ``#`` comment lines.

    Returns:
        The path written.
    """
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    values = dict(config)
    _check_known_keys(values, "config")
    cell = None if cell is None else model_kind(cell).name
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    header = {"source": source, "default_cell": cell, "default_size": size}
    lines.append("[preset]")
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in header.items() if v is not None]
    lines += ["", "[defaults]", f"task = {_toml_value('task', task)}"]
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in values.items()]
    units = values.get("hidden_size")
    if cell is not None and size is not None and units is not None and units != size:
        lines += ["", f"[hidden_size.{cell}]", f'"{size}" = {_toml_value("hidden_size", units)}']
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temp, path)
    read_preset_file(path)  # what is written must read back
    return path


# -- resolving a run's config -----------------------------------------------------------


def _refuse_selector_overrides(overrides: Mapping[str, Any]) -> None:
    # task, cell and size choose the preset and its row: overriding them afterwards would
    # train one experiment with another's hyperparameters
    for key, argument in (("task", "the task"), ("cell", "--cell"), ("size", "--size")):
        if key in overrides:
            raise ValueError(
                f"{key} cannot be overridden (got {key}={overrides[key]!r}): it selects the "
                f"preset and its row; give it as {argument} instead"
            )


def _rerun_config(
    path: str | os.PathLike[str],
    task: str | None,
    cell: str | None,
    size: int | None,
    overrides: Mapping[str, Any],
) -> ExperimentConfig:
    """A run's ``config.json`` as it was, ``overrides`` applied (see :func:`load_config`)."""
    saved = _read_run_config(path)
    given = {
        "task": None if task is None else _canonical_task(task),
        "cell": None if cell is None else model_kind(cell).name,
        "size": size,
    }
    have = {"task": saved.task, "cell": saved.cell, "size": saved.nominal_size}
    for name, value in given.items():
        if value is not None and value != have[name]:
            raise ValueError(
                f"{name} {value!r} differs from the {name} {have[name]!r} of run config {path}: "
                f"a run's config is rerun as it was (drop the {name}, or start from a preset "
                "TOML to change it)"
            )
    if saved.data_dir is not None and not Path(saved.data_dir).is_dir():
        saved = saved.replace(data_dir=None)  # moved, or another machine's: the default
    fields = config_fields()
    changes = {name: _coerce(name, fields[name], value) for name, value in overrides.items()}
    return saved.replace(**changes).validate()


def load_config(
    task: str | None,
    cell: str | None = None,
    size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    preset: str | os.PathLike[str] | PresetFile | None = None,
) -> ExperimentConfig:
    """Resolve the config of one run from the task's preset, its table row and overrides.

    Args:
        task: one of :data:`TASKS`, or an alias such as ``wt2``
            (:data:`~microcircuits.task_registry.TASK_KINDS`); ``None``: the task of
            ``preset``.
        cell: ``"lstm"``, ``"sublstm"``, ``"fix_sublstm"``, ``"elm"``, ``"branch_elm"``,
            ``"cmc"``, ``"cmc_hierarchy"`` or ``"mlp"``, or an alias such as ``fix-sublstm``
            (:data:`~microcircuits.model_registry.MODELS`).
            ``None``: the preset file's ``default_cell``, else the task preset's
            (``"cmc"`` for ``mnist``), else ``"lstm"``.
        size: the paper's nominal size. For PTB and WikiText-2 it selects the row of
            Table 2/3 (10, 100, 200 or 650; fix-subLSTM then gets the parameter-matched
            11/115/230/750 units); elsewhere it sets ``hidden_size``. ``None``: the
            preset file's ``default_size``, else the task preset's.
        overrides: field -> value, applied last; text values (from ``--set``) are
            converted to the field's type.
        preset: a preset file (path, or as read by :func:`read_preset_file`) layered
            after the task's shipped preset, before ``overrides``; or a run's
            ``config.json`` (a ``.json`` path), which is taken as it is (``task``,
            ``cell`` and ``size``, if given, must be its own), ``overrides`` applied.

    Returns:
        The validated config.

    Raises:
        ValueError: unknown task, cell or override key, a size the table lacks, a
            preset file for another task, or an invalid value (naming field, value and
            allowed range).
        FileNotFoundError: no such preset file.
    """
    overrides = dict(overrides or {})
    _check_known_keys(overrides, "override")
    _refuse_selector_overrides(overrides)
    if _is_run_config(preset):
        return _rerun_config(preset, task, cell, size, overrides)
    user = None
    if preset is not None:
        user = preset if isinstance(preset, PresetFile) else read_preset_file(preset)
        if task is not None and _canonical_task(task) != user.task:
            where = user.path or "preset file"
            raise ValueError(f"{where} is for task {user.task!r}, not {task!r}")
        task = user.task
        cell = cell if cell is not None else user.cell
        size = size if size is not None else user.size
    if task is None:
        raise ValueError(f"a task is needed, one of {list(TASKS)} (or a preset file naming one)")
    task = _canonical_task(task)
    _choice("task", task, TASKS)
    layers = [preset_table(task)]
    if user is not None:
        layers.append(user.tables)
    header: dict[str, Any] = {}
    for layer in layers:
        header.update(layer["preset"])
    kind = model_kind(cell if cell is not None else header.get("default_cell", "lstm"))
    _check_model_task(kind, task)
    if size is None:
        size = header.get("default_size")
    if size is not None:
        _positive_int("size", size)
    row_sizes = sorted({int(s) for layer in layers for s in layer["rows"].get(kind.name, {})})
    if row_sizes and size not in row_sizes:
        sources = " and ".join(
            dict.fromkeys(
                layer["preset"].get("source", "the preset")
                for layer in layers
                if layer["rows"].get(kind.name)
            )
        )
        raise ValueError(
            f"size must be one of {row_sizes} for {task} with cell {kind.name!r} (the rows of "
            f"{sources}), got {size}"
        )

    values: dict[str, Any] = {"task": task, "cell": kind.name}
    extra: dict[str, Any] = {"preset": task}
    notes = []
    for layer in layers:
        values.update(layer["defaults"])
        values.update(layer["cell_defaults"].get(kind.name, {}))
        row = dict(layer["rows"].get(kind.name, {}).get(str(size), {}))
        notes.append(row.pop("note", None))
        values.update(row)
    if size is not None:
        # the size is the hidden size, except where a row gives the units or the preset
        # matches a cell's parameter count to the LSTM's at that size
        # ([hidden_size.<cell>] "<size>" = units)
        values["size"] = size
        units, how = size, None
        for layer in layers:
            matched = layer["hidden_size"].get(kind.name, {})
            if str(size) in matched:
                units, how = matched[str(size)], "matched"
            row = layer["rows"].get(kind.name, {}).get(str(size))
            if row is not None:
                units, how = row.get("hidden_size", units), "row"
        values["hidden_size"] = units
        if how == "row":
            extra["row"] = f"{kind.name} {size}"
        elif how == "matched":
            extra["row"] = f"{kind.name} {size}: {units} units, parameter-matched"
    note = next((n for n in reversed(notes) if n), None)
    if note:
        extra["note"] = note
    if user is not None:
        if user.path is not None and not isinstance(preset, PresetFile):
            extra["preset_file"] = str(preset)
        if user.source:
            extra["preset_source"] = user.source
    fields = config_fields()
    for name, value in list(values.items()):
        if name != "extra":
            values[name] = _coerce(name, fields[name], value)
    for name, value in overrides.items():
        values[name] = _coerce(name, fields[name], value)
    values["extra"] = {**extra, **values.get("extra", {})}
    return ExperimentConfig(**values).validate()


# -- the config itself (microcircuits.config) -------------------------------------------
#
# Imported last: microcircuits.config re-exports this module's names, so whichever of the
# two is imported first finds the other's names defined (they are used in calls only).

from .config import (  # noqa: E402
    TASKS,
    ExperimentConfig,
    _canonical_task,
    _check_known_keys,
    _check_model_task,
    _choice,
    _coerce,
    _positive_int,
    config_fields,
)
