"""The modules where torch users take models: ``torch.jit.trace``, ``torch.export``,
``torch.onnx.export`` (both exporters), ``torch.compile``, and ``torch.jit.script``
(refused clearly). While a graph is recorded the dispatcher takes only kernels that
record as plain ATen ops; under ``torch.compile`` the layers run eagerly in a graph break.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch

import microcircuits as mc
from microcircuits import kernels

CELL_NAMES = ["lstm", "sublstm", "fix_sublstm"]

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed"
)
needs_onnxscript = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="torch.onnx.export(dynamo=True) needs the onnx and onnxscript packages",
)


def _module(cell, **kwargs):
    torch.manual_seed(0)
    return mc.make_rnn(cell, 3, 4, num_layers=2, **kwargs)


def _trace(module, x):
    with warnings.catch_warnings():  # shape checks in Python: TracerWarnings
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, (x,))  # check_trace on: re-traces and compares


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_jit_trace_matches_eager_outputs_and_gradients(cell):
    m = _module(cell, bidirectional=True)
    x = torch.randn(6, 2, 3, requires_grad=True)
    traced = _trace(m, x)
    out, (h, c) = traced(x)
    want_out, (want_h, want_c) = m(x)
    for got, want in ((out, want_out), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, want)
    (got_grad,) = torch.autograd.grad(out.pow(2).sum(), x)
    (want_grad,) = torch.autograd.grad(want_out.pow(2).sum(), x)
    torch.testing.assert_close(got_grad, want_grad)
    # the subtractive cells record the reference path's plain ops, no Python Function
    assert "PythonOp" not in str(traced.graph)


def test_traced_lstm_is_aten_lstm_and_takes_any_sequence_length():
    m = _module("lstm").eval()
    traced = _trace(m, torch.randn(6, 2, 3))
    assert "aten::lstm" in str(traced.graph)
    x = torch.randn(9, 5, 3)  # other length and batch
    torch.testing.assert_close(traced(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", ["sublstm", "fix_sublstm"])
def test_forcing_a_fused_kernel_while_tracing_says_why(cell):
    m = _module(cell)
    with kernels.use_kernel("cpu_fused"), pytest.raises(ValueError, match="jit.trace"):
        _trace(m, torch.randn(4, 2, 3))


@needs_onnx
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_onnx_export_through_torchscript_runs_like_eager(cell):
    import onnx
    from onnx.reference import ReferenceEvaluator

    m = _module(cell).eval()
    x = torch.randn(5, 2, 3)
    buffer = io.BytesIO()
    dynamic = {"input": {0: "steps", 1: "batch"}} if cell == "lstm" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m, (x,), buffer, dynamo=False, input_names=["input"],
            output_names=["output", "h_n", "c_n"], dynamic_axes=dynamic,
        )  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    if cell == "lstm":  # ONNX's own LSTM op: any sequence length
        assert "LSTM" in {node.op_type for node in model.graph.node}
        x = torch.randn(8, 3, 3)
    got = ReferenceEvaluator(model).run(None, {"input": x.numpy()})
    with torch.no_grad():
        want_out, (want_h, want_c) = m(x)
    for a, b in zip(got, (want_out, want_h, want_c)):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-4)


@needs_onnxscript
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_onnx_export_through_torch_export_runs_like_eager(cell):
    from onnx.reference import ReferenceEvaluator

    m = _module(cell).eval()
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    model = program.model_proto
    got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        want = m(x)[0]
    torch.testing.assert_close(torch.from_numpy(got[0]), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_torch_export_matches_eager(cell):
    m = _module(cell).eval()
    x = torch.randn(5, 2, 3)
    program = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x)[0], m(x)[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's own
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_jit_script_is_refused_naming_what_works(cell):
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(_module(cell))


def test_torch_compile_with_inductor_runs_lstm():
    """ATen's LSTM fails inside inductor's graph (mkldnn_rnn_layer); the dispatcher runs
    it in a graph break, as torch.nn.LSTM is run."""
    torch._dynamo.reset()
    m = mc.LSTM(8, 16)
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(torch.compile(m)(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", ["sublstm", "fix_sublstm"])
def test_torch_compile_does_not_recompile_per_sequence_length(cell):
    """The layers run eagerly (the fused kernel), outside the compiled graphs, so new
    sequence lengths do not each compile a new unrolled graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = _module(cell)
    counter = CompileCounter()
    compiled = torch.compile(m, backend=counter)
    for steps in (3, 4, 5, 6, 7):
        x = torch.randn(steps, 2, 3)
        torch.testing.assert_close(compiled(x)[0], m(x)[0])
    # graphs around the break, compiled once static and once dynamic, none per length
    assert counter.frame_count <= 4
    assert counter.op_count <= 8  # no unrolled steps inside them


# -- projected hidden states (proj_size > 0) ------------------------------------------


def _projected(cell):
    torch.manual_seed(0)
    return mc.make_rnn(cell, 3, 4, num_layers=2, proj_size=2).eval()


def _check_onnx_runs_like_eager(model_proto, m, x):
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(model_proto).run(None, {model_proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        want_out, (want_h, want_c) = m(x)
    for a, b in zip(got, (want_out, want_h, want_c)):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")  # ATen's
@needs_onnx
@pytest.mark.parametrize("cell", ["lstm", "sublstm"])
def test_projected_modules_export_to_onnx_through_torchscript(cell):
    """torch.onnx cannot export ATen's LSTM with projections (nor torch.nn.LSTM with
    proj_size > 0); while it records, projected layers take the reference path."""
    import onnx

    m, x = _projected(cell), torch.randn(5, 2, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buffer, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    _check_onnx_runs_like_eager(model, m, x)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")  # ATen's
@needs_onnxscript
def test_projected_lstm_exports_to_onnx_through_torch_export():
    m, x = _projected("lstm"), torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    _check_onnx_runs_like_eager(program.model_proto, m, x)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")  # ATen's
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_projected_modules_trace_and_export(cell):
    m, x = _projected(cell), torch.randn(5, 2, 3)
    traced = _trace(m, x)
    torch.testing.assert_close(traced(x)[0], m(x)[0])
    program = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x)[0], m(x)[0])
