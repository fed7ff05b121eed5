"""Orthanc as the sender over DICOMweb: its STOW-RS client pushes studies to dicomai's
[dicomweb] receiver, dicomai analyses them and stores its results back over DIMSE.

Orthanc (with the Debian DICOMweb plugin) runs as a subprocess on free loopback ports,
configured from the shipped ``deploy/orthanc/orthanc-stow-to-dicomai.json`` and its two Lua
scripts; dicomai runs in-process with basic authentication and an address allow-list.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomai_tools import synthetic
from tests.conftest import free_port, running_daemon, skip_or_fail
from tests.e2e.test_orthanc import (
    DEPLOY,
    STABLE_AGE,
    Orthanc,
    _jobs,
    _received,
    _results,
    _status,
    _wait_results,
)
from tests.waiting import let_time_pass

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "orthanc", "stow-test-password"


class StowOrthanc(Orthanc):
    """Orthanc from orthanc-stow-to-dicomai.json: forwards over STOW-RS to dicomai."""

    def __init__(self, root: Path, dicomai_port: int, dicomweb_port: int) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        text = (DEPLOY / "orthanc-stow-to-dicomai.json").read_text()
        for old, new in {
            '"HttpPort" : 8042,': f'"HttpPort" : {self.http_port},',
            '"DicomPort" : 4242,': f'"DicomPort" : {self.dicom_port},',
            '"Port" : 11112,': f'"Port" : {dicomai_port},',
            '"StableAge" : 30,': f'"StableAge" : {STABLE_AGE},',
            '"Url" : "http://127.0.0.1:8080/dicomweb/",':
                f'"Url" : "http://127.0.0.1:{dicomweb_port}/dicomweb/",',
            '"Password" : "change-me"': f'"Password" : "{PASSWORD}"',
        }.items():
            assert text.count(old) == 1, f"orthanc-stow-to-dicomai.json no longer has {old!r}"
            text = text.replace(old, new)
        self.config = root / "orthanc.json"
        self.config.write_text(text)
        for script in ("dicomai-forward-stow.lua", "dicomai-forward.lua"):
            shutil.copy(DEPLOY / script, root / script)
        self.log = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StowOrthanc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["Orthanc", "--no-jobs", str(self.config)],
                                         cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self._up(), 30, "Orthanc HTTP /system")
        assert "dicom-web" in self.get("/plugins"), self.log_tail()
        assert self.get("/dicom-web/servers") == ["dicomai"]
        return self


@pytest.fixture
def orthanc_stow_and_dicomai(tmp_path, make_settings) -> Iterator[tuple[StowOrthanc, Any]]:
    if not PLUGIN.exists():
        skip_or_fail(f"{PLUGIN} not installed (apt: orthanc-dicomweb)")
    dicomai_port, web_port = free_port(), free_port()
    orthanc = StowOrthanc(tmp_path / "orthanc", dicomai_port, web_port)
    password = tmp_path / "dicomweb.password"
    password.write_text(PASSWORD + "\n")
    settings = make_settings(
        orthanc.dicom_port,
        receiver={"port": dicomai_port, "allowed_calling_ae_titles": ["ORTHANC"]},
        dicomweb={"enabled": True, "port": web_port, "auth": "basic", "user": USER,
                  "password_file": str(password), "allowed_peer_addresses": ["127.0.0.1"]})
    dests = [d.model_copy(update={"ae_title": "ORTHANC"}) for d in settings.destinations]
    settings = settings.model_copy(update={"destinations": dests})
    try:
        with running_daemon(settings) as daemon:
            assert daemon.dicomweb.port == web_port
            orthanc.start()
            yield orthanc, daemon
    finally:
        orthanc.stop()


def _storescu(orthanc: Orthanc, paths: list[Path]) -> None:
    run = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                          str(orthanc.dicom_port), *map(str, paths)],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")


def test_orthanc_forwards_over_stow_and_gets_results(orthanc_stow_and_dicomai, tmp_path):
    orthanc, daemon = orthanc_stow_and_dicomai
    ct = synthetic.make_head_ct(24, rows=128, cols=128, seed=191)
    uid = ct[0].StudyInstanceUID
    _storescu(orthanc, synthetic.write_study(ct, tmp_path / "ct"))

    study_id = _wait_results(orthanc, daemon, uid, timeout=120)
    have = _results(orthanc, study_id)
    assert len(have["CT"]) == len(ct) and len(have["SR"]) == 1 and have["OT"]
    # Received over DICOMweb: every instance, from the HTTP caller, in one job.
    received = _received(daemon, uid)
    assert {r.sop_instance_uid for r in received} == {str(ds.SOPInstanceUID) for ds in ct}
    assert {r.calling_ae_title for r in received} == {"DICOMWEB"}
    assert _jobs(daemon, uid) == 1
    lines = orthanc.wait(lambda: len(orthanc.forward_lines(study_id)) >= 2 and
                         orthanc.forward_lines(study_id), 30, "second stable-study event")
    assert lines[0] == f"0 from dicomai (not sent), 0 forwarded before, sent {len(ct)}"
    assert lines[1].endswith(f"{len(ct)} forwarded before, sent 0")

    # The same study pushed again by hand through Orthanc's DICOMweb client (an operator's
    # re-send): dicomai answers every instance as stored, keeps one job and one result set.
    before = _results(orthanc, study_id)
    answer = orthanc.post("/dicom-web/servers/dicomai/stow",
                          {"Resources": [study_id], "Synchronous": True})
    assert answer is not None
    let_time_pass(daemon.settings.scheduler.study_quiet_seconds + 1.0,
                  "a new job, were one opened, would close")
    status = _status(daemon, uid)
    assert status["state"] == "done" and status["generation"] == 1
    assert _jobs(daemon, uid) == 1
    assert _results(orthanc, study_id) == before

    audit = [json.loads(line) for line in
             (daemon.settings.general.data_dir / "audit.log").read_text().splitlines()]
    logins = [a for a in audit if a["EventIdentification"]["EventID"]["code"] == "110114"
              and a["ActiveParticipant"][1]["UserID"] == "DICOMweb"]
    assert logins and {a["ActiveParticipant"][0]["UserID"] for a in logins} == {USER}


def test_orthanc_with_a_wrong_password_sends_nothing(orthanc_stow_and_dicomai, tmp_path):
    orthanc, daemon = orthanc_stow_and_dicomai
    password_file = Path(daemon.settings.dicomweb.password_file)
    password_file.write_text("another password\n")  # rotated on dicomai's side only
    chest = synthetic.make_xray("chest", rows=256, cols=256, seed=192)
    _storescu(orthanc, synthetic.write_study([chest], tmp_path / "cx"))
    (study_id,) = orthanc.wait(lambda: orthanc.study_ids(chest.StudyInstanceUID), 30,
                               "study in Orthanc")
    lines = orthanc.wait(lambda: orthanc.forward_lines(study_id), 30, "forward attempt")
    assert lines[0].startswith("0 from dicomai (not sent), 0 forwarded before, FAILED")
    assert _status(daemon, chest.StudyInstanceUID) is None  # nothing stored
    # Nothing was marked as forwarded: the next change (or a manual send) sends it again.
    password_file.write_text(PASSWORD + "\n")
    orthanc.post("/dicom-web/servers/dicomai/stow", {"Resources": [study_id],
                                                     "Synchronous": True})
    assert _status(daemon, chest.StudyInstanceUID) is not None
