"""Phantom datasets for the training tests (tests/phantoms.py; small, generated once per session)."""

from __future__ import annotations

from tests.phantoms import phantom_fixture

phantom_set = phantom_fixture(
    "phantom_set", "4 cases (3 pneumonia) at 128 px, 24 slices.", cases=4, seed=21, prevalence=0.75, size=128, slices=24
)
tiny_set = phantom_fixture(
    "tiny_set", "4 cases (2 pneumonia) at 64 px, 12 slices, for CLI and training smoke tests.",
    cases=4, seed=22, prevalence=0.5, size=64, slices=12,
)
