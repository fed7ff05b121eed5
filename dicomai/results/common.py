"""Helpers every result object shares: input checks, UIDs, model identity, dates, equipment.

Pure functions: values in, values or datasets out; no I/O and no logging of dataset content.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from dicomai.inference.findings import DISCLAIMER, Findings, ModelIdentity
from dicomai.results.codes import LabelCode, table_for

__all__ = [
    "NOT_FOR_DIAGNOSTIC_USE",
    "PROCESSING_ALGORITHM",
    "add_air_equipment",
    "air_contributing_equipment",
    "check_findings",
    "check_sources",
    "clip_text",
    "comment_text",
    "content_when",
    "model_line",
    "no_name_warnings",
    "sentences",
    "stamp_series_time",
    "uid_key",
    "with_type2_defaults",
]

#: IHE AIR Rev 1.1 purpose of the "Processing Algorithm" Contributing Equipment item.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use."
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@contextmanager
def no_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning, which quotes the name (PHI) in its text."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        yield


def with_type2_defaults(ds: Dataset) -> Dataset:
    """Copy of ``ds`` with the attributes highdicom reads from evidence present (maybe empty)."""
    out = Dataset()
    out.update(ds)  # new container; Dataset(ds) and ds.copy() would share ds's elements
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def check_sources(sources: Sequence[Dataset]) -> None:
    """Check that ``sources`` is a non-empty list of distinct instances of one study.

    Raises
    ------
    ValueError
        If not; the message names the argument, never a value.
    """
    if len(sources) == 0:
        raise ValueError('Argument "sources" must not be empty.')
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError('Argument "sources" must contain pydicom Datasets.')
        for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise ValueError(f'Argument "sources" has an instance without {keyword}.')
    if len({str(ds.StudyInstanceUID) for ds in sources}) != 1:
        raise ValueError('Argument "sources" must all belong to one study.')
    if len({str(ds.SOPInstanceUID) for ds in sources}) != len(sources):
        raise ValueError('Argument "sources" must not repeat an instance.')


def check_findings(sources: Sequence[Dataset], findings: Findings) -> Mapping[str, LabelCode]:
    """Check ``findings`` against its task's code table and ``sources``; return the table.

    Raises
    ------
    ValueError
        If a label has no code, a score or threshold is missing or outside [0, 1], or an image
        score or key image names an instance that is not in ``sources``.
    """
    if not isinstance(findings, Findings):
        raise TypeError('Argument "findings" must be a Findings.')
    table = table_for(findings.model.task)
    if not findings.labels:
        raise ValueError('Argument "findings" has no labels.')
    for label in findings.labels:
        if label not in table:
            raise ValueError(f'Argument "findings" has label "{label}", which has no code.')
        for what, values in (("score", findings.study_scores), ("threshold", findings.thresholds)):
            value = values.get(label)
            if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f'Argument "findings" needs a {what} in [0, 1] for "{label}".')
    known = {str(ds.SOPInstanceUID) for ds in sources}
    for uid, scores in findings.image_scores.items():
        if uid not in known:
            raise ValueError('Argument "findings" scores an instance that is not in "sources".')
        for label, value in scores.items():
            if label not in table or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError('Argument "findings" has an invalid image score.')
    if any(uid not in known for uid in findings.key_image_uids):
        raise ValueError('Argument "findings" has a key image that is not in "sources".')
    if findings.started.tzinfo is None:
        raise ValueError('Argument "findings" must have an aware "started" time.')
    return table


def uid_key(sources: Sequence[Dataset], model: ModelIdentity) -> dict[str, object]:
    """Content key of a result: study, sorted input instances, model name, version and hash."""
    return {
        "study_uid": str(sources[0].StudyInstanceUID),
        "source_uids": sorted(str(ds.SOPInstanceUID) for ds in sources),
        "model": model.name,
        "version": model.version,
        "sha256": model.sha256,
    }


def model_line(model: ModelIdentity) -> str:
    """``name version (sha256 …)``: the model as every object records it."""
    return f"{model.name} {model.version} (sha256 {model.sha256})"


def content_when(started: datetime | None) -> dict[str, Any]:
    """``content_date``/``content_time`` keyword arguments pinned to ``started``, in UTC."""
    if started is None:
        return {}
    utc = started.astimezone(UTC)
    return {"content_date": utc.date(), "content_time": utc.time()}


def air_contributing_equipment(model: ModelIdentity) -> Dataset:
    """IHE AIR "Processing Algorithm" Contributing Equipment item (a plain Dataset: highdicom's
    ContributingEquipment takes only DCM purposes)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = model.vendor
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.version
    item.DeviceUID = model.device_uid  # dciodvfy: "not present in standard DICOM IOD" (warning)
    item.ContributionDescription = clip_text(
        sentences(f"{model_line(model)}: {model.description}", NOT_FOR_DIAGNOSTIC_USE), 1024
    )
    return item


def add_air_equipment(ds: Dataset, model: ModelIdentity) -> None:
    """Append the AIR item to the Contributing Equipment Sequence of ``ds``."""
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = []
    ds.ContributingEquipmentSequence.append(air_contributing_equipment(model))


def sentences(*parts: str) -> str:
    """Join text fragments into sentences: each ends with one full stop, none is repeated
    (case-insensitively), empty fragments are dropped.

    ``sentences("Untrained model. Not for diagnostic use.", "Not for diagnostic use")`` gives
    ``"Untrained model. Not for diagnostic use."``.
    """
    out: list[str] = []
    seen: set[str] = set()
    for part in parts:
        for piece in part.replace("\n", " ").split(". "):
            text = piece.strip().rstrip(".").strip()
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append(text + ".")
    return " ".join(out)


def comment_text(model: ModelIdentity) -> str:
    """Report-level comment: the disclaimer, the model and its description (no repetition)."""
    return sentences(DISCLAIMER, f"Model {model_line(model)}: {model.description}")


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stamp_series_time(ds: Dataset, started: datetime | None) -> None:
    """SeriesDate/SeriesTime (and ContentDate/Time where missing) of a result object: when the
    analysis started (UTC, like ContentDate/Time), else now. Without them Orthanc Explorer and
    date-sorted PACS lists file the series under "?"."""
    when = (started or datetime.now(UTC)).astimezone(UTC)
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    if not ds.get("ContentDate"):
        ds.ContentDate = ds.SeriesDate
    if not ds.get("ContentTime"):
        ds.ContentTime = ds.SeriesTime
