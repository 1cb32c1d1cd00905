"""Model registry: loads shipped models by name and version from ``models/weights/<name>/<version>/``.

Each version folder holds ``model.keras`` (Keras 3) and ``model_card.json`` (data, training settings, metrics,
intended use, preprocessing, and the sha256 of the weights, checked on load). A model is loaded once per process
and shared by every :class:`Registry` over the same folder. ``Registry.classifier()`` / ``.segmenter()`` return
wrappers whose ``predict`` takes a :class:`models.preprocess.Volume` and answers on the source grid. Raises
:class:`RegistryError` for a missing or unreadable model and :class:`InferenceError` when a model fails on input.
``Registry(mixed_precision=True)`` gives float16-compute copies of the models (for GPUs; see `models.device`).
A classifier whose card has a ``lesion_fusion`` block (`models.lesion_evidence`) reports the fusion of its own
probability with the segmenter's lesion evidence, which ``predict`` then requires (``lesion=``, from the
`SegmenterOutput` of the segmenter the card names). When that fusion uses the candidate stage's scores (feature set
v3), ``Registry.candidates_for(classifier)`` loads the candidate model it names (`models.candidates`), and
``Segmenter.predict(volume, candidates=…)`` runs it over the series.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.candidates import CandidateError, CandidateEvidence, CandidateModel, lesion_in_lungs
from models.clinical import AGE_SEX, ClinicalError, ClinicalInputs, encode, feature_count, schema_inputs
from models.errors import ModelError
from models.lesion_evidence import LesionEvidence, LesionFusion, LesionFusionError, map_evidence
from models.preprocess import PreprocessConfig, PreprocessError, Volume, masks_to_source, volume_grid, window

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER = "classifier"
SEGMENTER = "segmenter"
CANDIDATES = "candidates"
MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
_REQUIRED_CARD_KEYS = ("name", "version", "kind", "intended_use", "preprocessing", "files")


class RegistryError(ModelError):
    """No such model or version, or its weights or card are missing, corrupt or inconsistent."""


class InferenceError(ModelError):
    """A loaded model failed on a (preprocessed) input."""


@dataclass(frozen=True)
class ClassifierOutput:
    """P(pneumonia) (calibrated when the card has a calibration, see ``raw_probability``), one attention weight
    per source slice (Volume order, sums to 1), the decision threshold on the same scale as ``probability``, and
    the clinical inputs fed to the fusion (``clinical_used``: the ones this version reads, each present or
    missing in ``clinical``). With a lesion fusion (``fusion``), ``probability`` is the fused probability,
    ``classifier_probability`` the classifier's own calibrated one and ``lesion`` the evidence fused."""

    probability: float
    attention: np.ndarray
    threshold: float
    raw_probability: float | None = None
    clinical: ClinicalInputs | None = None
    clinical_used: tuple[str, ...] = ()
    calibration: dict[str, Any] | None = None
    classifier_probability: float | None = None
    lesion: LesionEvidence | None = None
    fusion: LesionFusion | None = None

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class SegmenterOutput:
    """Boolean masks shaped exactly like ``volume.hu`` (the lesion mask lies inside the lung mask), and the
    per-slice lesion evidence on the model grid (what a lesion-fusing classifier needs)."""

    lungs: np.ndarray
    lesion: np.ndarray
    evidence: LesionEvidence | None = None


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: numeric parts compare as numbers ("1.10.0" > "1.9.2")."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+]", version))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _LoadedModel:
    """A Keras model with its card and preprocessing, loaded from one version folder."""

    def __init__(self, folder: Path, kind: str):
        card_path = folder / CARD_FILE
        model_path = folder / MODEL_FILE
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read model card {card_path}: {exc}") from exc
        missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
        if missing:
            raise RegistryError(f"model card {card_path} lacks {missing}")
        if card["kind"] != kind:
            raise RegistryError(f"{folder} holds a {card['kind']!r} model, expected {kind!r}")
        expected = card["files"].get(MODEL_FILE, {}).get("sha256")
        if not model_path.is_file():
            raise RegistryError(f"missing weights file {model_path}")
        if expected and sha256_file(model_path) != expected:
            raise RegistryError(f"{model_path} does not match the sha256 in its model card")
        try:
            self.preprocess = PreprocessConfig.from_dict(card["preprocessing"])
        except PreprocessError as exc:
            raise RegistryError(f"model card {card_path}: {exc}") from exc
        import keras

        import models.classifier  # noqa: F401  (registers the custom layers used by saved classifiers)

        try:
            self.model = keras.saving.load_model(model_path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError, TypeError, zipfile errors …
            raise RegistryError(f"cannot load {model_path}: {exc}") from exc
        self.card: dict[str, Any] = card
        self.name: str = str(card["name"])
        self.version: str = str(card["version"])


class Classifier:
    """Series-level pneumonia classifier; ``predict`` is one batched forward pass over all slices."""

    def __init__(self, loaded: _LoadedModel):
        import tensorflow as tf

        self._m = loaded
        self.name, self.version, self.card = loaded.name, loaded.version, loaded.card
        self.threshold = float(loaded.card.get("threshold", 0.5))
        self.clinical_schema, self.clinical_used = clinical_spec(loaded.card)
        self.calibration: dict[str, Any] | None = loaded.card.get("calibration")
        self.temperature = temperature_of(loaded.card)
        self.min_matrix = min_matrix_of(loaded.card)
        try:
            self.fusion = LesionFusion.from_card(loaded.card)
        except LesionFusionError as exc:
            raise RegistryError(str(exc)) from exc
        g, c = loaded.preprocess.grid, loaded.preprocess.channels
        model = loaded.model
        n = feature_count(self.clinical_schema)
        self._fn = tf.function(
            lambda s, k: model({"slices": s, "clinical": k}, training=False),
            autograph=False,
            input_signature=[tf.TensorSpec((1, None, g, g, c), tf.float32), tf.TensorSpec((1, n), tf.float32)],
        )

    @property
    def preprocess(self) -> PreprocessConfig:
        return self._m.preprocess

    def warm(self) -> None:
        """Trace the compiled forward pass on a blank two-slice input, so the first series does not pay for it."""
        g, c = self._m.preprocess.grid, self._m.preprocess.channels
        self._fn(np.zeros((1, 2, g, g, c), np.float32), self.fusion_input()[1].astype(np.float32))

    def predict(self, volume: Volume, *, age: float | None = None, sex: str | None = None,
                clinical: ClinicalInputs | None = None, lesion: LesionEvidence | None = None) -> ClassifierOutput:
        """P(pneumonia) for the series and per-slice attention. ``clinical`` (else ``age``/``sex`` alone) feeds
        the late fusion; None values are missing, and inputs this version does not read are dropped (use
        :func:`models.clinical.from_header` for what a header offers). ``lesion``: the series' segmenter
        evidence, required by a lesion-fusing version, ignored otherwise. Raises InferenceError."""
        cfg = self._m.preprocess
        x = window(volume_grid(volume, cfg.grid), cfg)[None]
        given, clin = self.fusion_input(clinical, age=age, sex=sex)
        try:
            out = self._fn(x, clin)
            raw = float(np.asarray(out["probability"]).reshape(-1)[0])
            att = np.asarray(out["attention"], dtype=np.float32).reshape(-1)
        except Exception as exc:  # TensorFlow errors must not leak past the model boundary
            raise InferenceError(f"{self.name} {self.version} failed on a {x.shape} input: {exc}") from exc
        return self.output(raw, att, given, volume.shape[0], lesion)

    def fusion_input(self, clinical: ClinicalInputs | None = None, *, age: float | None = None,
                     sex: str | None = None) -> tuple[ClinicalInputs, np.ndarray]:
        """(the inputs this version reads, their (1, F) encoding for the model's ``clinical`` input)."""
        given = (clinical or ClinicalInputs(age=age, sex=sex)).only(self.clinical_used)
        return given, encode(given, self.clinical_schema)[None]

    def output(self, raw: float, attention: np.ndarray, given: ClinicalInputs, n_slices: int,
               lesion: LesionEvidence | None = None) -> ClassifierOutput:
        """The checked, calibrated (and, for a lesion-fusing version, fused) result of one forward pass (raw
        probability, attention per slice)."""
        if attention.shape[0] != n_slices or not np.isfinite(raw):
            raise InferenceError(f"{self.name} {self.version} returned an invalid output")
        calibrated = float(apply_temperature(raw, self.temperature))
        probability = calibrated
        if self.fusion is not None:
            if lesion is not None and len(lesion.slices) != n_slices:
                raise InferenceError(f"lesion evidence for {len(lesion.slices)} slices, the series has {n_slices}")
            try:
                probability = self.fusion.probability(calibrated, lesion)
            except LesionFusionError as exc:
                raise InferenceError(f"{self.name} {self.version}: {exc}") from exc
        return ClassifierOutput(probability=probability, attention=attention,
                                threshold=self.threshold, raw_probability=raw, clinical=given,
                                clinical_used=self.clinical_used, calibration=self.calibration,
                                classifier_probability=calibrated,
                                lesion=lesion if self.fusion is not None else None, fusion=self.fusion)


def clinical_spec(card: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(schema, inputs used) of a classifier card; cards without ``clinical_inputs`` are 1.x ``age-sex`` models.
    Raises RegistryError for an unknown schema or input."""
    spec = card.get("clinical_inputs") or {"schema": AGE_SEX}
    try:
        schema = str(spec["schema"])
        names = schema_inputs(schema)
        used = tuple(spec.get("used", names))
        encode(ClinicalInputs(), schema, used)  # checks the names
    except (ClinicalError, KeyError, TypeError) as exc:
        raise RegistryError(f"model card {card.get('name')} {card.get('version')}: bad clinical_inputs: {exc}") from exc
    return schema, used


def temperature_of(card: dict[str, Any]) -> float:
    """The card's temperature (``calibration.method == "temperature"``), else 1 (no calibration). Raises
    RegistryError for a non-positive or unreadable temperature."""
    cal = card.get("calibration") or {}
    if cal.get("method") != "temperature":
        return 1.0
    try:
        t = float(cal["temperature"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"model card {card.get('name')}: unreadable calibration temperature") from exc
    if not (np.isfinite(t) and t > 0):
        raise RegistryError(f"model card {card.get('name')}: calibration temperature must be > 0, got {t}")
    return t


def min_matrix_of(card: dict[str, Any]) -> int:
    """The smallest in-plane matrix (rows or columns, whichever is larger) the card says the model was validated
    on (``validated_acquisition.min_matrix``), else 0 (no limit stated). Raises RegistryError for a value that is
    not a non-negative integer."""
    block = card.get("validated_acquisition") or {}
    value = block.get("min_matrix", 0) if isinstance(block, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RegistryError(f"model card {card.get('name')} {card.get('version')}: validated_acquisition.min_matrix "
                            f"must be a non-negative integer")
    return value


def apply_temperature(p: Any, temperature: float) -> Any:
    """sigmoid(logit(p) / T): temperature scaling of probabilities (T = 1 leaves them as they are)."""
    if temperature == 1.0:
        return p
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    out = 1.0 / (1.0 + np.exp(-(np.log(q) - np.log1p(-q)) / temperature))
    return float(out) if np.ndim(out) == 0 else out


class Segmenter:
    """Slice-wise U-Net; ``predict`` runs batches of slices on the model grid and resamples masks back."""

    batch_size = 32

    def __init__(self, loaded: _LoadedModel):
        import tensorflow as tf

        self._m = loaded
        self.name, self.version, self.card = loaded.name, loaded.version, loaded.card
        g, c = loaded.preprocess.grid, loaded.preprocess.channels
        model = loaded.model
        self._fn = tf.function(
            lambda s: model(s, training=False), autograph=False, input_signature=[tf.TensorSpec((None, g, g, c), tf.float32)]
        )

    @property
    def preprocess(self) -> PreprocessConfig:
        return self._m.preprocess

    def warm(self, batch: int = 1) -> None:
        """Trace the compiled forward pass on ``batch`` blank slices, so the first series does not pay for it."""
        g, c = self._m.preprocess.grid, self._m.preprocess.channels
        self._fn(np.zeros((batch, g, g, c), np.float32))

    def probabilities(self, volume: Volume) -> np.ndarray:
        """Softmax (slices, grid, grid, 3) over {background, lung, lesion} on the model grid."""
        cfg = self._m.preprocess
        return self.grid_probabilities(window(volume_grid(volume, cfg.grid), cfg))

    def grid_probabilities(self, x: np.ndarray) -> np.ndarray:
        """The softmax of windowed model-grid slices (slices, grid, grid, channels), in `batch_size` calls."""
        try:
            parts = [np.asarray(self._fn(x[a : a + self.batch_size])) for a in range(0, len(x), self.batch_size)]
        except Exception as exc:  # TensorFlow errors must not leak past the model boundary
            raise InferenceError(f"{self.name} {self.version} failed on a {x.shape} input: {exc}") from exc
        return np.concatenate(parts, axis=0)

    def predict(self, volume: Volume, candidates: CandidateModel | None = None) -> SegmenterOutput:
        """Lung and lesion masks on the source grid (same shape as ``volume.hu``) and the lesion evidence, with
        the ``candidates`` stage's scores when given. Raises InferenceError."""
        cfg = self._m.preprocess
        x = window(volume_grid(volume, cfg.grid), cfg)
        p = self.grid_probabilities(x)
        shape = volume.shape[1:]
        lungs = masks_to_source(p[..., 1] + p[..., 2], shape)
        lesion = masks_to_source(p[..., 2], shape) & lungs
        lp = lesion_in_lungs(p)
        evidence = LesionEvidence(map_evidence(lp), (self.name, self.version), cfg.grid,
                                  self.candidate_evidence(candidates, x, lp), slice_spacing_mm=volume.spacing[0])
        return SegmenterOutput(lungs=lungs, lesion=lesion, evidence=evidence)

    def candidate_evidence(self, candidates: CandidateModel | None, x: np.ndarray,
                           lp: np.ndarray) -> CandidateEvidence | None:
        """``candidates``' scores of one series (None without a candidate model): ``x`` this U-Net's windowed
        input, ``lp`` its lesion-in-lungs probability (`models.candidates.lesion_in_lungs`). Raises
        InferenceError for a candidate model trained over another segmenter."""
        if candidates is None:
            return None
        try:
            candidates.check_segmenter(self.name, self.version)
            return candidates.score(x, lp)
        except CandidateError as exc:
            raise InferenceError(str(exc)) from exc


class Registry:
    """Finds model versions under ``weights_dir`` (default: the weights shipped in this package)."""

    def __init__(self, weights_dir: Path | None = None, *, mixed_precision: bool = False):
        self.weights_dir = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
        self.mixed_precision = mixed_precision  # float16 compute (models.device.mixed_precision_copy): GPUs only

    def versions(self, name: str) -> list[str]:
        """Versions of model ``name`` that have a model card, oldest first."""
        folder = self.weights_dir / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if (p / CARD_FILE).is_file()]
        return sorted(found, key=version_key)

    def default_version(self, name: str) -> str:
        """The version loaded when none is asked for: the newest whose card is not marked ``"candidate": true`` (a
        release candidate that did not beat its predecessor is shipped for trials only), else the newest."""
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no versions of model {name!r} under {self.weights_dir}")
        released = [v for v in versions if not _is_candidate(self.weights_dir / name / v / CARD_FILE)]
        return (released or versions)[-1]

    def folder(self, name: str, version: str | None = None) -> Path:
        """The version folder of ``name`` (`default_version` when ``version`` is None). Raises RegistryError."""
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no versions of model {name!r} under {self.weights_dir}")
        if version is None:
            version = self.default_version(name)
        if version not in versions:
            raise RegistryError(f"model {name!r} has no version {version!r} (have {versions})")
        return self.weights_dir / name / version

    def classifier(self, version: str | None = None) -> Classifier:
        """The classifier ``version`` (`default_version` when None), loaded once per process. Raises RegistryError."""
        model = _load_cached(self.folder(CLASSIFIER, version), CLASSIFIER, self.mixed_precision)
        assert isinstance(model, Classifier)
        return model

    def segmenter(self, version: str | None = None) -> Segmenter:
        """The segmenter ``version`` (`default_version` when None), loaded once per process. Raises RegistryError."""
        model = _load_cached(self.folder(SEGMENTER, version), SEGMENTER, self.mixed_precision)
        assert isinstance(model, Segmenter)
        return model

    def segmenter_for(self, classifier: Classifier, version: str | None = None) -> Segmenter:
        """The segmenter to run beside ``classifier``: ``version`` when given; else, for a lesion-fusing
        classifier, the version its fusion was fitted with (asking for classifier 2.1.0 alone loads U-Net 1.0.0
        beside it, whatever the default U-Net is); else the default. Raises RegistryError."""
        if version is None and classifier.fusion is not None:
            try:
                return self.segmenter(classifier.fusion.segmenter[1])
            except RegistryError as exc:
                raise RegistryError(f"classifier {classifier.version} fuses the lesion evidence of "
                                    f"{' '.join(classifier.fusion.segmenter)}, which cannot be loaded: {exc}") from exc
        return self.segmenter(version)

    def candidates(self, version: str | None = None) -> CandidateModel:
        """The candidate model ``version`` (`default_version` when None), loaded once per process. Raises
        RegistryError."""
        model = _load_cached(self.folder(CANDIDATES, version), CANDIDATES, self.mixed_precision)
        assert isinstance(model, CandidateModel)
        return model

    def candidates_over(self, segmenter: Segmenter) -> CandidateModel | None:
        """The newest candidate model trained over ``segmenter``'s outputs, else None (for new fits: a fusion
        then takes the newest feature set the models allow)."""
        for version in reversed(self.versions(CANDIDATES)):  # the cards decide; only the match is loaded
            try:
                seg = json.loads((self.weights_dir / CANDIDATES / version / CARD_FILE).read_text()).get("segmenter")
            except (OSError, ValueError):
                continue  # an unreadable card: `candidates(version)` would say why, if asked for
            if isinstance(seg, dict) and (seg.get("name"), seg.get("version")) == (segmenter.name, segmenter.version):
                return self.candidates(version)
        return None

    def candidates_for(self, classifier: Classifier) -> CandidateModel | None:
        """The candidate model whose scores ``classifier``'s lesion fusion takes (feature set v3), else None.
        Raises RegistryError."""
        if classifier.fusion is None or classifier.fusion.candidates is None:
            return None
        try:
            return self.candidates(classifier.fusion.candidates[1])
        except RegistryError as exc:
            raise RegistryError(f"classifier {classifier.version} fuses the scores of candidate model "
                                f"{' '.join(classifier.fusion.candidates)}, which cannot be loaded: {exc}") from exc


def _is_candidate(card: Path) -> bool:
    try:
        return bool(json.loads(card.read_text()).get("candidate", False))
    except (OSError, ValueError):
        return False


_CACHE: dict[tuple[Path, str, bool], Classifier | Segmenter | CandidateModel] = {}
_CACHE_LOCK = threading.Lock()


def _load_cached(folder: Path, kind: str, mixed_precision: bool = False) -> Classifier | Segmenter | CandidateModel:
    """One wrapper (model + compiled tf.function) per version folder, precision and process."""
    key = (folder.resolve(), kind, mixed_precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            loaded = _LoadedModel(folder, kind)
            from models.fastnorm import fast_norm_copy

            loaded.model = fast_norm_copy(loaded.model)  # the same layers and weights, faster GroupNormalization
            if mixed_precision:
                from models.device import mixed_precision_copy

                loaded.model = mixed_precision_copy(loaded.model)
            _CACHE[key] = (Classifier(loaded) if kind == CLASSIFIER else Segmenter(loaded) if kind == SEGMENTER
                           else CandidateModel(loaded))
        return _CACHE[key]
