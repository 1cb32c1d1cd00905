"""Tiny phantom datasets shared by the models tests (generated once per session, a few hundred ms)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.phantom import generate_dataset


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 cases (2 pneumonia), 64 px, 12 slices."""
    out = tmp_path_factory.mktemp("tiny_phantom")
    generate_dataset(out, cases=3, seed=11, prevalence=0.67, size=64, slices=12)
    return out


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 pneumonia cases at 128 px, 20 slices: big enough for visible lesions."""
    out = tmp_path_factory.mktemp("small_phantom")
    generate_dataset(out, cases=4, seed=12, prevalence=1.0, size=128, slices=20)
    return out

