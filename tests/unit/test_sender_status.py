"""Tests of sender.classify_status, the spool's file handling and status.collect."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomai.ingest import spool as store
from dicomai.config import Settings, load_settings
from dicomai.db import create_all, make_engine, make_session_factory
from dicomai.ingest.index import InstanceIndex, InstanceRecord
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState
from dicomai.delivery.dimse import classify_status
from dicomai.jobs.policy import SendOutcome
from dicomai.ops.status import collect
from dicomai.ops.status_view import render_text
from dicomai.ingest.spool import Spool, safe_uid

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)

# -- classify_status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, SendOutcome.SENT),
        (0xB000, SendOutcome.SENT),  # coercion of data elements
        (0xB007, SendOutcome.SENT),  # data set does not match SOP class
        (0xB006, SendOutcome.SENT),  # elements discarded
        (0xA700, SendOutcome.RETRY),  # out of resources
        (0xA701, SendOutcome.RETRY),
        (0xA7FF, SendOutcome.RETRY),
        (None, SendOutcome.RETRY),  # no response
        (0xA900, SendOutcome.REFUSED),  # data set does not match SOP class
        (0xA9FF, SendOutcome.REFUSED),
        (0xC000, SendOutcome.REFUSED),  # cannot understand
        (0xC123, SendOutcome.REFUSED),
        (0x0122, SendOutcome.REFUSED),  # SOP class not supported
        (0x0124, SendOutcome.REFUSED),  # not authorised
        (0x0211, SendOutcome.REFUSED),  # unrecognised operation
    ],
)
def test_classify_status(status: int | None, outcome: SendOutcome) -> None:
    assert classify_status(status) is outcome


# -- spool ------------------------------------------------------------------------------------


def test_write_atomic_bytes_and_chunks_leave_no_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.start()
    assert sorted(p.name for p in spool.root.iterdir()) == ["incoming", "quarantine", "results"]
    target = spool.result_path(3, "sr.dcm")
    assert target == spool.root / "results" / "3" / "sr.dcm"
    assert spool.write_atomic(target, b"DICM" * 10) == 40
    assert target.read_bytes() == b"DICM" * 10
    # overwrite with chunks: replaced whole
    assert spool.write_atomic(target, [b"abc", b"", b"defg"]) == 7
    assert target.read_bytes() == b"abcdefg"
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]


def test_new_directories_are_fsynced_and_a_purged_directory_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.start()
    synced: list[Path] = []
    real = store._fsync_dir
    monkeypatch.setattr(store, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    target = spool.result_path(3, "sr.dcm")
    spool.write_atomic(target, b"DICM")
    results = spool.root / "results"
    # each new directory's entry is made durable in its parent, then the file's
    assert synced == [results, results / "3"]
    # retention removed the job's results; a result written again is written again
    spool.remove_tree(results / "3")
    spool.write_atomic(target, b"DICM")
    assert target.read_bytes() == b"DICM"
    # ... also when another process purged it (this spool still thinks it exists)
    shutil.rmtree(results / "3")
    spool.write_atomic(target, b"DICM2")
    assert target.read_bytes() == b"DICM2"


def test_write_atomic_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    target = spool.result_path(7, "sr.dcm")
    target.mkdir(parents=True)  # a directory where the file should go: os.replace fails
    with pytest.raises(OSError):
        spool.write_atomic(target, b"x" * 100)
    assert target.is_dir()
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]


def test_write_atomic_failing_chunk_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    target = spool.result_path(1, "sc.dcm")
    with pytest.raises(TypeError):
        spool.write_atomic(target, [b"good", "not bytes"])  # type: ignore[list-item]
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..\\x", "sr dcm", "é.dcm", "/etc/passwd"])
def test_result_path_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        Spool(tmp_path).result_path(1, name)


@pytest.mark.parametrize("name", [".", ".."])
def test_spool_paths_reject_dot_names(tmp_path: Path, name: str) -> None:
    # "." and ".." match the allowed character sets but name directories, not files:
    # results/1/.. is the results directory, quarantine/../x.dcm lands in the spool root.
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        spool.result_path(1, name)
    with pytest.raises(ValueError, match="short code"):
        spool.quarantine_path(name)


def test_result_path_and_quarantine_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.result_path(12, "sr_1.2-3.dcm") == tmp_path / "results" / "12" / "sr_1.2-3.dcm"
    q1, q2 = spool.quarantine_path("bad_syntax"), spool.quarantine_path("bad_syntax")
    assert q1.parent == tmp_path / "quarantine" / "bad_syntax"
    assert q1 != q2
    for reason in ("../x", "Bad", "a/b", ""):
        with pytest.raises(ValueError, match="short code"):
            spool.quarantine_path(reason)


@pytest.mark.parametrize(
    "uid", ["../x", "1.2.a", "1" * 65, "", "1..2", ".1.2", "1.2.", "1.2/3", "1.2 .3", "1.2\\3"]
)
def test_safe_uid_rejects(uid: str) -> None:
    with pytest.raises(ValueError, match="UID"):
        safe_uid(uid)


def test_safe_uid_accepts_and_strips() -> None:
    assert safe_uid("1.2.840.10008.1.2") == "1.2.840.10008.1.2"
    assert safe_uid("1.2.3\x00") == "1.2.3"  # UI padding
    assert safe_uid(" 1.2.3 ") == "1.2.3"
    sixty_four = "1." + "2" * 62
    assert safe_uid(sixty_four) == sixty_four


def test_instance_file_names_are_ours_not_the_senders(tmp_path: Path) -> None:
    """No peer-supplied value (a UID like ``..``) ever becomes part of a path."""
    import re

    spool = Spool(tmp_path)
    path, size = spool.write_instance([b"DICM"])
    assert size == 4
    assert re.fullmatch(r"incoming/\d{8}/[0-9a-f]{12}-\d+/\d{6}\.dcm",
                        path.relative_to(tmp_path).as_posix())
    with pytest.raises(ValueError):
        spool.result_path(3, "../../etc/passwd")


def test_remove_tree_only_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inside = spool.root / "results" / "3"
    inside.mkdir(parents=True)
    (inside / "x.dcm").write_bytes(b"x")
    outside = tmp_path / "keep"
    outside.mkdir()
    with pytest.raises(ValueError, match="inside the spool"):
        spool.remove_tree(outside)
    spool.remove_tree(inside)
    assert not inside.exists()
    assert outside.exists()


# -- status.collect ---------------------------------------------------------------------------


def settings_for(tmp_path: Path, data_dir: Path) -> Settings:
    conf = tmp_path / "dicomai.toml"
    conf.write_text(
        f'[general]\ndata_dir = "{data_dir.as_posix()}"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n',
        encoding="utf-8",
    )
    return load_settings(conf, environ={})


def test_collect_on_an_empty_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    data = collect(settings_for(tmp_path, data_dir), now=NOW)
    assert data["counts"] == {s.value: 0 for s in JobState}
    assert len(data["counts"]) == 9
    assert data["daemon"]["up"] is False
    assert data["daemon"]["components"] == []
    assert data["studies"] == []
    assert [d["name"] for d in data["destinations"]] == ["pacs"]
    assert data["destinations"][0]["sent"] == 0
    assert data["generated_at"] == "2024-05-06T07:08:09+00:00"
    assert data["disk"]["spool"] == str(data_dir / "spool")
    assert "dicomai daemon: DOWN" in render_text(data)


def test_collect_before_the_data_dir_exists(tmp_path: Path) -> None:
    # `dicomai status --check` on a fresh install, before the daemon ever ran: the data
    # directory does not exist yet. Status must report "down", not crash.
    data_dir = tmp_path / "not-yet"
    data = collect(settings_for(tmp_path, data_dir), now=NOW)
    assert data["counts"] == {s.value: 0 for s in JobState}
    assert data["daemon"]["up"] is False


def test_collect_counts_jobs_and_sees_fresh_heartbeats(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    settings = settings_for(tmp_path, data_dir)
    engine = make_engine(settings.database_url)
    try:
        create_all(engine)
        queue = Queue(make_session_factory(engine))
        index = InstanceIndex(queue.sessions)
        for n in range(3):
            index.record_instance(
                InstanceRecord(f"1.{n}.1.1", f"1.{n}", f"1.{n}.1", "1.2.840.10008.5.1.4.1.1.1.1",
                               "1.2.840.10008.1.2.1"),
                "/p", 1, "M", NOW,
            )
        queue.transition(1, JobState.RECEIVING, JobState.SKIPPED, reason="route.none", now=NOW)
        queue.beat("daemon@host:1", "daemon", NOW - timedelta(seconds=5), {"roles": ["all"]})
        data = collect(settings, now=NOW, engine=engine)
        assert data["counts"]["receiving"] == 2
        assert data["counts"]["skipped"] == 1
        assert sum(data["counts"].values()) == 3
        assert data["daemon"]["up"] is True
        assert data["daemon"]["heartbeat_age_seconds"] == 5.0
        assert [s["job_id"] for s in data["studies"]] == [3, 2, 1]
        later = collect(settings, now=NOW + timedelta(minutes=5), engine=engine)
        assert later["daemon"]["up"] is False
    finally:
        engine.dispose()
