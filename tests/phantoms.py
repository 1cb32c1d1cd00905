"""Phantom CT datasets (`training.phantom.generate_dataset`) as session fixtures, for the models and training tests.

`phantom_fixture(name, ...)` declares one: generated on first use into its own temporary directory, once per
session, then shared by every test that names it. A directory's conftest.py assigns each to the name its tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.phantom import generate_dataset


def phantom_fixture(name: str, doc: str, *, cases: int, seed: int, prevalence: float, size: int, slices: int) -> Any:
    """A session-scoped fixture ``name`` returning the folder of a phantom dataset made with these arguments
    (``doc`` is its docstring, shown by ``pytest --fixtures``)."""

    def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
        out = tmp_path_factory.mktemp(name)
        generate_dataset(out, cases=cases, seed=seed, prevalence=prevalence, size=size, slices=slices)
        return out

    dataset.__doc__ = doc
    return pytest.fixture(scope="session", name=name)(dataset)
