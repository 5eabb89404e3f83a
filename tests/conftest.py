"""Shared test setup: data directory, thread count, deterministic seeds."""

from __future__ import annotations

import os
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
