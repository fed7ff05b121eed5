"""The operator's toolkit against a real in-process daemon: status, studies, echo, send, purge,
metrics. Real associations on loopback, a real SQLite file, a LocalPacs; no mocks."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomai.ops import cli

from dicomai_tools import synthetic
from dicomai.config import Settings
from dicomai.ops.scu import send_files
from dicomai.ops.health import check_health
from dicomai.ops.status import collect
from dicomai.ops.status_view import render_rich
from dicomai.jobs import reads
from tests.conftest import free_port, running_daemon
from tests.waiting import wait_until

NO_WORKER = ("receiver", "sender", "scheduler")  # no model to load: starts in well under 1 s


def write_config(settings: Settings, path: Path, *, receiver_port: int | None = None,
                 min_free_disk_mb: int = 0) -> Path:
    """A TOML file reproducing the test settings, for CLI calls."""
    r = settings.receiver
    models = "\n".join(
        f'[models.{n}]\npath = "{settings.model_path(n)}"\nversion = "{m.version}"\n'
        f'task = "{m.task}"\ndevice = "cpu"\n' for n, m in settings.models.items())
    routes = "\n".join(
        f'[[routes]]\nname = "{x.name}"\nmodel = "{x.model}"\n'
        f'modality = {json.dumps(x.modality)}\nbody_part = {json.dumps(x.body_part)}\n'
        f'series_rule = "{x.series_rule}"\ndestinations = {json.dumps(x.destinations)}\n'
        for x in settings.routes)
    dests = "\n".join(
        f'[[destinations]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\nhost = "{d.host}"\n'
        f'port = {d.port}\n' for d in settings.destinations)
    path.write_text(
        f'[general]\ndata_dir = "{settings.general.data_dir}"\n'
        + (f'[database]\nurl = "{settings.database.url}"\n' if settings.database.url else "")
        + f'[receiver]\nae_title = "{r.ae_title}"\nhost = "{r.host}"\n'
        f'port = {receiver_port if receiver_port is not None else r.port}\n'
        f'min_free_disk_mb = {min_free_disk_mb}\n'
        f'[spool]\nretention_days = {settings.spool.retention_days}\n'
        f'{dests}\n{routes}\n{models}\n')
    return path


def chest_only(settings: Settings) -> Settings:
    """Only the chest route (the daemon then loads one model, not three)."""
    return settings.model_copy(update={
        "routes": [r for r in settings.routes if r.model == "chest-xray"]})


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- status --------------------------------------------------------------------------------
def test_status_check_healthy_then_receiver_down(make_settings, local_pacs, tmp_path, capsys):
    settings = make_settings(local_pacs.port)
    cfg = write_config(settings, tmp_path / "cfg.toml")
    with running_daemon(settings, roles=NO_WORKER) as daemon:
        code, out, err = run_cli(capsys, "--config", str(cfg), "status", "--check")
        assert code == 0, err
        for word in ("dicomai daemon: UP", "healthy", "heartbeat", "receiver", "answers C-ECHO",
                     "database", "disk", "destinations", "models", "last hour",
                     "studies by state"):
            assert word in out, word
        assert "worker" in out and "warn" in out  # no worker role: a warning, not a failure

        code, out, _ = run_cli(capsys, "--config", str(cfg), "status", "--json")
        data = json.loads(out)
        assert code == 0 and data["health"]["healthy"] is True
        for key in ("studies", "counts", "throughput", "latency", "daemon", "destinations"):
            assert key in data

        # Stop only the receiver: the daemon keeps beating, but nothing answers C-ECHO.
        daemon.receiver.stop()
        assert collect(settings, engine=daemon.engine)["daemon"]["up"] is True
        code, out, err = run_cli(capsys, "--config", str(cfg), "status", "--check",
                                 "--plain")
        assert code == 1
        assert "UNHEALTHY" in out
        assert "unhealthy: receiver" in err


def test_status_check_fails_below_disk_floor_and_when_down(make_settings, tmp_path, capsys):
    settings = make_settings(None, receiver={"allowed_calling_ae_titles": ["PACS"]})
    huge = write_config(settings, tmp_path / "floor.toml", min_free_disk_mb=10**12)
    ok_cfg = write_config(settings, tmp_path / "cfg.toml")
    with running_daemon(settings, roles=NO_WORKER):
        code, _, err = run_cli(capsys, "--config", str(huge), "status", "--check")
        assert code == 1 and "unhealthy: disk" in err
        # The probe's calling AE is not allowed: rejected, which still proves it listens.
        code, out, _ = run_cli(capsys, "--config", str(ok_cfg), "status", "--check", "--plain")
        assert code == 0 and "association rejected for DICOMAI; it listens" in out
        code, out, _ = run_cli(capsys, "--config", str(ok_cfg), "status", "--check", "--plain",
                               "--probe-ae", "PACS")
        assert code == 0 and "answers C-ECHO" in out
    # After a clean stop the heartbeat row is gone: down.
    code, out, err = run_cli(capsys, "--config", str(ok_cfg), "status", "--check", "--plain")
    assert code == 1 and "dicomai daemon: DOWN" in out and "unhealthy: heartbeat" in err


def test_status_throughput_latency_and_watch(make_settings, local_pacs, tmp_path, capsys):
    settings = chest_only(make_settings(local_pacs.port))
    cfg = write_config(settings, tmp_path / "cfg.toml")
    xrays = [synthetic.make_xray("chest", rows=128, cols=128, seed=70 + i) for i in range(2)]
    with running_daemon(settings) as daemon:
        for ds in xrays:
            assert send_files(synthetic.write_study([ds], tmp_path / ds.SOPInstanceUID),
                              "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        wait_until(lambda: collect(settings, engine=daemon.engine)["counts"]["done"] == 2,
                   timeout=120, what="two studies done")
        data = collect(settings, engine=daemon.engine)
        lat = data["latency"]
        assert data["throughput"]["done"] == 2 and data["throughput"]["finished"] == 2
        assert data["throughput"]["studies_per_hour"] == 2.0
        assert lat["count"] == 2
        per_study = sorted(s["latency_seconds"] for s in data["studies"])
        assert lat["p50_seconds"] == pytest.approx(sum(per_study) / 2, abs=2e-3)
        assert lat["p95_seconds"] == pytest.approx(
            per_study[0] + 0.95 * (per_study[1] - per_study[0]), abs=2e-3)
        assert lat["inference_p50_seconds"] is not None
        # Outside the one-hour window: nothing.
        later = collect(settings, engine=daemon.engine,
                        now=datetime.now(UTC) + timedelta(hours=2))
        assert later["throughput"]["finished"] == 0 and later["latency"]["p50_seconds"] is None

        # The rich layout as a function, and --watch bounded by --iterations.
        from rich.console import Console

        console = Console(record=True, width=160, file=open("/dev/null", "w"))
        console.print(render_rich(data, check_health(data, settings, probe=False)))
        text = console.export_text()
        console.file.close()
        for word in ("recent studies", "chest-xray", "latency p95", "last success",
                     "backlog", "models", "loaded"):
            assert word in text, word
        code, out, _ = run_cli(capsys, "--config", str(cfg), "status", "--watch", "0.05",
                               "--iterations", "2", "--json")
        assert code == 0
        frames = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(frames) == 2 and frames[-1]["throughput"]["done"] == 2
        code, out, _ = run_cli(capsys, "--config", str(cfg), "status", "--watch", "0.05",
                               "--iterations", "2")
        assert code == 0 and out.count("refreshing every 0.05s") == 2
    assert run_cli(capsys, "--config", str(cfg), "status", "--watch", "1", "--check")[0] == 2


# -- studies / purge -----------------------------------------------------------------------
def test_studies_list_show_and_purge(make_settings, local_pacs, tmp_path, capsys):
    import pydicom
    from pydicom.encaps import encapsulate

    settings = chest_only(make_settings(local_pacs.port))
    cfg = write_config(settings, tmp_path / "cfg.toml")
    good = synthetic.make_xray("chest", rows=128, cols=128, seed=81)
    bad = synthetic.make_xray("chest", rows=128, cols=128, seed=82,
                              transfer_syntax=pydicom.uid.RLELossless)
    bad.PixelData = encapsulate([b"\x07\x00\x00\x00" + b"\x00" * 60])  # undecodable RLE
    mr = synthetic.make_mr(body_part="KNEE", n_slices=2)
    with running_daemon(settings) as daemon:
        for i, study in enumerate(([good], [bad], mr)):
            assert send_files(synthetic.write_study(study, tmp_path / f"in{i}"), "127.0.0.1",
                              daemon.receiver.port, called_ae="DICOMAI").ok
        wait_until(lambda: (c := collect(settings, engine=daemon.engine)["counts"])["done"] == 1
                   and c["failed"] == 1 and c["skipped"] == 1, timeout=120,
                   what="three studies settled")

        def listing(*extra: str) -> list[dict]:
            code, out, err = run_cli(capsys, "--config", str(cfg), "studies", "--json", *extra)
            assert code == 0, err
            return json.loads(out)

        assert len(listing()) == 3
        assert [r["study_instance_uid"] for r in listing("--state", "done")] \
            == [good.StudyInstanceUID]
        assert {r["state"] for r in listing("--state", "failed", "--state", "skipped")} \
            == {"failed", "skipped"}
        assert {r["study_instance_uid"] for r in listing("--route", "chest-xray")} \
            == {good.StudyInstanceUID, bad.StudyInstanceUID}
        assert len(listing("--since", "1h")) == 3
        assert listing("--since", "2099-01-01") == []
        assert len(listing("--limit", "1")) == 1
        code, _, err = run_cli(capsys, "--config", str(cfg), "studies", "--since", "yesterday")
        assert code == 2 and "duration such as 90m" in err
        assert run_cli(capsys, "--config", str(cfg), "studies", "--state", "nonsense")[0] == 2
        code, out, _ = run_cli(capsys, "--config", str(cfg), "studies")
        assert code == 0 and good.StudyInstanceUID in out and "skipped" in out

        # One study's timeline, with the failure's reason code and message.
        code, out, _ = run_cli(capsys, "--config", str(cfg), "studies", "show",
                               bad.StudyInstanceUID)
        assert code == 0
        for text in ("receiving -> queued", "route.matched", "running -> failed",
                     "permanent.UnsupportedInput", "could not be decoded", "timeline", "jobs"):
            assert text in out, text
        code, out, _ = run_cli(capsys, "--config", str(cfg), "studies", "show",
                               good.StudyInstanceUID, "--json")
        shown = json.loads(out)
        assert [e["dst"] for e in shown["timeline"]] == [
            "receiving", "queued", "running", "outbox", "sending", "done"]
        assert shown["timeline"][-1]["reason"] == "send.done"
        assert sorted(r["kind"] for r in shown["results"]) == ["sc", "sr"]
        assert all(r["state"] == "sent" for r in shown["results"])
        assert shown["series"][0]["modality"] == "DX"
        code, _, err = run_cli(capsys, "--config", str(cfg), "studies", "show", "1.2.3.4")
        assert code == 1 and "no study with StudyInstanceUID 1.2.3.4" in err

        # status: the failure appears under recent failures with its reason.
        code, out, _ = run_cli(capsys, "--config", str(cfg), "status", "--json")
        failures = json.loads(out)["recent_failures"]
        assert failures[0]["study_instance_uid"] == bad.StudyInstanceUID
        assert failures[0]["reason"] == "permanent.UnsupportedInput"
        assert failures[0]["kind"] == "failed"

        # purge: a dry run lists, a real run removes, a second run finds nothing.
        job = reads.get_job(daemon.sessions, shown["jobs"][0]["job_id"])
        stored = [Path(r.path) for r in reads.study_instances(daemon.sessions, job.study_id)]
        assert stored and all(p.exists() for p in stored)
        code, out, _ = run_cli(capsys, "--config", str(cfg), "purge", "--older-than-days", "0",
                               "--dry-run")
        assert code == 0 and out.count("would remove study") == 3 and "results folder" in out
        assert all(p.exists() for p in stored)
        code, out, _ = run_cli(capsys, "--config", str(cfg), "purge")  # 7 days: nothing yet
        assert code == 0 and "nothing to purge" in out
        code, out, _ = run_cli(capsys, "--config", str(cfg), "purge", "--older-than-days", "0")
        assert code == 0 and out.count("removed study") == 3
        assert re.search(r"removed 4 instance file\(s\) and 1 results folder\(s\) of 3 stud",
                         out), out
        assert not any(p.exists() for p in stored)
        assert not (settings.spool_path / "results" / str(shown["jobs"][0]["job_id"])).exists()
        code, out, _ = run_cli(capsys, "--config", str(cfg), "purge", "--older-than-days", "0")
        assert code == 0 and "nothing to purge" in out
        assert run_cli(capsys, "--config", str(cfg), "purge", "--older-than-days", "-1")[0] == 2


# -- echo / send ---------------------------------------------------------------------------
def test_echo_destinations(make_settings, local_pacs, tmp_path, capsys):
    from dicomai.config import DestinationSettings

    settings = make_settings(local_pacs.port)
    dead = DestinationSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1",
                               port=free_port())
    settings = settings.model_copy(update={"destinations": [*settings.destinations, dead]})
    cfg = write_config(settings, tmp_path / "cfg.toml")
    code, out, _ = run_cli(capsys, "--config", str(cfg), "echo", "pacs")
    assert code == 0 and "pacs (PACS@127.0.0.1" in out and "C-ECHO success" in out
    code, _, err = run_cli(capsys, "--config", str(cfg), "echo", "archive", "--timeout", "3")
    assert code == 1 and "C-ECHO failed" in err
    code, _, err = run_cli(capsys, "--config", str(cfg), "echo", "nowhere")
    assert code == 2 and "known: pacs, archive" in err


def test_send_files_and_folders(make_settings, tmp_path, capsys):
    settings = make_settings(None)
    xrays = [synthetic.make_xray("chest", rows=96, cols=96, seed=90 + i) for i in range(3)]
    folder = tmp_path / "study"
    paths = synthetic.write_study(xrays[:2], folder / "nested")
    (folder / "README.txt").write_text("not DICOM")
    extra = synthetic.write_study(xrays[2:], tmp_path / "single")[0]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    with running_daemon(settings, roles=NO_WORKER) as daemon:
        port = daemon.receiver.port
        cfg = write_config(settings, tmp_path / "cfg.toml", receiver_port=port)
        code, out, err = run_cli(capsys, "--config", str(cfg), "send", str(folder))
        assert code == 0, err
        assert "sent 2/2 file(s) to DICOMAI@127.0.0.1:" in out
        assert "1 non-DICOM file(s) skipped" in out
        code, out, _ = run_cli(capsys, "--config", str(cfg), "send", str(extra), str(paths[0]),
                               "--to", f"DICOMAI@127.0.0.1:{port}")
        assert code == 0 and "sent 2/2" in out  # the duplicate is answered Success
        uids = {s["study_instance_uid"] for s in collect(settings, engine=daemon.engine)
                ["studies"]}
        assert uids == {x.StudyInstanceUID for x in xrays}

        code, out, err = run_cli(capsys, "--config", str(cfg), "send", str(extra), str(junk))
        assert code == 1 and "sent 1/2" in out and "not a DICOM file" in err
        code, _, err = run_cli(capsys, "--config", str(cfg), "send", str(extra), "--to",
                               f"WRONG@127.0.0.1:{port}")
        assert code == 1 and "association rejected" in err
        code, _, err = run_cli(capsys, "--config", str(cfg), "send", str(extra), "--to",
                               f"DICOMAI@127.0.0.1:{free_port()}", "--timeout", "3")
        assert code == 1 and "FAILED" in err
        code, _, err = run_cli(capsys, "--config", str(cfg), "send", str(extra), "--to",
                               "DICOMAI-127.0.0.1")
        assert code == 2 and "expected AE@host:port" in err
        assert run_cli(capsys, "--config", str(cfg), "send", str(tmp_path / "nope"))[0] == 2
        empty = tmp_path / "empty"
        empty.mkdir()
        code, _, err = run_cli(capsys, "--config", str(cfg), "send", str(empty))
        assert code == 1 and "no DICOM files found" in err

    # A receiver below its free-space floor answers 0xA700: every file fails, exit 1.
    full = make_settings(None, receiver={"min_free_disk_mb": 10**12})
    fresh = synthetic.write_study([synthetic.make_xray("chest", rows=96, cols=96, seed=99)],
                                  tmp_path / "fresh")[0]
    with running_daemon(full, roles=NO_WORKER) as daemon:
        code, out, err = run_cli(capsys, "send", str(fresh), "--to",
                                 f"DICOMAI@127.0.0.1:{daemon.receiver.port}")
        assert code == 1 and "sent 0/1" in out and "status 0xA700" in err


# -- metrics -------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as rsp:
        assert rsp.status == 200
        text = rsp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    scrape.last_text = text  # type: ignore[attr-defined]
    return samples


def test_metrics_endpoint_database_gauges(make_settings, local_pacs, tmp_path):
    from dicomai.metrics import observe_refused, observe_send, start_metrics_server

    settings = chest_only(make_settings(local_pacs.port))
    good = synthetic.make_xray("chest", rows=96, cols=96, seed=101)
    mr = synthetic.make_mr(body_part="KNEE", n_slices=1)
    with running_daemon(settings) as daemon:
        server = start_metrics_server("127.0.0.1", 0, settings, daemon.engine)
        try:
            assert server.url.startswith("http://127.0.0.1:")
            before = scrape(server.url)
            assert before["dicomai_database_up"] == 1.0
            assert before['dicomai_studies{state="done"}'] == 0.0
            for i, study in enumerate(([good], mr)):
                assert send_files(synthetic.write_study(study, tmp_path / f"s{i}"), "127.0.0.1",
                                  daemon.receiver.port, called_ae="DICOMAI").ok
            # the chest X-ray closes at its release, the MR after its quiet period
            wait_until(lambda: [scrape(server.url)[f'dicomai_studies{{state="{state}"}}']
                                for state in ("done", "skipped")] == [1.0, 1.0], timeout=120,
                       what="done and skipped in the metrics")
            after = scrape(server.url)
            assert after['dicomai_queue_depth{state="queued"}'] == 0.0
            assert after['dicomai_destination_backlog{destination="pacs"}'] == 0.0
            assert 0 <= after["dicomai_heartbeat_age_seconds"] < 30
            assert after["dicomai_spool_free_bytes"] > 0
            # Label values that could carry identifiers are reported as "other".
            observe_refused("1.2.840.113619.2.55.3")
            observe_refused("PHI^SENTINEL")
            observe_send("1.2.3.4.5", "sent")  # not a configured destination
            guarded = scrape(server.url)
            assert guarded['dicomai_instances_refused_total{reason="other"}'] >= 2
            assert guarded['dicomai_send_total{destination="other",outcome="sent"}'] >= 1
            text = scrape.last_text  # type: ignore[attr-defined]
            for secret in (good.StudyInstanceUID, good.SOPInstanceUID, "PHI", "SENTINEL",
                           "113619", "1.2.3.4.5"):
                assert secret not in text
            import torch

            if not torch.cuda.is_initialized():  # GPU memory only once CUDA is in use
                assert "dicomai_gpu_memory_bytes" not in text
        finally:
            server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_metrics_count_the_pipeline(make_settings, local_pacs, tmp_path):
    from pynetdicom import AE

    from dicomai.metrics import start_metrics_server

    settings = chest_only(make_settings(local_pacs.port))
    ds = synthetic.make_xray("chest", rows=96, cols=96, seed=102)
    path = synthetic.write_study([ds], tmp_path / "in")[0]
    with running_daemon(settings) as daemon:
        server = getattr(daemon, "metrics_server", None) or start_metrics_server(
            "127.0.0.1", 0, settings, daemon.engine)
        try:
            before = scrape(server.url)
            assert send_files([path], "127.0.0.1", daemon.receiver.port,
                              called_ae="DICOMAI").ok
            # An object without a StudyInstanceUID: refused (0xA900, reason missing_uid).
            bad = synthetic.make_xray("chest", rows=64, cols=64, seed=103)
            refused_study = bad.StudyInstanceUID
            del bad.StudyInstanceUID
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(bad.SOPClassUID, bad.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
            assert assoc.is_established
            rsp = assoc.send_c_store(bad)
            assoc.release()
            ae.shutdown()
            assert rsp.Status == 0xA900
            e2e = 'dicomai_job_duration_seconds_count{model="chest-xray",stage="end_to_end"}'
            wait_until(lambda: scrape(server.url).get(e2e, 0) >= before.get(e2e, 0) + 1,
                       timeout=120, what="end-to-end observed")
            after = scrape(server.url)
        finally:
            if server is not getattr(daemon, "metrics_server", None):
                server.stop()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dicomai_instances_received_total") == 1
    assert 0 < delta("dicomai_bytes_received_total") < 2 * path.stat().st_size
    assert delta('dicomai_instances_refused_total{reason="missing_uid"}') == 1
    assert delta('dicomai_send_total{destination="pacs",outcome="sent"}') == 2
    for stage in ("inference", "send", "end_to_end"):
        assert delta(f'dicomai_job_duration_seconds_count{{model="chest-xray",stage="{stage}"}}'
                     ) == 1, stage
    text = scrape.last_text  # type: ignore[attr-defined]
    for secret in (ds.StudyInstanceUID, refused_study, bad.SOPInstanceUID, "PHI", "SENTINEL"):
        assert secret not in text
