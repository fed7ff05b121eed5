"""A real PACS round trip: Orthanc (deploy/orthanc) forwards studies to dicomai, gets results back.

Orthanc runs as a subprocess on free loopback ports with its storage in ``tmp_path``, configured
from the shipped template ``deploy/orthanc/orthanc.json`` and Lua script
``deploy/orthanc/dicomai-forward.lua``; dicomai runs in-process. Studies enter Orthanc through
DCMTK ``storescu``, like a modality would send them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import func, select

from dicomai_tools import synthetic
from dicomai.db import Job, Study
from dicomai.ops.status import collect
from dicomai.jobs import reads
from tests.sr_summary import summary_scores
from tests.conftest import free_port, running_daemon
from tests.waiting import let_time_pass, wait_until

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
STABLE_AGE = 2  # seconds without a new instance before Orthanc forwards a study


class Orthanc:
    """An Orthanc subprocess configured from the deploy/orthanc template, and its REST API."""

    def __init__(self, root: Path, dicomai_port: int) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        # The template as shipped, except ports and stable age. Each line must exist exactly
        # once, so a change of the template that this test does not follow fails here.
        text = (DEPLOY / "orthanc.json").read_text()
        for old, new in {
            '"HttpPort" : 8042,': f'"HttpPort" : {self.http_port},',
            '"DicomPort" : 4242,': f'"DicomPort" : {self.dicom_port},',
            '"Port" : 11112,': f'"Port" : {dicomai_port},',
            '"StableAge" : 30,': f'"StableAge" : {STABLE_AGE},',
        }.items():
            assert text.count(old) == 1, f"deploy/orthanc/orthanc.json no longer has {old!r}"
            text = text.replace(old, new)
        self.config = root / "orthanc.json"
        self.config.write_text(text)
        # Relative paths (storage, Lua script) resolve against the config file's folder.
        shutil.copy(DEPLOY / "dicomai-forward.lua", root / "dicomai-forward.lua")
        self.log = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process -----------------------------------------------------------------------
    def start(self) -> Orthanc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["Orthanc", "--no-jobs", str(self.config)],
                                         cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self._up(), 30, "Orthanc HTTP /system")
        system = self.get("/system")
        assert system["DicomAet"] == "ORTHANC" and system["DicomPort"] == self.dicom_port
        # No plugins (unlike Debian's default config); "explorer.js" is Orthanc's own web UI.
        assert set(self.get("/plugins")) <= {"explorer.js"}
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """:func:`tests.waiting.wait_until`, failing with the end of Orthanc's log."""
        return wait_until(predicate, timeout=timeout, what=what,
                          diagnose=lambda: f"--- Orthanc log ---\n{self.log_tail()}")

    # -- REST --------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return json.loads(self._request("POST", path, data))

    # -- queries -----------------------------------------------------------------------
    def study_ids(self, study_uid: str) -> list[str]:
        return [r["ID"] for r in self.post("/tools/lookup", study_uid) if r["Type"] == "Study"]

    def series(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def dataset(self, instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.get_bytes(f"/instances/{instance_id}/file")))

    def forward_lines(self, study_id: str) -> list[str]:
        """The summary lines dicomai-forward.lua printed for this study, in order."""
        return re.findall(rf"dicomai-forward: study {study_id}: (.*)", self.log_text())


@pytest.fixture
def dicomai_settings(make_settings):
    """dicomai with Orthanc as destination "pacs", accepting calls from ORTHANC only."""

    def make(orthanc: Orthanc | None, receiver_port: int):
        settings = make_settings(
            orthanc.dicom_port if orthanc else None,
            receiver={"port": receiver_port, "allowed_calling_ae_titles": ["ORTHANC"]})
        dests = [d.model_copy(update={"ae_title": "ORTHANC"}) for d in settings.destinations]
        return settings.model_copy(update={"destinations": dests})

    return make


@pytest.fixture
def orthanc_and_dicomai(tmp_path, dicomai_settings) -> Iterator[tuple[Orthanc, Any]]:
    """Orthanc and a running dicomai pointing at each other, both on 127.0.0.1."""
    dicomai_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", dicomai_port)
    settings = dicomai_settings(orthanc, dicomai_port)
    try:
        with running_daemon(settings) as daemon:
            assert daemon.receiver.port == dicomai_port
            orthanc.start()
            yield orthanc, daemon
    finally:
        orthanc.stop()


def _storescu(orthanc: Orthanc, paths: list[Path]) -> None:
    run = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                          str(orthanc.dicom_port), *map(str, paths)],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")


def _status(daemon, study_uid: str) -> dict[str, Any] | None:
    for s in collect(daemon.settings, limit=100, engine=daemon.engine)["studies"]:
        if s["study_instance_uid"] == study_uid:
            return s
    return None


def _jobs(daemon, study_uid: str) -> int:
    with daemon.queue.session() as s:
        return s.scalar(select(func.count(Job.id)).join(Study, Study.id == Job.study_id)
                        .where(Study.study_instance_uid == study_uid))


def _received(daemon, study_uid: str) -> list[Any]:
    """The instances dicomai stored for this study."""
    job_id = _status(daemon, study_uid)["job_id"]
    return reads.study_instances(daemon.sessions, reads.get_job(daemon.sessions, job_id).study_id)


def _results(orthanc: Orthanc, study_id: str) -> dict[str, list[str]]:
    """Orthanc instance IDs of the study by modality."""
    out: dict[str, list[str]] = {}
    for s in orthanc.series(study_id):
        out.setdefault(s["MainDicomTags"].get("Modality", ""), []).extend(s["Instances"])
    return out


def _wait_results(orthanc: Orthanc, daemon, study_uid: str, timeout: float = 60) -> str:
    """Wait until dicomai is done with the study and Orthanc holds its SR and SC."""

    def ready() -> str | None:
        s = _status(daemon, study_uid)
        if s and s["state"] in ("failed", "cancelled", "skipped"):
            raise AssertionError(f"dicomai: study {s['state']}: {s['last_error']}")
        if not s or s["state"] != "done":
            return None
        (study_id,) = orthanc.study_ids(study_uid)
        have = _results(orthanc, study_id)
        return study_id if have.get("SR") and have.get("OT") else None

    return orthanc.wait(ready, timeout, f"results of {study_uid} in Orthanc")


def test_orthanc_forwards_studies_and_stores_results_without_loop(orthanc_and_dicomai,
                                                                   tmp_path):
    orthanc, daemon = orthanc_and_dicomai
    chest = synthetic.make_xray("chest", rows=512, cols=512, seed=31)
    ct = synthetic.make_head_ct(20, rows=128, cols=128, seed=32)
    _storescu(orthanc, synthetic.write_study([chest], tmp_path / "cx"))
    _storescu(orthanc, synthetic.write_study(ct, tmp_path / "ct"))

    sent = {chest.StudyInstanceUID: [chest], ct[0].StudyInstanceUID: ct}
    study_ids = {uid: _wait_results(orthanc, daemon, uid) for uid in sent}

    for uid, sources in sent.items():
        study_id = study_ids[uid]
        source_uids = {str(ds.SOPInstanceUID) for ds in sources}
        # The results went into the very study that was forwarded (one Orthanc study).
        assert orthanc.study_ids(uid) == [study_id]
        have = _results(orthanc, study_id)
        assert len(have["SR"]) == 1
        assert 1 <= len(have["OT"]) <= 5
        assert len(have[sources[0].Modality]) == len(sources)
        sr_ds = orthanc.dataset(have["SR"][0])
        assert sr_ds.StudyInstanceUID == uid
        assert sr_ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        assert sr_ds.PatientID == sources[0].PatientID
        # SR certainty values are the scores dicomai recorded. The SR rounds the raw score to
        # 0.1 % and status to 4 decimals, so they agree within 0.05 + 0.005 percentage points
        # (rounding status' value again to 0.1 % can differ by 0.1 at a .x5 boundary).
        status = _status(daemon, uid)
        study_level = summary_scores(sr_ds, status["model"])
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
        # Nothing present: one group, over the whole key image, saying so.
        (group,) = sr.content.get_image_measurement_groups()
        assert group.tracking_identifier.endswith(":whole-image")
        assert status["scores"] and set(study_level) == set(status["scores"])
        for label, score in status["scores"].items():
            assert study_level[label] == pytest.approx(100 * score, abs=0.0551), label
        evidence = sr_ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert {ref.ReferencedSOPInstanceUID
                for series in evidence.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence} == source_uids
        # Each SC is in the same study and references a source image.
        for sc_id in have["OT"]:
            sc = orthanc.dataset(sc_id)
            assert sc.StudyInstanceUID == uid
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
            assert sc.SeriesDescription == "AI OVERLAY - NOT FOR DIAGNOSTIC USE"

    # After the results arrived the study became stable again; the Lua script saw dicomai's
    # objects, skipped them and sent nothing.
    for uid, sources in sent.items():
        study_id = study_ids[uid]
        n_results = sum(len(v) for k, v in _results(orthanc, study_id).items() if k in ("SR", "OT"))
        lines = orthanc.wait(lambda sid=study_id: len(orthanc.forward_lines(sid)) >= 2 and
                             orthanc.forward_lines(sid), 20, "second stable-study event")
        assert lines[0] == f"0 from dicomai (not sent), 0 forwarded before, sent {len(sources)}"
        assert lines[1] == (f"{n_results} from dicomai (not sent), {len(sources)} forwarded "
                            f"before, sent 0")
        assert len(lines) == 2
        # Nothing came back to dicomai: one job, only the images storescu sent.
        assert _jobs(daemon, uid) == 1
        received = _received(daemon, uid)
        assert {r.sop_instance_uid for r in received} == {str(ds.SOPInstanceUID)
                                                          for ds in sources}
        assert {r.modality for r in received} == {sources[0].Modality}
        status = _status(daemon, uid)
        assert status["generation"] == 1 and status["instances"] == len(sources)
        # Every source instance was marked as forwarded; dicomai's results came from DICOMAI.
        for s in orthanc.series(study_id):
            for inst in s["Instances"]:
                meta = orthanc.get(f"/instances/{inst}/metadata?expand")
                if s["MainDicomTags"]["Modality"] in ("SR", "OT"):
                    assert meta["RemoteAET"] == "DICOMAI" and "ForwardedToDicomai" not in meta
                else:
                    assert meta["RemoteAET"] == "MODALITY" and "ForwardedToDicomai" in meta

    # Orthanc forwards the same study a second time (e.g. an operator re-sends it): dicomai
    # stores nothing new, opens no job, and Orthanc still has one set of results.
    before = {uid: _results(orthanc, study_ids[uid]) for uid in sent}
    for uid, sources in sent.items():
        resend = [i for k, v in before[uid].items() if k not in ("SR", "OT") for i in v]
        assert len(resend) == len(sources)
        orthanc.post("/modalities/dicomai/store", {"Resources": resend, "Synchronous": True})
    let_time_pass(daemon.settings.scheduler.study_quiet_seconds + 1.0,
                  "a new job, were one opened, would close")
    for uid, sources in sent.items():
        status = _status(daemon, uid)
        assert status["state"] == "done" and status["generation"] == 1
        assert status["instances"] == len(sources)
        assert _jobs(daemon, uid) == 1
        assert _results(orthanc, study_ids[uid]) == before[uid]



def test_whole_study_sent_back_with_results_yields_no_second_sr(orthanc_and_dicomai, tmp_path):
    """A user re-sends the whole study, dicomai's results included ("Send to modality")."""
    orthanc, daemon = orthanc_and_dicomai
    chest = synthetic.make_xray("chest", rows=256, cols=256, seed=33)
    _storescu(orthanc, synthetic.write_study([chest], tmp_path / "cx"))
    uid = chest.StudyInstanceUID
    study_id = _wait_results(orthanc, daemon, uid)
    orthanc.wait(lambda: len(orthanc.forward_lines(study_id)) >= 2, 20, "study stable again")
    before = _results(orthanc, study_id)
    assert len(before["SR"]) == 1

    orthanc.post("/modalities/dicomai/store", {"Resources": [study_id], "Synchronous": True})
    let_time_pass(daemon.settings.scheduler.study_quiet_seconds + 1.0,
                  "a new job, were one opened, would close")
    idle = ("done", "skipped", "failed", "cancelled")
    orthanc.wait(lambda: _status(daemon, uid)["state"] in idle, 60, "dicomai idle")
    after = _results(orthanc, study_id)
    status = _status(daemon, uid)
    assert after == before, f"results changed; dicomai generation {status['generation']}"
    assert status["generation"] == 1  # our own results are recognised and never analysed
