"""The Segmentation on its way to the PACS: sent where the PACS accepts it, skipped (the job
still done) where it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from dicomai_tools import synthetic
from dicomai_tools.local_pacs import LocalPacs
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from dicomai.jobs import reads
from tests.conftest import running_daemon
from tests.waiting import wait_until


def _positive_settings(make_settings: Any, port: int) -> Any:
    """The chest model (untrained: scores near 0.1) with pneumothorax present."""
    settings = make_settings(port)
    models = dict(settings.models)
    models["chest-xray"] = models["chest-xray"].model_copy(
        update={"threshold": 0.999, "thresholds": {"pneumothorax": 0.02}})
    return settings.model_copy(update={"models": models})


def _run_study(settings: Any, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    ds = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=512, cols=512,
                             seed=77)
    paths = synthetic.write_study([ds], tmp_path / "in")
    with running_daemon(settings) as daemon:
        assert send_files(paths, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok

        def done() -> dict[str, Any] | None:
            data = collect(settings, limit=10, engine=daemon.engine)
            study = next((s for s in data["studies"]
                          if s["study_instance_uid"] == ds.StudyInstanceUID), None)
            if study and study["state"] in ("failed", "cancelled"):
                raise AssertionError(f"study ended {study['state']}: {study['last_error']}")
            return data if study and study["state"] == "done" else None

        data = wait_until(done, timeout=120, what="study done")
        rows = reads.results_for(daemon.sessions,
            next(s for s in data["studies"]
                 if s["study_instance_uid"] == ds.StudyInstanceUID)["job_id"])
    return ds, {"status": data, "rows": rows}


@pytest.mark.slow
def test_seg_sent_to_a_pacs_that_accepts_it(make_settings: Any, local_pacs: LocalPacs,
                                            tmp_path: Path) -> None:
    ds, out = _run_study(_positive_settings(make_settings, local_pacs.port), tmp_path)
    received = local_pacs.objects(str(ds.StudyInstanceUID))
    modalities = sorted(o.modality for o in received)
    assert modalities == ["OT", "SEG", "SR"]
    seg = next(o.dataset for o in received if o.modality == "SEG")
    assert seg.SegmentSequence[0].SegmentLabel == "Pneumothorax (AI)"
    refs = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence}
    assert refs == {str(ds.SOPInstanceUID)}
    assert seg.SeriesDate and seg.SeriesTime
    assert {r.kind: r.state for r in out["rows"]}["seg"] == "sent"


@pytest.mark.slow
def test_seg_skipped_not_failed_where_the_pacs_refuses_its_sop_class(
        make_settings: Any, tmp_path: Path) -> None:
    pacs = LocalPacs(ae_title="PACS", refuse_sop_classes=[SegmentationStorage]).start()
    try:
        ds, out = _run_study(_positive_settings(make_settings, pacs.port), tmp_path)
        received = pacs.objects(str(ds.StudyInstanceUID))
    finally:
        pacs.stop()
    assert sorted(o.modality for o in received) == ["OT", "SR"]
    states = {r.kind: r.state for r in out["rows"]}
    assert states == {"sr": "sent", "sc": "sent", "seg": "skipped"}
    seg_row = next(r for r in out["rows"] if r.kind == "seg")
    assert "SOP class not accepted" in (seg_row.last_error or "")
    (dest,) = out["status"]["destinations"]
    assert dest["skipped"] == 1 and dest["failed"] == 0 and dest["sent"] == 2
    assert pydicom.uid.UID(seg_row.sop_class_uid) == SegmentationStorage
