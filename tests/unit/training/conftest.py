"""Phantom datasets for the training tests (small, generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.phantom import generate_dataset


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 cases (3 pneumonia) at 128 px, 24 slices."""
    out = tmp_path_factory.mktemp("phantom_set")
    generate_dataset(out, cases=4, seed=21, prevalence=0.75, size=128, slices=24)
    return out


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 cases (2 pneumonia) at 64 px, 12 slices, for CLI and training smoke tests."""
    out = tmp_path_factory.mktemp("tiny_set")
    generate_dataset(out, cases=4, seed=22, prevalence=0.5, size=64, slices=12)
    return out
