"""Sagittal T1-weighted MR, a modality no route handles."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
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
    draw_limb,
    ellipse,
    grid,
    window_of,
)
from dicomai_tools.synthetic.output import encode_as


def make_mr(
    body_part: str = "KNEE",
    n_slices: int = 3,
    *,
    rows: int = 256,
    cols: int = 256,
    seed: int = 0,
    patient: PatientInfo = DEFAULT_PATIENT,
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
    check_size(rows, cols)
    check_seed(seed)
    check_uid("study_uid", study_uid)
    check_uid("series_uid", series_uid)
    if laterality not in {"R", "L", ""}:
        raise ValueError('Argument "laterality" must be "R", "L" or "".')
    if not 0.1 <= slice_thickness <= 20.0:
        raise ValueError('Argument "slice_thickness" must be from 0.1 to 20 mm.')

    study_uid = study_uid or derive_uid(seed, "mr", body_part, "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "mr", "series")
    when = study_datetime(seed, study_uid)
    study = Study(
        patient,
        study_uid,
        when,
        f"MR{stable_int(seed, study_uid) % 10**8}",
        f"MR {body_part or 'UNKNOWN'} WO CONTRAST",
    )
    frame_uid = derive_uid(seed, study_uid, "mr", "frame-of-reference")
    rng = np.random.default_rng([seed, stable_int(series_uid) & 0xFFFFFFFF])
    spacing = 160.0 / max(rows, cols)
    x, y = grid(rows, cols)
    if body_part.upper() == "KNEE":
        limb = draw_limb("knee", x * 1.6, y * 1.6, lateral=True)
        base = np.where(limb.soft, 0.45, 0.0).astype(np.float32)
        base[limb.marrow] = 0.8
        base[limb.cortex] = 0.05
    else:
        base = np.where(ellipse(x, y, 0.0, 0.0, 0.6, 0.8), 0.5, 0.0).astype(np.float32)
    base = box_blur(base, max(1, max(rows, cols) // 256))
    x_start = -((n_slices - 1) * slice_thickness) / 2.0
    out: list[Dataset] = []
    for i in range(n_slices):
        falloff = 1.0 - 0.3 * abs(i - (n_slices - 1) / 2.0) / max(n_slices, 1)
        image = base * falloff * 3000.0 + np.abs(rng.normal(0.0, 25.0, base.shape))
        stored = np.clip(np.rint(image), 0, (1 << 12) - 1).astype(np.uint16)
        ds = new_instance(
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
        ds.SliceThickness = decimal_string(slice_thickness)
        ds.SpacingBetweenSlices = decimal_string(slice_thickness)
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
            decimal_string(x_pos),
            decimal_string(-(cols - 1) / 2.0 * spacing),
            decimal_string((rows - 1) / 2.0 * spacing),
        ]
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.SliceLocation = decimal_string(x_pos)
        ds.PixelSpacing = [decimal_string(spacing), decimal_string(spacing)]
        set_pixels(ds, stored, 12, "MONOCHROME2")
        centre, width = window_of(stored)
        ds.WindowCenter = decimal_string(centre)
        ds.WindowWidth = decimal_string(width)
        out.append(ds)
    return encode_as(out, transfer_syntax)
