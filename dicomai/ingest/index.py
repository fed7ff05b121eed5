"""The index of received instances: what the receiver writes and asks of the database.

An instance is indexed once its file is written: its row, its study, and the RECEIVING job
(the study's current generation) it joins. Concurrent associations share one transaction and
one commit (:mod:`dicomai.ingest.group_commit`); the statements are built once
(:mod:`dicomai.ingest.index_sql`). Job state changes after arrival are
:class:`dicomai.jobs.queue.Queue`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.engine import CursorResult, Engine, Result
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import Instance, InstanceCopy, Job, QuarantineEntry, Study
from dicomai.errors import StateConflict
from dicomai.ingest.group_commit import FileLock, GroupCommit, Pending
from dicomai.ingest.index_sql import RecordStatements, SqliteRecordStatements, open_generation
from dicomai.jobs.states import JobState
from dicomai.logs import log_fields

__all__ = ["InstanceIndex", "InstanceRecord", "OwnResultObject"]

logger = logging.getLogger(__name__)
_RECEIVING = JobState.RECEIVING.value
#: ``(new, job_id)`` of one recorded instance.
Recorded = tuple[bool, int]


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Header fields of a received instance, extracted once by the receiver."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    image_type: str = ""
    view_position: str = ""
    study_description: str = ""
    series_description: str = ""
    orientation: str = ""
    slice_position: float | None = None
    rows: int | None = None
    columns: int | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None


class OwnResultObject(Exception):
    """Raised by :meth:`InstanceIndex.record_instance` for an object dicomai made itself (a
    PACS sent one of our results back): it is never indexed, or it would be analysed in turn."""


@functools.cache
def _header_columns() -> tuple[str, ...]:
    """InstanceRecord fields that are also ``instances`` columns (a new pair just works)."""
    columns = Instance.__table__.c
    return tuple(f.name for f in dataclasses.fields(InstanceRecord) if f.name in columns)


class InstanceIndex:
    """Received instances in the database: record, look up, copies, quarantine, arrival clocks."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.sessions = session_factory
        #: The bound engine, for the Core paths of the receiver (``None``: via a session).
        self._engine: Engine | None = session_factory.kw.get("bind")
        self._group: GroupCommit[Recorded] = GroupCommit(self._record_batch)
        engine = self._engine
        sqlite = engine is not None and engine.dialect.name == "sqlite"
        self._stmts = (
            SqliteRecordStatements(engine.dialect, _header_columns())
            if engine is not None and sqlite
            else RecordStatements()
        )
        database = engine.url.database if engine is not None and sqlite else None
        #: Receiver processes sharing a SQLite database queue for its write lock in the kernel
        #: instead of in SQLite's busy handler, which sleeps 1 ms and more per retry.
        self._writer_lock: AbstractContextManager[Any] = (
            FileLock(f"{database}.record-lock")
            if database and database != ":memory:"
            else contextlib.nullcontext()
        )

    # -- look-ups ----------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is already stored."""
        with self.sessions() as s:
            found = s.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

    def indexed_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` have an instance row."""
        found: set[str] = set()
        with self.sessions() as s:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                found.update(s.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        return found

    def known_instance(self, sop_instance_uid: str) -> str | None:
        """``"stored"`` (already received), ``"own_result"`` (an object dicomai made and a
        PACS sent back), or ``None``. One Core query on one connection."""
        with self._connect() as conn:
            stored, own = self._stmts.row(conn, "known", {"b_sop": sop_instance_uid}) or (0, 0)
        if stored:
            return "stored"
        return "own_result" if own else None

    # -- recording ---------------------------------------------------------------------
    def record_instance(
        self,
        rec: InstanceRecord,
        path: str,
        size_bytes: int,
        calling_ae: str,
        now: datetime,
        copy: bytes | None = None,
    ) -> Recorded:
        """Index a stored instance and attach it to its study's RECEIVING job.

        One transaction on one connection (SQLAlchemy Core, statements built once): make
        sure it is not one of our own result objects, touch or create the study, touch the
        RECEIVING job (``WHERE state = 'receiving'``, so a job the scheduler closed meanwhile
        is not touched) or open the next generation, insert the instance. Concurrent calls
        (several associations) share one transaction and one commit (group commit); each
        call returns only after that commit. With ``copy`` (the file's bytes, for a file not
        fsynced yet), a new instance's bytes are committed with its row (see
        :class:`~dicomai.db.InstanceCopy`).

        Returns
        -------
        tuple[bool, int]
            ``(new, job_id)``; ``new`` is False when the SOP Instance UID was already stored
            (then nothing changes).

        Raises
        ------
        OwnResultObject
            The SOP Instance UID is one of dicomai's result objects (nothing changes).
        """
        item: Pending[Recorded] = Pending((rec, path, size_bytes, calling_ae, now, copy))
        self._group.submit(item)
        return item.outcome()

    def _record_batch(self, batch: list[Pending[Recorded]]) -> None:
        """Record a batch in one transaction; on any error, each on its own (never raises)."""
        with self._writer_lock:
            if len(batch) > 1:
                try:
                    with self._begin() as conn:
                        results = [
                            _write(conn, self._stmts, *item.args, look_first=False)
                            for item in batch
                        ]
                except Exception:  # a race or a duplicate in the batch: each on its own below
                    logger.debug(
                        "group commit fell back",
                        extra=log_fields("instance.group_commit_fallback", size=len(batch)),
                    )
                else:
                    for item, result in zip(batch, results, strict=True):
                        item.result = result
                    return
            for item in batch:
                try:
                    item.result = self._record_one(item.args)
                except Exception as exc:  # re-raised in the caller's thread
                    item.error = exc

    def _record_one(self, args: tuple[Any, ...]) -> Recorded:
        """One instance in its own transaction; the first attempt does not look for a
        duplicate first: the unique SOP Instance UID makes it fail and the retry looks."""
        for attempt in range(5):
            try:
                with self._begin() as conn:
                    return _write(conn, self._stmts, *args, look_first=attempt > 0)
            except (IntegrityError, StateConflict):
                # A concurrent association created the same study/job/instance, or the
                # instance is a duplicate: read again.
                continue
        raise StateConflict("could not record instance after 5 attempts")

    def _connect(self) -> AbstractContextManager[Connection]:
        """A connection outside any ORM session (for reads)."""
        if self._engine is not None:
            return self._engine.connect()
        return _session_connection(self.sessions, begin=False)

    def _begin(self) -> AbstractContextManager[Connection]:
        """A connection in a transaction, committed at the end of the block."""
        if self._engine is not None:
            return self._engine.begin()
        return _session_connection(self.sessions, begin=True)

    # -- instance copies (see dicomai.ingest.copies) -----------------------------------
    def instance_copies(
        self, made_before: datetime | None = None, limit: int = 1000
    ) -> list[tuple[str, bytes]]:
        """``(path, bytes)`` of small instances whose files are not known durable yet (only
        those committed before ``made_before``, if given), oldest first."""
        stmt = select(InstanceCopy.path, InstanceCopy.data).order_by(InstanceCopy.made_at)
        if made_before is not None:
            stmt = stmt.where(InstanceCopy.made_at < made_before)
        with self._connect() as conn:
            return [(str(p), bytes(d)) for p, d in conn.execute(stmt.limit(limit))]

    def drop_instance_copies(self, paths: Sequence[str]) -> int:
        """Forget the copies of these files (they are fsynced now); returns the rows deleted."""
        dropped = 0
        with self._writer_lock:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                with self._begin() as conn:
                    dropped += conn.execute(
                        delete(InstanceCopy).where(InstanceCopy.path.in_(chunk))
                    ).rowcount
        return dropped

    # -- refused objects, arrival clocks, retention ------------------------------------
    def quarantine(
        self,
        *,
        reason: str,
        status_code: int,
        calling_ae: str,
        peer: str,
        sop_class_uid: str,
        path: str | None,
        size_bytes: int,
        now: datetime,
    ) -> None:
        """Record a refused object."""
        with self.sessions.begin() as s:
            s.add(
                QuarantineEntry(
                    reason=reason,
                    status_code=status_code,
                    calling_ae_title=calling_ae,
                    peer_address=peer,
                    sop_class_uid=sop_class_uid,
                    path=path,
                    size_bytes=size_bytes,
                    received_at=now,
                )
            )

    def restart_quiet_clocks(self, now: datetime) -> int:
        """Restart the quiet period of every RECEIVING job (at start: our downtime is not the
        modality's silence, and its sender may still be about to resume)."""
        with self.sessions.begin() as s:
            result = _cursor(
                s.execute(
                    update(Job)
                    .where(Job.state == _RECEIVING, Job.last_instance_at < now)
                    .values(last_instance_at=now)
                )
            )
            return int(result.rowcount or 0)

    def mark_released(self, study_uids: Sequence[str], now: datetime) -> int:
        """Note that the sender released the association that delivered these studies.

        Only RECEIVING jobs are touched; an instance arriving later moves ``last_instance_at``
        past ``released_at``, which cancels the early close until the next release.
        """
        if not study_uids:
            return 0
        with self.sessions.begin() as s:
            studies = select(Study.id).where(Study.study_instance_uid.in_(list(study_uids)))
            result = _cursor(
                s.execute(
                    update(Job)
                    .where(Job.state == _RECEIVING, Job.study_id.in_(studies))
                    .values(released_at=now)
                    .execution_options(synchronize_session=False)
                )
            )
            return int(result.rowcount or 0)

    def forget_study(self, study_id: int) -> None:
        """Delete a study's instance rows (retention: its files are gone; a study sent again
        later is stored and analysed afresh)."""
        with self.sessions.begin() as s:
            s.execute(delete(Instance).where(Instance.study_id == study_id))


def _cursor(result: Result[Any]) -> CursorResult[Any]:
    """An UPDATE's result (it has a row count)."""
    return cast("CursorResult[Any]", result)


@contextlib.contextmanager
def _session_connection(sessions: sessionmaker[Session], *, begin: bool) -> Iterator[Connection]:
    """The connection of a new session (a session factory without an engine bound)."""
    with sessions.begin() if begin else sessions() as s:
        yield s.connection(bind_arguments={"mapper": Instance})


def _write(
    conn: Connection,
    stmts: RecordStatements,
    rec: InstanceRecord,
    path: str,
    size_bytes: int,
    calling_ae: str,
    now: datetime,
    copy: bytes | None = None,
    *,
    look_first: bool,
) -> Recorded:
    """One instance's rows on ``conn`` (the caller commits); see
    :meth:`InstanceIndex.record_instance`."""
    if stmts.row(conn, "own_result", {"b_sop": rec.sop_instance_uid}) is not None:
        raise OwnResultObject(rec.sop_instance_uid)
    if look_first:
        existing = stmts.row(conn, "instance_job", {"b_sop": rec.sop_instance_uid})
        if existing is not None:
            return False, int(existing[0])
    touched = stmts.row(conn, "touch_study", {"b_uid": rec.study_instance_uid, "b_now": now})
    if touched is not None:
        study_id = int(touched[0])
    else:
        study_id = stmts.insert(
            conn,
            "insert_study",
            {
                "study_instance_uid": rec.study_instance_uid,
                "first_received_at": now,
                "last_received_at": now,
                "calling_ae_title": calling_ae,
            },
        )
    # Only a job still RECEIVING is touched: if the scheduler closed it meanwhile, this
    # instance belongs to the next generation.
    job = stmts.row(conn, "touch_job", {"b_study": study_id, "b_now": now})
    job_id = int(job[0]) if job is not None else open_generation(conn, study_id, now)
    instance_id = stmts.insert(
        conn,
        "insert_instance",
        {
            **{name: getattr(rec, name) for name in _header_columns()},
            "study_id": study_id,
            "job_id": job_id,
            "path": path,
            "size_bytes": size_bytes,
            "calling_ae_title": calling_ae,
            "received_at": now,
        },
    )
    if copy is not None:
        stmts.insert(
            conn,
            "insert_copy",
            {"instance_id": instance_id, "path": path, "data": copy, "made_at": now},
        )
    return True, job_id
