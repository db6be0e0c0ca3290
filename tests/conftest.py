"""Shared test settings and fixtures."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The tests use tiny tensors: one thread is as fast, and several threads on a busy machine
# (a training run beside the tests) can be a hundred times slower.
torch.set_num_threads(1)


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root: configs name their structures relative to it."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def photos():
    """The bundled photographs (assets/photos)."""
    return REPO / "assets" / "photos"
