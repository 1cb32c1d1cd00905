"""Coded concepts and closed sets used in the node's SR and SEG objects (leaf module: imports no other node code).

Standard codes (SCT, DCM, UCUM) are used where one fits; everything else comes from the private coding scheme
``99PACSAI``, which every object using it declares in its CodingSchemeIdentificationSequence
(see `private_coding_scheme`).
"""

from __future__ import annotations

import enum

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME_DESIGNATOR = "99PACSAI"


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """A fresh CodingSchemeIdentificationSequence item declaring the private scheme (one per object built)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME_DESIGNATOR,
        name="pacs-ai-node private codes",
        version="1",
        responsible_organization="pacs-ai-node",
    )


def _private(value: str, meaning: str) -> Code:
    if len(value) > 16:  # Code Value is SH
        raise ValueError(f"private code value {value!r} is longer than 16 characters")
    return Code(value, PRIVATE_SCHEME_DESIGNATOR, meaning)


# --- standard codes -------------------------------------------------------------------------------------------
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present  # 52101004, CID 240/241
ABSENT = codes.SCT.Absent  # 272519000, CID 240/241
LUNG = codes.SCT.Lung  # 39607008
LESION = codes.SCT.Lesion  # 52988006
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # for reports on series that are not CT
VOLUME = codes.SCT.Volume  # 118565006
AREA = codes.SCT.Area  # 42798000
# The same concept (SCT Area) with a meaning naming the finding: OHIF 3.x labels an SR outline with its NUM items'
# "CodeMeaning: value unit" lines (and "363698007: <meaning>" for a finding site), so this reads
# "Pneumonia lesion area: 662.14 mm2" in the viewer.
LESION_AREA = Code(AREA.value, AREA.scheme_designator, "Pneumonia lesion area")
COMMENT = codes.DCM.Comment  # 121106
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # 123110, CID 7162 algorithm family
DEVICE_OBSERVER = codes.DCM.Device  # 121007, CID 270 observer type
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # 113001, IOCM rejection note title (CID 7010)
FOR_REFERRING_PROVIDER = codes.DCM.ForReferringProvider  # 113002, the key-images document's title (CID 7010)
LUNG_VOLUME = codes.SCT.Volume  # measured over the lung segment

UNIT_NONE = codes.UCUM.NoUnits  # "1"
UNIT_MILLILITER = Code("ml", "UCUM", "milliliter")
UNIT_SQUARE_MILLIMETER = codes.UCUM.SquareMillimeter  # mm2

# --- private codes --------------------------------------------------------------------------------------------
PNEUMONIA_PROBABILITY = _private("P-PNEUMONIA", "Probability of pneumonia")
DECISION_THRESHOLD = _private("P-THRESHOLD", "Decision threshold for pneumonia")
AI_ANALYSIS_STATUS = _private("AI-STATUS", "AI analysis status")
NOT_PROCESSED = _private("NOT-PROCESSED", "Series not processed by AI")
SKIP_REASON = _private("SKIP-REASON", "Reason series was not processed")
SKIP_DETAIL = _private("SKIP-DETAIL", "Detail of reason series was not processed")
SUPERSEDES = _private("SUPERSEDES", "Supersedes earlier AI result")
FUSION_INPUT = _private("AI-FUSION-IN", "Clinical input fused with the image")
FUSION_MISSING = _private("AI-FUSION-MISS", "Clinical input missing for fusion")
FUSION_EVIDENCE = _private("AI-FUSION-EV", "Image evidence fused into the probability")
CALIBRATION = _private("AI-CALIBRATION", "Probability calibration")
OPERATING_POINT = _private("AI-OPERATING-PT", "Operating point of the decision")
SCOPE = _private("AI-SCOPE", "Scope of the verdict")

NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE. Research software: the models were trained on synthetic phantoms only and have not "
    "been validated on patient data. Do not use for diagnosis or treatment decisions."
)


class SkipReason(enum.Enum):
    """Why the node did not run its models on a series; each member carries its coded concept (`code`)."""

    NOT_CT = "NOT_CT"
    MULTIPLE_FRAMES_OF_REFERENCE = "MULTIPLE_FRAMES_OF_REFERENCE"
    MIXED_ORIENTATION = "MIXED_ORIENTATION"
    UNEVEN_SPACING = "UNEVEN_SPACING"  # gaps or duplicate slice positions
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    MULTI_FRAME = "MULTI_FRAME"  # enhanced (multi-frame) images: the models read single-frame stacks
    UNDECODABLE_PIXELS = "UNDECODABLE_PIXELS"
    PROCESSING_FAILED = "PROCESSING_FAILED"
    OUT_OF_SCOPE = "OUT_OF_SCOPE"  # the image is not what the model can judge (e.g. not a chest CT)
    MISSING_GEOMETRY = "MISSING_GEOMETRY"  # no frame of reference, orientation, position or pixel spacing
    GANTRY_TILT = "GANTRY_TILT"  # slices are not stacked along their normal (tilted gantry)
    INCOMPLETE_SERIES = "INCOMPLETE_SERIES"  # fewer instances than the series says it has
    NOT_ORIGINAL_AXIAL = "NOT_ORIGINAL_AXIAL"  # SOP class or image type the pipeline does not read
    MIXED_GEOMETRY = "MIXED_GEOMETRY"  # slices differ in matrix size or pixel spacing
    TOO_LARGE = "TOO_LARGE"  # more voxels than the worker's memory budget ([gate] max_series_megavoxels)
    MULTIPLE_STUDIES = "MULTIPLE_STUDIES"  # one SeriesInstanceUID under several studies (a sender reusing UIDs)

    @property
    def code(self) -> Code:
        """The coded concept for this reason (private scheme 99PACSAI: DICOM and SNOMED have no fitting codes)."""
        return _SKIP_REASON_CODES[self]


_SKIP_REASON_CODES: dict[SkipReason, Code] = {
    SkipReason.NOT_CT: _private("SKIP-NOT-CT", "Series is not a CT image series"),
    SkipReason.MULTIPLE_FRAMES_OF_REFERENCE: _private(
        "SKIP-MULTI-FOR", "Series has several frames of reference"
    ),
    SkipReason.MIXED_ORIENTATION: _private("SKIP-ORIENTATION", "Series has mixed image orientations"),
    SkipReason.UNEVEN_SPACING: _private("SKIP-SPACING", "Uneven slice spacing (gaps or duplicate slices)"),
    SkipReason.TOO_FEW_SLICES: _private("SKIP-FEW-SLICES", "Too few slices for analysis"),
    SkipReason.MULTI_FRAME: _private("SKIP-MULTIFRAME", "Multi-frame images are not supported"),
    SkipReason.UNDECODABLE_PIXELS: _private("SKIP-UNDECODABLE", "Pixel data could not be decoded"),
    SkipReason.PROCESSING_FAILED: _private("SKIP-FAILED", "AI processing failed"),
    SkipReason.OUT_OF_SCOPE: _private("SKIP-SCOPE", "Outside the model's scope"),
    SkipReason.MISSING_GEOMETRY: _private("SKIP-GEOMETRY", "Image geometry attributes missing"),
    SkipReason.GANTRY_TILT: _private("SKIP-TILT", "Gantry tilt: slices not stacked along their normal"),
    SkipReason.INCOMPLETE_SERIES: _private("SKIP-INCOMPLETE", "Series incomplete"),
    SkipReason.NOT_ORIGINAL_AXIAL: _private("SKIP-IMAGE-TYPE", "Image type or SOP class not supported"),
    SkipReason.MIXED_GEOMETRY: _private("SKIP-MIXED-GEOM", "Slices differ in matrix size or pixel spacing"),
    SkipReason.TOO_LARGE: _private("SKIP-TOO-LARGE", "Series larger than the node's memory budget"),
    SkipReason.MULTIPLE_STUDIES: _private("SKIP-MULTI-STUDY", "Series instances belong to several studies"),
}


class ResultKind(enum.Enum):
    """The objects and identifiers `result_uid` derives UIDs for (the ``kind`` argument)."""

    SR = "sr"
    SKIPPED_SR = "skipped-sr"
    SEG = "seg"
    SR_SERIES = "sr-series"
    SEG_SERIES = "seg-series"
    SEG_DIMENSION_ORGANIZATION = "seg-dimension-organization"
    TRACKING_CLASSIFICATION = "tracking-classification"
    TRACKING_LUNGS = "tracking-lungs"
    TRACKING_LESION = "tracking-lesion"
    TRACKING_LESION_OUTLINE = "tracking-lesion-outline"
    TRACKING_SKIPPED = "tracking-skipped"
    TRACKING_LUNG_VOLUME = "tracking-lung-volume"
    KOS = "kos"  # the IOCM rejection note withdrawing a superseded version
    KOS_SERIES = "kos-series"
    KEY_IMAGES = "key-images"  # the Key Object Selection naming the slices that drove the verdict
    KEY_IMAGES_SERIES = "key-images-series"


class SegmentNumber(enum.IntEnum):
    """Segment numbers in the node's SEG (the SR's volumetric group references LESION)."""

    LUNGS = 1
    LESION = 2


SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
KEY_IMAGES_SERIES_NUMBER = 9904
SR_SERIES_DESCRIPTION = "AI pneumonia report (NOT FOR CLINICAL USE)"
LUNG_VOLUME_SR_SERIES_DESCRIPTION = "AI lung volume report (NOT FOR CLINICAL USE)"
SEG_SERIES_DESCRIPTION = "AI lung and lesion segmentation (NOT FOR CLINICAL USE)"
KOS_SERIES_DESCRIPTION = "AI result withdrawn (superseded by a newer version)"
KEY_IMAGES_SERIES_DESCRIPTION = "AI key images (NOT FOR CLINICAL USE)"
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


def versioned_number(base: int, version: int) -> int:
    """The series number of result ``version``: 9901, 9911, 9921… for the SR, so a newer version never shares
    series numbers with the one it replaces (viewers sort and label by them)."""
    return base + 10 * (max(int(version), 1) - 1)
