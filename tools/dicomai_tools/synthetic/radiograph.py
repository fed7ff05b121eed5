"""Radiographs (DX For Presentation, CR): chest and limbs."""

from __future__ import annotations

from datetime import timedelta
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from dicomai_tools.synthetic.common import (
    DEFAULT_PATIENT,
    PatientInfo,
    Study,
    check_seed,
    check_size,
    check_uid,
    decimal_string,
    derive_uid,
    new_instance,
    set_pixels,
    stable_int,
    study_datetime,
)
from dicomai_tools.synthetic.drawing import (
    box_blur,
    chest_attenuation,
    draw_limb,
    grid,
    window_of,
)
from dicomai_tools.synthetic.output import encode_as

#: Radiograph kinds that `make_xray` draws, with their default BodyPartExamined.
XRAY_KINDS: Final[dict[str, str]] = {
    "chest": "CHEST",
    "hand": "HAND",
    "wrist": "WRIST",
    "elbow": "ELBOW",
    "knee": "KNEE",
    "ankle": "ANKLE",
}
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
_XR_BITS_STORED = 12
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


def _radiograph_stored(
    att: np.ndarray, rng: np.random.Generator, *, monochrome1: bool, blur: int
) -> tuple[np.ndarray, bool]:
    """Map attenuation (0 air .. 1 dense bone) to 12-bit stored values.

    Returns the array and whether higher stored values mean more attenuation.
    """
    att = box_blur(att, blur)
    att = att + rng.normal(0.0, 0.012, att.shape).astype(np.float32)
    max_value = (1 << _XR_BITS_STORED) - 1
    bright = np.clip(200.0 + att * 3600.0, 0, max_value)
    if monochrome1:
        return np.rint(max_value - bright).astype(np.uint16), False
    return np.rint(bright).astype(np.uint16), True


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
    patient: PatientInfo = DEFAULT_PATIENT,
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
    check_size(rows, cols)
    check_seed(seed)
    check_uid("study_uid", study_uid)
    check_uid("series_uid", series_uid)
    body_part = XRAY_KINDS[kind] if body_part is None else body_part
    view = view_position or ("PA" if kind in {"chest", "hand"} else "AP")
    if not view.isupper() or len(view) > 16:
        raise ValueError('Argument "view_position" must be an upper-case code string.')
    side = laterality or ("U" if kind == "chest" else "R")
    if side not in {"R", "L", "U", "B"}:
        raise ValueError('Argument "laterality" must be "R", "L", "U" or "B".')

    study_uid = study_uid or derive_uid(seed, "xray", kind, "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "xray", kind, view, "series")
    when = study_datetime(seed, study_uid)
    region = body_part or kind.upper()
    study = Study(
        patient, study_uid, when, f"XR{stable_int(seed, study_uid) % 10**8}", f"XR {region} {view}"
    )
    rng = np.random.default_rng([seed, stable_int(series_uid) & 0xFFFFFFFF])

    x, y = grid(rows, cols)
    if side == "L":
        x = -x
    if kind == "chest":
        att = chest_attenuation(x, y)
    else:
        limb = draw_limb(kind, x, y, lateral=view in _LATERAL_VIEWS)
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
    ds = new_instance(
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
    ds.ImagerPixelSpacing = [decimal_string(spacing), decimal_string(spacing)]
    ds.PixelSpacing = [decimal_string(spacing), decimal_string(spacing)]
    if kind != "chest":
        ds.Laterality = side
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    set_pixels(ds, stored, _XR_BITS_STORED, photometric)
    centre, width = window_of(stored)
    ds.WindowCenter = decimal_string(centre)
    ds.WindowWidth = decimal_string(width)
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
    return encode_as([ds], transfer_syntax)[0]
