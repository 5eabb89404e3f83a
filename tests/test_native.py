"""The C++ step loops of the fused CPU kernel: used by default, optional, and equal to
the reference path. (Their numerics are also covered by every test of
``tests/test_kernels.py`` that takes the ``step_loops`` fixture.)"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from microcircuits import kernels
from microcircuits.cells import LSTMState
from microcircuits.cli import main
from microcircuits.kernels import cpu_fused, native
from tests.test_kernels import CELL_NAMES, LENGTHS, _layer, _run


class _Spy:
    """Wraps the compiled module and counts the calls of each loop."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.module, name)(*args)

        return call


@pytest.fixture
def fresh_step_loops(monkeypatch):
    """``native.step_loops`` with a cache of its own for one test, which may clear it and
    fake or refuse the build: afterwards the process keeps the module it had loaded. (A
    cleared process-wide cache would load the build again later, a new build if the
    sources changed meanwhile, whose operators could not be registered a second time.)"""
    fresh = functools.lru_cache(maxsize=1)(native.step_loops.__wrapped__)
    monkeypatch.setattr(native, "step_loops", fresh)
    return fresh


@pytest.mark.parametrize("step_loops", ["native"], indirect=True)
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("packed", [False, True])
def test_the_fused_kernel_runs_its_steps_in_cpp_by_default(cell, packed, monkeypatch, step_loops):
    spy = _Spy(native.step_loops())
    monkeypatch.setattr(native, "step_loops", lambda: spy)
    kind, x, state, weights, mask = _layer(cell, dtype=torch.float32, mask=True)
    lengths = LENGTHS["unsorted"] if packed else None
    with kernels.use_kernel("cpu_fused"):
        out, _ = kernels.run_layer(kind, x, state, weights, lengths=lengths, update_mask=mask)
        out.sum().backward()
        with torch.no_grad():
            kernels.run_layer(kind, x, state, weights, lengths=lengths, update_mask=mask)
    direct = spy.module.direct_available()
    if direct:  # every cell in float32 (tests/test_direct.py)
        want = ["forward_direct", "backward_direct", "forward_direct"]
    else:
        backward = "backward_steps" if cell == "lstm" else "backward_subtractive"
        want = ["forward_steps", backward, "forward_steps"]
    assert [c for c in spy.calls if c not in ("direct_available", "transposed")] == want


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_inference_in_several_chunks_equals_the_reference(cell, monkeypatch, step_loops):
    """Long inputs are projected chunk by chunk; the state must carry across chunks."""
    monkeypatch.setattr(cpu_fused, "_INFERENCE_CHUNK_BYTES", 1)  # one step per chunk
    kind, x, state, weights, mask = _layer(cell, T=7, dtype=torch.float32, mask=True)
    with torch.no_grad():
        want = _run_no_grad("reference", kind, x, state, weights, mask)
        got = _run_no_grad("cpu_fused", kind, x, state, weights, mask)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _run_no_grad(kernel, kind, x, state, weights, mask):
    with kernels.use_kernel(kernel):
        out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=mask)
    return out, h, c


def test_non_contiguous_initial_state_and_mask(step_loops):
    """The loops read h0 through ATen (any strides) and copy c0/the mask to rows."""
    kind, x, state, weights, mask = _layer("sublstm", mask=True)
    wide_h = torch.randn(state.h.shape[1], state.h.shape[0], dtype=x.dtype).t()
    wide_c = torch.randn(state.c.shape[1], state.c.shape[0], dtype=x.dtype).t()
    odd = LSTMState(wide_h.requires_grad_(), wide_c.requires_grad_())
    mask_t = mask.t().contiguous().t()
    ref_out, ref_grads = _run("reference", kind, x, odd, weights, mask_t)
    out, grads = _run("cpu_fused", kind, x, odd, weights, mask_t)
    for a, b in zip(ref_out + ref_grads, out + grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


def test_turned_off_by_the_environment(monkeypatch, fresh_step_loops):
    monkeypatch.setenv(native.NATIVE_ENV_VAR, "0")
    assert native.step_loops() is None


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, capsys, fresh_step_loops):
    import torch.utils.cpp_extension as cpp_extension

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
        assert native.step_loops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.step_loops() is None  # remembered: no second attempt, no warning
    # the kernel still runs, on its Python loops
    kind, x, state, weights, _ = _layer("fix_sublstm")
    ref_out, _ = _run("reference", kind, x, state, weights)
    out, _ = _run("cpu_fused", kind, x, state, weights)
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)
    native.step_loops.cache_clear()
    assert main(["build-native"]) == 0
    assert "not available" in capsys.readouterr().out


def test_build_directory_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    where = native.build_directory()
    assert where.parent == tmp_path / "native"
    assert where.name.startswith("microcircuits_step_loops_")


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_transposed_gradients_of_the_final_state(cell, step_loops):
    """Autograd may hand backward non-contiguous gradients (here of h_n.t(), c_n.t())."""
    kind, x, state, weights, mask = _layer(cell, mask=True)
    grads = {}
    for kernel in ("reference", "cpu_fused"):
        with kernels.use_kernel(kernel):
            out, (h, c) = kernels.run_layer(kind, x, state, weights, update_mask=mask)
        probe = torch.arange(h.numel(), dtype=h.dtype).view(h.shape[1], h.shape[0])
        loss = (h.t() * probe).sum() + (c.t() * probe.flip(0)).sum() + out.sum()
        grads[kernel] = torch.autograd.grad(loss, [x, state.h, state.c, weights.weight_hh])
    for a, b in zip(grads["reference"], grads["cpu_fused"]):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_fake_tensors_keep_to_aten_ops(cell, step_loops):
    """Shape inference with fake tensors (a Python dispatch mode) must see every ATen op:
    the C++ loops would read data pointers fake tensors do not have, so they step aside."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    import microcircuits as mc

    model = mc.make_rnn(cell, 3, 4, num_layers=2, update_dropout=0.25)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(5, 2, 3, requires_grad=True)
        out, (h, c) = model(x)
        out.sum().backward()
    assert isinstance(out, FakeTensor) and out.shape == (5, 2, 4) and h.shape == (2, 2, 4)


# -- one build for every copy of the package (the build directory and its sources) -------


def _copy_sources(root):
    """Copies of the compiled sources (and any headers beside them) under ``root``."""
    copies = []
    for source in native._source_files():
        target = root / "csrc" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        if source in native._SOURCES:
            copies.append(target)
    return tuple(copies)


def test_the_build_is_named_by_contents_not_by_where_the_sources_are(monkeypatch, tmp_path):
    name = native._module_name()
    for copy in ("a", "b"):
        monkeypatch.setattr(native, "_SOURCES", _copy_sources(tmp_path / copy))
        assert native._module_name() == name
    # a header beside the sources, or an edit, is another build
    (tmp_path / "b" / "csrc" / "extra.h").write_text("#pragma once\n")
    with_header = native._module_name()
    assert with_header != name
    edited = tmp_path / "b" / "csrc" / native._SOURCES[0].name
    edited.write_text(edited.read_text() + "\n// changed\n")
    assert native._module_name() not in (name, with_header)


def test_the_compiler_is_part_of_the_build_name(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    default = native._module_name()
    monkeypatch.setenv("CXX", "c++")
    assert native._module_name() == default  # torch's default compiler, spelt out
    names = set()
    for version in ("1.0", "2.0"):
        fake = tmp_path / version / "fake-c++"
        fake.parent.mkdir()
        fake.write_text(f"#!/bin/sh\necho 'fake c++ {version}'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("CXX", str(fake))
        assert f"fake c++ {version}" in native._compiler_identity(str(fake))
        names.add(native._module_name())
    assert len(names) == 2 and default not in names
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    assert "not found" in native._compiler_identity(str(tmp_path / "missing-c++"))


def test_sources_are_staged_into_the_build_directory_once(tmp_path):
    staged = native._stage_sources(tmp_path)
    assert [p.name for p in staged] == [s.name for s in native._SOURCES]
    assert all(p.parent == tmp_path / "src" for p in staged)
    for copy, source in zip(staged, native._SOURCES):
        assert copy.read_bytes() == source.read_bytes()
    times = [p.stat().st_mtime_ns for p in staged]
    os.utime(staged[0], ns=(times[0] - 10**9, times[0] - 10**9))  # older than "now"
    times[0] -= 10**9
    assert native._stage_sources(tmp_path) == staged
    assert [p.stat().st_mtime_ns for p in staged] == times  # untouched: ninja sees no change
    staged[1].write_text("stale")
    native._stage_sources(tmp_path)
    assert staged[1].read_bytes() == native._SOURCES[1].read_bytes()
    assert not [p for p in (tmp_path / "src").iterdir() if p.name.startswith(".")]


def test_a_build_says_so_on_stderr(monkeypatch, tmp_path, capsys, fresh_step_loops):
    import types

    import torch.utils.cpp_extension as cpp_extension

    loads = []

    def fake_load(**kwargs):
        loads.append(kwargs)
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    assert native.step_loops() is not None
    err = capsys.readouterr().err
    directory = native.build_directory()
    assert "building (once per source, torch and compiler" in err and str(directory) in err
    assert len(err.strip().splitlines()) == 1
    # the build reads the copies in the build directory, never the package's files
    (source,) = {Path(s).parent for s in loads[0]["sources"]}
    assert source == directory / "src"
    (directory / f"{loads[0]['name']}.so").write_bytes(b"")  # built
    native.step_loops.cache_clear()
    native.step_loops()
    assert capsys.readouterr().err == ""


_LOAD_SCRIPT = (
    "import microcircuits\n"
    "from microcircuits.kernels import native\n"
    "module = native.step_loops()\n"
    "print(microcircuits.__file__)\n"
    "print(module.__file__ if module is not None else None)\n"
)


def _load_from(root: Path) -> tuple[Path, Path, str]:
    """Run the package copied under ``root`` in a new process: where it ran from, the
    step loops it loaded, and its stderr."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    where, loaded = done.stdout.split()[-2:]
    assert loaded != "None", done.stderr
    return Path(where), Path(loaded), done.stderr


@pytest.mark.parametrize("step_loops", ["native"], indirect=True)
def test_copies_of_the_package_elsewhere_share_one_build(step_loops, tmp_path, monkeypatch):
    """The package copied to two other places (a second checkout, a worktree, an
    installed copy): each loads the same build, and nothing compiles.

    The copies are made from one snapshot of the package, and the build for the
    snapshot's sources is made (or found) first, by a third copy: the sources may have
    changed since this process loaded its build (an edit during the test run, another
    checkout's builds running meanwhile), and then the copies need a build of their own."""
    import microcircuits

    package = Path(microcircuits.__file__).parent
    snapshot = tmp_path / "snapshot" / "microcircuits"
    shutil.copytree(package, snapshot, ignore=shutil.ignore_patterns("__pycache__"))
    # the build the snapshot's sources name (this process's, unless the sources changed)
    csrc = snapshot / "kernels" / "csrc"
    with monkeypatch.context() as patch:
        patch.setattr(native, "_SOURCES", tuple(csrc / s.name for s in native._SOURCES))
        want = native.build_directory()
    _, built, _ = _load_from(snapshot.parent)  # builds it if it is not there yet
    assert built.parent == want
    outputs = sorted(built.parent.glob("*.o")) + [built]
    before = [p.stat().st_mtime_ns for p in outputs]
    for copy in ("a", "b"):
        root = tmp_path / copy
        shutil.copytree(snapshot, root / "microcircuits")
        where, loaded, stderr = _load_from(root)
        assert where.is_relative_to(root)  # the copy ran, not this checkout
        assert loaded == built, stderr
        assert "building" not in stderr
    assert [p.stat().st_mtime_ns for p in outputs] == before  # nothing recompiled


def test_every_source_the_build_reads_is_shipped_as_package_data():
    """An installed wheel holds only the files ``package-data`` names: every C++ source
    and header the build stages must match one of its patterns (step_loops.h once did
    not, so a wheel fell back to the Python loops)."""
    import fnmatch

    from microcircuits.report import tomllib  # tomli before Python 3.11

    root = Path(native.__file__).resolve().parents[1]  # the microcircuits package
    pyproject = root.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["microcircuits"]
    staged = native._source_files()
    assert staged, "no C++ sources found"
    for path in staged:
        relative = path.resolve().relative_to(root).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
