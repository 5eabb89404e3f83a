"""Shared test setup: data directory, thread count, deterministic seeds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# CI and `make test` set MICROCIRCUITS_DATA; plain `pytest` in a checkout beside
# ../shared finds the verified copies too.
if "MICROCIRCUITS_DATA" not in os.environ and _SHARED_DATA.is_dir():
    os.environ["MICROCIRCUITS_DATA"] = str(_SHARED_DATA)

# One thread: on shared 2-core machines two threads stall each other badly.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Each test starts on one thread, whatever a run before it set (train sets the
    config's thread count)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(params=["native", "python"])
def step_loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test of the fused CPU kernel with its C++ step loops and with its Python
    ones. Where a C++ compiler exists the C++ loops must build: a broken build fails the
    test instead of quietly testing the Python loops twice."""
    from microcircuits.kernels import native

    if request.param == "python":
        monkeypatch.setattr(native, "step_loops", lambda: None)
    elif native.step_loops() is None:
        if not native.enabled() or shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("the C++ step loops are off or there is no C++ compiler here")
        pytest.fail("the C++ step loops did not build (see the warning above)")
    return request.param
