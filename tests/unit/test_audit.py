"""dicomai.audit on its own: the ATNA-style events it writes as JSON lines to the audit file
(and to syslog over a real Unix datagram socket), their fields, that they carry no patient
data, and how the file behaves when it is rotated or its folder goes away."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicomai import audit

STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890"


@pytest.fixture(autouse=True)
def unconfigured() -> Iterator[None]:
    """Each test configures the audit logger itself; afterwards its handlers are closed."""
    yield
    audit.configure(None)


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    """The audit trail in a folder that does not exist yet (configure creates it)."""
    path = tmp_path / "data" / "audit.log"
    audit.configure(path, site="test-site")
    return path


def events(path: Path) -> list[dict[str, Any]]:
    """The events in an audit file, one JSON object a line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def emit_one_of_each() -> None:
    """Every kind of event the daemon writes, as its callers write them."""
    audit.association(
        accepted=True,
        calling_ae="MODALITY",
        called_ae="DICOMAI",
        peer="192.0.2.10",
        local="192.0.2.1",
    )
    audit.association(
        accepted=False,
        calling_ae="STRANGER",
        called_ae="DICOMAI",
        peer="192.0.2.66",
        local="192.0.2.1",
        reason="calling AE not allowed",
    )
    audit.http_caller(accepted=True, user="orthanc", peer="192.0.2.20", local="192.0.2.1")
    audit.http_caller(
        accepted=False, user="", peer="192.0.2.21", local="192.0.2.1", reason="bad credentials"
    )
    audit.instances_transferred(
        received=True,
        study_uid=STUDY_UID,
        count=60,
        source_ae="MODALITY",
        source_address="192.0.2.10",
        destination_ae="DICOMAI",
        destination_address="192.0.2.1",
    )
    audit.instances_transferred(
        received=False,
        study_uid=STUDY_UID,
        count=2,
        source_ae="DICOMAI",
        source_address="192.0.2.1",
        destination_ae="PACS",
        destination_address="192.0.2.30",
        outcome=audit.OUTCOME_SERIOUS_FAILURE,
        reason="1 of 2 sent",
    )
    audit.security_alert(reason="file too large", peer="192.0.2.66")


def code(value: str, meaning: str) -> dict[str, str]:
    return {"code": value, "scheme": "DCM", "meaning": meaning}


# -- the events and their fields ----------------------------------------------------------------
def test_configure_creates_the_folder_and_writes_one_json_object_a_line(audit_file: Path) -> None:
    assert audit_file.parent.is_dir()
    emit_one_of_each()
    lines = audit_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_every_event_identifies_its_source_and_time(audit_file: Path) -> None:
    before = datetime.now(UTC)
    emit_one_of_each()
    after = datetime.now(UTC)
    for event in events(audit_file):
        assert event["AuditSourceIdentification"] == {
            "AuditSourceID": socket.gethostname(),
            "AuditEnterpriseSiteID": "test-site",
        }
        when = event["EventIdentification"]["EventDateTime"]
        assert len(when.split("T")[1].split("+")[0]) == len("12:34:56.789")  # milliseconds
        at = datetime.fromisoformat(when)
        assert at.utcoffset() == timedelta(0)
        assert before - timedelta(milliseconds=1) <= at <= after


def test_association_accepted_and_rejected(audit_file: Path) -> None:
    emit_one_of_each()
    accepted, rejected = events(audit_file)[:2]
    ident = accepted["EventIdentification"]
    assert ident["EventID"] == code("110114", "User Authentication")
    assert ident["EventTypeCode"] == code("110122", "Login")
    assert ident["EventActionCode"] == "E"
    assert ident["EventOutcomeIndicator"] == audit.OUTCOME_SUCCESS == 0
    assert "EventOutcomeDescription" not in ident
    assert accepted["ActiveParticipant"] == [
        {
            "UserID": "AE=MODALITY",
            "AlternativeUserID": "MODALITY",
            "UserIsRequestor": True,
            "NetworkAccessPointID": "192.0.2.10",
            "NetworkAccessPointTypeCode": "2",
        },
        {
            "UserID": "AE=DICOMAI",
            "AlternativeUserID": "DICOMAI",
            "UserIsRequestor": False,
            "NetworkAccessPointID": "192.0.2.1",
            "NetworkAccessPointTypeCode": "2",
        },
    ]
    assert "ParticipantObjectIdentification" not in accepted
    ident = rejected["EventIdentification"]
    assert ident["EventOutcomeIndicator"] == audit.OUTCOME_MINOR_FAILURE == 4
    assert ident["EventOutcomeDescription"] == "calling AE not allowed"
    assert rejected["ActiveParticipant"][0]["UserID"] == "AE=STRANGER"


def test_dicomweb_caller_let_in_and_turned_away(audit_file: Path) -> None:
    emit_one_of_each()
    let_in, turned_away = events(audit_file)[2:4]
    for event in (let_in, turned_away):
        assert event["EventIdentification"]["EventID"] == code("110114", "User Authentication")
        assert event["EventIdentification"]["EventTypeCode"] == code("110122", "Login")
    assert let_in["EventIdentification"]["EventOutcomeIndicator"] == audit.OUTCOME_SUCCESS
    assert let_in["ActiveParticipant"] == [
        {
            "UserID": "orthanc",
            "UserIsRequestor": True,
            "NetworkAccessPointID": "192.0.2.20",
            "NetworkAccessPointTypeCode": "2",
        },
        {
            "UserID": "DICOMweb",
            "UserIsRequestor": False,
            "NetworkAccessPointID": "192.0.2.1",
            "NetworkAccessPointTypeCode": "2",
        },
    ]
    ident = turned_away["EventIdentification"]
    assert ident["EventOutcomeIndicator"] == audit.OUTCOME_MINOR_FAILURE
    assert ident["EventOutcomeDescription"] == "bad credentials"
    assert turned_away["ActiveParticipant"][0]["UserID"] == "-"  # no user name given


def test_instances_received_and_sent(audit_file: Path) -> None:
    emit_one_of_each()
    received, sent = events(audit_file)[4:6]
    study = {
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
        "ParticipantObjectIDTypeCode": code("110180", "Study Instance UID"),
        "ParticipantObjectID": STUDY_UID,
    }
    for event, action, count in ((received, "C", 60), (sent, "R", 2)):
        ident = event["EventIdentification"]
        assert ident["EventID"] == code("110104", "DICOM Instances Transferred")
        assert ident["EventActionCode"] == action
        assert "EventTypeCode" not in ident
        assert event["ParticipantObjectIdentification"] == [
            {**study, "ParticipantObjectDetail": {"NumberOfInstances": count}}
        ]
        source, destination = event["ActiveParticipant"]
        assert source["RoleIDCode"] == code("110153", "Source Role ID")
        assert destination["RoleIDCode"] == code("110152", "Destination Role ID")
    # Received: the modality is the source and we, the destination, are the requestor of
    # record; sent: we are the source and the requestor.
    assert [
        (p["UserID"], p["NetworkAccessPointID"], p["UserIsRequestor"])
        for p in received["ActiveParticipant"]
    ] == [("AE=MODALITY", "192.0.2.10", False), ("AE=DICOMAI", "192.0.2.1", True)]
    assert [
        (p["UserID"], p["NetworkAccessPointID"], p["UserIsRequestor"])
        for p in sent["ActiveParticipant"]
    ] == [("AE=DICOMAI", "192.0.2.1", True), ("AE=PACS", "192.0.2.30", False)]
    assert received["EventIdentification"]["EventOutcomeIndicator"] == audit.OUTCOME_SUCCESS
    assert "EventOutcomeDescription" not in received["EventIdentification"]
    ident = sent["EventIdentification"]
    assert ident["EventOutcomeIndicator"] == audit.OUTCOME_SERIOUS_FAILURE == 8
    assert ident["EventOutcomeDescription"] == "1 of 2 sent"


def test_security_alert(audit_file: Path) -> None:
    audit.security_alert(reason="file too large", peer="192.0.2.66")
    audit.security_alert(reason="bad PDU", peer="192.0.2.67", calling_ae="PROBE")
    anonymous, named = events(audit_file)
    ident = anonymous["EventIdentification"]
    assert ident["EventID"] == code("110113", "Security Alert")
    assert ident["EventActionCode"] == "E"
    assert ident["EventOutcomeIndicator"] == audit.OUTCOME_MINOR_FAILURE
    assert ident["EventOutcomeDescription"] == "file too large"
    assert anonymous["ActiveParticipant"] == [
        {
            "UserID": "AE=-",
            "AlternativeUserID": "-",
            "UserIsRequestor": True,
            "NetworkAccessPointID": "192.0.2.66",
            "NetworkAccessPointTypeCode": "2",
        }
    ]
    assert named["ActiveParticipant"][0]["UserID"] == "AE=PROBE"


def test_events_carry_only_audit_fields_never_patient_data(audit_file: Path) -> None:
    """Every key of every event is one of the audit message's own fields: there is no place
    for a patient's name, ID or birth date, and a new field must be added here on purpose."""
    emit_one_of_each()
    keys: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            keys.update(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for event in events(audit_file):
        walk(event)
    assert keys == {
        "EventIdentification",
        "EventID",
        "EventActionCode",
        "EventDateTime",
        "EventOutcomeIndicator",
        "EventOutcomeDescription",
        "EventTypeCode",
        "code",
        "scheme",
        "meaning",
        "ActiveParticipant",
        "UserID",
        "AlternativeUserID",
        "UserIsRequestor",
        "NetworkAccessPointID",
        "NetworkAccessPointTypeCode",
        "RoleIDCode",
        "AuditSourceIdentification",
        "AuditSourceID",
        "AuditEnterpriseSiteID",
        "ParticipantObjectIdentification",
        "ParticipantObjectTypeCode",
        "ParticipantObjectTypeCodeRole",
        "ParticipantObjectIDTypeCode",
        "ParticipantObjectID",
        "ParticipantObjectDetail",
        "NumberOfInstances",
    }
    assert "patient" not in audit_file.read_text(encoding="utf-8").lower()


class Collected(logging.Handler):
    """The records that reach a logger's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_events_stay_out_of_the_application_log(audit_file: Path) -> None:
    """The application log (handlers on the root or ``dicomai`` logger) never sees them.
    (pytest's caplog cannot tell: it attaches itself to non-propagating loggers too.)"""
    application = Collected()
    for name in ("", "dicomai"):
        logging.getLogger(name).addHandler(application)
    try:
        emit_one_of_each()
        logging.getLogger("dicomai.ingest").warning("an application record")
    finally:
        for name in ("", "dicomai"):
            logging.getLogger(name).removeHandler(application)
    assert len(events(audit_file)) == 7
    assert [r.name for r in application.records] == ["dicomai.ingest"] * 2  # root, dicomai


# -- configuration ------------------------------------------------------------------------------
def test_configure_again_replaces_the_destination(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    audit.configure(first, site="one")
    audit.security_alert(reason="before", peer="192.0.2.1")
    audit.configure(second, site="two")
    audit.security_alert(reason="after", peer="192.0.2.1")
    (before,) = events(first)
    (after,) = events(second)  # once: the first file's handler is gone
    assert before["EventIdentification"]["EventOutcomeDescription"] == "before"
    assert after["EventIdentification"]["EventOutcomeDescription"] == "after"
    assert after["AuditSourceIdentification"]["AuditEnterpriseSiteID"] == "two"


def test_no_file_and_no_syslog_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit.configure(None)
    emit_one_of_each()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


@pytest.fixture
def syslog_socket() -> Iterator[tuple[socket.socket, str]]:
    """A syslog daemon's datagram socket (short folder: a socket path has ~100 bytes)."""
    folder = tempfile.mkdtemp(prefix="audit-")
    path = f"{folder}/log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder)


def test_syslog_gets_the_same_json_at_facility_auth(
    tmp_path: Path, syslog_socket: tuple[socket.socket, str]
) -> None:
    sock, path = syslog_socket
    audit.configure(tmp_path / "audit.log", syslog=True, syslog_address=path)
    audit.association(
        accepted=True,
        calling_ae="MODALITY",
        called_ae="DICOMAI",
        peer="192.0.2.10",
        local="192.0.2.1",
    )
    audit.security_alert(reason="file too large", peer="192.0.2.66")
    datagrams = [sock.recv(65536), sock.recv(65536)]
    in_file = events(tmp_path / "audit.log")
    for datagram, from_file in zip(datagrams, in_file, strict=True):
        # <PRI> = facility auth (4) * 8 + severity info (6); then the message, NUL-ended.
        assert datagram.startswith(b"<38>") and datagram.endswith(b"\x00")
        assert json.loads(datagram[4:-1]) == from_file


def test_syslog_only_writes_no_file(
    tmp_path: Path, syslog_socket: tuple[socket.socket, str]
) -> None:
    sock, path = syslog_socket
    audit.configure(None, syslog=True, syslog_address=path)
    audit.security_alert(reason="bad PDU", peer="192.0.2.67")
    event = json.loads(sock.recv(65536)[4:-1])
    assert event["EventIdentification"]["EventID"]["code"] == "110113"
    assert list(tmp_path.iterdir()) == []


def test_syslog_not_listening_yet_loses_its_events_but_not_the_file_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A syslog socket nobody listens on does not stop configure nor the audit file; the
    events meant for syslog are lost (logging reports each on stderr) until it listens,
    and then the next one reaches it."""
    folder = tempfile.mkdtemp(prefix="audit-")
    path = f"{folder}/log"
    try:
        audit.configure(tmp_path / "audit.log", syslog=True, syslog_address=path)
        audit.security_alert(reason="unheard", peer="192.0.2.1")
        assert "Logging error" in capsys.readouterr().err
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            audit.security_alert(reason="heard", peer="192.0.2.1")
            heard = json.loads(sock.recv(65536)[4:-1])
    finally:
        shutil.rmtree(folder)
    assert heard["EventIdentification"]["EventOutcomeDescription"] == "heard"
    assert [
        e["EventIdentification"]["EventOutcomeDescription"] for e in events(tmp_path / "audit.log")
    ] == ["unheard", "heard"]


# -- rotation and failures ----------------------------------------------------------------------
def test_a_rotated_file_is_followed_by_a_new_one(audit_file: Path) -> None:
    """logrotate moves the file away (or deletes it): the next event opens a new file at the
    configured path; the moved file keeps what was written before."""
    audit.security_alert(reason="one", peer="192.0.2.1")
    rotated = audit_file.with_name("audit.log.1")
    audit_file.rename(rotated)
    audit.security_alert(reason="two", peer="192.0.2.1")
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in events(rotated)] == ["one"]
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in events(audit_file)] == [
        "two"
    ]
    audit_file.unlink()
    audit.security_alert(reason="three", peer="192.0.2.1")
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in events(audit_file)] == [
        "three"
    ]


def test_a_vanished_audit_folder_fails_each_event_until_it_is_back(audit_file: Path) -> None:
    """What the daemon's callers see today when the audit file cannot be opened again: the
    event raises (it is not silently lost); once the folder is back, events are written."""
    audit.security_alert(reason="one", peer="192.0.2.1")
    shutil.rmtree(audit_file.parent)
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            audit.security_alert(reason="lost", peer="192.0.2.1")
    audit_file.parent.mkdir()
    audit.security_alert(reason="two", peer="192.0.2.1")
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in events(audit_file)] == [
        "two"
    ]
