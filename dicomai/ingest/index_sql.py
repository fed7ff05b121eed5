"""The record path's SQL: statements built once, run through SQLAlchemy Core or, on SQLite,
on the driver's own cursor; and the opening of a study's next generation.

:class:`~dicomai.ingest.index.InstanceIndex` runs them; nothing else here keeps state.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError, StatementError

from dicomai.db import Instance, InstanceCopy, Job, JobEvent, ResultObject, Study, UTCDateTime
from dicomai.jobs.states import JobState

__all__ = ["RecordStatements", "SqliteRecordStatements", "open_generation"]

_RECEIVING = JobState.RECEIVING.value

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
    .where(Job.study_id == bindparam("b_study"), Job.state == _RECEIVING)
    .values(
        last_instance_at=bindparam("b_now", type_=UTCDateTime),
        instance_count=Job.instance_count + 1,
    )
    .returning(Job.id)
)
_MAX_GENERATION = select(func.max(Job.generation)).where(Job.study_id == bindparam("b_study"))

#: Columns the raw path's INSERTs bind, besides an instance's header fields.
_INSERT_KEYS = {
    "insert_study": [
        "study_instance_uid",
        "first_received_at",
        "last_received_at",
        "calling_ae_title",
    ],
    "insert_instance": [
        "study_id",
        "job_id",
        "path",
        "size_bytes",
        "calling_ae_title",
        "received_at",
    ],
    "insert_copy": ["instance_id", "path", "data", "made_at"],
}


class RecordStatements:
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


class SqliteRecordStatements(RecordStatements):
    """The same statements, compiled once for SQLite and run on the driver's own cursor of
    the SQLAlchemy connection (same transaction): less interpreter time per received instance
    than Core's execution path. Values go through the columns' own bind processors, so the
    stored rows are the ones Core would store (tested).

    ``header_columns``: the instance header fields an ``insert_instance`` binds.
    """

    def __init__(self, dialect: Any, header_columns: Sequence[str]) -> None:
        super().__init__()
        keys = {**_INSERT_KEYS}
        keys["insert_instance"] = [*header_columns, *keys["insert_instance"]]
        self._compiled: dict[str, tuple[str, list[tuple[str, Any, Any]]]] = {}
        for name, stmt in self._statements.items():
            compiled = stmt.compile(dialect=dialect, column_keys=keys.get(name))
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
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # a live connection has its driver's connection
        cursor = dbapi.cursor()
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


def open_generation(conn: Connection, study_id: int, now: datetime) -> int:
    """A new RECEIVING job (the study's next generation) holding one instance; its
    ``instance.first`` job event."""
    generation = (conn.execute(_MAX_GENERATION, {"b_study": study_id}).scalar() or 0) + 1
    key = conn.execute(
        insert(Job),
        {
            "study_id": study_id,
            "generation": generation,
            "state": _RECEIVING,
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
        {"job_id": job_id, "src": None, "dst": _RECEIVING, "at": now, "reason": "instance.first"},
    )
    return int(job_id)
