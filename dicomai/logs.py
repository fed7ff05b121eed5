"""Structured logging: JSON lines, stable event names, and guards that keep patient data out."""

from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "PhiFilter", "configure", "log_fields", "uid_ref"]

_UID_KEY = os.environ.get("DICOMAI_UID_HASH_KEY", "dicomai").encode()
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# Dataset dumps look like "(0010,0010) Patient's Name   PN: ..."; refuse such lines outright.
_DATASET_DUMP = re.compile(r"\(00[01][0-9a-fA-F],[0-9a-fA-F]{4}\)")


def uid_ref(uid: str | None) -> str:
    """A short keyed hash of a DICOM UID, safe for logs and metrics."""
    if not uid:
        return "-"
    return hashlib.blake2s(str(uid).encode(), key=_UID_KEY[:32], digest_size=6).hexdigest()


def log_fields(event: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` mapping for a log call: a stable dotted ``event`` name plus context fields."""
    return {"event": event, "fields": fields}


class PhiFilter(logging.Filter):
    """Drops library records that would print datasets or patient identifiers.

    pynetdicom and highdicom can log identifiers (a C-FIND identifier dump, a warning quoting a
    person name). Records from those libraries below WARNING are dropped, and any record whose
    text looks like a dataset dump or mentions a patient attribute is replaced by a constant.
    """

    _WORDS = re.compile(r"patient'?s? ?(name|id|birth)|accession", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("pynetdicom", "highdicom", "pydicom")):
            if record.levelno < logging.WARNING:
                return False
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string: keep the record, drop its args
            text = str(record.msg)
        if _DATASET_DUMP.search(text) or self._WORDS.search(text):
            record.msg = "library message withheld (may contain patient data)"
            record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, message and fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None) or record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Readable single lines for a terminal: time level event message key=value..."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        event = getattr(record, "event", None) or record.name
        fields = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{when} {record.levelname:<7} {event}: {record.getMessage()} {tail}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def resolve_format(fmt: str) -> str:
    """``auto``: JSON lines under systemd/journald or when stderr is not a terminal, readable
    text in a terminal."""
    if fmt != "auto":
        return fmt
    if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty():
        return "json"
    return "text"


def configure(
    level: str = "INFO",
    fmt: str = "auto",
    file: str | None = None,
    levels: dict[str, str] | None = None,
) -> None:
    """Apply the logging configuration once per process (idempotent).

    ``levels`` sets per-component levels, e.g. ``{"dicomai.ingest": "DEBUG"}``.
    """
    formatter = resolve_format(fmt)
    handlers: dict[str, Any] = {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": sys.stderr,
            "formatter": formatter,
            "filters": ["phi"],
        }
    }
    if file:
        handlers["file"] = {
            "class": "logging.handlers.WatchedFileHandler",
            "filename": file,
            "formatter": "json",
            "filters": ["phi"],
        }
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"phi": {"()": PhiFilter}},
            "formatters": {"json": {"()": JsonFormatter}, "text": {"()": TextFormatter}},
            "handlers": handlers,
            "root": {"level": level, "handlers": list(handlers)},
            "loggers": {
                "pynetdicom": {"level": "WARNING"},
                "highdicom": {"level": "ERROR"},
                "apscheduler": {"level": "WARNING"},
                **{name: {"level": lvl} for name, lvl in (levels or {}).items()},
            },
        }
    )
    quiet_libraries()


def quiet_libraries() -> None:
    """Stop pynetdicom from logging request/response identifiers (they hold patient data)."""
    from dicomai.ingest.pynetdicom_seam import quiet_identifier_logging

    quiet_identifier_logging()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.ERROR)
