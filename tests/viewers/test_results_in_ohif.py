"""What a radiologist sees: dicomai's results in OHIF 3, through a real PACS round trip.

Orthanc (with its DICOMweb plugin) is the PACS and forwards stable studies to dicomai with
``deploy/orthanc/dicomai-forward.lua``; dicomai analyses them with the bundled reference models
and stores its SR, Secondary Capture and Segmentation back into Orthanc; OHIF 3.13 (served
beside Orthanc, driven in headless Chromium) opens each result series. DCMTK's ``dsr2html``
renders the SR as text and highdicom reads it back.

The reference models are untrained, so their scores are low; the test gives one label per
model a threshold under its score (and every other label one above), so that exactly that
finding is "present", as a trained model would report a real one.

Screenshots stay in ``build/viewer-screenshots/<test>/`` (the README's pictures come from
there: ``scripts/update-screenshots.sh``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomai_tools import synthetic
from dicomai.inference.findings import Findings, ModelIdentity, Task
from dicomai.models.reference import REFERENCE_DESCRIPTION
from dicomai.results import build_results, table_for
from tests.conftest import free_port, running_daemon
from tests.viewers.harness import (
    DicomWebOrthanc,
    coloured_fraction,
    step_named,
    summary,
    viewport_stats,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.viewers, pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NIH = REPO / "tests" / "data" / "real" / "chest_xray" / "nih_cxr14_dx_sc.dcm"
LUA = REPO / "deploy" / "orthanc" / "dicomai-forward.lua"
SR = "AI RESULT - NOT FOR DIAGNOSTIC USE"
SC = "AI OVERLAY - NOT FOR DIAGNOSTIC USE"
SEG = "AI REGIONS - NOT FOR DIAGNOSTIC USE"
DISCLAIMER = "not for diagnostic use"


class ForwardingOrthanc(DicomWebOrthanc):
    """The viewer tests' Orthanc, also forwarding stable studies to dicomai as
    ``deploy/orthanc`` does (its Lua script, unchanged)."""

    def __init__(self, root: Path, dicomai_port: int) -> None:
        super().__init__(root)
        config = json.loads(self.config.read_text())
        config.update(
            {
                "StableAge": 2,
                "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": False,
                "DicomModalities": {
                    "dicomai": {"AET": "DICOMAI", "Host": "127.0.0.1", "Port": dicomai_port,
                                "AllowStore": True, "AllowEcho": True},
                },
                "LuaScripts": ["dicomai-forward.lua"],
                "UserMetadata": {"ForwardedToDicomai": 1024},
            }
        )  # fmt: skip
        self.config.write_text(json.dumps(config, indent=2))
        shutil.copy(LUA, root / "dicomai-forward.lua")

    def series_by_description(self, study_uid: str) -> dict[str, list[str]]:
        """SeriesDescription -> instance IDs of the study (empty when Orthanc lacks it)."""
        out: dict[str, list[str]] = {}
        for study_id in self.study_ids(study_uid):
            for series in self.series(study_id):
                desc = series["MainDicomTags"].get("SeriesDescription", "")
                out.setdefault(desc, []).extend(series["Instances"])
        return out


@pytest.fixture
def pacs_and_dicomai(
    tmp_path: Path, make_settings: Callable[..., Any]
) -> Iterator[tuple[ForwardingOrthanc, Any]]:
    """A forwarding Orthanc and dicomai sending its results back to it."""
    dicomai_port = free_port()
    orthanc = ForwardingOrthanc(tmp_path / "orthanc", dicomai_port)
    settings = make_settings(
        orthanc.dicom_port,
        receiver={"port": dicomai_port, "allowed_calling_ae_titles": ["ORTHANC"]},
        scheduler={"study_quiet_seconds": 2.0, "poll_seconds": 0.2},
    )
    dests = [d.model_copy(update={"ae_title": "ORTHANC"}) for d in settings.destinations]
    models = {}
    for name, model in settings.models.items():
        present = {"chest-xray": "pneumothorax", "head-ct-ich": "subdural"}.get(name)
        thresholds = {present: 0.02} if present else {}
        models[name] = model.model_copy(update={"threshold": 0.999, "thresholds": thresholds})
    settings = settings.model_copy(update={"destinations": dests, "models": models})
    try:
        with running_daemon(settings) as daemon:
            orthanc.start()
            yield orthanc, daemon
    finally:
        orthanc.stop()


def _results_back(orthanc: ForwardingOrthanc, study_uid: str, wanted: set[str]) -> dict:
    def ready() -> dict[str, list[str]] | None:
        series = orthanc.series_by_description(study_uid)
        return series if wanted <= set(series) else None

    try:
        found = wait_until(ready, timeout=180, interval=1.0, what=f"{sorted(wanted)} in Orthanc")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- Orthanc log ---\n{orthanc.log_tail()}") from None
    # Orthanc Explorer files series by date: every result series has one (not "?").
    for (study_id,) in [orthanc.study_ids(study_uid)]:
        for series in orthanc.series(study_id):
            tags = series["MainDicomTags"]
            if tags.get("SeriesDescription") in wanted:
                assert tags.get("SeriesDate") and tags.get("SeriesTime"), tags
    return found


def _check_sr_text(orthanc: ForwardingOrthanc, instance_id: str, finding: str) -> str:
    """dsr2html labels every value; highdicom reads the SR back."""
    data = orthanc.get_bytes(f"/instances/{instance_id}/file")
    sr = hd.sr.srread(io.BytesIO(data))
    groups = sr.content.get_image_measurement_groups()
    assert groups and all(g.finding_type.meaning == finding for g in groups[:1])
    path = orthanc.root / f"{instance_id}.dcm"
    path.write_bytes(data)
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert html.returncode == 0, html.stderr
    text = " ".join(re.sub(r"<[^>]+>", " ", html.stdout).split())
    assert "Absent Absent" not in text, text
    assert f"{finding}: Present" in text, text
    assert "Certainty of Finding:" in text and DISCLAIMER in text.lower(), text
    return text


def _open_and_check(
    open_in_ohif: Callable[..., dict[str, Any]], study_uid: str, finding: str
) -> dict[str, Any]:
    result = open_in_ohif(study_uid, [SR, SEG, SC], accept=["Yes"])
    why = summary(result)
    assert result["ok"] and result["all_found"], why
    assert not result["error_boundary"], why
    assert not result["page_errors"], why
    assert not [h for h in result["http_errors"] if "/dicom-web/" in h["url"]], why
    # The study as first shown: the source image drawn (mid greys, not a black canvas).
    first = viewport_stats(step_named(result, None))
    assert first["nonblack"] > 0.03 and first["std"] > 15, f"{first}\n{why}"
    sr_step = step_named(result, SR)
    text = sr_step["body_text"]
    assert f"{finding}: Present - AI result, not for diagnostic use" in text, why
    assert "Certainty of Finding:" in text, why
    seg_step = step_named(result, SEG)
    # The sources are grey: colour in the viewport is the SEG overlay (the SC's yellow title
    # alone covers < 1.5 % of its viewport; a heat map much more).
    assert coloured_fraction(seg_step) > 0.003, f"no segmentation overlay drawn\n{why}"
    sc_step = step_named(result, SC)
    assert coloured_fraction(sc_step) > 0.03, f"no heat map on the SC\n{why}"
    return result


def test_chest_xray_results_in_ohif(
    pacs_and_dicomai: tuple[ForwardingOrthanc, Any],
    open_in_pacs_viewer: Callable[..., Callable[..., dict[str, Any]]],
) -> None:  # fmt: skip
    orthanc, _daemon = pacs_and_dicomai
    ds = pydicom.dcmread(NIH)
    # The NIH file has no BodyPartExamined (routes match on it) and a reused study UID.
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    orthanc.upload_dataset(ds)
    study_uid = str(ds.StudyInstanceUID)
    series = _results_back(orthanc, study_uid, {SR, SC, SEG})
    _check_sr_text(orthanc, series[SR][0], "Pneumothorax")
    _open_and_check(open_in_pacs_viewer(orthanc), study_uid, "Pneumothorax")


def test_head_ct_results_in_ohif(
    pacs_and_dicomai: tuple[ForwardingOrthanc, Any],
    open_in_pacs_viewer: Callable[..., Callable[..., dict[str, Any]]],
) -> None:  # fmt: skip
    orthanc, _daemon = pacs_and_dicomai
    slices = synthetic.make_head_ct(16, rows=256, cols=256, seed=14, bleed=True)
    orthanc.upload_dataset(*slices)
    study_uid = str(slices[0].StudyInstanceUID)
    series = _results_back(orthanc, study_uid, {SR, SC, SEG})
    _check_sr_text(orthanc, series[SR][0], "Subdural hemorrhage")
    _open_and_check(open_in_pacs_viewer(orthanc), study_uid, "Subdural hemorrhage")


def test_negative_report_opens_without_error(viewer_orthanc: DicomWebOrthanc,
                                            open_in_ohif: Callable[..., dict[str, Any]]) -> None:
    """Nothing present: no finding has a location, the SR has no measurement group, and OHIF
    must still open it (a group without coordinates would stop it) and show no map."""
    src = pydicom.dcmread(NIH)
    src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid()
    src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    src.BodyPartExamined = "CHEST"
    labels = tuple(table_for(Task.CHEST_XRAY))
    model = ModelIdentity(name="chest-xray", version="0.1.0", sha256="0" * 64,
                          task=Task.CHEST_XRAY, architecture="densenet121",
                          description=REFERENCE_DESCRIPTION)
    scores = dict.fromkeys(labels, 0.1)
    cam = np.outer(np.hanning(7), np.hanning(7))
    findings = Findings(model=model, labels=labels, thresholds=dict.fromkeys(labels, 0.5),
                        study_scores=scores, image_scores={str(src.SOPInstanceUID): scores},
                        key_image_uids=(str(src.SOPInstanceUID),),
                        started=datetime.now(UTC), heatmaps={str(src.SOPInstanceUID): cam},
                        top_label=labels[0])
    objects = build_results([src], findings)
    assert [o.Modality for o in objects] == ["SR", "OT"]  # no SEG: nothing located
    viewer_orthanc.upload_dataset(src, *objects)
    result = open_in_ohif(str(src.StudyInstanceUID), [SR, SC])
    why = summary(result)
    assert result["ok"] and result["all_found"], why
    assert not result["error_boundary"] and not result["page_errors"], why
    # Only the panel's yellow title is coloured (a heat map covers several per cent).
    assert coloured_fraction(step_named(result, SC)) < 0.015, f"a heat map was drawn\n{why}"
    text = step_named(result, SR)["body_text"]
    assert "No finding at or above threshold (highest: " in text, why
    assert "AI result, not for diagnostic use" in text, why
