"""Shared fixtures: golden files, tiny configs, output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def golden_dir() -> Path:
    return GOLDEN
