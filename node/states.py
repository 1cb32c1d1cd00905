"""Closed sets of states, a leaf module: series, job and delivery states."""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    RECEIVING = "receiving"    # instances may still arrive
    COMPLETE = "complete"      # judged whole; a job was queued
    REOPENED = "reopened"      # an instance arrived after completion; a new result version will follow


class AssociationState(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
