"""What every generated instance shares: patient identifiers, derived UIDs, dates, the
Patient/Study/Series/Equipment/SOP Common modules and native pixel data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    RE_VALID_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

_MANUFACTURER = "DICOMAI SYNTHETIC"
# The generator's historical name (it lived in dicomai.synthetic): it seeds the UIDs and
# pixels, so keeping it keeps every generated study identical to before the move.
_SOFTWARE = "dicomai.synthetic 1"


@dataclass(frozen=True, slots=True)
class PatientInfo:
    """Patient and visit identifiers written into generated datasets.

    The defaults are PHI sentinels: tests assert that none of them reaches a log line, an
    exception message or a file name.

    Parameters
    ----------
    name
        PatientName, DICOM PN form (``FAMILY^GIVEN``).
    patient_id
        PatientID.
    birth_date
        PatientBirthDate, ``YYYYMMDD``.
    sex
        PatientSex: ``M``, ``F`` or ``O``.
    accession
        AccessionNumber (at most 16 characters).
    institution
        InstitutionName.
    referring_physician
        ReferringPhysicianName, DICOM PN form.
    """

    name: str = "PHI^SENTINEL"
    patient_id: str = "PHI-SENTINEL-ID"
    birth_date: str = "19010101"
    sex: str = "O"
    accession: str = "PHISENTINELACC"
    institution: str = "PHI SENTINEL HOSPITAL"
    referring_physician: str = "PHI^REFERRER"

    def __post_init__(self) -> None:
        if self.sex not in {"M", "F", "O", ""}:
            raise ValueError('Argument "sex" must be one of "M", "F", "O" or "".')
        if len(self.accession) > 16:
            raise ValueError('Argument "accession" must be at most 16 characters.')
        if self.birth_date and (len(self.birth_date) != 8 or not self.birth_date.isdigit()):
            raise ValueError('Argument "birth_date" must be YYYYMMDD.')


DEFAULT_PATIENT: Final = PatientInfo()


def derive_uid(*parts: object) -> UID:
    """Return a UID derived deterministically from `parts`.

    Parameters
    ----------
    *parts
        Values whose ``str()`` forms seed the UID; the same parts always give the same UID.

    Returns
    -------
    UID
        A UID under pydicom's documented example root.
    """
    return generate_uid(
        prefix=PYDICOM_ROOT_UID, entropy_srcs=["dicomai.synthetic", *(str(p) for p in parts)]
    )


def stable_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError('Argument "seed" must be a non-negative int.')


def is_valid_uid(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def check_uid(name: str, value: str | None) -> None:
    if value is not None and not is_valid_uid(value):
        raise ValueError(f'Argument "{name}" must be a valid UID.')


def check_size(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or not 16 <= value <= 4096:
            raise ValueError(f'Argument "{name}" must be an int from 16 to 4096.')


def study_datetime(seed: int, study_uid: str) -> datetime:
    """A weekday working-hours date in 2026, fixed by the seed and study."""
    n = stable_int(seed, study_uid, "datetime")
    day = datetime(2026, 1, 5) + timedelta(days=(n % 300))
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day + timedelta(hours=7 + (n >> 16) % 10, minutes=(n >> 24) % 60, seconds=(n >> 32) % 60)


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S")


def decimal_string(value: float) -> str:
    return format_number_as_ds(float(value))


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMAI_SYNTH"
    return meta


@dataclass(frozen=True, slots=True)
class Study:
    patient: PatientInfo
    study_uid: str
    when: datetime
    study_id: str
    description: str


def new_instance(
    study: Study,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_uid: str,
    modality: str,
    series_number: int,
    instance_number: int,
    series_description: str,
    body_part: str,
    series_time: datetime,
) -> Dataset:
    """Patient, General Study, General Series, General Equipment and SOP Common modules."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid)
    p = study.patient
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = _da(series_time)
    ds.InstanceCreationTime = _tm(series_time)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = _da(study.when)
    ds.SeriesDate = _da(series_time)
    ds.AcquisitionDate = _da(series_time)
    ds.ContentDate = _da(series_time)
    ds.StudyTime = _tm(study.when)
    ds.SeriesTime = _tm(series_time)
    ds.AcquisitionTime = _tm(series_time)
    ds.ContentTime = _tm(series_time)
    ds.AccessionNumber = p.accession
    ds.Modality = modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = p.institution
    ds.ReferringPhysicianName = p.referring_physician
    ds.StudyDescription = study.description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = f"SYNTHETIC {modality}"
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.BodyPartExamined = body_part
    ds.SoftwareVersions = _SOFTWARE
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def set_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, photometric: str) -> None:
    """Write a 2-D uint16 array as unsigned native PixelData."""
    if stored.ndim != 2:
        raise ValueError("pixel array must be 2-D")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype="<u2").tobytes())
