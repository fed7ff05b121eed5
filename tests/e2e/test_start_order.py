"""`dicomai serve` receives from its first second: models load in the background, studies that
arrive meanwhile wait in the queue and are analysed once their model is ready.

The model's readiness is driven through the file system, not timing: the chest model's file is
first present but unreadable (a PACS admin copying it in), so loading fails and is retried;
once the real file is in place, the waiting study is analysed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicomai_tools import synthetic
from dicomai_tools.local_pacs import LocalPacs
from dicomai.models.reference import REFERENCE_MODELS
from dicomai.ops.scu import echo, send_files
from tests.conftest import DEFAULT_CONFIG, free_port, listening
from tests.waiting import wait_until

DICOMAI = Path(sys.executable).parent / "dicomai"


def _config(tmp_path: Path, model_dir: Path, pacs_port: int, port: int) -> Path:
    """The shipped configuration, with a temp data dir, our ports and the chest model's file
    in a folder of its own (the other models from the session's prebuilt files)."""
    text = DEFAULT_CONFIG.read_text()
    replacements = {
        'data_dir = "../var"': f'data_dir = "{tmp_path / "data"}"',
        "port = 11112": f"port = {port}",
        "port = 4242": f"port = {pacs_port}",
        "study_quiet_seconds = 30": "study_quiet_seconds = 1",
        "model_retry_seconds = 30": "model_retry_seconds = 1",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"config/dicomai.toml no longer has {old!r}"
        text = text.replace(old, new)
    for name, ref in REFERENCE_MODELS.items():
        old = f'path = "models/{ref.filename}"'
        folder = tmp_path / "chest-model" if name == "chest-xray" else model_dir
        assert text.count(old) == 1, f"config/dicomai.toml no longer has {old!r}"
        text = text.replace(old, f'path = "{folder / ref.filename}"')
    path = tmp_path / "dicomai.toml"
    path.write_text(text)
    return path


def _status(config: Path) -> dict[str, Any]:
    out = subprocess.run([str(DICOMAI), "--config", str(config), "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr  # 1: degraded (a model not ready)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_serve_receives_while_a_model_cannot_load_yet(tmp_path: Path, model_dir: Path,
                                                      local_pacs: LocalPacs) -> None:
    port = free_port()
    config = _config(tmp_path, model_dir, local_pacs.port, port)
    chest_file = tmp_path / "chest-model" / REFERENCE_MODELS["chest-xray"].filename
    chest_file.parent.mkdir()
    chest_file.write_bytes(b"")  # present (so not rebuilt) but not a model: loading fails
    study = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=256, cols=256,
                                seed=15)
    paths = synthetic.write_study([study], tmp_path / "in")
    env = {**os.environ, "DICOMAI_LOGGING__FORMAT": "json"}
    log = open(tmp_path / "serve.log", "wb")
    started = time.monotonic()
    proc = subprocess.Popen([str(DICOMAI), "--config", str(config), "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listening(port) or proc.poll() is not None, timeout=60,
                   interval=0.05, what="the port")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        opened = time.monotonic() - started
        print(f"dicomai serve: port open {opened:.2f} s after the process started")
        assert echo("127.0.0.1", port, called_ae="DICOMAI") == 0x0000
        assert send_files(paths, "127.0.0.1", port, called_ae="DICOMAI").ok

        def waiting() -> dict[str, Any] | None:
            data = _status(config)
            chest = next(m for m in data["models"] if m["name"] == "chest-xray")
            studies = [s for s in data["studies"]
                       if s["study_instance_uid"] == study.StudyInstanceUID]
            if chest["state"] == "failed" and studies and studies[0]["state"] == "queued":
                return data
            return None

        data = wait_until(waiting, timeout=90, interval=0.5,
                          what="the study queued while its model cannot load")
        chest = next(m for m in data["models"] if m["name"] == "chest-xray")
        assert chest["load_error"] and not chest["loaded"]
        others = {m["name"]: m["state"] for m in data["models"] if m["name"] != "chest-xray"}
        assert set(others.values()) <= {"ready", "loading"}
        assert local_pacs.objects(study.StudyInstanceUID) == []

        # The admin puts the real file in place: the next retry loads it, the study runs.
        shutil.copy(model_dir / REFERENCE_MODELS["chest-xray"].filename, chest_file)
        wait_until(lambda: len(local_pacs.objects(study.StudyInstanceUID)) >= 2, timeout=120,
                   interval=0.5, what="results of the waiting study")
        modalities = sorted(o.modality for o in local_pacs.objects(study.StudyInstanceUID))
        assert modalities == ["OT", "SR"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            log.close()
    text = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    events = [json.loads(line).get("event") for line in text.splitlines()
              if line.startswith("{")]
    assert events.index("daemon.receiving") < events.index("model.load_failed")
    assert "model.loaded" in events
