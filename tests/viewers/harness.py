"""Show DICOM objects to real viewers from pytest: Orthanc + DICOMweb, OHIF 3, headless Chromium.

The pieces (each usable alone, see tests/viewers/conftest.py for the fixtures):

* :class:`DicomWebOrthanc`: an Orthanc subprocess with the DicomWeb plugin on free loopback
  ports, storage in a temp folder; REST upload of DICOM files.
* :class:`~tests.viewers.ohif_server.OhifServer`: OHIF's prebuilt ``dist/`` with our
  ``app-config.js`` and a same-origin proxy to Orthanc's DICOMweb API.
* :class:`OhifDriver`: ``ohif_driver.mjs`` (playwright-core + the system Chromium) running as
  one long-lived process; :meth:`OhifDriver.open` opens a study, double-clicks series
  thumbnails and returns what was on screen (screenshots, text, console, errors).

:func:`missing_requirements` says what is not installed (scripts/setup.sh installs it all).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from tests.conftest import free_port
from tests.e2e.test_orthanc import Orthanc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "ohif_driver.mjs"
OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM = Path(os.environ.get("DICOMAI_CHROMIUM", "/usr/bin/chromium"))
#: Screenshots and page text of every viewer test, kept after the run (ignored by git).
ARTEFACTS = Path(os.environ.get("DICOMAI_VIEWER_ARTEFACTS", REPO / "build" / "viewer-screenshots"))


def viewer_cache() -> Path:
    """Where scripts/setup.sh keeps OHIF's dist (per user, so it outlives a checkout)."""
    if "DICOMAI_VIEWER_CACHE" in os.environ:
        return Path(os.environ["DICOMAI_VIEWER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dicomai" / "viewers"


def ohif_dist() -> Path:
    return viewer_cache() / f"ohif-{OHIF_VERSION}" / "dist"


def _node_major() -> int:
    node = shutil.which("node")
    if node is None:
        return 0
    out = subprocess.run([node, "-p", "process.versions.node"], capture_output=True, text=True,
                         timeout=30)
    return int(out.stdout.split(".")[0]) if out.returncode == 0 else 0


def missing_requirements() -> list[str]:
    """What the viewer tests need and this machine lacks (empty when all is there)."""
    missing = []
    if shutil.which("Orthanc") is None:
        missing.append("Orthanc (apt: orthanc)")
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"{DICOMWEB_PLUGIN} (apt: orthanc-dicomweb)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt: chromium)")
    if _node_major() < 20:
        missing.append("node >= 20")
    elif not (HERE / "node_modules" / "playwright-core" / "package.json").exists():
        missing.append("tests/viewers/node_modules (npm ci --prefix tests/viewers)")
    if not (ohif_dist().parent / ".complete").exists():
        missing.append(f"OHIF {OHIF_VERSION} in {ohif_dist().parent}")
    return missing


# --------------------------------------------------------------------------- Orthanc


class DicomWebOrthanc(Orthanc):
    """Orthanc with the DicomWeb plugin, as the PACS a viewer reads from.

    Process handling and REST helpers come from the e2e tests' :class:`Orthanc`; only the
    configuration (plugin, no Lua forward) differs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomai-viewer-tests",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "HttpThreadsCount": 20,
            "HttpCompressionEnabled": False,
            "StableAge": 3,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> DicomWebOrthanc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["Orthanc", "--no-jobs", str(self.config)],
                                         cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self._up(), 30, "Orthanc HTTP /system")
        assert "dicom-web" in self.get("/plugins"), self.log_tail()
        return self

    def upload(self, *files: Path | bytes) -> list[dict[str, Any]]:
        """POST each file to /instances; returns Orthanc's answers (ID, ParentStudy, Status)."""
        answers = []
        for f in files:
            data = f if isinstance(f, bytes) else Path(f).read_bytes()
            answer = json.loads(self._request("POST", "/instances", data))
            assert answer.get("Status") in ("Success", "AlreadyStored"), answer
            answers.append(answer)
        return answers

    def upload_dataset(self, *datasets: pydicom.Dataset) -> list[dict[str, Any]]:
        """Upload pydicom datasets (written as DICOM files)."""
        blobs = []
        for ds in datasets:
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            blobs.append(buf.getvalue())
        return self.upload(*blobs)

    def clear(self) -> None:
        """Delete every study (a clean PACS for the next test of a shared server)."""
        for study in self.get("/studies"):
            self._request("DELETE", f"/studies/{study}")


# --------------------------------------------------------------------------- browser


class OhifDriver:
    """One ``node ohif_driver.mjs --serve`` process: one Chromium, a fresh page per job."""

    def __init__(self, log_path: Path, start_timeout: float = 60) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in close()
        self.proc = subprocess.Popen(["node", str(DRIVER), "--serve"], cwd=HERE,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self._lock = threading.Lock()
        self.info = self._read_line(start_timeout)
        if not self.info.get("ready"):
            raise RuntimeError(f"driver did not start: {self.info}")

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.close()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ohif_driver.mjs gave no answer within {timeout}s:\n{tail}")
        return json.loads(box[0])

    def run(self, job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            return self._read_line(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()  # the driver ends when its input ends
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._log.close()


def open_in_ohif(driver: OhifDriver, viewer_url: str, out_dir: Path,
                 series_descriptions: Sequence[str] = (), name: str = "ohif",
                 **options: Any) -> dict[str, Any]:
    """Open ``viewer_url`` in OHIF, then double-click each series thumbnail in turn.

    Returns the driver's result: ``ok``, ``error_boundary`` (any step), ``steps`` (one per
    screen: ``name``, ``screenshot``, ``body_text``, ``thumbnails``, ``viewports``,
    ``error_boundary``, ``error_details``, ``console``, ``page_errors``, ``http_errors``,
    ``settled``/``wait_ms``), and all ``console``, ``page_errors`` and ``http_errors``.
    ``options`` go into the job (``settle={"max_ms": ...}``, ``study_timeout_ms``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        if old.is_file():
            old.unlink()
    job = {"url": viewer_url, "out_dir": str(out_dir), "name": name,
           "series": list(series_descriptions), **options}
    t0 = time.monotonic()
    result = driver.run(job)
    result["python_elapsed_s"] = round(time.monotonic() - t0, 1)
    return result


# --------------------------------------------------------------------------- assertions


def step_named(result: dict[str, Any], series_description: str | None) -> dict[str, Any]:
    """The step that opened ``series_description`` (None: the study as first shown)."""
    for step in result["steps"]:
        if step.get("series") == series_description:
            return step
    raise AssertionError(f"no step for {series_description!r} in {summary(result)}")


def summary(result: dict[str, Any]) -> str:
    """A short, readable account of a driver result for assertion messages."""
    lines = [f"ok={result.get('ok')} error_boundary={result.get('error_boundary')} "
             f"elapsed={result.get('elapsed_ms')}ms out={result.get('out_dir')}"]
    if result.get("failure"):
        lines.append(f"failure: {result['failure']}")
    for step in result.get("steps", []):
        thumbs = [t["text"].replace("\n", " | ") for t in step["thumbnails"]]
        lines.append(f"- {step['name']}: found={step.get('found')} settled={step.get('settled')}"
                     f" wait={step.get('wait_ms')}ms error_boundary={step['error_boundary']}"
                     f" thumbnails={thumbs}")
        for report in step.get("error_reports") or []:
            lines.append(f"  error boundary: {report}")
        if step.get("failure"):
            lines.append(f"  failure: {step['failure']}")
        if step.get("error_details"):
            lines.append(f"  error details: {str(step['error_details'].get('text'))[:800]}")
    for err in result.get("page_errors", []):
        lines.append(f"pageerror ({err['step']}): {err['message']}")
    errors = [c for c in result.get("console", []) if c["type"] == "error"]
    for c in errors[:10]:
        lines.append(f"console.error ({c['step']}): {' '.join(c.get('args') or [c['text']])[:500]}")
    for h in result.get("http_errors", [])[:10]:
        lines.append(f"http ({h['step']}): {h.get('status') or h.get('error')} {h['url']}")
    return "\n".join(lines)


def _viewport_pixels(step: dict[str, Any], index: int, mode: str) -> np.ndarray:
    """One viewport of a step's screenshot, as an array in Pillow ``mode`` ("L", "RGB")."""
    box = step["viewports"][index]["box"]
    with Image.open(step["screenshot"]) as im:
        crop = im.convert(mode).crop((int(box["x"]), int(box["y"]),
                                      int(box["x"] + box["width"]),
                                      int(box["y"] + box["height"])))
        return np.asarray(crop)


def viewport_stats(step: dict[str, Any], index: int = 0) -> dict[str, float]:
    """Pixel statistics of one viewport in a step's screenshot (grey levels 0-255)."""
    a = _viewport_pixels(step, index, "L").astype(np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()),
            "nonblack": float((a > 24).mean()), "width": a.shape[1], "height": a.shape[0]}


def coloured_fraction(step: dict[str, Any], index: int = 0) -> float:
    """Share of one viewport's pixels that are clearly coloured (max - min channel > 60).

    Greyscale sources show none: colour there comes from an overlay (SEG, heat map, SR).
    """
    a = _viewport_pixels(step, index, "RGB").astype(np.int16)
    return float(((a.max(axis=2) - a.min(axis=2)) > 60).mean())


def text_contains(step: dict[str, Any], needles: Iterable[str]) -> list[str]:
    """The needles missing from a step's on-screen text (case-insensitive)."""
    text = re.sub(r"\s+", " ", step["body_text"]).lower()
    return [n for n in needles if re.sub(r"\s+", " ", n).lower() not in text]
