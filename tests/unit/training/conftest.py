"""Phantom datasets for the training tests (tests/phantoms.py; small, generated once per session)."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.phantoms import phantom_fixture
from training.phantom import generate_dataset

phantom_set = phantom_fixture(
    "phantom_set", "4 cases (3 pneumonia) at 128 px, 24 slices.", cases=4, seed=21, prevalence=0.75, size=128, slices=24
)
tiny_set = phantom_fixture(
    "tiny_set", "4 cases (2 pneumonia) at 64 px, 12 slices, for CLI and training smoke tests.",
    cases=4, seed=22, prevalence=0.5, size=64, slices=12,
)


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test run, whichever xdist worker asks first (test_fusion and test_calibration
    land on different workers under `make test`; each trained the same two models); the others wait and share it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, shared by workers
    folder = root / f"shared-{name}"
    with (root / f"shared-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half way
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def fusion_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Separate training (16), validation (16) and held-out test (32) phantom sets at 48 px, 12 slices."""
    splits = (("train", 16, 71), ("val", 16, 72), ("test", 32, 73))

    def build(folder: Path) -> None:
        for name, cases, seed in splits:
            generate_dataset(folder / name, cases=cases, seed=seed, size=48, slices=(12, 12))

    folder = _built_once(tmp_path_factory, "fusion-sets", build)
    return {name: folder / name for name, _, _ in splits}


@pytest.fixture(scope="session")
def fusion_weights(fusion_sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with two tiny classifiers trained on ``fusion_sets["train"]`` (fixed seeds, the last epoch
    kept: with a validation set this small the warmed-up epoch 0, whose fusion head is still zero, can win):
    ``2.0.0-test`` fusing every clinical input and ``2.0.0-image-only`` fusing none."""
    from dataclasses import replace

    from training.train import ClassifierSettings, train_classifier

    tiny = ClassifierSettings(grid=32, max_slices=8, pretrain_steps=20, pretrain_batch=8, widths=(8, 16),
                              features=16, seed=5, mil_learning_rate=3e-3, epochs=2)

    def build(out: Path) -> None:
        for version, s in (("2.0.0-test", tiny), ("2.0.0-image-only", replace(tiny, clinical_inputs=()))):
            train_classifier(fusion_sets["train"], out / "classifier" / version, settings=s,
                             version=version, progress=False, log=lambda _: None)

    return _built_once(tmp_path_factory, "fusion-weights", build)
