"""dicomai.ingest.copies: a small instance is durable through its committed copy; its file is
flushed afterwards, and written again from the copy after a crash."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from dicomai_tools import synthetic
from dicomai.db import Instance, InstanceCopy, make_session_factory
from dicomai.ingest import copies
from dicomai.ingest import store_instance as storing
from dicomai.ingest.copies import MAX_COPY_BYTES, CopyFlusher, restore_copies
from dicomai.ingest.fast_store import StoreRequest
from dicomai.ingest.index import InstanceIndex
from dicomai.ingest.spool import Spool
from tests.waiting import wait_until

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool")
    sp.start()
    yield sp
    sp.close()


def request_for(ds: Dataset) -> StoreRequest:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return StoreRequest("MOD", "127.0.0.1", 1, UID(ExplicitVRLittleEndian), ds.SOPClassUID,
                        ds.SOPInstanceUID, BytesIO(buf.getvalue()))


def copies_in(engine: Engine) -> dict[str, bytes]:
    with engine.connect() as conn:
        return {p: bytes(d) for p, d in conn.execute(select(InstanceCopy.path,
                                                            InstanceCopy.data))}


def store(req: StoreRequest, spool: Spool, index: InstanceIndex, flusher: CopyFlusher | None) -> int:
    return storing.store_instance(req, spool, index, lambda: 0, lambda: T0, None, flusher)


def test_small_instance_committed_with_its_bytes_then_flushed(
        engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    index = InstanceIndex(make_session_factory(engine))
    flushed: list[int] = []
    real = copies._fdatasync
    monkeypatch.setattr(copies, "_fdatasync", lambda fd: (flushed.append(fd), real(fd)))
    flusher = CopyFlusher(index, batch=4, max_wait=0.05)  # not started yet
    small = synthetic.make_xray("chest", rows=64, cols=64, seed=1)
    big = synthetic.make_xray("chest", rows=256, cols=256, seed=2)  # 128 KiB of pixels
    for ds in (small, big, small):  # the second small one is a duplicate
        assert store(request_for(ds), spool, index, flusher) == 0
    kept = copies_in(engine)
    assert len(kept) == 1  # the small one only; its file holds exactly the committed bytes
    (path, data), = kept.items()
    assert Path(path).read_bytes() == data and len(data) <= MAX_COPY_BYTES
    assert data[128:132] == b"DICM"
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance)) == 2
    flusher.start()  # flushes on its own, without waiting for a full batch or a stop
    wait_until(lambda: not copies_in(engine) and flusher.flushed >= 1, timeout=5,
               interval=0.01, what="the copy flushed and dropped")
    assert copies_in(engine) == {} and flusher.flushed == 1 and len(flushed) == 1
    flusher.stop()
    assert Path(path).read_bytes() == data


def test_without_a_flusher_every_file_is_flushed_before_success(
        engine: Engine, spool: Spool) -> None:
    index = InstanceIndex(make_session_factory(engine))
    ds = synthetic.make_xray("chest", rows=64, cols=64, seed=3)
    assert store(request_for(ds), spool, index, None) == 0
    assert copies_in(engine) == {}


def test_restore_writes_lost_files_again_from_their_copies(
        engine: Engine, spool: Spool) -> None:
    """A machine crash after Success: the file lost what was not flushed (here: all of it,
    or the file itself); the copies left in the database bring them back at start."""
    index = InstanceIndex(make_session_factory(engine))
    flusher = CopyFlusher(index)  # never started: as if the machine went down at once
    datasets = [synthetic.make_xray("hand", rows=64, cols=48, seed=s) for s in (4, 5, 6)]
    for ds in datasets:
        assert store(request_for(ds), spool, index, flusher) == 0
    kept = copies_in(engine)
    assert len(kept) == 3
    first, second, third = sorted(kept)
    os.truncate(first, 0)
    os.unlink(second)
    with open(third, "r+b") as f:  # longer than its instance: cut back to its size
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 100)
    assert restore_copies(index, made_before=T0) == 0  # only those committed before T0
    assert restore_copies(index) == 3
    assert copies_in(engine) == {}
    for path, data in kept.items():
        assert Path(path).read_bytes() == data
    assert restore_copies(index) == 0


def test_a_file_that_cannot_be_flushed_keeps_its_copy(engine: Engine, spool: Spool) -> None:
    index = InstanceIndex(make_session_factory(engine))
    flusher = CopyFlusher(index, max_wait=0.01)
    ds = synthetic.make_xray("chest", rows=64, cols=64, seed=7)
    assert store(request_for(ds), spool, index, flusher) == 0
    (path, data), = copies_in(engine).items()
    os.unlink(path)  # e.g. removed behind our back
    flusher.start()
    flusher.stop()
    assert copies_in(engine) == {path: data} and flusher.flushed == 0
    assert restore_copies(index, made_before=T0 + timedelta(seconds=1)) == 1
    assert Path(path).read_bytes() == data
