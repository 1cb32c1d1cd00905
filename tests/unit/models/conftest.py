"""Tiny phantom datasets shared by the models tests (tests/phantoms.py; generated once per session, a few hundred
ms)."""

from __future__ import annotations

from tests.phantoms import phantom_fixture

tiny_phantom = phantom_fixture(
    "tiny_phantom", "3 cases (2 pneumonia), 64 px, 12 slices.", cases=3, seed=11, prevalence=0.67, size=64, slices=12
)
small_phantom = phantom_fixture(
    "small_phantom", "4 pneumonia cases at 128 px, 20 slices: big enough for visible lesions.",
    cases=4, seed=12, prevalence=1.0, size=128, slices=20,
)
