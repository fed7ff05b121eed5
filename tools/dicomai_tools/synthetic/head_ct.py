"""Non-contrast axial head CT of a phantom, with an optional lateral localizer."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
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
    ellipse,
    window_of,
)
from dicomai_tools.synthetic.output import encode_as

#: RescaleIntercept of generated CT: stored value = HU + 1024, 12 bits stored, unsigned.
CT_RESCALE_INTERCEPT: Final = -1024
_CT_BITS_STORED = 12


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
                vent = ellipse(x_mm, y_mm, side * 11.0 * s, -4.0, 5.0 * v + 2.0, 24.0 * v + 4.0)
                hu[vent & brain] = 5.0
        if u < -0.55:  # orbits: fat around the globe
            for side in (-1.0, 1.0):
                cx, cy = side * 30.0 * s, -0.82 * b
                hu[ellipse(x_mm, y_mm, cx, cy, 16.0, 14.0)] = -80.0
                hu[ellipse(x_mm, y_mm, cx, cy, 11.0, 11.0)] = 12.0
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
    patient: PatientInfo = DEFAULT_PATIENT,
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
    check_size(rows, cols)
    check_seed(seed)
    check_uid("study_uid", study_uid)
    check_uid("series_uid", series_uid)
    if not 0.1 <= slice_thickness <= 20.0:
        raise ValueError('Argument "slice_thickness" must be from 0.1 to 20 mm.')

    study_uid = study_uid or derive_uid(seed, "head-ct", "study")
    series_uid = series_uid or derive_uid(seed, study_uid, "head-ct", "series")
    when = study_datetime(seed, study_uid)
    study = Study(
        patient,
        study_uid,
        when,
        f"CT{stable_int(seed, study_uid) % 10**8}",
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
    rng = np.random.default_rng([seed, stable_int(study_uid) & 0xFFFFFFFF])
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
        ds = new_instance(
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
        ds.SliceThickness = decimal_string(slice_thickness)
        ds.SpacingBetweenSlices = decimal_string(slice_thickness)
        ds.ReconstructionDiameter = decimal_string(spacing * max(rows, cols))
        ds.ConvolutionKernel = "H30s"
        ds.ImagePositionPatient = [decimal_string(x0), decimal_string(y0), decimal_string(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = decimal_string(z)
        ds.PixelSpacing = [decimal_string(spacing), decimal_string(spacing)]
        set_pixels(ds, stored, _CT_BITS_STORED, "MONOCHROME2")
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
    return encode_as(out, transfer_syntax)


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
    study: Study,
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
    ds = new_instance(
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
    ds.SliceThickness = decimal_string(slice_thickness)
    ds.ImagePositionPatient = ["0", decimal_string(y0), decimal_string(z_top)]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.PixelSpacing = [decimal_string(z_extent / rows), decimal_string(spacing * axial_rows / cols)]
    set_pixels(ds, stored, _CT_BITS_STORED, "MONOCHROME2")
    centre, width = window_of(stored)
    ds.WindowCenter = decimal_string(centre)
    ds.WindowWidth = decimal_string(width)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    return ds
