"""Config for routing: the pipelines a route can name, `Route`, the default routes, priority rules."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from node.config.base import AETitle, _Frozen


class PipelineName(StrEnum):
    """The model pipelines a route can name (`node.pipelines` implements each)."""

    PNEUMONIA = "pneumonia"  # classifier + U-Net: pneumonia verdict, lung/lesion SEG
    LUNG_VOLUME = "lung-volume"  # U-Net only: lung and lesion volumes, SEG


IGNORE = "ignore"  # a route's pipeline value that drops the series without any result

# SOP classes by keyword or UID; resolved to UIDs when the config is validated.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _sop_class(value: str) -> str:
    if re.fullmatch(r"[0-9.]+", value):
        return value
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == value:
            return str(uid)
    raise ValueError(f"{value!r} is neither a UID nor a SOP class keyword (e.g. 'CTImageStorage')")


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from exc
    return value


class Route(_Frozen):
    """One routing rule: every condition given must hold (lists: any of; `image_type`: all of); the first route
    that matches a completed series names its pipeline, or `ignore`. Text is compared case-insensitively;
    regular expressions are searched (not anchored); "" in `body_part` matches a missing BodyPartExamined."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    pipeline: PipelineName | Literal["ignore"]
    modality: tuple[str, ...] = ()
    sop_class: tuple[Annotated[str, AfterValidator(_sop_class)], ...] = ()
    image_type: tuple[str, ...] = ()  # values that must all be present in ImageType
    image_type_not: tuple[str, ...] = ()  # values that must all be absent
    body_part: tuple[str, ...] = ()
    series_description: Annotated[str, AfterValidator(_regex)] | None = None
    protocol_name: Annotated[str, AfterValidator(_regex)] | None = None
    calling_ae: tuple[AETitle, ...] = ()
    min_slices: Annotated[int, Field(ge=1)] | None = None
    max_slices: Annotated[int, Field(ge=1)] | None = None
    min_slice_thickness_mm: Annotated[float, Field(ge=0)] | None = None
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] | None = None


_CHEST_CT: dict[str, Any] = dict(
    pipeline=PipelineName.PNEUMONIA, modality=("CT",), sop_class=(CT_IMAGE_STORAGE,),
    image_type=("ORIGINAL", "AXIAL"), image_type_not=("LOCALIZER",),
)
# The default: axial CT image series of the chest go to the pneumonia pipeline (by BodyPartExamined, or by the
# series description when the body part is missing); everything else is ignored. config/node.toml spells it out.
DEFAULT_ROUTES = (
    Route(name="chest-ct", body_part=("CHEST", "THORAX", "LUNG", "LUNGS"), **_CHEST_CT),
    Route(name="chest-ct-by-description", body_part=("",),
          series_description=r"chest|thorax|thoracic|lung|pulmo", **_CHEST_CT),
    Route(name="everything-else", pipeline="ignore"),
)


class Priority(StrEnum):
    STAT = "stat"
    ROUTINE = "routine"


class PriorityRule(_Frozen):
    """A series matches when every given condition holds: the calling AE, and/or a header keyword's value."""

    priority: Priority = Priority.STAT
    calling_ae: AETitle | None = None
    keyword: str | None = None
    equals: str | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> PriorityRule:
        if self.calling_ae is None and self.keyword is None:
            raise ValueError("a priority rule needs calling_ae and/or keyword")
        if (self.keyword is None) != (self.equals is None):
            raise ValueError("keyword and equals go together")
        if self.keyword is not None:
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(self.keyword) is None:
                raise ValueError(f"{self.keyword!r} is not a DICOM keyword")
        return self


