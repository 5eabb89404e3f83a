"""The documentation of the public modules: every section ``torch.nn.LSTM``'s has, and
Examples that run (doctest), so that they fail when the code changes under them."""

from __future__ import annotations

import doctest
import inspect
import pydoc

import pytest
import torch

import microcircuits as mc
from microcircuits import cells
from microcircuits import nn as mcnn

SEQUENCE_MODULES = [mc.LSTM, mc.SubLSTM, mc.FixSubLSTM]
CELL_MODULES = [mc.LSTMCell, mc.SubLSTMCell, mc.FixSubLSTMCell]


def _doctests(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [test for test in finder.find(module) if test.examples]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")  # ATen's
@pytest.mark.parametrize("module", [mcnn, cells], ids=lambda m: m.__name__)
def test_examples_run(module):
    tests = _doctests(module)
    assert tests, f"{module.__name__} has no examples"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report = []
    torch.manual_seed(0)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_public_module_has_runnable_examples():
    documented = {test.name.rsplit(".", 1)[-1] for test in _doctests(mcnn)}
    for cls in SEQUENCE_MODULES + CELL_MODULES:
        assert cls.__name__ in documented
    assert {"make_rnn", "make_cell"} <= documented
    assert {"CellWeights", "LSTMState"} <= {t.name.rsplit(".", 1)[-1] for t in _doctests(cells)}


@pytest.mark.parametrize("cls", SEQUENCE_MODULES + CELL_MODULES, ids=lambda c: c.__name__)
def test_sections_like_torch_nn_lstm(cls):
    doc = inspect.getdoc(cls)
    for section in ("Args:", "Inputs:", "Outputs:", "Attributes:", "Examples::", ".. math::"):
        assert section in doc, f"{cls.__name__} lacks {section}"
    assert "@" not in doc.replace(">>>", "")  # every placeholder filled in
    signature = inspect.signature(cls)
    documented_args = doc.split("Args:")[1].split("Inputs:")[0]
    for name in signature.parameters:
        assert f"{name}:" in documented_args, f"{cls.__name__}: argument {name} undocumented"
    for name, _ in cls(3, 4).named_parameters():
        stem = name.replace("_l0", "_l[k]")
        assert f"{stem}:" in doc, f"{cls.__name__}: parameter {name} undocumented"
    gates = f"({', '.join(cls(3, 4).cell.gate_names)})"
    assert gates in doc


@pytest.mark.parametrize("cls", SEQUENCE_MODULES, ids=lambda c: c.__name__)
def test_sequence_docs_cover_projections_and_every_parameter(cls):
    doc = inspect.getdoc(cls)
    assert "proj_size" in doc and "H_out" in doc
    m = cls(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    for name, _ in m.named_parameters():
        stem = name.replace("_l0", "_l[k]").replace("_l1", "_l[k]")
        assert f"{stem}:" in doc, f"{cls.__name__}: parameter {name} undocumented"


@pytest.mark.parametrize("cls", SEQUENCE_MODULES + CELL_MODULES, ids=lambda c: c.__name__)
def test_help_shows_the_modules_own_text(cls):
    """``help()`` once showed ``torch.nn.Module.__init__``'s text for the constructor."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Examples::" in text and "Args:" in text
    assert inspect.getdoc(cls.__init__) != inspect.getdoc(torch.nn.Module.__init__)
    assert "class's docstring" in inspect.getdoc(cls.__init__)
