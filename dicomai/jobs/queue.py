"""The job state machine in the database: states, allowed transitions, claims and enqueueing."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, exists, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import (
    ComponentHeartbeat,
    Instance,
    InstanceCopy,
    Job,
    JobEvent,
    QuarantineEntry,
    ResultObject,
    Study,
    UTCDateTime,
    utcnow,
)
from dicomai.errors import StateConflict
from dicomai.jobs.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, JobState, ResultState
from dicomai.logs import log_fields

__all__ = [
    "InstanceRecord",
    "OwnResultObject",
    "Queue",
    "RetryPolicy",
]

logger = logging.getLogger(__name__)
S = JobState


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: ``base * 2**(attempt-1)`` seconds, capped, for ``max_attempts``."""

    max_attempts: int
    base_seconds: float
    max_seconds: float = 3600.0

    def delay(self, attempt: int) -> timedelta:
        """Wait before the attempt after ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError('Argument "attempt" must be positive.')
        return timedelta(seconds=min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1)))


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


# -- the receiver's record path: SQLAlchemy Core, statements built once ------------------------
_KNOWN = select(
    exists().where(Instance.sop_instance_uid == bindparam("b_sop")),
    exists().where(ResultObject.sop_instance_uid == bindparam("b_sop")),
)
_OWN_RESULT = select(ResultObject.id).where(ResultObject.sop_instance_uid == bindparam("b_sop"))
_INSTANCE_JOB = select(Instance.job_id).where(Instance.sop_instance_uid == bindparam("b_sop"))
_TOUCH_STUDY = (
    update(Study)
    .where(Study.study_instance_uid == bindparam("b_uid"))
    .values(last_received_at=bindparam("b_now", type_=UTCDateTime))
    .returning(Study.id)
)
_TOUCH_JOB = (
    update(Job)
    .where(Job.study_id == bindparam("b_study"), Job.state == "receiving")
    .values(
        last_instance_at=bindparam("b_now", type_=UTCDateTime),
        instance_count=Job.instance_count + 1,
    )
    .returning(Job.id)
)
_MAX_GENERATION = select(func.max(Job.generation)).where(Job.study_id == bindparam("b_study"))


class OwnResultObject(Exception):
    """Raised by :meth:`Queue.record_instance` for an object dicomai made itself (a PACS sent
    one of our results back): it is never indexed, or it would be analysed in turn."""


class _FileLock:
    """An exclusive ``flock`` on a lock file beside the SQLite database, held while recording.

    Processes that would otherwise meet in SQLite's busy handler (which sleeps and retries)
    wait in the kernel and continue as soon as the lock is released. Threads of one process
    (the group commit's leader, the copy flusher of :mod:`dicomai.ingest.copies`) take a thread lock
    first: ``flock`` does not exclude them from each other. Without a usable lock file only
    the thread lock is taken.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._fd is None and not self._failed:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                self._failed = True
                logger.warning(
                    "no record lock file; SQLite's busy handler only",
                    extra=log_fields("queue.record_lock_unavailable"),
                )
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class _RecordStatements:
    """The receiver's record-path statements, run through SQLAlchemy Core."""

    def __init__(self) -> None:
        self._statements: dict[str, Any] = {
            "known": _KNOWN,
            "own_result": _OWN_RESULT,
            "instance_job": _INSTANCE_JOB,
            "touch_study": _TOUCH_STUDY,
            "touch_job": _TOUCH_JOB,
            "insert_study": insert(Study),
            "insert_instance": insert(Instance),
            "insert_copy": insert(InstanceCopy),
        }

    def row(self, conn: Connection, name: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a query (or of an ``UPDATE ... RETURNING``), or ``None``."""
        found = conn.execute(self._statements[name], params).first()
        return None if found is None else tuple(found)

    def insert(self, conn: Connection, name: str, params: dict[str, Any]) -> int:
        """Run an INSERT; the new row's primary key."""
        key = conn.execute(self._statements[name], params).inserted_primary_key
        assert key is not None
        return int(key[0])


class _SqliteRecordStatements(_RecordStatements):
    """The same statements, compiled once for SQLite and run on the driver's own cursor of
    the SQLAlchemy connection (same transaction): about 0.3 ms less interpreter time per
    received instance than Core's execution path. Values go through the columns' own bind
    processors, so the stored rows are the ones Core would store (tested)."""

    def __init__(self, dialect: Any) -> None:
        super().__init__()
        self._compiled: dict[str, tuple[str, list[tuple[str, Any, Any]]]] = {}
        for name, stmt in self._statements.items():
            keys = None
            if name == "insert_study":
                keys = [
                    "study_instance_uid",
                    "first_received_at",
                    "last_received_at",
                    "calling_ae_title",
                ]
            elif name == "insert_instance":
                keys = [
                    *_record_columns(),
                    "study_id",
                    "job_id",
                    "path",
                    "size_bytes",
                    "calling_ae_title",
                    "received_at",
                ]
            elif name == "insert_copy":
                keys = ["instance_id", "path", "data", "made_at"]
            compiled = stmt.compile(dialect=dialect, column_keys=keys)
            order = []
            for key in compiled.positiontup or []:
                bind = compiled.binds[key]
                processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
                order.append((key, processor, bind.value))
            self._compiled[name] = (compiled.string, order)

    def _run(self, conn: Connection, name: str, params: dict[str, Any]) -> Any:
        sql, order = self._compiled[name]
        args = []
        try:
            for key, processor, default in order:
                value = params.get(key, default)
                args.append(
                    processor(value) if processor is not None and value is not None else value
                )
        except Exception as exc:  # as Core reports a value its type refuses
            raise StatementError(str(exc), sql, params, exc) from exc
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, args)
        except sqlite3.IntegrityError as exc:  # as Core would raise it (callers retry)
            raise IntegrityError(sql, args, exc) from exc
        return cursor

    def row(self, conn: Connection, name: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        cursor = self._run(conn, name, params)
        try:
            found = cursor.fetchone()
        finally:
            cursor.close()
        return None if found is None else tuple(found)

    def insert(self, conn: Connection, name: str, params: dict[str, Any]) -> int:
        cursor = self._run(conn, name, params)
        try:
            return int(cursor.lastrowid)
        finally:
            cursor.close()


@functools.cache
def _record_columns() -> tuple[str, ...]:
    """InstanceRecord fields that are also ``instances`` columns (a new pair just works)."""
    columns = Instance.__table__.c
    return tuple(f.name for f in dataclasses.fields(InstanceRecord) if f.name in columns)


def _instance_fields(rec: InstanceRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in _record_columns()}


def _open_generation(conn: Connection, study_id: int, now: datetime) -> int:
    """A new RECEIVING job (the study's next generation) holding one instance; its
    ``instance.first`` job event."""
    generation = (conn.execute(_MAX_GENERATION, {"b_study": study_id}).scalar() or 0) + 1
    key = conn.execute(
        insert(Job),
        {
            "study_id": study_id,
            "generation": generation,
            "state": "receiving",
            "created_at": now,
            "updated_at": now,
            "last_instance_at": now,
            "instance_count": 1,
        },
    ).inserted_primary_key
    assert key is not None
    job_id = key[0]
    conn.execute(
        insert(JobEvent),
        {"job_id": job_id, "src": None, "dst": "receiving", "at": now, "reason": "instance.first"},
    )
    return int(job_id)


@contextlib.contextmanager
def _session_connection(sessions: sessionmaker[Session], *, begin: bool) -> Iterator[Connection]:
    """The connection of a new session (a session factory without an engine bound)."""
    with sessions.begin() if begin else sessions() as s:
        yield s.connection(bind_arguments={"mapper": Instance})


@dataclass(slots=True)
class _PendingRecord:
    """One ``record_instance`` call waiting for its (group) commit."""

    args: tuple[InstanceRecord, str, int, str, datetime, bytes | None]
    result: tuple[bool, int] | None = None
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def outcome(self) -> tuple[bool, int]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _GroupCommit:
    """Leader/follower group commit without a thread of its own.

    A caller that finds no leader becomes one: it takes every pending call (its own among
    them), runs them as one batch, then hands leadership on. Callers arriving meanwhile wait;
    the next leader takes all of them at once, so concurrent associations share a transaction
    and its commit (one WAL fsync instead of one each, no SQLite busy-wait between them).
    """

    def __init__(self, run: Callable[[list[_PendingRecord]], None]) -> None:
        self._run = run
        self._cond = threading.Condition()
        self._pending: list[_PendingRecord] = []
        self._leading = False

    def submit(self, item: _PendingRecord) -> None:
        """Return once ``item`` is done (its result or error set)."""
        with self._cond:
            self._pending.append(item)
            while self._leading and not item.done:
                self._cond.wait()
            if item.done:
                return
            self._leading = True
            batch, self._pending = self._pending, []
        try:
            self._run(batch)
        finally:
            with self._cond:
                for pending in batch:  # only after an interrupt: nobody waits forever
                    if not pending.done:
                        pending.error = RuntimeError("group commit interrupted")
                self._leading = False
                self._cond.notify_all()


class Queue:
    """All reads and writes of job state. The only place a job's state changes."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory
        #: The bound engine, for the Core paths of the receiver (``None``: via a session).
        self._engine: Engine | None = session_factory.kw.get("bind")
        self._group = _GroupCommit(self._record_batch)
        sqlite = self._engine is not None and self._engine.dialect.name == "sqlite"
        self._stmts = (
            _SqliteRecordStatements(self._engine.dialect)  # type: ignore[union-attr]
            if sqlite
            else _RecordStatements()
        )
        database = self._engine.url.database if sqlite else None  # type: ignore[union-attr]
        self._writer_lock: contextlib.AbstractContextManager[Any] = (
            _FileLock(f"{database}.record-lock")
            if database and database != ":memory:"
            else contextlib.nullcontext()
        )
        #: In-process wake-ups: events set after a job entered a state (see :meth:`subscribe`).
        self._subscribers: dict[JobState, list[threading.Event]] = {}

    def subscribe(self, state: JobState | str, wake: threading.Event) -> None:
        """Set ``wake`` whenever a job of this process enters ``state`` (after the commit).

        The worker and sender wait on it instead of sleeping their whole poll interval, so a
        job closed by this process's scheduler is claimed at once; other hosts still poll.
        """
        self._subscribers.setdefault(JobState(state), []).append(wake)

    def _notify(self, state: JobState) -> None:
        for wake in self._subscribers.get(state, ()):
            wake.set()

    def session(self) -> Session:
        """A new session (use as a context manager)."""
        return self._sessions()

    # -- receiving ---------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is already stored."""
        with self._sessions() as s:
            found = s.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

    def indexed_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` have an instance row."""
        found: set[str] = set()
        with self._sessions() as s:
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

    def record_instance(
        self,
        rec: InstanceRecord,
        path: str,
        size_bytes: int,
        calling_ae: str,
        now: datetime,
        copy: bytes | None = None,
    ) -> tuple[bool, int]:
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
        item = _PendingRecord((rec, path, size_bytes, calling_ae, now, copy))
        self._group.submit(item)
        return item.outcome()

    def _record_batch(self, batch: list[_PendingRecord]) -> None:
        """Record a batch in one transaction; on any error, each on its own (never raises).

        On SQLite, under :attr:`_writer_lock`: receiver processes sharing the database queue
        for the write lock in the kernel instead of in SQLite's busy handler, which sleeps
        1 ms and more per retry."""
        with self._writer_lock:
            self._record_batch_locked(batch)

    def _record_batch_locked(self, batch: list[_PendingRecord]) -> None:
        if len(batch) > 1:
            try:
                with self._begin() as conn:
                    results = [
                        self._record_instance(conn, self._stmts, *item.args, look_first=False)
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
                item.result = self._record_one(*item.args)
            except Exception as exc:  # re-raised in the caller's thread
                item.error = exc

    def _record_one(
        self,
        rec: InstanceRecord,
        path: str,
        size_bytes: int,
        calling_ae: str,
        now: datetime,
        copy: bytes | None,
    ) -> tuple[bool, int]:
        """One instance in its own transaction; the first attempt does not look for a
        duplicate first: the unique SOP Instance UID makes it fail and the retry looks."""
        for attempt in range(5):
            try:
                with self._begin() as conn:
                    return self._record_instance(
                        conn,
                        self._stmts,
                        rec,
                        path,
                        size_bytes,
                        calling_ae,
                        now,
                        copy,
                        look_first=attempt > 0,
                    )
            except (IntegrityError, StateConflict):
                # A concurrent association created the same study/job/instance, or the
                # instance is a duplicate: read again.
                continue
        raise StateConflict("could not record instance after 5 attempts")

    def _connect(self) -> AbstractContextManager[Connection]:
        """A connection outside any ORM session (for reads)."""
        if self._engine is not None:
            return self._engine.connect()
        return _session_connection(self._sessions, begin=False)

    def _begin(self) -> AbstractContextManager[Connection]:
        """A connection in a transaction, committed at the end of the block."""
        if self._engine is not None:
            return self._engine.begin()
        return _session_connection(self._sessions, begin=True)

    @staticmethod
    def _record_instance(
        conn: Connection,
        stmts: _RecordStatements,
        rec: InstanceRecord,
        path: str,
        size_bytes: int,
        calling_ae: str,
        now: datetime,
        copy: bytes | None = None,
        *,
        look_first: bool,
    ) -> tuple[bool, int]:
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
        job_id = int(job[0]) if job is not None else _open_generation(conn, study_id, now)
        instance_id = stmts.insert(
            conn,
            "insert_instance",
            {
                **_instance_fields(rec),
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

    # -- instance copies (see dicomai.ingest.copies) --------------------------------------------
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
        with self._sessions.begin() as s:
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

    # -- transitions -------------------------------------------------------------------
    def transition(
        self,
        job_id: int,
        src: JobState | str,
        dst: JobState | str,
        *,
        reason: str,
        now: datetime | None = None,
        session: Session | None = None,
        guard: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Compare-and-set a job from ``src`` to ``dst``, recording a job event.

        ``guard`` adds column values that must still hold (e.g. the ``last_instance_at`` the
        caller routed on, so an instance that arrived meanwhile makes the close fail).

        Raises
        ------
        ValueError
            The transition is not in :data:`ALLOWED_TRANSITIONS`.
        StateConflict
            The job was not in ``src`` (somebody else moved it).
        """
        src, dst = JobState(src), JobState(dst)
        if dst not in ALLOWED_TRANSITIONS[src]:
            raise ValueError(f"transition {src} -> {dst} is not allowed")
        now = now or utcnow()
        values: dict[str, Any] = {"state": dst.value, "updated_at": now, **fields}
        if dst in TERMINAL_STATES and "finished_at" not in values:
            values["finished_at"] = now
        if session is None:
            with self._sessions.begin() as s:
                self._cas(s, job_id, src, dst, values, reason, now, guard)
            self._notify(dst)
        else:
            self._cas(session, job_id, src, dst, values, reason, now, guard)
            if dst in self._subscribers:
                sa_event.listen(session, "after_commit", lambda _s: self._notify(dst), once=True)
        logger.info(
            "job state changed",
            extra=log_fields(
                "job.transition", job_id=job_id, src=src.value, dst=dst.value, reason=reason
            ),
        )

    @staticmethod
    def _cas(
        s: Session,
        job_id: int,
        src: JobState,
        dst: JobState,
        values: dict[str, Any],
        reason: str,
        now: datetime,
        guard: dict[str, Any] | None = None,
    ) -> None:
        query = update(Job).where(Job.id == job_id, Job.state == src.value)
        for column, expected in (guard or {}).items():
            query = query.where(getattr(Job, column) == expected)
        result = s.execute(query.values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise StateConflict(f"job {job_id} is not {src.value}")
        s.add(JobEvent(job_id=job_id, src=src.value, dst=dst.value, at=now, reason=reason))

    def claim_next(
        self,
        src: JobState,
        dst: JobState,
        claimer: str,
        now: datetime,
        *,
        models: Sequence[str] | None = None,
    ) -> Job | None:
        """Claim the most urgent due job in ``src`` and move it to ``dst``.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite the compare-and-set guard alone
        keeps two claimers off the same job.
        """
        for _ in range(5):
            with self._sessions.begin() as s:
                query = (
                    select(Job)
                    .where(Job.state == src.value)
                    .where((Job.not_before.is_(None)) | (Job.not_before <= now))
                    .order_by(Job.priority.desc(), Job.closed_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if models is not None:
                    query = query.where(Job.model.in_(list(models)))
                job = s.scalar(query)
                if job is None:
                    return None
                fields: dict[str, Any] = {"claimed_by": claimer, "heartbeat_at": now}
                if dst is S.RUNNING:
                    fields["attempts"] = job.attempts + 1
                try:
                    # updated_at as the row's version: on SQLite the SELECT above runs outside
                    # the write transaction, so another claimer may have claimed, sent and put
                    # the job back (with a later not_before) in between; a state-only guard
                    # would then claim it before its backoff is over.
                    self._cas(
                        s,
                        job.id,
                        src,
                        dst,
                        {"state": dst.value, "updated_at": now, **fields},
                        "claim",
                        now,
                        guard={"updated_at": job.updated_at},
                    )
                except StateConflict:
                    continue
                s.flush()
                s.refresh(job)
            logger.info(
                "job claimed",
                extra=log_fields("job.claimed", job_id=job.id, state=dst.value, claimer=claimer),
            )
            return job
        return None

    def heartbeat_job(self, job_id: int, claimer: str, now: datetime) -> None:
        """Touch a claimed job's heartbeat."""
        with self._sessions.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.claimed_by == claimer)
                .values(heartbeat_at=now)
            )

    # -- reads -------------------------------------------------------------------------
    def get_job(self, job_id: int) -> Job:
        """The job row (detached)."""
        with self._sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job

    def study_uid(self, job: Job) -> str:
        """StudyInstanceUID of a job's study."""
        with self._sessions() as s:
            return s.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id)) or ""

    def study_instances(self, study_id: int, up_to_generation: int | None = None) -> list[Instance]:
        """All instances of a study, optionally only those of generations up to the given one."""
        with self._sessions() as s:
            q = select(Instance).where(Instance.study_id == study_id)
            if up_to_generation is not None:
                q = q.join(Job, Job.id == Instance.job_id).where(Job.generation <= up_to_generation)
            return list(s.scalars(q.order_by(Instance.id)))

    def restart_quiet_clocks(self, now: datetime) -> int:
        """Restart the quiet period of every RECEIVING job (at start: our downtime is not the
        modality's silence, and its sender may still be about to resume)."""
        with self._sessions.begin() as s:
            result = s.execute(
                update(Job)
                .where(Job.state == S.RECEIVING.value, Job.last_instance_at < now)
                .values(last_instance_at=now)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def jobs_of_study(self, study_id: int) -> list[Job]:
        """Every job (generation) of a study, oldest first."""
        with self._sessions() as s:
            return list(
                s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.generation))
            )

    def receiving_jobs_quiet_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose last instance arrived before ``cutoff``."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(Job.state == S.RECEIVING.value, Job.last_instance_at < cutoff)
                    .order_by(Job.id)
                )
            )

    def mark_released(self, study_uids: Sequence[str], now: datetime) -> int:
        """Note that the sender released the association that delivered these studies.

        Only RECEIVING jobs are touched; an instance arriving later moves ``last_instance_at``
        past ``released_at``, which cancels the early close until the next release.
        """
        if not study_uids:
            return 0
        with self._sessions.begin() as s:
            studies = select(Study.id).where(Study.study_instance_uid.in_(list(study_uids)))
            result = s.execute(
                update(Job)
                .where(Job.state == S.RECEIVING.value, Job.study_id.in_(studies))
                .values(released_at=now)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def receiving_jobs_released_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose sender released its association at or before ``cutoff`` and
        sent nothing after that release."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(
                        Job.state == S.RECEIVING.value,
                        Job.released_at.is_not(None),
                        Job.released_at >= Job.last_instance_at,
                        Job.released_at <= cutoff,
                    )
                    .order_by(Job.id)
                )
            )

    def receiving_jobs_complete(
        self, single_image_modalities: Sequence[str]
    ) -> list[tuple[Job, str]]:
        """RECEIVING jobs whose study may be complete, with why.

        ``"announced"``: every instance of the study carries ImagesInAcquisition and each
        (series, acquisition) holds at least that many instances. ``"single_image"``: the study
        is one image of one of ``single_image_modalities`` (a one-view X-ray) — a weaker hint,
        which the scheduler acts on only once the sender released its association.
        """
        groups: dict[int, list[tuple[int, int, int | None, str]]] = {}
        with self._sessions() as s:
            receiving = select(Job.study_id).where(Job.state == S.RECEIVING.value)
            rows = s.execute(
                select(
                    Instance.study_id,
                    func.count(),
                    func.count(Instance.images_in_acquisition),
                    func.max(Instance.images_in_acquisition),
                    func.min(Instance.modality),
                )
                .where(Instance.study_id.in_(receiving))
                .group_by(
                    Instance.study_id, Instance.series_instance_uid, Instance.acquisition_number
                )
            ).all()
            for study_id, n, known, expected, modality in rows:
                groups.setdefault(int(study_id), []).append(
                    (
                        int(n),
                        int(known),
                        None if expected is None else int(expected),
                        str(modality or ""),
                    )
                )
            single = {m.upper() for m in single_image_modalities}
            why: dict[int, str] = {}
            for study_id, parts in groups.items():
                if all(
                    known == n and expected is not None and n >= expected > 0
                    for n, known, expected, _ in parts
                ):
                    why[study_id] = "announced"
                elif len(parts) == 1 and parts[0][0] == 1 and parts[0][3].upper() in single:
                    why[study_id] = "single_image"
            if not why:
                return []
            jobs = s.scalars(
                select(Job)
                .where(Job.state == S.RECEIVING.value, Job.study_id.in_(list(why)))
                .order_by(Job.id)
            )
            return [(job, why[job.study_id]) for job in jobs]

    def stale_claims(self, state: JobState, cutoff: datetime) -> list[Job]:
        """Jobs in ``state`` whose heartbeat is older than ``cutoff``."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Job).where(
                        Job.state == state.value,
                        (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
                    )
                )
            )

    def previous_results(self, study_id: int, before_generation: int) -> list[ResultObject]:
        """Result objects of earlier generations of a study (for predecessor references)."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(ResultObject)
                    .join(Job, Job.id == ResultObject.job_id)
                    .where(Job.study_id == study_id, Job.generation < before_generation)
                    .order_by(Job.generation.desc())
                )
            )

    def results_for(self, job_id: int) -> list[ResultObject]:
        """Result rows of a job."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(ResultObject)
                    .where(ResultObject.job_id == job_id)
                    .order_by(ResultObject.id)
                )
            )

    def add_results(self, job_id: int, rows: Sequence[ResultObject], *, session: Session) -> None:
        """Replace a job's result rows (a rerun after a crash rebuilds the same UIDs)."""
        for old in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)):
            session.delete(old)
        session.flush()
        session.add_all(rows)

    def mark_result(
        self,
        result_id: int,
        *,
        state: str,
        status_code: int | None,
        error: str | None,
        now: datetime,
    ) -> None:
        """Record one object's delivery outcome."""
        with self._sessions.begin() as s:
            row = s.get(ResultObject, result_id)
            if row is None:
                return
            row.state = state
            row.status_code = status_code
            row.attempts += 1
            row.last_error = error
            if state == ResultState.SENT:
                row.sent_at = now

    # -- operator actions --------------------------------------------------------------
    def retry(self, job_id: int, now: datetime) -> JobState:
        """FAILED → OUTBOX (results exist and were not all refused) or QUEUED; resets counters.

        Raises
        ------
        StateConflict
            The job is not FAILED.
        """
        with self._sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != S.FAILED.value:
                raise StateConflict(f"job {job_id} is not failed")
            results = list(s.scalars(select(ResultObject).where(ResultObject.job_id == job_id)))
            notice = bool((job.findings or {}).get("failure_notice"))
            done = (ResultState.SENT, ResultState.SKIPPED)
            unsent = [r for r in results if r.state not in done]
            dst = S.OUTBOX if results and unsent and not notice else S.QUEUED
            for r in unsent:
                r.state, r.last_error = ResultState.PENDING, None
            fields: dict[str, Any] = {
                "not_before": None,
                "claimed_by": None,
                "finished_at": None,
                "last_error": None,
                "send_attempts": 0,
            }
            if dst is S.QUEUED:
                fields.update(attempts=0, findings=None)
            self.transition(
                job_id, S.FAILED, dst, reason="operator.retry", now=now, session=s, **fields
            )
            return dst

    def cancel(self, job_id: int, now: datetime) -> None:
        """QUEUED, OUTBOX or FAILED → CANCELLED (raises StateConflict otherwise)."""
        job = self.get_job(job_id)
        src = JobState(job.state)
        if S.CANCELLED not in ALLOWED_TRANSITIONS[src]:
            raise StateConflict(f"job {job_id} is {src.value} and cannot be cancelled")
        self.transition(job_id, src, S.CANCELLED, reason="operator.cancel", now=now)

    # -- components --------------------------------------------------------------------
    def beat(self, component: str, role: str, now: datetime, info: dict[str, Any]) -> None:
        """Record that a component is alive."""
        with self._sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is None:
                s.add(
                    ComponentHeartbeat(
                        component=component, role=role, started_at=now, beat_at=now, info=info
                    )
                )
            else:
                row.beat_at = now
                row.info = info
                row.role = role

    def forget_component(self, component: str) -> None:
        """Remove a component's heartbeat row (clean shutdown)."""
        with self._sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is not None:
                s.delete(row)
