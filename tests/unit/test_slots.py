"""Pre-created spool files: durable before use, one write each, never re-made blindly."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dicomai.ingest import slots
from dicomai.ingest.slots import SLOT_MAX_AGE, SlotPool
from dicomai.ingest.spool import Spool


class Recorder:
    """fsync_dir / make_dirs / fdatasync stand-ins that log the order of durability steps."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def make_dirs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.events.append(("mkdir", str(directory)))

    def fsync_dir(self, directory: Path) -> None:
        self.events.append(("fsync_dir", str(directory)))

    def fdatasync(self, fd: int) -> None:
        self.events.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    r = Recorder()
    monkeypatch.setattr(slots, "_fdatasync", r.fdatasync)
    return r


def pool(tmp_path: Path, rec: Recorder, **kwargs: object) -> SlotPool:
    """A pool that makes its batches in the writer's thread (deterministic order)."""
    kwargs.setdefault("background", False)
    return SlotPool(tmp_path / "incoming", rec.make_dirs, rec.fsync_dir, **kwargs)  # type: ignore[arg-type]


def test_a_batch_is_made_durable_once_then_each_write_is_one_fdatasync(
        tmp_path: Path, rec: Recorder) -> None:
    p = pool(tmp_path, rec, batch=4, today=lambda: "20261127")
    written = [p.write([b"DICM", memoryview(b"-%d" % i)]) for i in range(6)]
    assert [size for _, size in written] == [6] * 6
    assert [path.read_bytes() for path, _ in written] == [b"DICM-%d" % i for i in range(6)]
    directory = written[0][0].parent
    assert directory.parent == tmp_path / "incoming" / "20261127"
    assert {path.parent for path, _ in written} == {directory}  # one directory, 2 batches
    kinds = [kind for kind, _ in rec.events]
    # the pool's lock file (made durable), its directory, then per batch: the directory
    # fsync before the first slot of it is written
    assert kinds == (["mkdir", "fsync_dir", "mkdir", "fsync_dir"] + ["fdatasync"] * 4
                     + ["fsync_dir"] + ["fdatasync"] * 2)
    assert rec.events[1] == ("fsync_dir", str(tmp_path / "incoming" / ".pools"))
    assert [name for kind, name in rec.events if kind == "fdatasync"] == [
        str(path) for path, _ in written]
    # the rest of the second batch is there, empty, until closed
    free = [f for f in directory.iterdir() if f.stat().st_size == 0]
    assert len(free) == 2
    p.close()
    assert sorted(directory.iterdir()) == sorted(path for path, _ in written)


def test_a_removed_slot_is_skipped_not_made_again(tmp_path: Path, rec: Recorder) -> None:
    p = pool(tmp_path, rec, batch=4)
    first, _ = p.write([b"a"])
    for f in first.parent.iterdir():  # e.g. an admin cleaned the folder
        if f != first:
            f.unlink()
    second, _ = p.write([b"b"])
    assert second.read_bytes() == b"b"
    assert second.parent != first.parent  # a fresh directory, made durable again
    assert sorted(f.name for f in first.parent.iterdir()) == [first.name]
    assert rec.events.count(("fsync_dir", str(second.parent))) == 1


def test_slots_older_than_the_limit_are_never_written(tmp_path: Path, rec: Recorder) -> None:
    now = [1000.0]
    p = pool(tmp_path, rec, batch=4, clock=lambda: now[0])
    first, _ = p.write([b"a"])
    left = {f for f in first.parent.iterdir() if f != first}
    now[0] += SLOT_MAX_AGE + 1
    second, _ = p.write([b"b"])
    assert second not in left
    assert not any(f.exists() for f in left)  # the stale free slots are removed


def test_a_failed_write_leaves_nothing_to_index(tmp_path: Path, rec: Recorder,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = pool(tmp_path, rec, batch=4)
    good, _ = p.write([b"ok"])

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slots.os, "writev", full)
    with pytest.raises(OSError):
        p.write([b"x" * 100])
    monkeypatch.undo()
    files = sorted(good.parent.iterdir())
    assert good in files and len(files) == 3  # the failed slot is gone, 2 free ones remain
    assert all(f.stat().st_size == 0 for f in files if f != good)


def test_short_writes_are_continued_in_order(tmp_path: Path, rec: Recorder,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked (a signal, a nearly full disk): the rest follows."""
    p = pool(tmp_path, rec, batch=2)
    real = os.writev
    calls = []

    def at_most_5(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real(fd, [bytes(b"".join(bytes(b) for b in buffers)[:5])])

    monkeypatch.setattr(slots.os, "writev", at_most_5)
    chunks = [b"A" * 128, b"", memoryview(b"meta-bytes"), bytearray(b"dataset" * 3)]
    path, size = p.write(chunks)
    expected = b"".join(bytes(c) for c in chunks)
    assert size == len(expected) and path.read_bytes() == expected
    assert len(calls) == -(-len(expected) // 5)


def test_directories_roll_over_by_count_and_day(tmp_path: Path, rec: Recorder) -> None:
    day = ["20261127"]
    p = pool(tmp_path, rec, batch=2, per_directory=4, today=lambda: day[0])
    paths = [p.write([b"x"])[0] for _ in range(5)]
    assert len({q.parent for q in paths[:4]}) == 1 and paths[4].parent != paths[0].parent
    day[0] = "20261128"
    last_of_batch, _ = p.write([b"y"])
    later, _ = p.write([b"z"])
    assert last_of_batch.parent == paths[4].parent
    assert later.parent.parent.name == "20261128"


def test_pools_sharing_a_spool_never_share_a_directory(tmp_path: Path) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.start()
    pa, _ = a.write_instance([b"a"])
    pb, _ = b.write_instance([b"b"])
    assert pa.parent != pb.parent
    assert (pa.read_bytes(), pb.read_bytes()) == (b"a", b"b")
    b.discard_instance(pb)
    assert not pb.exists()


def test_the_next_batch_is_made_ahead_on_a_helper_thread(tmp_path: Path, rec: Recorder) -> None:
    import threading

    p = pool(tmp_path, rec, batch=8, background=True)
    p.prepare()  # at start: the first batch before any write
    assert [kind for kind, _ in rec.events] == ["mkdir", "fsync_dir", "mkdir", "fsync_dir"]
    writer = threading.get_ident()
    synced_in: list[int] = []
    real = rec.fsync_dir
    rec.fsync_dir = lambda d: (synced_in.append(threading.get_ident()), real(d))  # type: ignore[method-assign]
    p._fsync_dir = rec.fsync_dir
    paths = [p.write([b"%d" % i])[0] for i in range(20)]
    assert len(set(paths)) == 20 and all(q.read_bytes() == b"%d" % i for i, q in enumerate(paths))
    assert synced_in and writer not in synced_in  # batches 2 and 3 made off the writer's thread
    # each slot was made durable (its directory fsynced) before it was written
    fsynced_at = [i for i, (kind, _) in enumerate(rec.events) if kind == "fsync_dir"]
    written_at = [i for i, (kind, _) in enumerate(rec.events) if kind == "fdatasync"]
    assert all(sum(1 for f in fsynced_at if f < w) >= 1 + n // 8
               for n, w in enumerate(written_at))
    p.close()
    with pytest.raises(OSError):
        p.write([b"late"])


def test_files_of_a_receiver_process_that_died_are_reaped_at_once(tmp_path: Path) -> None:
    """A process wrote two instances (one indexed, one in flight) and died without closing
    its pool: its lock is free, so its unindexed files go now, not after an hour."""
    import subprocess
    import sys

    from dicomai.ingest.slots import reap_dead_pools

    script = (
        "import os, sys; from pathlib import Path; from dicomai.ingest.spool import Spool\n"
        "s = Spool(Path(sys.argv[1])); s.start(); s.prepare()\n"
        "print(s.write_instance([b'indexed'])[0]); print(s.write_instance([b'in flight'])[0])\n"
        "sys.stdout.flush(); os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    indexed, in_flight = (Path(line) for line in done.stdout.split())
    live = Spool(tmp_path)  # a live process's pool, with a file not indexed yet
    live_file, _ = live.write_instance([b"committing"])
    incoming = tmp_path / "incoming"
    assert len(list((incoming / ".pools").glob("*.lock"))) == 2
    removed = reap_dead_pools(incoming, lambda paths: {p for p in paths if p == str(indexed)})
    # the dead pool: its in-flight file and its 62 unused slots; the live pool: untouched
    assert removed == 1 + 62
    assert indexed.read_bytes() == b"indexed" and not in_flight.exists()
    assert sorted(indexed.parent.iterdir()) == [indexed]
    assert live_file.exists() and len(list(live_file.parent.iterdir())) == 64
    assert [p.stem for p in (incoming / ".pools").glob("*.lock")] == [live._slots.pool_id]
    assert reap_dead_pools(incoming, lambda paths: set()) == 0  # nothing left to reap
    live.close()
    assert not list((incoming / ".pools").glob("*.lock"))


def test_a_removed_directory_is_replaced_by_a_new_one(tmp_path: Path, rec: Recorder) -> None:
    import shutil

    p = pool(tmp_path, rec, batch=2)
    first, _ = p.write([b"a"])
    _second, _ = p.write([b"b"])  # the batch is used up; the next write makes a new batch
    shutil.rmtree(first.parent)  # e.g. retention removed the emptied directory
    third, _ = p.write([b"c"])
    assert third.read_bytes() == b"c" and third.parent != first.parent
    assert rec.events.count(("fsync_dir", str(third.parent))) == 1
