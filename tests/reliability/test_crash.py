"""Never lose a study: `dicomai serve` killed (-9) or stopped (SIGTERM) at each stage, restarted.

Real daemon processes (only the brain-CT route configured, so start-up loads one model), DCMTK
storescu as the modality, and a LocalPacs in the test process as the destination. Each test
prints its figures (``pytest -s``).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pydicom
import pytest

from dicomai_tools import synthetic
from dicomai_tools.local_pacs import LocalPacs
from tests.reliability.conftest import RelServe, rel_storescu
from tests.waiting import let_time_pass, sample_until, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

CT_ROUTE = ["brain-ct"]


def _check_spool(serve: RelServe, study_uid: str, expected_uids: set[str],
                 max_orphans: int = 0) -> dict[str, int]:
    """Every row points to a complete file of its own SOP instance; one file per instance.

    ``max_orphans``: right after a kill, the file of the instance in flight may be in place
    without its row (written and fsynced, not yet committed; never acknowledged).
    """
    rows = serve.instances(study_uid)
    uids = [uid for uid, _, _ in rows]
    assert len(uids) == len(set(uids))
    assert set(uids) == expected_uids
    for uid, path, _ in rows:
        assert not path.endswith(".tmp"), "an instance row points to a temporary file"
        ds = pydicom.dcmread(path)  # parses: not a partial file
        assert ds.SOPInstanceUID == uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == uid
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    incoming = serve.settings.spool_path / "incoming"
    # written files (pre-created empty slots not counted), against every row of the spool
    files = {str(f) for f in incoming.rglob("*.dcm") if f.stat().st_size}
    indexed = {path for _, path, _ in rows}
    assert indexed <= files
    orphans = files - {r[0] for r in serve.query("SELECT path FROM instances")}
    assert len(orphans) <= max_orphans, sorted(orphans)
    leftovers = [p for p in incoming.rglob("*")
                 if p.is_file() and p.suffix not in (".dcm", ".lock")]  # .lock: pool owners
    return {"files": len(files), "orphan_files": len(orphans), "tmp_leftovers": len(leftovers)}


def _check_results_at_pacs(serve: RelServe, pacs: LocalPacs, study_uid: str) -> dict[str, int]:
    """Exactly one set of results at the PACS (by UID); returns how often each UID arrived."""
    jobs = serve.jobs(study_uid)
    assert [(g, s) for _, g, s, _ in jobs] == [(1, "done")], jobs
    expected = serve.results(jobs[0][0])
    assert expected and all(state == "sent" for _, _, state in expected)
    assert [kind for kind, _, _ in expected].count("sr") == 1
    assert "sc" in {kind for kind, _, _ in expected}
    objects = pacs.objects(study_uid)
    counts = Counter(o.sop_instance_uid for o in objects)
    assert set(counts) == {uid for _, uid, _ in expected}
    assert len({o.sop_instance_uid for o in objects if o.modality == "SR"}) == 1
    return dict(counts)


def _duplicates(counts: dict[str, int]) -> int:
    return sum(n - 1 for n in counts.values())


def test_kill_during_receive(rel_serve, rel_storescu_runs, local_pacs, tmp_path, rel_report):
    serve = rel_serve(local_pacs.port, quiet=10.0, routes=CT_ROUTE, ct_input_size=64)
    ct = synthetic.make_head_ct(300, rows=128, cols=128, slice_thickness=0.5, seed=71)
    study_uid = ct[0].StudyInstanceUID
    files = synthetic.write_study(ct, tmp_path / "ct")
    serve.start()

    first = rel_storescu(serve.port, files)
    rel_storescu_runs.append(first)
    wait_until(lambda: serve.instance_count(study_uid) >= 80 or first.proc.poll() is not None,
               timeout=60, interval=0.02, what=">= 80 instances stored")
    t_kill = time.monotonic()
    serve.kill9()
    assert first.wait(30) != 0, "storescu finished before the kill: the test proves nothing"
    acked = {f.stem for f in first.acknowledged}
    # Nothing acknowledged is lost, and what the killed daemon indexed is complete on disk.
    rows_at_kill = {uid for uid, _, _ in serve.instances(study_uid)}
    assert 80 <= len(rows_at_kill) < len(ct)
    assert acked <= rows_at_kill
    spool_at_kill = _check_spool(serve, study_uid, rows_at_kill, max_orphans=1)
    assert serve.study(study_uid)["state"] == "receiving"

    serve.start()
    restart_s = round(time.monotonic() - t_kill, 2)
    second = rel_storescu(serve.port, files)  # the modality sends the whole study again
    rel_storescu_runs.append(second)
    assert second.wait(120) == 0, second.out[-2000:]
    assert second.statuses == ["Success"] * len(ct)
    status = serve.wait_state(study_uid, "done", timeout=150)

    assert status["generation"] == 1
    assert status["instances"] == len(ct)
    assert serve.instance_count(study_uid) == len(ct)
    spool = _check_spool(serve, study_uid, {ds.SOPInstanceUID for ds in ct})
    counts = _check_results_at_pacs(serve, local_pacs, study_uid)
    assert _duplicates(counts) == 0  # nothing was sent before the kill
    rel_report("acknowledged / indexed at kill", f"{len(acked)} / {len(rows_at_kill)}")
    rel_report("spool at kill", spool_at_kill)
    rel_report("spool at end", spool)
    rel_report("kill to listening again (s)", restart_s)
    rel_report("daemon start times (s)", serve.started)
    rel_report("result objects at PACS / duplicates", f"{len(counts)} / {_duplicates(counts)}")


def test_restart_after_downtime_keeps_partial_study_open(rel_serve, rel_storescu_runs,
                                                         local_pacs, tmp_path, rel_report):
    """A study cut off by a crash is not closed by the restarted daemon before its sender
    could resume: the daemon's downtime is not silence from the modality."""
    quiet = 4.0
    serve = rel_serve(local_pacs.port, quiet=quiet, routes=CT_ROUTE, ct_input_size=64)
    ct = synthetic.make_head_ct(60, rows=128, cols=128, seed=72)
    study_uid = ct[0].StudyInstanceUID
    files = synthetic.write_study(ct, tmp_path / "ct")
    serve.start()
    first = rel_storescu(serve.port, files[:20])
    rel_storescu_runs.append(first)
    assert first.wait(60) == 0, first.out[-2000:]
    serve.kill9()
    assert serve.study(study_uid)["state"] == "receiving"  # killed within the quiet period

    def down_longer_than_quiet() -> bool:
        (last,) = serve.query("SELECT max(last_instance_at) FROM jobs")[0]
        last_at = datetime.fromisoformat(last).replace(tzinfo=UTC)
        return datetime.now(UTC) - last_at > timedelta(seconds=quiet + 0.5)

    wait_until(down_longer_than_quiet, timeout=30, what="an outage longer than the quiet period")
    serve.start()
    # The modality needs a moment to notice that the daemon is back; for half the quiet
    # period the study must stay open.
    state = sample_until(lambda: serve.study(study_uid)["state"], lambda s: s != "receiving",
                         timeout=quiet / 2, interval=0.1)
    assert state == "receiving", f"20 of 60 slices closed as {state} right after restart"
    rest = rel_storescu(serve.port, files[20:])
    rel_storescu_runs.append(rest)
    assert rest.wait(60) == 0, rest.out[-2000:]
    status = serve.wait_state(study_uid, "done", timeout=120)
    assert status["generation"] == 1 and status["instances"] == len(ct)
    _check_results_at_pacs(serve, local_pacs, study_uid)


def test_kill_during_inference(rel_serve, rel_storescu_runs, local_pacs, tmp_path, rel_report):
    serve = rel_serve(local_pacs.port, quiet=1.5, routes=CT_ROUTE, ct_input_size=128)
    ct = synthetic.make_head_ct(200, rows=256, cols=256, slice_thickness=1.0, seed=73)
    study_uid = ct[0].StudyInstanceUID
    files = synthetic.write_study(ct, tmp_path / "ct")
    proc = serve.start()
    run = rel_storescu(serve.port, files)
    rel_storescu_runs.append(run)
    assert run.wait(120) == 0, run.out[-2000:]

    serve.wait_state(study_uid, "running", timeout=60)
    serve.kill9()
    ((job_id, _, state, attempts),) = serve.jobs(study_uid)
    assert (state, attempts) == ("running", 1), "the job finished before the kill"
    (claimer,) = serve.query("SELECT claimed_by FROM jobs WHERE id = ?", job_id)[0]
    assert f":{proc.pid}:" in claimer  # role@host:pid:token
    assert local_pacs.objects(study_uid) == []

    serve.start()
    status = serve.wait_state(study_uid, "done", timeout=150)
    assert status["generation"] == 1 and status["instances"] == len(ct)
    assert status["attempts"] == 2  # the killed attempt and the one that finished
    assert ("running", "queued", "reap.dead_process") in serve.job_events(job_id)
    counts = _check_results_at_pacs(serve, local_pacs, study_uid)
    assert _duplicates(counts) == 0  # nothing had been sent when the worker died
    rel_report("inference seconds (completed run)", status["inference_seconds"])
    rel_report("result objects at PACS / duplicates", f"{len(counts)} / {_duplicates(counts)}")
    rel_report("daemon start times (s)", serve.started)


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _pid_namespaces() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare --pid (root)")
def test_kill_and_restart_with_the_same_pid(rel_serve, rel_storescu_runs, local_pacs,
                                            tmp_path, rel_report):
    """As in a container: the daemon is PID 1 of its PID namespace, before and after."""
    serve = rel_serve(local_pacs.port, quiet=1.0, routes=CT_ROUTE, ct_input_size=128,
                      wrapper=UNSHARE)
    ct = synthetic.make_head_ct(120, rows=256, cols=256, seed=78)
    study_uid = ct[0].StudyInstanceUID
    serve.start()
    run = rel_storescu(serve.port, synthetic.write_study(ct, tmp_path / "ct"))
    rel_storescu_runs.append(run)
    assert run.wait(120) == 0, run.out[-2000:]
    serve.wait_state(study_uid, "running", timeout=60)
    serve.kill9()
    ((job_id, _, state, _),) = serve.jobs(study_uid)
    (claimer,) = serve.query("SELECT claimed_by FROM jobs WHERE id = ?", job_id)[0]
    assert state == "running" and ":1:" in claimer, claimer  # role@host:pid:token

    serve.start()  # listening means start() has run reclaim_dead_local
    reasons = [r for (r,) in serve.query(
        "SELECT reason FROM job_events WHERE job_id = ? ORDER BY id", job_id)]
    # Taken back at start (the new worker may already have claimed it again).
    assert "reap.dead_process" in reasons, reasons
    serve.wait_state(study_uid, "done", timeout=120)
    _check_results_at_pacs(serve, local_pacs, study_uid)


def test_kill_during_sending(rel_serve, rel_storescu_runs, local_pacs, tmp_path, rel_report):
    slow = threading.Event()
    slow.set()

    def slow_pacs(ds: pydicom.Dataset) -> int:
        if slow.is_set():
            let_time_pass(1.5, "a slow PACS: each object takes 1.5 s to be accepted")
        return 0x0000

    local_pacs.status_fn = slow_pacs
    serve = rel_serve(local_pacs.port, quiet=1.5, routes=CT_ROUTE, ct_input_size=64)
    ct = synthetic.make_head_ct(40, rows=128, cols=128, seed=74, bleed=True)
    study_uid = ct[0].StudyInstanceUID
    files = synthetic.write_study(ct, tmp_path / "ct")
    serve.start()
    run = rel_storescu(serve.port, files)
    rel_storescu_runs.append(run)
    assert run.wait(60) == 0, run.out[-2000:]

    # Kill once the PACS holds part of the results and the next object is on its way.
    serve.wait_state(study_uid, "sending", timeout=90)
    wait_until(lambda: local_pacs.objects(study_uid), timeout=30, interval=0.05,
               what="first result object at the PACS")
    serve.kill9()
    ((job_id, _, state, _),) = serve.jobs(study_uid)
    assert state == "sending"
    n_results = len(serve.results(job_id))
    before = Counter(o.sop_instance_uid for o in local_pacs.objects(study_uid))
    assert 0 < len(before) < n_results, "all results arrived before the kill"
    slow.clear()  # the PACS is fast again

    serve.start()
    status = serve.wait_state(study_uid, "done", timeout=120)
    assert status["generation"] == 1
    assert status["send_attempts"] == 0  # the killed delivery was reclaimed, not failed
    assert ("sending", "outbox", "reap.dead_process") in serve.job_events(job_id)
    counts = _check_results_at_pacs(serve, local_pacs, study_uid)
    dups = _duplicates(counts)
    # At-least-once transport, exactly-once by UID: only what was accepted before the kill
    # (or was in flight at it) may arrive a second time.
    assert max(counts.values()) <= 2
    assert dups <= len(before) + 1
    rel_report("result objects", n_results)
    rel_report("accepted by the PACS before the kill", len(before))
    rel_report("result objects at PACS / duplicates of the same UID", f"{len(counts)} / {dups}")
    rel_report("daemon start times (s)", serve.started)


def test_sigterm_graceful(rel_serve, rel_storescu_runs, local_pacs, tmp_path, rel_report):
    # Daemon.stop bounds each step by 3 x heartbeat: here up to 10 s to drain open
    # associations and 15 s for the running job. The quiet period outlasts stop + restart
    # (the restarted scheduler restarts the quiet clock of receiving studies).
    serve = rel_serve(local_pacs.port, quiet=4.0, routes=CT_ROUTE, ct_input_size=128,
                      env={"DICOMAI_WORKER__HEARTBEAT_SECONDS": "5"})
    a = synthetic.make_head_ct(120, rows=256, cols=256, seed=75)
    b = synthetic.make_head_ct(200, rows=128, cols=128, slice_thickness=0.5, seed=76)
    a_uid, b_uid = a[0].StudyInstanceUID, b[0].StudyInstanceUID
    a_files = synthetic.write_study(a, tmp_path / "a")
    b_files = synthetic.write_study(b, tmp_path / "b")
    serve.start()
    run_a = rel_storescu(serve.port, a_files)
    rel_storescu_runs.append(run_a)
    assert run_a.wait(120) == 0, run_a.out[-2000:]
    serve.wait_state(a_uid, "running", timeout=60)

    # While study A is being analysed, study B arrives; SIGTERM in the middle of it.
    run_b = rel_storescu(serve.port, b_files)
    rel_storescu_runs.append(run_b)
    wait_until(lambda: serve.instance_count(b_uid) >= 50 or run_b.proc.poll() is not None,
               timeout=60, interval=0.02, what="study B arriving")
    a_state_at_term = serve.study(a_uid)["state"]
    b_at_term = serve.instance_count(b_uid)
    rc, seconds = serve.terminate(60)
    assert rc == 0, f"exit code {rc} after {seconds}s:\n{serve.log_tail()}"
    run_b.wait(60)
    acked_b = {f.stem for f in run_b.acknowledged}
    stored_b = {uid for uid, _, _ in serve.instances(b_uid)}
    assert acked_b <= stored_b  # nothing acknowledged is lost
    assert serve.query("SELECT count(*) FROM heartbeats")[0][0] == 0  # a clean stop
    a_after_stop = serve.jobs(a_uid)

    serve.start()
    # The modality retries what was not acknowledged, then re-sends the rest of B too.
    unacked = [f for f in b_files if f.stem not in acked_b]
    resend = rel_storescu(serve.port, unacked + [f for f in b_files if f.stem in acked_b])
    rel_storescu_runs.append(resend)
    assert resend.wait(120) == 0, resend.out[-2000:]
    assert resend.statuses == ["Success"] * len(b)
    for uid, n in ((a_uid, len(a)), (b_uid, len(b))):
        status = serve.wait_state(uid, "done", timeout=150)
        assert status["generation"] == 1 and status["instances"] == n
        assert serve.instance_count(uid) == n
        _check_results_at_pacs(serve, local_pacs, uid)
    _check_spool(serve, b_uid, {ds.SOPInstanceUID for ds in b})
    rel_report("SIGTERM to exit 0 (s)", seconds)
    rel_report("study A at SIGTERM / job after stop", f"{a_state_at_term} / {a_after_stop}")
    rel_report("study B stored at SIGTERM / acknowledged / stored at exit",
               f"{b_at_term} / {len(acked_b)} / {len(stored_b)} "
               f"(storescu rc {run_b.proc.returncode})")


def test_sigterm_while_inference_outlasts_stop_timeout(rel_serve, rel_storescu_runs,
                                                       local_pacs, tmp_path, rel_report):
    # heartbeat 0.2 s: Daemon.stop waits 0.6 s for the worker; the CT job takes ~4 s.
    serve = rel_serve(local_pacs.port, quiet=1.0, routes=CT_ROUTE, ct_input_size=128,
                      env={"DICOMAI_WORKER__HEARTBEAT_SECONDS": "0.2"})
    ct = synthetic.make_head_ct(200, rows=256, cols=256, seed=77)
    study_uid = ct[0].StudyInstanceUID
    serve.start()
    run = rel_storescu(serve.port, synthetic.write_study(ct, tmp_path / "ct"))
    rel_storescu_runs.append(run)
    assert run.wait(120) == 0, run.out[-2000:]
    serve.wait_state(study_uid, "running", timeout=60)
    rc, seconds = serve.terminate(60)
    rel_report("SIGTERM during inference: exit code / seconds", f"{rc} / {seconds}")
    assert rc == 0, f"exit code {rc} after {seconds}s:\n{serve.log_tail(3)}"
    serve.start()
    status = serve.wait_state(study_uid, "done", timeout=150)
    assert status["generation"] == 1
    _check_results_at_pacs(serve, local_pacs, study_uid)
