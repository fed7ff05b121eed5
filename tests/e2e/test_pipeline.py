"""The whole daemon in-process: real associations in, SR + SC out to a local PACS, status after."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomai.ops import cli

from dicomai_tools import synthetic
from dicomai.db import Job, JobEvent, make_engine
from dicomai.logs import JsonFormatter
from dicomai.ops.scu import echo, send_files
from dicomai.ops.status import collect
from dicomai.jobs import reads
from tests.conftest import running_daemon
from tests.sr_summary import summary, summary_scores
from tests.waiting import wait_for_study, wait_until

CHEST_LABELS = {"atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                "pleural_thickening", "hernia"}


def _study_state(settings, study_uid, engine=None):
    data = collect(settings, limit=500, engine=engine)
    for s in data["studies"]:
        if s["study_instance_uid"] == study_uid:
            return s
    return None


def _status_json(settings, config_path: Path) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["--config", str(config_path), "status", "--json", "--limit", "100"])
    assert code == 0
    return json.loads(out.getvalue())


def _write_config(settings, path: Path) -> Path:
    """A TOML file reproducing the test settings (for CLI calls)."""
    models = "\n".join(
        f'[models.{n}]\npath = "{settings.model_path(n)}"\nversion = "{m.version}"\n'
        f'task = "{m.task}"\ndevice = "cpu"\n' for n, m in settings.models.items())
    routes = "\n".join(
        f'[[routes]]\nname = "{r.name}"\nmodel = "{r.model}"\nmodality = {json.dumps(r.modality)}\n'
        f'body_part = {json.dumps(r.body_part)}\nseries_rule = "{r.series_rule}"\n'
        for r in settings.routes)
    dests = "\n".join(
        f'[[destinations]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\nhost = "{d.host}"\n'
        f'port = {d.port}\n' for d in settings.destinations)
    path.write_text(f'[general]\ndata_dir = "{settings.general.data_dir}"\n'
                    f'[database]\nurl = "{settings.database.url}"\n{dests}\n{routes}\n'
                    f'{models}\n')
    return path


def test_chest_xray_round_trip_with_pynetdicom(make_settings, local_pacs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = make_settings(local_pacs.port)
    ds = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=600, cols=500,
                             seed=1)
    paths = synthetic.write_study([ds], tmp_path / "in")
    with running_daemon(settings) as daemon:
        assert echo("127.0.0.1", daemon.receiver.port, called_ae="DICOMAI") == 0
        assert send_files(paths, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        status = wait_for_study(daemon, ds.StudyInstanceUID, "done")
    assert status["route"] == "chest-xray"
    assert status["model"] == "chest-xray"
    assert status["instances"] == 1
    assert status["latency_seconds"] is not None and status["latency_seconds"] >= 0

    objects = local_pacs.objects(ds.StudyInstanceUID)
    assert sorted(o.modality for o in objects) == ["OT", "SR"]
    assert all(o.study_instance_uid == ds.StudyInstanceUID for o in objects)
    sr_ds = next(o.dataset for o in objects if o.modality == "SR")
    sc_ds = next(o.dataset for o in objects if o.modality == "OT")
    assert sr_ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr_ds.PatientID == ds.PatientID  # patient module copied from the source

    # Findings: every label once in the report's summary, with the model's score as certainty;
    # nothing reaches the default threshold, so no finding has a location: one group over the
    # whole image says so.
    seen = summary_scores(sr_ds, "chest-xray")
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier.endswith(":whole-image")
    assert set(seen) == CHEST_LABELS
    for label, score in status["scores"].items():
        # status keeps scores to 4 decimals; the SR rounds the raw score to 0.1 %
        assert seen[label] == pytest.approx(100 * score, abs=0.0551)
    evidence = sr_ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # Honest model statement in the SR and the SC.
    text = " ".join(str(e.value) for e in sr_ds.iterall() if e.VR in ("UT", "LO", "ST", "LT"))
    assert "not for diagnostic use" in text.lower()
    assert "untrained" in text.lower()
    assert sc_ds.BurnedInAnnotation == "YES"
    assert sc_ds.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sc_ds.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")

    # No patient data in the log records (sentinels from synthetic.PatientInfo).
    fmt = JsonFormatter()
    logs = "\n".join(fmt.format(r) for r in caplog.records)
    assert "job.analysed" in logs
    for sentinel in ("PHI^SENTINEL", "PHI-SENTINEL-ID", "19010101", "PHISENTINELACC"):
        assert sentinel not in logs
    for path in Path(settings.general.data_dir).rglob("*"):
        assert "SENTINEL" not in path.name

    # Audit trail: association, study received, results sent; no patient data either.
    audit_text = (Path(settings.general.data_dir) / "audit.log").read_text()
    events = [json.loads(line) for line in audit_text.splitlines()]
    kinds = {(e["EventIdentification"]["EventID"]["code"],
              e["EventIdentification"]["EventActionCode"]) for e in events}
    assert {("110114", "E"), ("110104", "C"), ("110104", "R")} <= kinds
    received = next(e for e in events if e["EventIdentification"]["EventActionCode"] == "C")
    obj = received["ParticipantObjectIdentification"][0]
    assert obj["ParticipantObjectID"] == ds.StudyInstanceUID
    assert obj["ParticipantObjectDetail"]["NumberOfInstances"] == 1
    assert received["ActiveParticipant"][0]["UserID"] == "AE=DICOMAI-SCU"
    for sentinel in ("PHI^SENTINEL", "PHI-SENTINEL-ID", "19010101", "PHISENTINELACC"):
        assert sentinel not in audit_text


@pytest.mark.dcmtk
def test_bone_xray_with_storescu_and_echoscu(make_settings, local_pacs, tmp_path):
    settings = make_settings(local_pacs.port)
    ds = synthetic.make_xray("hand", modality="CR", body_part="HAND", laterality="L",
                             rows=400, cols=320, seed=2, monochrome1=True)
    paths = synthetic.write_study([ds], tmp_path / "in")
    with running_daemon(settings) as daemon:
        port = str(daemon.receiver.port)
        echo_run = subprocess.run(["echoscu", "-aec", "DICOMAI", "127.0.0.1", port],
                                  capture_output=True, timeout=30)
        assert echo_run.returncode == 0, echo_run.stderr
        run = subprocess.run(["storescu", "-aec", "DICOMAI", "-aet", "MODALITY", "127.0.0.1",
                              port, *map(str, paths)], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
        status = wait_for_study(daemon, ds.StudyInstanceUID, "done")
    assert status["route"] == "bone-xray"
    objects = local_pacs.objects(ds.StudyInstanceUID)
    assert sorted(o.modality for o in objects) == ["OT", "SR"]
    sr_ds = next(o.dataset for o in objects if o.modality == "SR")
    ((value, score),) = summary(sr_ds, "bone-xray").values()  # Normality = Abnormal/Normal
    assert score == pytest.approx(100 * status["scores"]["abnormal"], abs=0.0551)
    expected = "263654008" if status["scores"]["abnormal"] >= 0.5 else "17621005"
    assert value == expected


@pytest.mark.dcmtk
def test_ct_200_slices_end_to_end(make_settings, local_pacs, tmp_path):
    settings = make_settings(local_pacs.port)
    slices = synthetic.make_head_ct(200, rows=256, cols=256, slice_thickness=1.0, seed=3,
                                    with_localizer=True, bleed=True)
    synthetic.write_study(slices, tmp_path / "ct")
    axial = [s for s in slices if "LOCALIZER" not in s.ImageType]
    assert len(axial) == 200
    with running_daemon(settings) as daemon:
        run = subprocess.run(["storescu", "-aec", "DICOMAI", "+sd", "127.0.0.1",
                              str(daemon.receiver.port), str(tmp_path / "ct")],
                             capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr
        status = wait_for_study(daemon, slices[0].StudyInstanceUID, "done", timeout=300)
    assert status["route"] == "brain-ct"
    assert status["instances"] == len(slices)
    objects = local_pacs.objects(slices[0].StudyInstanceUID)
    sr_ds = next(o.dataset for o in objects if o.modality == "SR")
    scs = [o.dataset for o in objects if o.modality == "OT"]
    assert 1 <= len(scs) <= 5
    # The SR's evidence is exactly the analysed axial series: the localizer is not in it.
    (series_ref,) = sr_ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == axial[0].SeriesInstanceUID
    assert len(series_ref.ReferencedSOPSequence) == 200
    axial_uids = {s.SOPInstanceUID for s in axial}
    for sc in scs:
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in axial_uids


def test_resend_and_new_generation(make_settings, local_pacs, tmp_path):
    settings = make_settings(local_pacs.port)
    ds = synthetic.make_xray("chest", view_position="AP", rows=300, cols=300, seed=4)
    paths = synthetic.write_study([ds], tmp_path / "a")
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        assert send_files(paths, "127.0.0.1", port, called_ae="DICOMAI").ok
        wait_for_study(daemon, ds.StudyInstanceUID, "done")
        first = {o.sop_instance_uid for o in local_pacs.objects(ds.StudyInstanceUID)}
        assert len(first) == 2

        # The same instance again: stored once, no new job, no second set of results.
        assert send_files(paths, "127.0.0.1", port, called_ae="DICOMAI").ok
        far = datetime.now(UTC) + timedelta(days=1)
        # the duplicate opened no job
        assert reads.receiving_jobs_quiet_since(daemon.sessions, far) == []
        s = _study_state(settings, ds.StudyInstanceUID, daemon.engine)
        assert s["generation"] == 1 and s["instances"] == 1
        assert len(local_pacs.objects(ds.StudyInstanceUID)) == 2

        # A new instance in the same study after it was processed: generation 2.
        extra = synthetic.make_xray("chest", view_position="PA", rows=300, cols=300, seed=5,
                                    study_uid=ds.StudyInstanceUID, series_uid=generate_uid())
        extra.SeriesNumber = int(ds.SeriesNumber) + 1  # a later acquisition: analysed now
        assert send_files(synthetic.write_study([extra], tmp_path / "b"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        wait_until(lambda: (s := _study_state(settings, ds.StudyInstanceUID, daemon.engine))
                   and s["generation"] == 2 and s["state"] == "done", timeout=120,
                   what="generation 2")
    objects = local_pacs.objects(ds.StudyInstanceUID)
    new = [o for o in objects if o.sop_instance_uid not in first]
    assert sorted(o.modality for o in new) == ["OT", "SR"]
    new_sr = next(o.dataset for o in new if o.modality == "SR")
    old_sr_uid = next(o.sop_instance_uid for o in objects
                      if o.modality == "SR" and o.sop_instance_uid in first)
    pred = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert pred == old_sr_uid
    new_sc = next(o.dataset for o in new if o.modality == "OT")
    assert new_sc.SourceImageSequence[0].ReferencedSOPInstanceUID == extra.SOPInstanceUID


def test_unroutable_study_is_skipped_and_status_json(make_settings, local_pacs, tmp_path):
    settings = make_settings(local_pacs.port)
    mr = synthetic.make_mr(body_part="KNEE", n_slices=3)
    chest = synthetic.make_xray("chest", rows=256, cols=256, seed=6)
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        assert send_files(synthetic.write_study(mr, tmp_path / "mr"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        assert send_files(synthetic.write_study([chest], tmp_path / "cx"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        wait_for_study(daemon, mr[0].StudyInstanceUID, "skipped")
        wait_for_study(daemon, chest.StudyInstanceUID, "done")
        data = _status_json(settings, _write_config(settings, tmp_path / "cfg.toml"))
    by_uid = {s["study_instance_uid"]: s for s in data["studies"]}
    assert by_uid[mr[0].StudyInstanceUID]["state"] == "skipped"
    assert by_uid[mr[0].StudyInstanceUID]["route"] is None
    assert by_uid[chest.StudyInstanceUID]["state"] == "done"
    for key in ("study_instance_uid", "state", "route", "model", "instances",
                "latency_seconds"):
        assert key in by_uid[chest.StudyInstanceUID]
    assert data["counts"]["skipped"] == 1 and data["counts"]["done"] == 1
    assert local_pacs.objects(mr[0].StudyInstanceUID) == []


def test_compressed_real_samples_stored_as_received(make_settings, local_pacs, tmp_path):
    from dicomai_tools.samples import real_sample

    settings = make_settings(local_pacs.port, scheduler={"study_quiet_seconds": 3600})
    files = [real_sample("chest_xray/RG1_J2KI.dcm"), real_sample("extremity_xray/RG3_J2KR.dcm")]
    with running_daemon(settings) as daemon:
        assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        for f in files:
            src = pydicom.dcmread(f, stop_before_pixels=True)
            job_id = _study_state(settings, src.StudyInstanceUID, daemon.engine)["job_id"]
            job = reads.get_job(daemon.sessions, job_id)
            (row,) = reads.study_instances(daemon.sessions, job.study_id)
            assert row.transfer_syntax_uid == src.file_meta.TransferSyntaxUID
            stored = pydicom.dcmread(row.path)
            assert stored.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
            assert stored.PixelData == pydicom.dcmread(f).PixelData


def test_wrong_calling_ae_is_rejected(make_settings, tmp_path):
    settings = make_settings(None, receiver={"allowed_calling_ae_titles": ["PACS"]})
    ds = synthetic.make_xray("chest", rows=128, cols=128)
    paths = synthetic.write_study([ds], tmp_path)
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        assert echo("127.0.0.1", port, called_ae="DICOMAI", calling_ae="INTRUDER") is None
        assert not send_files(paths, "127.0.0.1", port, called_ae="DICOMAI",
                              calling_ae="INTRUDER").ok
        assert echo("127.0.0.1", port, called_ae="WRONGCALLED", calling_ae="PACS") is None
        assert echo("127.0.0.1", port, called_ae="DICOMAI", calling_ae="PACS") == 0
        assert _study_state(settings, ds.StudyInstanceUID, daemon.engine) is None


def test_module_help_runs():
    import sys

    run = subprocess.run([sys.executable, "-m", "dicomai", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0
    for sub in ("serve", "status", "demo", "models", "check-config"):
        assert sub in run.stdout


def test_check_config_and_models_commands(make_settings, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[receiver]\nae_tilte = "X"\n')
    assert cli.main(["--config", str(cfg), "check-config"]) == 3
    assert "receiver.ae_tilte: unknown key" in capsys.readouterr().err
    good = _write_config(make_settings(), tmp_path / "good.toml")
    assert cli.main(["--config", str(good), "check-config"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(good), "models", "verify", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"chest-xray", "head-ct-ich", "bone-xray"}
    for row in rows.values():
        assert row["verified"] is True
        assert len(row["sha256"]) == 64
        assert "not for diagnostic use" in row["description"].lower()


def test_destination_down_then_back(make_settings, tmp_path):
    from dicomai_tools.local_pacs import LocalPacs
    from tests.conftest import free_port

    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    settings = make_settings(pacs_port, sender={"retry_base_seconds": 1.0})
    ds = synthetic.make_xray("chest", rows=256, cols=256, seed=21)
    with running_daemon(settings) as daemon:
        assert send_files(synthetic.write_study([ds], tmp_path), "127.0.0.1",
                          daemon.receiver.port, called_ae="DICOMAI").ok
        waiting = wait_until(
            lambda: (s := _study_state(settings, ds.StudyInstanceUID, daemon.engine))
            and s["send_attempts"] >= 1 and s["state"] in ("outbox", "sending") and s,
            timeout=120, what="a failed send")
        assert waiting["last_error"]
        data = collect(settings, engine=daemon.engine)
        (dest,) = data["destinations"]
        assert dest["pending"] == 2 and dest["sent"] == 0 and dest["last_error"]
        with LocalPacs(ae_title="PACS", port=pacs_port) as pacs:
            wait_for_study(daemon, ds.StudyInstanceUID, "done", timeout=120)
            assert sorted(o.modality for o in pacs.objects(ds.StudyInstanceUID)) == ["OT", "SR"]


@pytest.mark.parametrize("notice", [False, True])
def test_undecodable_study_fails_with_optional_notice(make_settings, local_pacs, tmp_path,
                                                      notice):
    settings = make_settings(local_pacs.port)
    settings = settings.model_copy(update={"destinations": [
        d.model_copy(update={"emit_failure_notice": notice}) for d in settings.destinations]})
    from pydicom.encaps import encapsulate

    ds = synthetic.make_xray("chest", rows=256, cols=256, seed=31,
                             transfer_syntax=pydicom.uid.RLELossless)
    # Well-formed encapsulation around a corrupt RLE stream: accepted at the door (the
    # receiver does not decode), then the worker cannot decode it.
    ds.PixelData = encapsulate([b"\x07\x00\x00\x00" + b"\x00" * 60])
    with running_daemon(settings) as daemon:
        assert send_files(synthetic.write_study([ds], tmp_path), "127.0.0.1",
                          daemon.receiver.port, called_ae="DICOMAI").ok
        status = wait_for_study(daemon, ds.StudyInstanceUID, "failed")
        if notice:  # the notice is sent before the job settles in FAILED
            wait_until(lambda: local_pacs.objects(ds.StudyInstanceUID), timeout=30, what="notice")
    assert "UnsupportedInput" in status["last_error"] or "decod" in status["last_error"]
    objects = local_pacs.objects(ds.StudyInstanceUID)
    if not notice:
        assert objects == []
        return
    (obj,) = objects
    assert obj.sop_class_uid == pydicom.uid.BasicTextSRStorage
    assert obj.study_instance_uid == ds.StudyInstanceUID
    texts = " ".join(str(e.value) for e in obj.dataset.iterall() if e.keyword == "TextValue")
    assert "could not be completed" in texts.lower()


def test_give_up_then_operator_retry_and_cancel(make_settings, tmp_path, capsys):
    from dicomai_tools.local_pacs import LocalPacs
    from tests.conftest import free_port

    pacs_port = free_port()
    settings = make_settings(pacs_port, sender={"retry_base_seconds": 0.2, "max_attempts": 2})
    cfg = _write_config(settings, tmp_path / "cfg.toml")
    cx1 = synthetic.make_xray("chest", rows=128, cols=128, seed=51)
    cx2 = synthetic.make_xray("chest", rows=128, cols=128, seed=52)
    with running_daemon(settings) as daemon:
        for ds in (cx1, cx2):
            assert send_files(synthetic.write_study([ds], tmp_path / ds.SOPInstanceUID),
                              "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        for ds in (cx1, cx2):
            s = wait_for_study(daemon, ds.StudyInstanceUID, "failed", timeout=120)
            assert s["send_attempts"] == 2 and "association" in s["last_error"]
        assert cli.main(["--config", str(cfg), "cancel", "--study", cx2.StudyInstanceUID]) == 0
        assert _study_state(settings, cx2.StudyInstanceUID, daemon.engine)["state"] \
            == "cancelled"
        assert cli.main(["--config", str(cfg), "retry", "--study", cx2.StudyInstanceUID]) == 1
        with LocalPacs(ae_title="PACS", port=pacs_port) as pacs:
            assert cli.main(["--config", str(cfg), "retry", "--all-failed"]) == 0
            assert "failed -> outbox" in capsys.readouterr().out
            wait_for_study(daemon, cx1.StudyInstanceUID, "done", timeout=60)
            assert sorted(o.modality for o in pacs.objects(cx1.StudyInstanceUID)) == ["OT", "SR"]
            assert pacs.objects(cx2.StudyInstanceUID) == []
    assert cli.main(["--config", str(cfg), "retry"]) == 2


def test_dead_destination_does_not_block_another(make_settings, local_pacs, tmp_path):
    import socket
    import time

    from dicomai.config import DestinationSettings

    # A "hung" node: accepts TCP connections but never answers a DICOM association request.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        settings = make_settings(local_pacs.port, sender={"timeout_seconds": 30})
        archive = DestinationSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1",
                                      port=hung.getsockname()[1])
        settings = settings.model_copy(update={
            "destinations": [*settings.destinations, archive],
            "routes": [r.model_copy(update={"destinations": ["pacs", "archive"]})
                       for r in settings.routes]})
        ds = synthetic.make_xray("chest", rows=128, cols=128, seed=61)
        with running_daemon(settings) as daemon:
            t0 = time.monotonic()
            assert send_files(synthetic.write_study([ds], tmp_path), "127.0.0.1",
                              daemon.receiver.port, called_ae="DICOMAI").ok
            wait_until(lambda: len(local_pacs.objects(ds.StudyInstanceUID)) == 2, timeout=25,
                       what="results at the live destination")
            assert time.monotonic() - t0 < 25  # well before the hung node's 30 s timeout
            status = _study_state(settings, ds.StudyInstanceUID, daemon.engine)
            assert status["state"] == "sending"  # still waiting on the archive

            def destinations() -> dict[str, Any]:
                return {d["name"]: d for d in collect(settings, engine=daemon.engine)
                        ["destinations"]}

            # the PACS has both objects; their rows are recorded sent right after
            wait_until(lambda: destinations()["pacs"]["sent"] == 2, timeout=5,
                       what="both results recorded sent")
            assert destinations()["archive"]["sent"] == 0
            leaving = time.monotonic()
        # Stopping does not wait out the hung node's 30 s: after a 5 s grace its association
        # is aborted, and the job goes back to the outbox without an attempt counted.
        assert time.monotonic() - leaving < 9
        engine = make_engine(settings.database_url)
        try:
            with engine.connect() as conn:
                job = conn.execute(select(Job.state, Job.send_attempts, Job.claimed_by)).one()
                reason = conn.execute(select(JobEvent.reason).order_by(JobEvent.id.desc())
                                      .limit(1)).scalar_one()
        finally:
            engine.dispose()
        assert tuple(job) == ("outbox", 0, None) and reason == "retry.shutdown"
    finally:
        hung.close()


def test_reload_changes_a_route_while_a_study_is_being_received(make_settings, local_pacs):
    from pynetdicom import AE

    settings = make_settings(local_pacs.port, scheduler={"study_quiet_seconds": 2.0})
    ct = synthetic.make_head_ct(10, rows=64, cols=64, seed=81)
    # The new configuration analyses head CT no more (the brain-ct route is removed).
    changed = settings.model_copy(update={
        "routes": [r for r in settings.routes if r.name != "brain-ct"]})
    with running_daemon(settings) as daemon:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ct[0].SOPClassUID, ct[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in ct[:5]]
        assert daemon.reload(changed) == []  # nothing needed a restart
        assert assoc.is_established  # the association was not dropped
        statuses += [int(assoc.send_c_store(ds).Status) for ds in ct[5:]]
        assoc.release()
        ae.shutdown()
        assert statuses == [0] * 10
        status = wait_for_study(daemon, ct[0].StudyInstanceUID, "skipped")
        assert status["instances"] == 10
        # A change to [receiver] is reported as needing a restart, and not applied.
        moved = changed.model_copy(update={"receiver": changed.receiver.model_copy(
            update={"ae_title": "OTHER"})})
        assert daemon.reload(moved) == ["receiver"]
        assert daemon.settings.receiver.ae_title == "DICOMAI"
    assert local_pacs.objects(ct[0].StudyInstanceUID) == []


def test_reload_swaps_a_model_after_loading_the_new_one(make_settings, local_pacs, tmp_path):
    settings = make_settings(local_pacs.port)
    models = dict(settings.models)
    models["chest-xray"] = models["chest-xray"].model_copy(update={"version": "0.2.0-test"})
    changed = settings.model_copy(update={"models": models})
    ds = synthetic.make_xray("chest", rows=128, cols=128, seed=91)
    with running_daemon(settings) as daemon:
        old = daemon.models.get("chest-xray")
        daemon.reload(changed)
        new = daemon.models.get("chest-xray")
        assert new is not old and new.identity.version == "0.2.0-test"
        assert old.identity.version != "0.2.0-test"  # jobs holding the old one finish with it
        assert send_files(synthetic.write_study([ds], tmp_path), "127.0.0.1",
                          daemon.receiver.port, called_ae="DICOMAI").ok
        wait_for_study(daemon, ds.StudyInstanceUID, "done")
    sr = next(o.dataset for o in local_pacs.objects(ds.StudyInstanceUID) if o.modality == "SR")
    assert sr.SoftwareVersions == "0.2.0-test"
