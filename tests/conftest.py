"""Shared fixtures. ``search_spaces`` is imported first: it makes timm importable on CPU torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import search_spaces  # noqa: F401

# one thread: the suite also runs subprocesses, and 2 threads on 2 busy cores oversubscribe badly
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real data for tests); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
