"""The receiver's fast path: Core record with group commit, file meta bytes, the PDU reader."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta, decode, encode_file_meta
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from dicomai.db import Base, Instance, Job, JobEvent, create_all, make_engine, make_session_factory
from dicomai.ingest.pdu_reader import PduReader
from dicomai.ingest.store_instance import file_meta_bytes
from dicomai.ingest.index import InstanceIndex, InstanceRecord
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState
from dicomai.jobs import reads
from tests.waiting import let_time_pass, sample_until, wait_until

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def rec(study: str, sop: str) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, study_instance_uid=study,
                          series_instance_uid=f"{study}.1",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                          transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR",
                          instance_number=1)


# -- record path ------------------------------------------------------------------------------


def test_concurrent_records_share_commits_and_stay_consistent(engine: Engine) -> None:
    index = InstanceIndex(make_session_factory(engine))
    results: list[tuple[str, bool, int]] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        for i in range(25):
            study = f"1.5.{i % 3}"
            sop = f"{study}.1.{i}.{k // 2}"  # senders 0 and 1 send the same, 2 and 3 too
            new, job_id = index.record_instance(rec(study, sop), f"/spool/{sop}.dcm", 10, "M",
                                                T0 + timedelta(milliseconds=i))
            with lock:
                results.append((sop, new, job_id))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 100
    sops = {sop for sop, _, _ in results}
    assert len(sops) == 50
    # Each SOP Instance UID recorded as new exactly once; its duplicate got the same job.
    for sop in sops:
        outcomes = sorted(new for s, new, _ in results if s == sop)
        assert outcomes == [False, True]
        assert len({job for s, _, job in results if s == sop}) == 1
    with index.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 50
        jobs = list(s.scalars(select(Job)))
        assert len(jobs) == 3  # one RECEIVING generation per study
        for job in jobs:
            n = s.scalar(select(func.count()).where(Instance.job_id == job.id))
            assert (job.state, job.generation, job.instance_count) == ("receiving", 1, n)
        assert s.scalar(select(func.count()).select_from(JobEvent)) == 3


def test_record_after_close_opens_next_generation(engine: Engine) -> None:
    queue, index = Queue(make_session_factory(engine)), InstanceIndex(make_session_factory(engine))
    _, job1 = index.record_instance(rec("1.6", "1.6.1.1"), "/a", 1, "M", T0)
    queue.transition(job1, JobState.RECEIVING, JobState.QUEUED, reason="test", now=T0)
    new, job2 = index.record_instance(rec("1.6", "1.6.1.2"), "/b", 1, "M", T0)
    assert new and job2 != job1
    assert reads.get_job(queue.sessions, job2).generation == 2
    assert index.record_instance(rec("1.6", "1.6.1.1"), "/c", 1, "M", T0) == (False, job1)


def test_duplicates_and_own_results_are_answered_success_and_leave_one_copy(
        engine: Engine, tmp_path: Path) -> None:
    """Written first, then indexed: a duplicate's copy and a returned result of ours are
    removed again; neither opens a job or a second row."""
    from dicomai_tools import synthetic
    from dicomai.db import ResultObject
    from dicomai.ingest import store_instance as storing
    from dicomai.ingest.fast_store import StoreRequest
    from dicomai.ingest.spool import Spool

    queue, index = Queue(make_session_factory(engine)), InstanceIndex(make_session_factory(engine))
    spool = Spool(tmp_path / "spool")
    spool.start()
    own, other = (synthetic.make_xray("chest", rows=16, cols=16, seed=s) for s in (7, 8))

    def request(ds: Dataset) -> StoreRequest:
        return StoreRequest("MOD", "127.0.0.1", 1, UID(ExplicitVRLittleEndian), ds.SOPClassUID,
                            ds.SOPInstanceUID, BytesIO(encoded(ds)))

    def files() -> list[Path]:
        return sorted(p for p in (tmp_path / "spool" / "incoming").rglob("*.dcm")
                      if p.stat().st_size)

    assert storing.store_instance(request(own), spool, index, lambda: 0, lambda: T0) == 0
    job = reads.get_job(queue.sessions, 1)
    with queue.session() as s, s.begin():  # "own" is now one of our results
        s.add(ResultObject(job_id=job.id, destination="pacs", kind="SR",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                           sop_instance_uid=str(other.SOPInstanceUID),
                           series_instance_uid="1.2.3", path="/x"))
    first = files()
    assert len(first) == 1
    for ds in (own, other, own, other):  # a duplicate, our result, again both
        assert storing.store_instance(request(ds), spool, index, lambda: 0, lambda: T0) == 0
    assert files() == first
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance)) == 1
        assert conn.scalar(select(func.count()).select_from(Job)) == 1
    assert index.known_instance(str(other.SOPInstanceUID)) == "own_result"
    spool.close()


def test_known_instance_and_session_without_engine(engine: Engine) -> None:
    index = InstanceIndex(sessionmaker(binds={Base: engine}, expire_on_commit=False))
    assert index.known_instance("1.7.1.1") is None
    index.record_instance(rec("1.7", "1.7.1.1"), "/a", 1, "M", T0)
    assert index.known_instance("1.7.1.1") == "stored"


# -- file meta --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sop_class", "sop", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian),
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.33.4", ImplicitVRLittleEndian),
    ("1.2", "1.23", JPEGBaseline8Bit),
])
def test_file_meta_bytes_match_pynetdicom(sop_class: str, sop: str, syntax: str) -> None:
    expected = encode_file_meta(create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop), transfer_syntax=UID(syntax)))
    assert file_meta_bytes(sop_class, sop, syntax) == expected


# -- the PDU reader on pynetdicom's own server --------------------------------------------


@pytest.fixture
def scp() -> Iterator[tuple[AE, int, list[PduReader]]]:
    readers: list[PduReader] = []

    def on_open(event: evt.Event) -> None:
        reader = PduReader(event.assoc, setup_timeout=1.0, network_timeout=1.0,
                           max_pdata=16384)
        reader.install()
        readers.append(reader)

    ae = AE("FASTSCP")
    ae.add_supported_context(Verification)
    ae.network_timeout = 1.0
    ae.acse_timeout = 1.0  # a connection that never asks for an association waits this long
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    yield ae, int(server.server_address[1]), readers
    ae.shutdown()


def _requestor() -> AE:
    ae = AE("FASTSCU")
    ae.add_requested_context(Verification)
    return ae


def _gone(ae: AE, within: float = 2.0) -> bool:
    """Whether every association of ``ae`` has ended within ``within`` seconds."""
    return not sample_until(lambda: ae.active_associations, lambda active: not active,
                            timeout=within, interval=0.01)


def test_reader_echo_and_release(scp: tuple[AE, int, list[PduReader]]) -> None:
    ae, port, readers = scp
    assoc = _requestor().associate("127.0.0.1", port)
    assert assoc.is_established
    for _ in range(20):
        assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert len(readers) == 1 and readers[0].dropped is None
    assert _gone(ae)


def test_reader_abort_and_dropped_connection(scp: tuple[AE, int, list[PduReader]]) -> None:
    ae, port, readers = scp
    assoc = _requestor().associate("127.0.0.1", port)
    assert assoc.is_established
    assoc.abort()
    assert _gone(ae)
    # A peer that connects and vanishes without a word.
    with socket.create_connection(("127.0.0.1", port)):
        pass
    wait_until(lambda: len(readers) >= 2, timeout=2, interval=0.01,
               what="a reader for the silent connection")
    assert len(readers) == 2
    assert _gone(ae, within=3.0)


def test_reader_idle_timeout_aborts(scp: tuple[AE, int, list[PduReader]]) -> None:
    ae, port, _ = scp
    assoc = _requestor().associate("127.0.0.1", port)
    assert assoc.is_established
    t0 = time.monotonic()
    wait_until(lambda: not assoc.is_established, timeout=5, interval=0.02,
               what="the idle association to end")
    assert assoc.is_aborted
    assert 0.9 <= time.monotonic() - t0 < 3  # network_timeout 1 s, not a poll late
    assert _gone(ae)


def test_reader_drops_a_request_that_stalls_half_way(scp: tuple[AE, int, list[PduReader]]
                                                      ) -> None:
    """Half an A-ASSOCIATE-RQ, then silence: closed after the set-up timeout (1 s)."""
    ae, port, readers = scp
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 200) + bytes(50))
        sock.settimeout(5)
        t0 = time.monotonic()
        try:
            while sock.recv(1024):
                pass
        except ConnectionResetError:
            pass
        assert 0.8 <= time.monotonic() - t0 < 3
    assert readers[-1].dropped == "stalled"
    assert _gone(ae)


# -- element conversion check with its cache of known-good raw elements ---------------------


def encoded(ds: Dataset) -> bytes:
    """A dataset as a peer sends it: Explicit VR Little Endian, no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def read(raw: bytes) -> Dataset:
    """Read as the receiver does (values converted when used)."""
    return decode(BytesIO(raw), False, True)


def test_convert_all_skips_only_elements_that_converted_before() -> None:
    from dicomai_tools import synthetic
    from dicomai.ingest import record

    record._CONVERTED.clear()
    good = encoded(synthetic.make_xray("chest", rows=16, cols=16, seed=3))
    record.convert_all(read(good), ExplicitVRLittleEndian)
    cached = len(record._CONVERTED)
    assert cached >= 15  # the numbers (US, DS, IS) of the header; text is not converted here
    record.convert_all(read(good), ExplicitVRLittleEndian)  # again: nothing new
    assert len(record._CONVERTED) == cached
    # The same header with one broken element: PixelRepresentation (US) of 3 bytes, then a
    # WindowCenter whose VR is garbage. Each still raises, every time.
    element = b"\x28\x00\x03\x01US\x02\x00\x00\x00"
    odd_us = good.replace(element, b"\x28\x00\x03\x01US\x03\x00\x00\x00\x00")
    bad_vr = good.replace(b"\x28\x00\x50\x10DS", b"\x28\x00\x50\x10D\x00")
    assert odd_us != good and bad_vr != good
    for broken in (odd_us, bad_vr, odd_us):
        with warnings.catch_warnings(), pytest.raises(Exception):  # noqa: B017
            warnings.simplefilter("ignore")
            record.convert_all(read(broken), ExplicitVRLittleEndian)
    # Another character set is another encoding: converted again, not skipped.
    ds = read(good)
    ds.SpecificCharacterSet = "ISO_IR 100"
    before = len(record._CONVERTED)
    record.convert_all(ds, ExplicitVRLittleEndian)
    assert len(record._CONVERTED) > before


@pytest.mark.parametrize("vr", ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST",
                                "TM", "UC", "UI", "UR", "UT"])
@pytest.mark.parametrize("charset", ["", "ISO_IR 192", "ISO_IR 100", "GB18030", "NO SUCH SET"])
def test_converting_text_dates_and_times_cannot_fail(vr: str, charset: str) -> None:
    """What _convert_all skips: pydicom's conversion of these VRs, under its default
    settings, raises for no bytes at all (undecodable text is replaced, with a warning)."""
    from pydicom.dataelem import RawDataElement

    from dicomai.ingest import record

    assert vr in record.never_failing_vrs()
    rng = random.Random(f"{vr}-{charset}")
    samples = [b"", b"\\\\", b"\x00" * 9, bytes(range(256)), b"\xff\xfe\x00\x1b$B\x1b(B\\",
               *(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
                 for _ in range(40))]
    for value in samples:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds[0x00091010] = RawDataElement(0x00091010, vr, len(value), value, 0, False, True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds[0x00091010].value  # noqa: B018 -- the conversion is the check


def test_convert_all_skips_text_but_still_converts_numbers() -> None:
    """Garbage text passes (its conversion cannot fail), but an IS whose integer cannot
    exist still raises (pydicom: OverflowError), so the instance is refused at once."""
    from dicomai_tools import synthetic
    from dicomai.ingest import record

    good = encoded(synthetic.make_xray("chest", rows=16, cols=16, seed=4))
    instance_number = b"\x20\x00\x13\x00IS\x02\x001 "
    assert instance_number in good
    bad_is = good.replace(instance_number, b"\x20\x00\x13\x00IS\x06\x001e999 ")
    at = good.index(b"\x08\x00\x60\x00CS\x02\x00") + 8  # Modality: 2 bytes of garbage
    bad_text = good[:at] + b"\xff\xfe" + good[at + 2:]
    assert bad_is != good and bad_text != good
    record._CONVERTED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record.convert_all(read(bad_text), ExplicitVRLittleEndian)
        with pytest.raises(OverflowError):
            record.convert_all(read(bad_is), ExplicitVRLittleEndian)


def test_sqlite_record_statements_store_exactly_what_core_stores(tmp_path: Path) -> None:
    from sqlalchemy import text

    from dicomai.ingest.index_sql import RecordStatements, SqliteRecordStatements

    indexes = []
    for name in ("raw", "core"):
        eng = make_engine(f"sqlite:///{tmp_path / name}.db")
        create_all(eng)
        indexes.append((eng, InstanceIndex(make_session_factory(eng))))
    (raw_engine, raw), (core_engine, core) = indexes
    assert isinstance(raw._stmts, SqliteRecordStatements)
    core._stmts = RecordStatements()
    full = InstanceRecord(
        sop_instance_uid="1.9.1.1.1", study_instance_uid="1.9.1", series_instance_uid="1.9.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid=ExplicitVRLittleEndian,
        modality="CT", body_part="HEAD", series_number=3, instance_number=7,
        image_type="ORIGINAL\\PRIMARY\\AXIAL", view_position="", study_description="CT HEAD",
        series_description="AXIAL 5mm", orientation="1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0",
        slice_position=-12.5, rows=512, columns=512, acquisition_number=1,
        images_in_acquisition=40)
    for index in (raw, core):
        outcomes = [
            index.record_instance(full, "/spool/a.dcm", 525_000, "CT01", T0),
            index.record_instance(rec("1.9.2", "1.9.2.1.1"), "/spool/b.dcm", 10, "CR01",
                                  T0 + timedelta(seconds=1)),
            index.record_instance(rec("1.9.1", "1.9.1.1.2"), "/spool/c.dcm", 11, "CT01",
                                  T0 + timedelta(seconds=2)),
            index.record_instance(full, "/spool/a.dcm", 525_000, "CT01", T0),  # duplicate
        ]
        Queue(index.sessions).transition(1, "receiving", "queued", reason="test",
                                         now=T0 + timedelta(seconds=3))
        outcomes.append(index.record_instance(rec("1.9.1", "1.9.1.1.3"), "/spool/d.dcm", 12,
                                              "CT01", T0 + timedelta(seconds=4)))
        assert outcomes == [(True, 1), (True, 2), (True, 1), (False, 1), (True, 3)]
        assert index.known_instance("1.9.1.1.3") == "stored"
        assert index.known_instance("1.9.9") is None

    def dump(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY id"))]
                    for t in ("studies", "jobs", "job_events", "instances")}

    raw_rows, core_rows = dump(raw_engine), dump(core_engine)
    assert raw_rows == core_rows
    assert len(raw_rows["instances"]) == 4 and len(raw_rows["jobs"]) == 3
    for eng in (raw_engine, core_engine):
        eng.dispose()


def test_extract_record_from_cached_values_equals_a_cold_extraction() -> None:
    from dicomai_tools import synthetic
    from dicomai.ingest import record

    series = [encoded(ds) for ds in synthetic.make_head_ct(4, rows=16, cols=16)]
    series += [encoded(synthetic.make_xray("chest", rows=16, cols=16, seed=s)) for s in (1, 2)]
    cold = []
    for raw in series:
        record._VALUES.clear()
        cold.append(record.extract_record(read(raw), ExplicitVRLittleEndian, "1.2.3"))
    warm = [record.extract_record(read(raw), ExplicitVRLittleEndian, "1.2.3")
            for raw in series]
    assert warm == cold
    assert len({r.sop_instance_uid for r in warm}) == 6
    assert [r.instance_number for r in warm[:4]] == [1, 2, 3, 4]
    assert len({r.slice_position for r in warm[:4]}) == 4
    assert record._VALUES  # the second pass was served from the cache


def test_conversion_caches_keep_no_patient_identity() -> None:
    from dicomai_tools import synthetic
    from dicomai.ingest import record

    record._CONVERTED.clear()
    record._VALUES.clear()
    ds = synthetic.make_xray("chest", rows=16, cols=16, seed=5)
    raw = read(encoded(ds))
    record.convert_all(raw, ExplicitVRLittleEndian)
    record.extract_record(read(encoded(ds)), ExplicitVRLittleEndian, "1.2.3")
    keys = [*record._CONVERTED, *record._VALUES]
    assert keys and all(key[0] >> 16 != 0x0010 and key[1] != "PN" for key in keys)
    name = str(ds.PatientName).encode()
    assert not any(name in key[2] for key in keys)


def test_supported_contexts_copy_is_as_independent_as_deepcopy() -> None:
    """pynetdicom deep-copies the server's contexts per association; ours copy cheaply."""
    import copy

    from pynetdicom.presentation import build_context

    from dicomai.ingest.storage_ae import SupportedContexts

    original = [build_context("1.2.840.10008.5.1.4.1.1.2",
                              [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    original[0].context_id = 3
    original[0].scp_role = True
    contexts = SupportedContexts(original)
    cheap, deep = copy.deepcopy(contexts), copy.deepcopy(list(original))
    assert [vars(c) for c in cheap] == [vars(c) for c in deep]
    assert type(cheap[0]) is type(deep[0])
    cheap[0].transfer_syntax.append(JPEGBaseline8Bit)  # changes to a copy stay in the copy
    cheap[0].result = 0
    assert original[0].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert original[0].result is None


def test_record_lock_excludes_threads_of_one_process(tmp_path: Path) -> None:
    """flock alone lets two threads of one process in at once (one open file); the record
    lock must not: the group commit's leader and the copy flusher both write."""
    from dicomai.ingest.group_commit import FileLock

    lock, order = FileLock(str(tmp_path / "db.record-lock")), []

    def other() -> None:
        with lock:
            order.append("other")

    with lock:
        t = threading.Thread(target=other)
        t.start()
        let_time_pass(0.2, "the other thread reaches the lock and must wait for it")
        order.append("first")
    t.join(5)
    assert order == ["first", "other"]
