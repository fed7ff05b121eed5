"""Results sent over STOW-RS to real DICOMweb peers on loopback.

* Orthanc with its DicomWeb plugin (Debian ``orthanc-dicomweb``) as the destination: a study
  sent to dicomai over DIMSE is analysed and its results land in the same study in Orthanc,
  seen through Orthanc's REST API and QIDO-RS.
* Orthanc with HTTP basic authentication: a wrong password is retried, the job kept; the
  password file rewritten, the next try delivers (no restart, no reload).
* Nothing listening: retried with backoff, given up, then ``dicomai retry`` delivers once the
  archive is up.
* An archive that holds the request (a tiny HTTP server of this test) delays no DIMSE
  destination of the same job.
* The deploy/orthanc DICOMweb variant as shipped (orthanc-dicomweb-results.json with
  dicomai-dicomweb-destination.toml): Orthanc forwards a study over DIMSE, takes the results
  over STOW-RS with basic authentication, and does not send them back.
"""

from __future__ import annotations

import base64
import http.server
import itertools
import json
import shutil
import subprocess
import threading
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicomai.ops import cli

from dicomai_tools import synthetic
from dicomai.config import DestinationSettings, Settings
from dicomai.db import JobEvent
from dicomai.delivery.stow_client import StowTarget, Verdict, store
from dicomai_tools.local_pacs import LocalPacs
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from dicomai.jobs import reads
from tests.conftest import free_port, running_daemon
from tests.viewers.harness import DICOMWEB_PLUGIN, DicomWebOrthanc
from tests.waiting import wait_for_study, wait_until

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(),
                       reason=f"{DICOMWEB_PLUGIN} missing (apt: orthanc-dicomweb)"),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
RESULT_MODALITIES = {"SR", "OT"}  # chest X-ray defaults: Comprehensive 3D SR and SC


class WebOrthanc(DicomWebOrthanc):
    """Orthanc + DicomWeb plugin on an HTTP port of our choosing, optionally with HTTP basic
    authentication (``users``: name -> password); its REST helpers log in as the first user."""

    def __init__(self, root: Path, *, http_port: int | None = None,
                 users: dict[str, str] | None = None) -> None:
        super().__init__(root)
        self.users = dict(users or {})
        if http_port is not None:
            self.http_port = http_port
        config = json.loads(self.config.read_text())
        config["HttpPort"] = self.http_port
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = self.users
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _request(self, method: str, path: str, body: bytes | None = None,
                 accept: str | None = None) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode())
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def qido(self, path: str) -> list[dict[str, Any]]:
        """A QIDO-RS search (DICOM JSON) under the DICOMweb root."""
        body = self._request("GET", f"/dicom-web{path}", accept="application/dicom+json")
        return json.loads(body) if body else []

    def study_modalities(self, study_uid: str) -> dict[str, int]:
        """Instances per modality of a study, as QIDO-RS reports its series."""
        out: dict[str, int] = {}
        for series in self.qido(f"/studies/{study_uid}/series"):
            modality = series["00080060"]["Value"][0]
            out[modality] = out.get(modality, 0) + int(series["00201209"]["Value"][0])
        return out


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def _study(settings: Settings, engine: Any, study_uid: str) -> dict[str, Any] | None:
    for s in collect(settings, limit=100, engine=engine)["studies"]:
        if s["study_instance_uid"] == study_uid:
            return s
    return None


def _dicomweb_settings(make_settings: Any, url: str, **dest: Any) -> Settings:
    """Chest X-rays only (one model to load), results to one DICOMweb destination "pacs"."""
    sender = dest.pop("sender", {})
    settings = make_settings(None, sender=sender)
    pacs = DestinationSettings(name="pacs", kind="dicomweb", url=url, **dest)
    return settings.model_copy(update={
        "destinations": [pacs],
        "routes": [r for r in settings.routes if r.model == "chest-xray"]})


def _chest(seed: int) -> Any:
    return synthetic.make_xray("chest", modality="DX", view_position="PA", rows=256, cols=256,
                               seed=seed)


def _send(daemon: Any, ds: Any, folder: Path) -> None:
    assert send_files(synthetic.write_study([ds], folder), "127.0.0.1", daemon.receiver.port,
                      called_ae="DICOMAI").ok


def test_results_land_in_the_same_study_in_orthanc(make_settings, tmp_path):
    orthanc = WebOrthanc(tmp_path / "orthanc").start()
    try:
        chest = _chest(seed=101)
        uid = str(chest.StudyInstanceUID)
        orthanc.upload_dataset(chest)  # the archive holds the study the modality made
        settings = _dicomweb_settings(make_settings, orthanc.dicomweb)
        with running_daemon(settings) as daemon:
            _send(daemon, chest, tmp_path / "in")
            status = wait_for_study(daemon, uid, "done")
            rows = reads.results_for(daemon.sessions, status["job_id"])
            data = collect(settings, limit=10, engine=daemon.engine)
        # One study in Orthanc: the image and dicomai's results (REST).
        (study_id,) = orthanc.study_ids(uid)
        series = orthanc.series(study_id)
        assert {s["MainDicomTags"]["Modality"] for s in series} == {"DX"} | RESULT_MODALITIES
        # QIDO-RS sees the same: the DX image plus every result object, in this study.
        assert orthanc.study_modalities(uid) == {"DX": 1, "SR": 1, "OT": 1}
        instances = orthanc.qido(f"/studies/{uid}/instances")
        stored = {_value(i, "00080018") for i in instances}
        assert {r.sop_instance_uid for r in rows} <= stored
        assert all(_value(i, "0020000D") == uid for i in instances)
        assert {r.state for r in rows} == {"sent"} and len(rows) == 2
        # The SR that arrived is the file dicomai built (same SOP instance, same study).
        sr_row = next(r for r in rows if r.kind == "sr")
        sr_id = next(i["ID"] for i in orthanc.post("/tools/lookup", sr_row.sop_instance_uid)
                     if i["Type"] == "Instance")
        sr = orthanc.dataset(sr_id)
        assert sr.StudyInstanceUID == uid and sr.SOPClassUID == sr_row.sop_class_uid
        # status: kind and url of the destination, its counters.
        (dest,) = data["destinations"]
        assert dest["kind"] == "dicomweb" and dest["url"] == orthanc.dicomweb
        assert dest["host"] == "127.0.0.1" and dest["port"] == orthanc.http_port
        assert dest["ae_title"] is None and dest["sent"] == 2 and dest["failed"] == 0
        # Audit: results sent, to the URL's host, with no AE title.
        audit = [json.loads(line) for line in
                 (settings.general.data_dir / "audit.log").read_text().splitlines()]
        sent = [e for e in audit if e["EventIdentification"]["EventID"]["code"] == "110104"
                and e["EventIdentification"]["EventActionCode"] == "R"]
        (event,) = sent
        dest_part = event["ActiveParticipant"][1]
        assert dest_part["NetworkAccessPointID"] == f"127.0.0.1:{orthanc.http_port}"
        assert dest_part["AlternativeUserID"] == ""
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 0
        assert event["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == uid
        # Sending the same objects again (a retried job): the archive holds them; no error.
        again = store(StowTarget(orthanc.dicomweb), [pydicom.dcmread(r.path) for r in rows])
        assert {v.verdict for v in again.instances.values()} == {Verdict.STORED}
        assert orthanc.study_modalities(uid) == {"DX": 1, "SR": 1, "OT": 1}
    finally:
        orthanc.stop()


def test_wrong_password_retried_then_the_rewritten_file_delivers(make_settings, tmp_path,
                                                                 caplog):
    caplog.set_level("INFO")
    right, wrong = "c0rrect-h0rse", "wr0ng-battery"
    orthanc = WebOrthanc(tmp_path / "orthanc", users={"dicomai": right}).start()
    password = tmp_path / "secrets" / "pacs.password"
    password.parent.mkdir()
    password.write_text(wrong + "\n")
    try:
        settings = _dicomweb_settings(
            make_settings, orthanc.dicomweb, auth="basic", user="dicomai",
            password_file=password,
            sender={"retry_base_seconds": 0.3, "retry_max_seconds": 1.0, "max_attempts": 50})
        chest = _chest(seed=102)
        uid = str(chest.StudyInstanceUID)
        with running_daemon(settings) as daemon:
            _send(daemon, chest, tmp_path / "in")

            def refused_twice() -> dict[str, Any] | None:
                s = _study(settings, daemon.engine, uid)
                return s if s and s["send_attempts"] >= 2 else None

            status = wait_until(refused_twice, timeout=120, what="two refused sends")
            assert status["state"] in ("outbox", "sending")
            assert "401" in status["last_error"] and "credentials" in status["last_error"]
            rows = reads.results_for(daemon.sessions, status["job_id"])
            assert {r.state for r in rows} == {"pending"}
            assert orthanc.study_ids(uid) == []  # nothing stored
            # The operator fixes the file (in place); the next try reads it.
            password.write_text(right + "\n")
            status = wait_for_study(daemon, uid, "done", timeout=60)
            data = collect(settings, limit=10, engine=daemon.engine)
        assert orthanc.study_modalities(uid) == {"SR": 1, "OT": 1}
        assert data["destinations"][0]["sent"] == 2
    finally:
        orthanc.stop()
    auth_logs = [r for r in caplog.records if getattr(r, "event", "") == "send.auth_problem"]
    assert auth_logs and all(r.levelname == "WARNING" for r in auth_logs)
    # Neither password, nor its base64 form, in any log record, the audit log or status.
    secrets = {right, wrong} | {base64.b64encode(f"dicomai:{p}".encode()).decode()
                                for p in (right, wrong)}
    texts = [r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str)
             for r in caplog.records]
    texts.append((settings.general.data_dir / "audit.log").read_text())
    texts.append(json.dumps(data, default=str))
    for text in texts:
        assert not any(s in text for s in secrets)


def _write_config(settings: Settings, path: Path) -> Path:
    """The CLI's view of the test settings: data, database, the destination (no routes)."""
    d = settings.destinations[0]
    path.write_text(
        f'[general]\ndata_dir = "{settings.general.data_dir}"\n'
        f'[database]\nurl = "{settings.database.url}"\n'
        f'[[destinations]]\nname = "{d.name}"\nkind = "dicomweb"\nurl = "{d.url}"\n')
    return path


def test_archive_down_backoff_give_up_then_retry_command(make_settings, tmp_path, capsys):
    port = free_port()  # nothing listens here yet
    settings = _dicomweb_settings(
        make_settings, f"http://127.0.0.1:{port}/dicom-web", timeout_seconds=5,
        sender={"retry_base_seconds": 0.5, "max_attempts": 3})
    cfg = _write_config(settings, tmp_path / "cli.toml")
    chest = _chest(seed=103)
    uid = str(chest.StudyInstanceUID)
    orthanc = WebOrthanc(tmp_path / "orthanc", http_port=port)
    try:
        with running_daemon(settings) as daemon:
            _send(daemon, chest, tmp_path / "in")
            status = wait_for_study(daemon, uid, "failed")
            assert status["send_attempts"] == 3
            assert "connection failed" in status["last_error"]
            with daemon.queue.session() as s:
                events = list(s.execute(
                    select(JobEvent.reason, JobEvent.at).where(
                        JobEvent.job_id == status["job_id"]).order_by(JobEvent.id)))
            reasons = [e.reason for e in events]
            assert reasons.count("retry.send") == 2
            assert reasons[-1] == "send.attempts_exhausted"
            # Backoff: each try waited at least base x 2^(attempt-1) after the one before.
            times = [e.at for e in events if e.reason in ("retry.send",
                                                          "send.attempts_exhausted")]
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
            assert gaps[0] >= 0.5 and gaps[1] >= 1.0, (gaps, "; ".join(f"{e.reason} {e.at.time()}" for e in events))
            rows = reads.results_for(daemon.sessions, status["job_id"])
            assert {r.state for r in rows} == {"pending"}

            orthanc.start()
            assert cli.main(["--config", str(cfg), "retry", "--all-failed"]) == 0
            assert "failed -> outbox" in capsys.readouterr().out
            wait_for_study(daemon, uid, "done", timeout=60)
        assert orthanc.study_modalities(uid) == {"SR": 1, "OT": 1}
        # status --json of the same configuration: kind and url, no AE title.
        assert cli.main(["--config", str(cfg), "status", "--json"]) == 0
        (dest,) = json.loads(capsys.readouterr().out)["destinations"]
        assert dest["kind"] == "dicomweb" and dest["url"] == f"http://127.0.0.1:{port}/dicom-web"
        assert dest["sent"] == 2 and dest["pending"] == 0
        # echo: a QIDO-RS search against the live archive.
        assert cli.main(["--config", str(cfg), "echo", "pacs"]) == 0
        assert "QIDO-RS answered HTTP 200" in capsys.readouterr().out
    finally:
        orthanc.stop()


class _HoldingArchive(http.server.ThreadingHTTPServer):
    """A STOW-RS endpoint that keeps each request until ``release`` is set, then answers
    200 (every instance stored) with an empty Store Instances Response."""

    daemon_threads = True

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _HoldingHandler)


class _HoldingHandler(http.server.BaseHTTPRequestHandler):
    server: _HoldingArchive

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is not None:
            self.rfile.read(int(length))
        else:  # chunked
            while size := int(self.rfile.readline().strip() or b"0", 16):
                self.rfile.read(size + 2)
            self.rfile.readline()
        self.server.requests.append((self.path, self.headers.get("Content-Type", "")))
        self.server.arrived.set()
        self.server.release.wait(60)
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_slow_archive_does_not_hold_back_a_dimse_destination(make_settings, tmp_path):
    archive = _HoldingArchive()
    threading.Thread(target=archive.serve_forever, daemon=True).start()
    pacs = LocalPacs(ae_title="PACS").start()
    try:
        settings = make_settings(pacs.port)
        web = DestinationSettings(name="web", kind="dicomweb", timeout_seconds=60,
                                  url=f"http://127.0.0.1:{archive.server_address[1]}/dicomweb")
        settings = settings.model_copy(update={
            "destinations": [*settings.destinations, web],
            "routes": [r.model_copy(update={"destinations": ["pacs", "web"]})
                       for r in settings.routes if r.model == "chest-xray"]})
        chest = _chest(seed=104)
        uid = str(chest.StudyInstanceUID)
        with running_daemon(settings) as daemon:
            _send(daemon, chest, tmp_path / "in")
            assert archive.arrived.wait(120), "no STOW-RS request"
            # The archive holds its request; the DIMSE PACS has the results all the same.
            wait_until(lambda: len(pacs.objects(uid)) == 2, timeout=60,
                       what="results at the PACS")
            dests = wait_until(lambda: (d := {x["name"]: x for x in collect(
                settings, engine=daemon.engine)["destinations"]})["pacs"]["sent"] == 2 and d,
                timeout=30, what="pacs rows sent")
            assert dests["web"]["sent"] == 0 and dests["web"]["pending"] == 2
            assert _study(settings, daemon.engine, uid)["state"] == "sending"
            assert not archive.release.is_set()
            archive.release.set()
            wait_for_study(daemon, uid, "done", timeout=60)
            dests = {x["name"]: x for x in collect(settings, engine=daemon.engine)
                     ["destinations"]}
        assert dests["web"]["sent"] == 2 and dests["pacs"]["sent"] == 2
        # One request for the job's objects, to {root}/studies, multipart of DICOM parts.
        ((path, content_type),) = archive.requests
        assert path == "/dicomweb/studies"
        assert content_type.startswith("multipart/related")
        assert 'type="application/dicom"' in content_type
    finally:
        archive.release.set()
        archive.shutdown()
        archive.server_close()
        pacs.stop()


class DeployedOrthanc(WebOrthanc):
    """Orthanc configured from deploy/orthanc/orthanc-dicomweb-results.json as shipped, except
    ports and stable age (each replaced line must exist once)."""

    def __init__(self, root: Path, dicomai_port: int) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        text = (DEPLOY / "orthanc-dicomweb-results.json").read_text()
        for old, new in {
            '"HttpPort" : 8042,': f'"HttpPort" : {self.http_port},',
            '"DicomPort" : 4242,': f'"DicomPort" : {self.dicom_port},',
            '"Port" : 11112,': f'"Port" : {dicomai_port},',
            '"StableAge" : 30,': '"StableAge" : 2,',
        }.items():
            assert text.count(old) == 1, f"orthanc-dicomweb-results.json lacks {old!r}"
            text = text.replace(old, new)
        assert text.count('"dicomai" : "change-me"') == 1
        self.users = {"dicomai": "change-me"}
        self.config = root / "orthanc.json"
        self.config.write_text(text)
        shutil.copy(DEPLOY / "dicomai-forward.lua", root / "dicomai-forward.lua")
        self.log = root / "orthanc.log"
        self.proc = None


@pytest.mark.dcmtk
def test_the_deploy_variant_takes_results_over_stow_and_sends_none_back(make_settings,
                                                                        tmp_path):
    dicomai_port = free_port()
    orthanc = DeployedOrthanc(tmp_path / "orthanc", dicomai_port)
    (entry,) = tomllib.loads((DEPLOY / "dicomai-dicomweb-destination.toml").read_text())[
        "destinations"]
    assert entry["url"] == "http://127.0.0.1:8042/dicom-web" and entry["user"] == "dicomai"
    password = tmp_path / "orthanc.password"
    password.write_text("change-me\n")
    entry.update(url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web", password_file=password)
    settings = make_settings(None, receiver={"port": dicomai_port,
                                             "allowed_calling_ae_titles": ["ORTHANC"]})
    settings = settings.model_copy(update={
        "destinations": [DestinationSettings(**entry)],
        "routes": [r for r in settings.routes if r.model == "chest-xray"]})
    chest = _chest(seed=105)
    uid = str(chest.StudyInstanceUID)
    try:
        with running_daemon(settings) as daemon:
            orthanc.start()
            run = subprocess.run(
                ["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                 str(orthanc.dicom_port), *map(str, synthetic.write_study([chest],
                                                                         tmp_path / "cx"))],
                capture_output=True, timeout=60)
            assert run.returncode == 0, run.stderr.decode(errors="replace")
            status = wait_for_study(daemon, uid, "done")
            (study_id,) = orthanc.study_ids(uid)
            assert orthanc.study_modalities(uid) == {"DX": 1, "SR": 1, "OT": 1}
            # The results made the study stable again: the Lua script saw them, sent nothing.
            lines = orthanc.wait(lambda: len(orthanc.forward_lines(study_id)) >= 2 and
                                 orthanc.forward_lines(study_id), 30, "second stable event")
            assert lines[:2] == ["0 from dicomai (not sent), 0 forwarded before, sent 1",
                                 "2 from dicomai (not sent), 1 forwarded before, sent 0"]
            again = _study(settings, daemon.engine, uid)
            assert again["generation"] == 1 and again["job_id"] == status["job_id"]
            # The results came over HTTP (the plugin), not from a DICOM peer.
            for s in orthanc.series(study_id):
                if s["MainDicomTags"]["Modality"] in RESULT_MODALITIES:
                    meta = orthanc.get(f"/instances/{s['Instances'][0]}/metadata?expand")
                    assert meta["Origin"] == "Plugins" and not meta.get("RemoteAET")
    finally:
        orthanc.stop()
