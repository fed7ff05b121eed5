"""Deterministic synthetic DICOM studies (head CT, radiographs, MR) for tests and demos."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    RE_VALID_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSNearLossless,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "CT_RESCALE_INTERCEPT",
    "XRAY_KINDS",
    "PatientInfo",
    "derive_uid",
    "make_head_ct",
    "make_mr",
    "make_xray",
    "recompress",
    "write_study",
]

#: RescaleIntercept of generated CT: stored value = HU + 1024, 12 bits stored, unsigned.
CT_RESCALE_INTERCEPT: Final = -1024
#: Radiograph kinds that `make_xray` draws, with their default BodyPartExamined.
XRAY_KINDS: Final[dict[str, str]] = {
    "chest": "CHEST",
    "hand": "HAND",
    "wrist": "WRIST",
    "elbow": "ELBOW",
    "knee": "KNEE",
    "ankle": "ANKLE",
}

_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_WRITABLE_NATIVE = _UNCOMPRESSED | {DeflatedExplicitVRLittleEndian}
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
_CT_BITS_STORED = 12
_XR_BITS_STORED = 12
_MANUFACTURER = "DICOMAI SYNTHETIC"
# The generator's historical name (it lived in dicomai.synthetic): it seeds the UIDs and
# pixels, so keeping it keeps every generated study identical to before the move.
_SOFTWARE = "dicomai.synthetic 1"
#: SNOMED CT codes of CID 4031 for AnatomicRegionSequence, keyed by BodyPartExamined.
_ANATOMY_CODES: Final[dict[str, tuple[str, str]]] = {
    "CHEST": ("43799004", "Chest"),
    "HAND": ("85562004", "Hand"),
    "WRIST": ("74670003", "Wrist joint"),
    "ELBOW": ("127949000", "Elbow"),
    "KNEE": ("72696002", "Knee"),
    "ANKLE": ("70258002", "Ankle joint"),
}
#: Field of view of each radiograph kind, in mm.
_XR_FOV_MM: Final[dict[str, float]] = {
    "chest": 430.0,
    "hand": 240.0,
    "wrist": 180.0,
    "elbow": 240.0,
    "knee": 300.0,
    "ankle": 260.0,
}


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


_DEFAULT_PATIENT: Final = PatientInfo()


# --------------------------------------------------------------------------------------------
# UIDs, dates, common modules
# --------------------------------------------------------------------------------------------


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


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError('Argument "seed" must be a non-negative int.')


def _is_valid_uid(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def _check_uid(name: str, value: str | None) -> None:
    if value is not None and not _is_valid_uid(value):
        raise ValueError(f'Argument "{name}" must be a valid UID.')


def _check_size(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or not 16 <= value <= 4096:
            raise ValueError(f'Argument "{name}" must be an int from 16 to 4096.')


def _study_datetime(seed: int, study_uid: str) -> datetime:
    """A weekday working-hours date in 2026, fixed by the seed and study."""
    n = _stable_int(seed, study_uid, "datetime")
    day = datetime(2026, 1, 5) + timedelta(days=(n % 300))
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day + timedelta(hours=7 + (n >> 16) % 10, minutes=(n >> 24) % 60, seconds=(n >> 32) % 60)


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S")


def _ds(value: float) -> str:
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
class _Study:
    patient: PatientInfo
    study_uid: str
    when: datetime
    study_id: str
    description: str


def _new_instance(
    study: _Study,
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


def _set_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, photometric: str) -> None:
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


def _finish(datasets: list[Dataset], transfer_syntax: str) -> list[Dataset]:
    """Put every dataset into `transfer_syntax`, compressing where needed."""
    ts = UID(transfer_syntax)
    if ts in _WRITABLE_NATIVE:
        for ds in datasets:
            ds.file_meta.TransferSyntaxUID = ts
        return datasets
    if not ts.is_compressed:
        raise ValueError('Argument "transfer_syntax" must be little endian or a compressed syntax.')
    return [_compress_in_place(ds, ts, {}) for ds in datasets]


def _compress_in_place(ds: Dataset, ts: UID, kwargs: dict[str, Any]) -> Dataset:
    options = dict(kwargs)
    if ts == JPEG2000 and "j2k_cr" not in options and "j2k_psnr" not in options:
        options["j2k_cr"] = [10.0]
    if ts == JPEGLSNearLossless and "jls_error" not in options:
        options["jls_error"] = 2
    ds.compress(ts, generate_instance_uid=False, **options)
    return ds


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: about -1..1 across the longer side, y pointing down."""
    half = max(rows, cols) / 2.0
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) / half)[:, None]
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2.0) / half)[None, :]
    return np.broadcast_to(x, (rows, cols)), np.broadcast_to(y, (rows, cols))


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dx * dx + dy * dy or 1e-12
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur via cumulative sums (edge-padded)."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        out = ((hi - lo) / k).astype(np.float32)
    return out


class _Limb:
    """Soft-tissue and bone masks of a limb phantom, built from capsules and ellipses."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.soft = np.zeros(x.shape, dtype=bool)
        self.bone = np.zeros(x.shape, dtype=bool)
        self.marrow = np.zeros(x.shape, dtype=bool)

    def tissue(self, p0: tuple[float, float], p1: tuple[float, float], r: float) -> None:
        self.soft |= _segment_distance(self.x, self.y, p0, p1) <= r

    def tissue_ellipse(self, cx: float, cy: float, ax: float, ay: float) -> None:
        self.soft |= _ellipse(self.x, self.y, cx, cy, ax, ay)

    def long_bone(self, p0: tuple[float, float], p1: tuple[float, float], r: float) -> None:
        d = _segment_distance(self.x, self.y, p0, p1)
        self.bone |= d <= r
        self.marrow |= d <= 0.55 * r

    def round_bone(self, cx: float, cy: float, ax: float, ay: float) -> None:
        self.bone |= _ellipse(self.x, self.y, cx, cy, ax, ay)
        self.marrow |= _ellipse(self.x, self.y, cx, cy, 0.7 * ax, 0.7 * ay)

    @property
    def cortex(self) -> np.ndarray:
        return self.bone & ~self.marrow


def _draw_hand(limb: _Limb) -> None:
    # Forearm, palm and carpus; thumb on image left.
    limb.tissue((0.0, 0.7), (0.0, 1.4), 0.27)
    limb.tissue_ellipse(0.0, 0.3, 0.28, 0.3)
    limb.long_bone((-0.1, 0.8), (-0.12, 1.4), 0.075)  # radius
    limb.long_bone((0.13, 0.82), (0.14, 1.4), 0.05)  # ulna
    for cx, cy in (
        (-0.12, 0.68),
        (0.0, 0.66),
        (0.1, 0.68),
        (-0.16, 0.58),
        (-0.06, 0.57),
        (0.04, 0.57),
        (0.13, 0.59),
        (0.16, 0.73),
    ):
        limb.round_bone(cx, cy, 0.055, 0.045)
    fingers = (  # base x, angle (degrees from vertical), length scale
        (-0.2, -10.0, 1.0),
        (-0.065, -3.0, 1.08),
        (0.07, 4.0, 1.02),
        (0.2, 11.0, 0.85),
    )
    for base_x, angle, scale in fingers:
        ux, uy = np.sin(np.radians(angle)), -np.cos(np.radians(angle))
        start = (base_x * 0.6, 0.52)
        head = (base_x + ux * 0.02, 0.08)
        limb.long_bone(start, head, 0.034)  # metacarpal
        pos = (head[0] + ux * 0.045, head[1] + uy * 0.045)
        tip = pos
        for length, radius in ((0.27, 0.031), (0.16, 0.027), (0.11, 0.023)):
            end = (pos[0] + ux * length * scale, pos[1] + uy * length * scale)
            limb.long_bone(pos, end, radius)
            tip = end
            pos = (end[0] + ux * 0.04, end[1] + uy * 0.04)
        limb.tissue(head, tip, 0.07)
    # Thumb.
    limb.long_bone((-0.2, 0.56), (-0.38, 0.3), 0.036)
    limb.long_bone((-0.41, 0.26), (-0.53, 0.08), 0.032)
    limb.long_bone((-0.55, 0.04), (-0.61, -0.08), 0.027)
    limb.tissue((-0.2, 0.56), (-0.62, -0.1), 0.08)


def _draw_knee(limb: _Limb, lateral: bool) -> None:
    limb.tissue((0.0, -1.4), (0.0, 1.4), 0.48)
    limb.long_bone((0.0, -1.4), (0.0, -0.25), 0.17)  # femoral shaft
    limb.long_bone((0.0, 0.12), (0.0, 1.4), 0.15)  # tibial shaft
    if lateral:
        limb.round_bone(0.03, -0.1, 0.2, 0.17)  # condyles seen side-on
        limb.long_bone((-0.18, 0.08), (0.2, 0.08), 0.06)  # plateau
        limb.round_bone(-0.33, -0.18, 0.06, 0.13)  # patella, anterior
        limb.long_bone((0.14, 0.3), (0.08, 1.4), 0.045)  # fibula behind the tibia
    else:
        limb.round_bone(-0.14, -0.12, 0.15, 0.14)
        limb.round_bone(0.14, -0.12, 0.15, 0.14)
        limb.long_bone((-0.23, 0.08), (0.23, 0.08), 0.06)
        limb.round_bone(0.0, -0.22, 0.11, 0.12)
        limb.long_bone((0.29, 0.26), (0.31, 1.4), 0.05)


def _draw_ankle(limb: _Limb) -> None:
    limb.tissue((0.0, -1.4), (0.0, 0.75), 0.38)
    limb.tissue_ellipse(0.0, 0.85, 0.42, 0.3)
    limb.long_bone((0.0, -1.4), (0.0, 0.3), 0.17)  # tibia
    limb.round_bone(-0.15, 0.36, 0.06, 0.1)  # medial malleolus
    limb.long_bone((0.27, -1.4), (0.29, 0.48), 0.06)  # fibula
    limb.round_bone(0.0, 0.58, 0.2, 0.14)  # talus
    limb.round_bone(0.0, 0.9, 0.26, 0.13)  # calcaneus overlapping


def _draw_elbow(limb: _Limb) -> None:
    limb.tissue((0.0, -1.4), (0.0, 1.4), 0.4)
    limb.long_bone((0.0, -1.4), (0.0, -0.25), 0.13)  # humerus
    limb.round_bone(0.0, -0.12, 0.28, 0.12)  # condyles
    limb.long_bone((-0.14, 0.1), (-0.12, 1.4), 0.07)  # radius
    limb.long_bone((0.1, 0.04), (0.12, 1.4), 0.08)  # ulna


def _limb(kind: str, x: np.ndarray, y: np.ndarray, lateral: bool) -> _Limb:
    if kind == "wrist":  # a close-up of the hand phantom around the carpus
        x, y = x / 1.9, y / 1.9 + 0.68
    limb = _Limb(x, y)
    if kind in {"hand", "wrist"}:
        _draw_hand(limb)
    elif kind == "knee":
        _draw_knee(limb, lateral)
    elif kind == "ankle":
        _draw_ankle(limb)
    elif kind == "elbow":
        _draw_elbow(limb)
    else:  # pragma: no cover - guarded by make_xray
        raise ValueError(kind)
    return limb


def _chest_attenuation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PA chest: darker lungs, brighter mediastinum, heart, spine, ribs, clavicles."""
    att = np.zeros(x.shape, dtype=np.float32)
    body = _ellipse(x, y, 0.0, 0.15, 0.88, 1.15)
    att[body] = 0.42
    ax = np.abs(x)
    for side in (-1.0, 1.0):
        cx = 0.37 * side
        dome = 0.4 + 0.18 * ((x - cx) / 0.3) ** 2 - (0.04 if side < 0 else 0.0)
        lung = _ellipse(x, y, cx, -0.02, 0.27, 0.58) & (y < dome)
        att[lung] = 0.14
    heart = _ellipse(x, y, 0.1, 0.22, 0.27, 0.2)
    mediastinum = (ax < 0.11) & (y > -0.75) & (y < 0.45)
    att[heart | mediastinum] = 0.5
    spine = (ax < 0.065) & body
    vertebra = 0.5 + 0.5 * np.cos((y + 1.0) * np.pi / 0.085)
    att[spine] += np.float32(0.12) + 0.06 * vertebra[spine]
    for k in range(10):
        centre = -0.62 + k * 0.105 + 0.45 * (ax - 0.05) ** 2
        rib = (np.abs(y - centre) < 0.018) & (ax > 0.07) & (ax < 0.72) & body
        att[rib] += 0.1
    clavicle = (np.abs(y - (-0.66 + 0.12 * (ax - 0.15))) < 0.025) & (ax > 0.08) & (ax < 0.55)
    att[clavicle] += 0.2
    shoulder = (y < -0.55) & (ax > 0.55) & body
    att[shoulder] += 0.1
    return att


def _radiograph_stored(
    att: np.ndarray, rng: np.random.Generator, *, monochrome1: bool, blur: int
) -> tuple[np.ndarray, bool]:
    """Map attenuation (0 air .. 1 dense bone) to 12-bit stored values.

    Returns the array and whether higher stored values mean more attenuation.
    """
    att = _box_blur(att, blur)
    att = att + rng.normal(0.0, 0.012, att.shape).astype(np.float32)
    max_value = (1 << _XR_BITS_STORED) - 1
    bright = np.clip(200.0 + att * 3600.0, 0, max_value)
    if monochrome1:
        return np.rint(max_value - bright).astype(np.uint16), False
    return np.rint(bright).astype(np.uint16), True


def _window(stored: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(stored, [1.0, 99.0])
    return round((lo + hi) / 2.0), max(round(hi - lo), 2)


# --------------------------------------------------------------------------------------------
# Head CT
# --------------------------------------------------------------------------------------------


def _head_slice(
    x_mm: np.ndarray,
    y_mm: np.ndarray,
    u: float,
    rng: np.random.Generator,
    *,
    bleed: bool,
) -> np.ndarray:
    """One axial slice of the head phantom in HU; `u` runs from -1 (skull base) to 1 (vertex)."""
    hu = np.full(x_mm.shape, -1000.0, dtype=np.float32)
    scale2 = 1.0 - ((u + 0.3) / 1.36) ** 2
    if scale2 > 0.01:
        s = float(np.sqrt(scale2))
        a, b = 72.0 * s, 92.0 * s
        scalp = ((x_mm / (a + 5.0)) ** 2 + (y_mm / (b + 5.0)) ** 2) <= 1.0
        hu[scalp] = 25.0
        hu[((x_mm / a) ** 2 + (y_mm / b) ** 2) <= 1.0] = 1000.0
        ai, bi = max(a - 7.0, 1.0), max(b - 7.0, 1.0)
        rho = np.sqrt((x_mm / ai) ** 2 + (y_mm / bi) ** 2)
        brain = rho <= 1.0
        parenchyma = np.where(rho > 0.9, 39.0, 32.0).astype(np.float32)  # cortex / white matter
        hu[brain] = parenchyma[brain]
        if -0.3 <= u <= 0.45:  # lateral ventricles, widest mid-stack
            v = 1.0 - abs(u - 0.08) / 0.4
            for side in (-1.0, 1.0):
                vent = _ellipse(x_mm, y_mm, side * 11.0 * s, -4.0, 5.0 * v + 2.0, 24.0 * v + 4.0)
                hu[vent & brain] = 5.0
        if u < -0.55:  # orbits: fat around the globe
            for side in (-1.0, 1.0):
                cx, cy = side * 30.0 * s, -0.82 * b
                hu[_ellipse(x_mm, y_mm, cx, cy, 16.0, 14.0)] = -80.0
                hu[_ellipse(x_mm, y_mm, cx, cy, 11.0, 11.0)] = 12.0
        if bleed:  # right-sided subdural crescent (patient's right is image left, -x)
            theta = np.arctan2(y_mm / bi, -x_mm / ai)
            span = np.radians(60.0)
            width = 0.16 * np.cos(np.clip(theta / span, -1.0, 1.0) * np.pi / 2.0)
            crescent = brain & (np.abs(theta) < span) & (rho > 1.0 - width)
            hu[crescent] = 72.0
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * 3.0
    return hu


def _bleed_slices(n_slices: int) -> range:
    span = max(3, n_slices // 6)
    start = min(max(0, int(n_slices * 0.55) - span // 2), max(0, n_slices - span))
    return range(start, min(n_slices, start + span))


def make_head_ct(
    n_slices: int = 24,
    *,
    rows: int = 256,
    cols: int = 256,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    patient: PatientInfo = _DEFAULT_PATIENT,
    slice_thickness: float = 5.0,
    with_localizer: bool = False,
    bleed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """Generate a non-contrast axial head CT series of a phantom, in HU.

    Stored values are unsigned 12-bit, HU = stored - 1024 (RescaleSlope 1,
    RescaleIntercept -1024). The phantom has air (-1000 HU), scalp (25), skull (1000), brain
    (cortex 39, white matter 32), lateral ventricles (5) on the middle slices and orbits on the
    lowest; ``bleed=True`` adds a 72 HU right-sided subdural crescent on a few middle slices.
    Slices run from skull base to vertex with ImagePositionPatient z increasing.

    Parameters
    ----------
    n_slices
        Number of axial slices (1 to 2000).
    rows, cols
        Matrix size of each slice (16 to 4096). The field of view is 250 mm.
    study_uid, series_uid
        UIDs to use; derived from `seed` when None. All other UIDs derive from these and
        `seed`, so a new `study_uid` gives wholly new instances.
    seed
        Seeds the noise, the dates and every derived UID.
    patient
        Identifiers written into each dataset.
    slice_thickness
        SliceThickness and spacing between slice centres, in mm.
    with_localizer
        Add a one-image lateral LOCALIZER series (SeriesNumber 1) before the axial series.
    bleed
        Draw a hyperdense (60 to 80 HU) subdural crescent on a few middle slices.
    transfer_syntax
        Explicit or Implicit VR Little Endian, Deflated, or an encodable compressed syntax (RLE
        Lossless, JPEG-LS, JPEG 2000); compressed slices keep their SOP Instance UIDs.

    Returns
    -------
    list of Dataset
        The localizer first (when requested), then the axial slices in InstanceNumber order.

    Raises
    ------
    ValueError
        If an argument is out of range or a UID is invalid.
    """
    if not isinstance(n_slices, int) or not 1 <= n_slices <= 2000:
        raise ValueError('Argument "n_slices" must be an int from 1 to 2000.')
    _check_size(rows, cols)
    _check_seed(seed)
    _check_uid("study_uid", study_uid)
    _check_uid("series_uid", series_uid)
    if not 0.1 <= slice_thickness <= 20.0:
        raise ValueError('Argument "slice_thickness" must be from 0.1 to 20 mm.')

    study_uid = study_uid or derive_uid(seed, "head-ct", "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "head-ct", "series")
    when = _study_datetime(seed, study_uid)
    study = _Study(
        patient,
        study_uid,
        when,
        f"CT{_stable_int(seed, study_uid) % 10**8}",
        "CT HEAD WITHOUT CONTRAST",
    )
    frame_uid = derive_uid(seed, study_uid, "frame-of-reference")
    spacing = 250.0 / max(rows, cols)
    x0 = -(cols - 1) / 2.0 * spacing
    y0 = -(rows - 1) / 2.0 * spacing
    z0 = -round((n_slices - 1) * slice_thickness / 2.0, 2)
    x_mm = (np.arange(cols, dtype=np.float32) * spacing + x0)[None, :]
    y_mm = (np.arange(rows, dtype=np.float32) * spacing + y0)[:, None]
    x_mm, y_mm = np.broadcast_to(x_mm, (rows, cols)), np.broadcast_to(y_mm, (rows, cols))
    rng = np.random.default_rng([seed, _stable_int(study_uid) & 0xFFFFFFFF])
    bleed_at = _bleed_slices(n_slices) if bleed else range(0)
    series_time = when + timedelta(minutes=2)
    max_value = (1 << _CT_BITS_STORED) - 1
    projection = np.zeros((n_slices, rows), dtype=np.float32) if with_localizer else None

    out: list[Dataset] = []
    for i in range(n_slices):
        u = -1.0 + 2.0 * (i + 0.5) / n_slices
        hu = _head_slice(x_mm, y_mm, u, rng, bleed=i in bleed_at)
        if projection is not None:
            projection[i] = np.clip(hu + 1000.0, 0.0, None).sum(axis=1) * (spacing / 1000.0)
        stored = np.clip(np.rint(hu - CT_RESCALE_INTERCEPT), 0, max_value).astype(np.uint16)
        z = z0 + i * slice_thickness
        ds = _new_instance(
            study,
            sop_class_uid=CTImageStorage,
            sop_instance_uid=derive_uid(seed, series_uid, "slice", i),
            series_uid=series_uid,
            modality="CT",
            series_number=2,
            instance_number=i + 1,
            series_description="HEAD WO",
            body_part="HEAD",
            series_time=series_time,
        )
        _ct_acquisition(ds, ["ORIGINAL", "PRIMARY", "AXIAL"], frame_uid)
        ds.ImagesInAcquisition = n_slices
        ds.SliceThickness = _ds(slice_thickness)
        ds.SpacingBetweenSlices = _ds(slice_thickness)
        ds.ReconstructionDiameter = _ds(spacing * max(rows, cols))
        ds.ConvolutionKernel = "H30s"
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        _set_pixels(ds, stored, _CT_BITS_STORED, "MONOCHROME2")
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.WindowCenterWidthExplanation = "BRAIN"
        ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        out.append(ds)

    if projection is not None:
        out.insert(
            0,
            _head_localizer(
                study,
                seed,
                frame_uid,
                projection,
                rows,
                cols,
                y0,
                z0,
                slice_thickness,
                spacing,
                rng,
                when,
            ),
        )
    return _finish(out, transfer_syntax)


def _ct_acquisition(ds: Dataset, image_type: list[str], frame_uid: str) -> None:
    ds.ImageType = image_type
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "280"
    ds.Exposure = "280"
    ds.FocalSpots = "0.7"
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""


def _head_localizer(
    study: _Study,
    seed: int,
    frame_uid: str,
    projection: np.ndarray,
    rows: int,
    cols: int,
    y0: float,
    z0: float,
    slice_thickness: float,
    spacing: float,
    rng: np.random.Generator,
    when: datetime,
) -> Dataset:
    """A lateral scout: vertical = z (vertex at the top), horizontal = y (anterior left)."""
    n_slices, axial_rows = projection.shape
    z_index = ((np.arange(rows) + 0.5) * n_slices / rows).astype(int)[::-1]
    y_index = ((np.arange(cols) + 0.5) * axial_rows / cols).astype(int)
    image = projection[z_index][:, y_index]
    peak = float(image.max()) or 1.0
    noisy = image / peak * 3000.0 + 100.0 + rng.normal(0.0, 8.0, image.shape)
    stored = np.clip(np.rint(noisy), 0, (1 << _CT_BITS_STORED) - 1).astype(np.uint16)
    series_uid = derive_uid(seed, study.study_uid, "localizer", "series")
    ds = _new_instance(
        study,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=derive_uid(seed, series_uid, "localizer", 0),
        series_uid=series_uid,
        modality="CT",
        series_number=1,
        instance_number=1,
        series_description="TOPOGRAM",
        body_part="HEAD",
        series_time=when + timedelta(minutes=1),
    )
    _ct_acquisition(ds, ["ORIGINAL", "PRIMARY", "LOCALIZER"], frame_uid)
    ds.AcquisitionNumber = 2  # the scout is its own acquisition
    ds.ImagesInAcquisition = 1
    z_extent = n_slices * slice_thickness
    z_top = z0 + (n_slices - 0.5) * slice_thickness
    ds.SliceThickness = _ds(slice_thickness)
    ds.ImagePositionPatient = ["0", _ds(y0), _ds(z_top)]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds(z_extent / rows), _ds(spacing * axial_rows / cols)]
    _set_pixels(ds, stored, _CT_BITS_STORED, "MONOCHROME2")
    centre, width = _window(stored)
    ds.WindowCenter = _ds(centre)
    ds.WindowWidth = _ds(width)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    return ds


# --------------------------------------------------------------------------------------------
# Radiographs
# --------------------------------------------------------------------------------------------


def make_xray(
    kind: str = "chest",
    *,
    modality: str = "DX",
    body_part: str | None = None,
    view_position: str | None = None,
    laterality: str | None = None,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient: PatientInfo = _DEFAULT_PATIENT,
    monochrome1: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """Generate one radiograph: DX For Presentation or CR.

    Chest images show darker lungs, a brighter mediastinum and heart, spine, ribs and
    clavicles; limb images show soft tissue with cortical and medullary bone.

    Parameters
    ----------
    kind
        One of `XRAY_KINDS`: ``chest``, ``hand``, ``wrist``, ``elbow``, ``knee``, ``ankle``.
    modality
        ``DX`` (Digital X-Ray Image Storage - For Presentation) or ``CR`` (Computed
        Radiography Image Storage).
    body_part
        BodyPartExamined; defaults to the kind's entry in `XRAY_KINDS`. Pass ``""`` to write
        an empty value (an unroutable radiograph).
    view_position
        ViewPosition written verbatim: ``PA`` (default for chest and hand), ``AP`` (default
        for the others), ``LL``, ``RL`` or ``LAT`` (a common non-standard value). A lateral
        knee is drawn side-on.
    laterality
        ``R``, ``L``, ``U`` or ``B``. Defaults to ``U`` for chest and ``R`` for limbs; a left
        limb is drawn mirrored. DX writes ImageLaterality; limbs also get series Laterality.
    rows, cols
        Matrix size (16 to 4096).
    seed
        Seeds the noise, dates and derived UIDs.
    patient
        Identifiers written into the dataset.
    monochrome1
        Write MONOCHROME1 (bone has low stored values) instead of MONOCHROME2.
    study_uid, series_uid
        UIDs to use; derived from `seed` when None.
    transfer_syntax
        As for `make_head_ct`.

    Returns
    -------
    Dataset
        The radiograph, with file meta.

    Raises
    ------
    ValueError
        If an argument is not one of the allowed values.
    """
    if kind not in XRAY_KINDS:
        raise ValueError(f'Argument "kind" must be one of {sorted(XRAY_KINDS)}.')
    if modality not in {"DX", "CR"}:
        raise ValueError('Argument "modality" must be "DX" or "CR".')
    _check_size(rows, cols)
    _check_seed(seed)
    _check_uid("study_uid", study_uid)
    _check_uid("series_uid", series_uid)
    body_part = XRAY_KINDS[kind] if body_part is None else body_part
    view = view_position or ("PA" if kind in {"chest", "hand"} else "AP")
    if not view.isupper() or len(view) > 16:
        raise ValueError('Argument "view_position" must be an upper-case code string.')
    side = laterality or ("U" if kind == "chest" else "R")
    if side not in {"R", "L", "U", "B"}:
        raise ValueError('Argument "laterality" must be "R", "L", "U" or "B".')

    study_uid = study_uid or derive_uid(seed, "xray", kind, "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "xray", kind, view, "series")
    when = _study_datetime(seed, study_uid)
    region = body_part or kind.upper()
    study = _Study(
        patient, study_uid, when, f"XR{_stable_int(seed, study_uid) % 10**8}", f"XR {region} {view}"
    )
    rng = np.random.default_rng([seed, _stable_int(series_uid) & 0xFFFFFFFF])

    x, y = _grid(rows, cols)
    if side == "L":
        x = -x
    if kind == "chest":
        att = _chest_attenuation(x, y)
    else:
        limb = _limb(kind, x, y, lateral=view in _LATERAL_VIEWS)
        att = 0.3 * limb.soft.astype(np.float32)
        att[limb.bone] = 0.62
        att[limb.cortex] = 0.85
    stored, bone_high = _radiograph_stored(
        att, rng, monochrome1=monochrome1, blur=max(1, max(rows, cols) // 400)
    )

    sop_class = (
        DigitalXRayImageStorageForPresentation
        if modality == "DX"
        else (ComputedRadiographyImageStorage)
    )
    ds = _new_instance(
        study,
        sop_class_uid=sop_class,
        sop_instance_uid=derive_uid(seed, series_uid, "image", 0),
        series_uid=series_uid,
        modality=modality,
        series_number=1,
        instance_number=1,
        series_description=f"{region} {view}",
        body_part=body_part,
        series_time=when + timedelta(minutes=1),
    )
    spacing = _XR_FOV_MM[kind] / max(rows, cols)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = "120" if kind == "chest" else "55"
    ds.DistanceSourceToDetector = "1800" if kind == "chest" else "1100"
    ds.ExposureTime = "10"
    ds.XRayTubeCurrent = "320" if kind == "chest" else "100"
    ds.Exposure = "3" if kind == "chest" else "1"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if kind == "chest" or side != "L" else ["R", "F"]
    ds.ImagerPixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    if kind != "chest":
        ds.Laterality = side
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    _set_pixels(ds, stored, _XR_BITS_STORED, photometric)
    centre, width = _window(stored)
    ds.WindowCenter = _ds(centre)
    ds.WindowWidth = _ds(width)
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = side
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # +1: lower values mean less beam intensity (more attenuation).
        ds.PixelIntensityRelationshipSign = -1 if bone_high else 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        code = _ANATOMY_CODES.get(body_part)
        if code is not None:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
                code[0],
                "SCT",
                code[1],
            )
            ds.AnatomicRegionSequence = DicomSequence([item])
        else:
            ds.AnatomicRegionSequence = DicomSequence([])
    return _finish([ds], transfer_syntax)[0]


# --------------------------------------------------------------------------------------------
# MR (a modality no route handles)
# --------------------------------------------------------------------------------------------


def make_mr(
    body_part: str = "KNEE",
    n_slices: int = 3,
    *,
    rows: int = 256,
    cols: int = 256,
    seed: int = 0,
    patient: PatientInfo = _DEFAULT_PATIENT,
    study_uid: str | None = None,
    series_uid: str | None = None,
    laterality: str = "R",
    slice_thickness: float = 3.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """Generate a sagittal T1-weighted MR series (MR Image Storage).

    Parameters
    ----------
    body_part
        BodyPartExamined. ``KNEE`` draws a knee (bright marrow, dark cortex); anything else
        draws a featureless soft-tissue ellipse.
    n_slices
        Number of slices (1 to 500).
    rows, cols
        Matrix size (16 to 4096). The field of view is 160 mm.
    seed
        Seeds the noise, dates and derived UIDs.
    patient
        Identifiers written into each dataset.
    study_uid, series_uid
        UIDs to use; derived from `seed` when None.
    laterality
        Series Laterality, ``R`` or ``L``; empty for an unpaired part.
    slice_thickness
        SliceThickness and slice spacing, in mm.
    transfer_syntax
        As for `make_head_ct`.

    Returns
    -------
    list of Dataset
        The slices in InstanceNumber order, x position increasing.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if not isinstance(n_slices, int) or not 1 <= n_slices <= 500:
        raise ValueError('Argument "n_slices" must be an int from 1 to 500.')
    _check_size(rows, cols)
    _check_seed(seed)
    _check_uid("study_uid", study_uid)
    _check_uid("series_uid", series_uid)
    if laterality not in {"R", "L", ""}:
        raise ValueError('Argument "laterality" must be "R", "L" or "".')
    if not 0.1 <= slice_thickness <= 20.0:
        raise ValueError('Argument "slice_thickness" must be from 0.1 to 20 mm.')

    study_uid = study_uid or derive_uid(seed, "mr", body_part, "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "mr", "series")
    when = _study_datetime(seed, study_uid)
    study = _Study(
        patient,
        study_uid,
        when,
        f"MR{_stable_int(seed, study_uid) % 10**8}",
        f"MR {body_part or 'UNKNOWN'} WO CONTRAST",
    )
    frame_uid = derive_uid(seed, study_uid, "mr", "frame-of-reference")
    rng = np.random.default_rng([seed, _stable_int(series_uid) & 0xFFFFFFFF])
    spacing = 160.0 / max(rows, cols)
    x, y = _grid(rows, cols)
    if body_part.upper() == "KNEE":
        limb = _limb("knee", x * 1.6, y * 1.6, lateral=True)
        base = np.where(limb.soft, 0.45, 0.0).astype(np.float32)
        base[limb.marrow] = 0.8
        base[limb.cortex] = 0.05
    else:
        base = np.where(_ellipse(x, y, 0.0, 0.0, 0.6, 0.8), 0.5, 0.0).astype(np.float32)
    base = _box_blur(base, max(1, max(rows, cols) // 256))
    x_start = -((n_slices - 1) * slice_thickness) / 2.0
    out: list[Dataset] = []
    for i in range(n_slices):
        falloff = 1.0 - 0.3 * abs(i - (n_slices - 1) / 2.0) / max(n_slices, 1)
        image = base * falloff * 3000.0 + np.abs(rng.normal(0.0, 25.0, base.shape))
        stored = np.clip(np.rint(image), 0, (1 << 12) - 1).astype(np.uint16)
        ds = _new_instance(
            study,
            sop_class_uid=MRImageStorage,
            sop_instance_uid=derive_uid(seed, series_uid, "slice", i),
            series_uid=series_uid,
            modality="MR",
            series_number=3,
            instance_number=i + 1,
            series_description="SAG T1 TSE",
            body_part=body_part,
            series_time=when + timedelta(minutes=5),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*tse2d1_3"
        ds.SliceThickness = _ds(slice_thickness)
        ds.SpacingBetweenSlices = _ds(slice_thickness)
        ds.RepetitionTime = "600"
        ds.EchoTime = "12"
        ds.EchoTrainLength = 3
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.68"
        ds.ImagedNucleus = "1H"
        ds.PatientPosition = "FFS"
        ds.AcquisitionNumber = 1
        if laterality:
            ds.Laterality = laterality
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        x_pos = x_start + i * slice_thickness
        ds.ImagePositionPatient = [
            _ds(x_pos),
            _ds(-(cols - 1) / 2.0 * spacing),
            _ds((rows - 1) / 2.0 * spacing),
        ]
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.SliceLocation = _ds(x_pos)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        _set_pixels(ds, stored, 12, "MONOCHROME2")
        centre, width = _window(stored)
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(width)
        out.append(ds)
    return _finish(out, transfer_syntax)


# --------------------------------------------------------------------------------------------
# Writing and transcoding
# --------------------------------------------------------------------------------------------


def write_study(datasets: Iterable[Dataset], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write each dataset as ``<out_dir>/<SOPInstanceUID>.dcm`` in DICOM file format.

    Parameters
    ----------
    datasets
        Datasets with file meta, such as those from `make_head_ct`.
    out_dir
        Folder to write into; created if missing. Existing files of the same name are replaced.

    Returns
    -------
    list of Path
        The written files, in input order.

    Raises
    ------
    ValueError
        If a SOP Instance UID is not a valid UID (it becomes a file name).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        sop_uid = str(ds.SOPInstanceUID)
        if not _is_valid_uid(sop_uid):
            raise ValueError('Argument "datasets" holds an invalid SOP Instance UID.')
        path = folder / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def recompress(ds: Dataset, transfer_syntax: str, **kwargs: Any) -> Dataset:
    """Return a copy of `ds` encoded in `transfer_syntax`, keeping its SOP Instance UID.

    Works with native (uncompressed) pixel data. Encoders present in this environment: RLE
    Lossless (pydicom), JPEG-LS lossless and near-lossless (pyjpegls), JPEG 2000 lossless and
    lossy (pylibjpeg-openjpeg). JPEG baseline/lossless have no encoder. Lossy JPEG 2000
    defaults to ``j2k_cr=[10]`` and near-lossless JPEG-LS to ``jls_error=2``; lossy results get
    ``LossyImageCompression = "01"``.

    Parameters
    ----------
    ds
        A dataset with native pixel data; not modified.
    transfer_syntax
        The target transfer syntax UID; a native little-endian syntax just relabels the copy.
    **kwargs
        Passed to `pydicom.dataset.Dataset.compress` (for example ``j2k_cr`` or ``jls_error``).

    Returns
    -------
    Dataset
        The re-encoded copy.

    Raises
    ------
    ValueError
        If `ds` is already compressed or the syntax is not supported.
    RuntimeError
        If no encoder plugin for the syntax is installed (raised by pydicom).
    """
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        raise ValueError('Argument "ds" must have native (uncompressed) pixel data.')
    ts = UID(transfer_syntax)
    out = copy.deepcopy(ds)
    if ts in _WRITABLE_NATIVE:
        out.file_meta.TransferSyntaxUID = ts
        return out
    if not ts.is_compressed:
        raise ValueError('Argument "transfer_syntax" must be little endian or compressed.')
    out = _compress_in_place(out, ts, kwargs)
    if ts in {JPEG2000, JPEGLSNearLossless}:
        out.LossyImageCompression = "01"
    return out
