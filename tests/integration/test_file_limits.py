"""Hostile files over real associations: refused at the door with their status and quarantine
reason, costing the receiver (in this process) bounded memory, and a normal instance stored
afterwards on the same association ([receiver] limits at their defaults)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy import func, select

from dicomai.runtime.daemon import Daemon
from dicomai.db import Instance, QuarantineEntry
from tests import file_bombs as bombs
from tests.conftest import running_daemon

DX = "1.2.840.10008.5.1.4.1.1.1.1"
MIB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


class PeakRss:
    """The growth of this process's peak resident size over a block (the receiver runs in
    this process): the kernel's high-water mark is reset on entry (``clear_refs`` 5)."""

    def __enter__(self) -> PeakRss:
        Path("/proc/self/clear_refs").write_text("5")
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (_status_kib("VmHWM") - self.before) * 1024


@pytest.fixture
def daemon(make_settings: Any) -> Iterator[Daemon]:
    settings = make_settings(None, scheduler={"study_quiet_seconds": 3600})
    with running_daemon(settings, roles=["receiver"]) as d:
        yield d


@pytest.fixture
def assoc(daemon: Daemon) -> Iterator[Association]:
    ae = AE("HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless):
        ae.add_requested_context(DX, syntax)  # one context each: all of them accepted
    association = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
    assert association.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's data set bytes go as they are
    try:
        yield association
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if association.is_established:
            association.release()
        ae.shutdown()


def send(assoc: Association, path: Path) -> int:
    rsp = assoc.send_c_store(path)
    assert rsp is not None and "Status" in rsp, "no C-STORE-RSP"
    return int(rsp.Status)


def quarantined(daemon: Daemon) -> list[tuple[str, int]]:
    with daemon.queue.session() as s:
        return [(r, int(c)) for r, c in s.execute(
            select(QuarantineEntry.reason, QuarantineEntry.status_code)
            .order_by(QuarantineEntry.id))]


def instance_rows(daemon: Daemon) -> int:
    with daemon.queue.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def normal_instance_stored(daemon: Daemon, assoc: Association, tmp: Path, seed: int) -> None:
    """A normal instance stores afterwards, on the same association, and is indexed."""
    ds = bombs.header(seed, pixels=True)
    path = bombs.part10(tmp / f"ok-{seed}.dcm", ds, bombs.encode(ds), ExplicitVRLittleEndian)
    before = instance_rows(daemon)
    assert send(assoc, path) == 0x0000
    assert daemon.index.known_instance(ds.SOPInstanceUID) == "stored"
    assert instance_rows(daemon) == before + 1


def refused(daemon: Daemon, ds: Dataset, reason: str, status: int) -> None:
    assert quarantined(daemon)[-1] == (reason, status)
    assert daemon.index.known_instance(ds.SOPInstanceUID) is None
    files = list((daemon.spool.root / "quarantine" / reason).glob("*"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_deflate_bomb_is_refused_without_inflating_it(daemon: Daemon, assoc: Association,
                                                       tmp_path: Path) -> None:
    ds = bombs.header(101)
    bomb = bombs.deflate_bomb(ds, 2 << 30)  # about 2 MB on the wire, 2 GiB inflated
    assert len(bomb) < 2.5 * MIB
    path = bombs.part10(tmp_path / "bomb.dcm", ds, bomb, DeflatedExplicitVRLittleEndian)
    with PeakRss() as rss:
        status = send(assoc, path)
    assert status == 0xC220
    refused(daemon, ds, "inflated_too_large", 0xC220)
    assert rss.growth < 150 * MIB, f"peak RSS grew by {rss.growth / MIB:.0f} MiB"
    assert instance_rows(daemon) == 0
    # A legitimate deflated instance is still inflated and stored.
    good = bombs.header(102, pixels=True)
    good_path = bombs.part10(tmp_path / "deflated.dcm", good, bombs.deflated(good),
                             DeflatedExplicitVRLittleEndian)
    assert send(assoc, good_path) == 0x0000
    assert daemon.index.known_instance(good.SOPInstanceUID) == "stored"
    normal_instance_stored(daemon, assoc, tmp_path, 103)


def test_a_million_tiny_elements_are_refused_at_the_limit(daemon: Daemon, assoc: Association,
                                                          tmp_path: Path) -> None:
    ds = bombs.header(111)
    path = bombs.part10(tmp_path / "elements.dcm", ds, bombs.element_bomb(ds, 10**6),
                        ExplicitVRLittleEndian)
    with PeakRss() as rss:
        status = send(assoc, path)
    assert status == 0xC220
    refused(daemon, ds, "too_many_elements", 0xC220)
    assert rss.growth < 150 * MIB, f"peak RSS grew by {rss.growth / MIB:.0f} MiB"
    normal_instance_stored(daemon, assoc, tmp_path, 112)


def test_deep_nesting_is_refused(daemon: Daemon, assoc: Association, tmp_path: Path) -> None:
    ds = bombs.header(121)
    path = bombs.part10(tmp_path / "nested.dcm", ds, bombs.encode(ds) + bombs.nested(300),
                        ExplicitVRLittleEndian)
    assert send(assoc, path) == 0xC220
    refused(daemon, ds, "nesting_too_deep", 0xC220)
    normal_instance_stored(daemon, assoc, tmp_path, 122)


def test_jpeg2000_claiming_another_size_is_refused(daemon: Daemon, assoc: Association,
                                                    tmp_path: Path) -> None:
    stream = bombs.j2k_codestream(64, 64, claim=(20000, 20000))
    ds = bombs.j2k_instance(131, rows=2048, columns=2048, codestream=stream)
    path = bombs.part10(tmp_path / "j2k.dcm", ds, bombs.encode(ds), JPEG2000Lossless)
    with PeakRss() as rss:
        status = send(assoc, path)
    assert status == 0xA900
    refused(daemon, ds, "codestream_mismatch", 0xA900)
    assert rss.growth < 150 * MIB, f"peak RSS grew by {rss.growth / MIB:.0f} MiB"
    # One whose codestream agrees with its header is stored.
    good = bombs.j2k_instance(132, rows=64, columns=64, codestream=bombs.j2k_codestream(64, 64))
    good_path = bombs.part10(tmp_path / "j2k-ok.dcm", good, bombs.encode(good),
                             JPEG2000Lossless)
    assert send(assoc, good_path) == 0x0000
    assert daemon.index.known_instance(good.SOPInstanceUID) == "stored"
    normal_instance_stored(daemon, assoc, tmp_path, 133)


def test_32767_square_with_an_agreeing_codestream_is_refused(daemon: Daemon,
                                                             assoc: Association,
                                                             tmp_path: Path) -> None:
    stream = bombs.j2k_codestream(64, 64, claim=(32767, 32767))
    ds = bombs.j2k_instance(141, rows=32767, columns=32767, codestream=stream)
    path = bombs.part10(tmp_path / "huge.dcm", ds, bombs.encode(ds), JPEG2000Lossless)
    assert len(stream) < 4096
    with PeakRss() as rss:
        status = send(assoc, path)
    assert status == 0xC220
    refused(daemon, ds, "frame_too_large", 0xC220)
    assert rss.growth < 150 * MIB, f"peak RSS grew by {rss.growth / MIB:.0f} MiB"
    normal_instance_stored(daemon, assoc, tmp_path, 142)
