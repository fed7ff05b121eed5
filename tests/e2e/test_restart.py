"""`dicomai serve` as a real process: kill -9 and restart lose nothing acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dicomai_tools import synthetic
from dicomai.config import load_settings
from dicomai.ops.scu import echo, send_files
from dicomai.ops.status import collect
from tests.conftest import free_port, listening
from tests.waiting import wait_until


def _config(tmp_path: Path, model_dir: Path, port: int, pacs_port: int,
            quiet: float) -> tuple[Path, dict[str, str]]:
    from dicomai.models.reference import REFERENCE_MODELS

    text = (Path(__file__).resolve().parents[2] / "config" / "dicomai.toml").read_text()
    cfg = tmp_path / "dicomai.toml"
    # The shipped file with test overrides through the environment (as an operator would).
    env = {
        "DICOMAI_GENERAL__DATA_DIR": str(tmp_path / "data"),
        "DICOMAI_RECEIVER__PORT": str(port),
        "DICOMAI_RECEIVER__MIN_FREE_DISK_MB": "0",
        "DICOMAI_SCHEDULER__STUDY_QUIET_SECONDS": str(quiet),
        "DICOMAI_SCHEDULER__POLL_SECONDS": "0.2",
        "DICOMAI_WORKER__POLL_SECONDS": "0.1",
        "DICOMAI_SENDER__POLL_SECONDS": "0.1",
    }
    for ref in REFERENCE_MODELS.values():
        link = tmp_path / "data" / "models" / ref.filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(model_dir / ref.filename, link)
    cfg.write_text(text.replace("port = 4242", f"port = {pacs_port}"))
    return cfg, env


def _serve(cfg: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dicomai", "--config", str(cfg), "serve"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )


@pytest.mark.slow
def test_kill_9_then_restart_loses_nothing(tmp_path, model_dir, local_pacs):
    port = free_port()
    cfg, env = _config(tmp_path, model_dir, port, local_pacs.port, quiet=4.0)
    settings = load_settings(cfg, environ=env)
    log = tmp_path / "daemon.log"
    chest = synthetic.make_xray("chest", rows=300, cols=300, seed=11)
    ct = synthetic.make_head_ct(30, rows=128, cols=128, seed=12)
    proc = _serve(cfg, env, log)
    try:
        wait_until(lambda: listening(port), timeout=120, interval=0.5, what="daemon listening")
        assert echo("127.0.0.1", port, called_ae="DICOMAI") == 0
        assert send_files(synthetic.write_study([chest], tmp_path / "cx"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        assert send_files(synthetic.write_study(ct, tmp_path / "ct"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        # Every instance was acknowledged; kill before the quiet period can close the studies.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        data = collect(settings)
        states = {s["study_instance_uid"]: s for s in data["studies"]}
        assert states[chest.StudyInstanceUID]["instances"] == 1
        assert states[ct[0].StudyInstanceUID]["instances"] == 30
        assert not data["daemon"]["up"] or data["daemon"]["heartbeat_age_seconds"] is not None

        proc = _serve(cfg, env, log)

        def all_done():
            d = collect(settings)
            st = {s["study_instance_uid"]: s["state"] for s in d["studies"]}
            return (st.get(chest.StudyInstanceUID) == "done"
                    and st.get(ct[0].StudyInstanceUID) == "done")

        wait_until(all_done, timeout=180, interval=0.5, what="both studies done after restart")
        # Nothing was processed twice: one SR per study reached the PACS.
        for uid in (chest.StudyInstanceUID, ct[0].StudyInstanceUID):
            srs = {o.sop_instance_uid for o in local_pacs.objects(uid) if o.modality == "SR"}
            assert len(srs) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert "PHI^SENTINEL" not in log.read_text()


def test_sighup_reloads_the_configuration(tmp_path, model_dir, local_pacs):
    port = free_port()
    cfg, env = _config(tmp_path, model_dir, port, local_pacs.port, quiet=1.0)
    log = tmp_path / "daemon.log"
    proc = _serve(cfg, env, log)
    try:
        wait_until(lambda: listening(port), timeout=120, interval=0.5, what="daemon listening")
        cfg.write_text(cfg.read_text().replace('name = "brain-ct"', 'name = "brain-ct-v2"'))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "daemon.reloaded" in log.read_text(), timeout=30, what="reload logged")
        settings = load_settings(cfg, environ=env)
        ct = synthetic.make_head_ct(4, rows=64, cols=64, seed=13)
        assert send_files(synthetic.write_study(ct, tmp_path / "ct"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        state = wait_until(lambda: next((s for s in collect(settings)["studies"]
                                         if s["state"] == "done"), None), timeout=120, what="done")
        assert state["route"] == "brain-ct-v2"  # the reloaded route name
        cfg.write_text("this is [not toml")  # a broken file is refused; the daemon carries on
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "daemon.reload_failed" in log.read_text(), timeout=30, what="refused")
        assert echo("127.0.0.1", port, called_ae="DICOMAI") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
