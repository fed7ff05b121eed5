"""The viewer harness itself: a real radiograph through Orthanc's DICOMweb API into OHIF 3."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.viewers.harness import DicomWebOrthanc, step_named, summary, viewport_stats

pytestmark = [pytest.mark.viewers, pytest.mark.orthanc]

# 8-bit MONOCHROME2 DX (NIH ChestX-ray14); OHIF draws RG1 (MONOCHROME1 J2K) black.
NIH = Path(__file__).resolve().parents[1] / "data" / "real" / "chest_xray" / "nih_cxr14_dx_sc.dcm"
LABEL = "VIEWER SMOKE CHEST"


def test_ohif_shows_a_real_radiograph(viewer_orthanc: DicomWebOrthanc, open_in_ohif) -> None:
    ds = pydicom.dcmread(NIH)
    ds.SeriesDescription = LABEL  # so the thumbnail can be found and double-clicked
    viewer_orthanc.upload_dataset(ds)

    result = open_in_ohif(str(ds.StudyInstanceUID), [LABEL])
    why = summary(result)

    assert result["ok"], why
    assert not result["error_boundary"], why
    assert not result["page_errors"], why
    assert not [h for h in result["http_errors"] if "/dicom-web/" in h["url"]], why
    for description in (None, LABEL):  # as first shown, and after a double-click
        step = step_named(result, description)
        assert step["found"], why
        assert [t["text"] for t in step["thumbnails"] if LABEL in t["text"]], why
        assert step["viewports"] and step["viewports"][0]["canvases"] >= 1, why
        stats = viewport_stats(step)
        # A chest radiograph fills much of the viewport with mid greys, not a black canvas.
        assert stats["nonblack"] > 0.3 and stats["std"] > 20, f"{stats}\n{why}"
        assert Path(step["screenshot"]).stat().st_size > 10_000
