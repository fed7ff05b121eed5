"""Fixtures of the viewer tests: Orthanc with DICOMweb, OHIF 3 beside it, headless Chromium.

One of each per test session (starting them costs ~15 s on 2 cores); a test uploads its objects
with ``viewer_orthanc.upload(...)`` and looks at them with ``open_in_ohif(study_uid, [series
descriptions])``. Screenshots, page text and the driver's ``result.json`` go to
``build/viewer-screenshots/<test name>/`` and are kept. Without the tools (scripts/setup.sh
installs them) the tests are skipped, or fail when ``DICOMAI_REQUIRE_VIEWERS=1``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.viewers import harness
from tests.viewers.harness import ARTEFACTS, DicomWebOrthanc, OhifDriver
from tests.viewers.ohif_server import OhifServer

LOGS = ARTEFACTS / "_logs"


@pytest.fixture(scope="session")
def viewer_requirements() -> None:
    """Skip (or fail, with DICOMAI_REQUIRE_VIEWERS=1) when a viewer tool is missing."""
    missing = harness.missing_requirements()
    if missing:
        reason = f"viewer tools missing: {'; '.join(missing)} (run scripts/setup.sh)"
        if os.environ.get("DICOMAI_REQUIRE_VIEWERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def viewer_orthanc(viewer_requirements: None,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    """Orthanc with the DicomWeb plugin on free loopback ports, storage in a temp folder."""
    orthanc = DicomWebOrthanc(tmp_path_factory.mktemp("viewer-orthanc")).start()
    try:
        yield orthanc
    finally:
        orthanc.stop()
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "orthanc.log").write_text(orthanc.log_text())


@pytest.fixture(scope="session")
def ohif_server(viewer_orthanc: DicomWebOrthanc) -> Iterator[OhifServer]:
    """OHIF's dist with our app-config.js, proxying DICOMweb to ``viewer_orthanc``."""
    LOGS.mkdir(parents=True, exist_ok=True)
    server = OhifServer(harness.ohif_dist(), viewer_orthanc.url,
                        log_path=LOGS / "ohif-server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ohif_driver(viewer_requirements: None) -> Iterator[OhifDriver]:
    """One headless Chromium (ohif_driver.mjs --serve) for all viewer tests."""
    LOGS.mkdir(parents=True, exist_ok=True)
    driver = OhifDriver(LOGS / "ohif-driver.log")
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture
def open_in_ohif(ohif_server: OhifServer, ohif_driver: OhifDriver,
                 request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """``open_in_ohif(study_uid, series_descriptions=(), out_dir=None, **job_options)``.

    Opens the study in OHIF, double-clicks each series thumbnail in turn (matched on its
    SeriesDescription) and returns the driver's result (see :func:`harness.open_in_ohif`);
    :func:`harness.summary` makes it readable in an assertion message.
    """
    calls = 0

    def open_(study_uid: str, series_descriptions: Sequence[str] = (),
              out_dir: Path | None = None, **options: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if out_dir is None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name).strip("_")
            out_dir = ARTEFACTS / (name if calls == 1 else f"{name}-{calls}")
        return harness.open_in_ohif(ohif_driver, ohif_server.viewer_url(study_uid), out_dir,
                                    series_descriptions, name=request.node.name, **options)

    return open_


@pytest.fixture
def open_in_pacs_viewer(ohif_driver: OhifDriver, request: pytest.FixtureRequest
                        ) -> Iterator[Callable[[DicomWebOrthanc], Callable[..., dict[str, Any]]]]:
    """``open_in_pacs_viewer(orthanc)`` gives an ``open_in_ohif``-like function for a test's own
    Orthanc (e.g. one that forwards to dicomai): OHIF is served over that Orthanc until the end
    of the test."""
    servers: list[OhifServer] = []

    def for_orthanc(orthanc: DicomWebOrthanc) -> Callable[..., dict[str, Any]]:
        LOGS.mkdir(parents=True, exist_ok=True)
        server = OhifServer(harness.ohif_dist(), orthanc.url,
                            log_path=LOGS / "ohif-server-pacs.log").start()
        servers.append(server)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name).strip("_")

        def open_(study_uid: str, series_descriptions: Sequence[str] = (),
                  **options: Any) -> dict[str, Any]:
            return harness.open_in_ohif(ohif_driver, server.viewer_url(study_uid),
                                        ARTEFACTS / name, series_descriptions,
                                        name=request.node.name, **options)

        return open_

    try:
        yield for_orthanc
    finally:
        for server in servers:
            server.stop()
