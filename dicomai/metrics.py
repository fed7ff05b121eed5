"""Prometheus metrics: counters the components bump, gauges read from the database at scrape.

The components call four small functions, each cheap and never raising:

- :func:`observe_instance` (receiver: an instance stored), :func:`observe_refused` (receiver:
  an object refused, by reason code);
- :func:`observe_job` (worker and sender: seconds of a stage: ``inference``, ``send`` or
  ``end_to_end``, per model);
- :func:`observe_send` (sender: one result object's outcome per destination);
- :func:`observe_http_request` (DICOMweb receiver: a STOW-RS request answered, by HTTP
  status; its instances are counted by :func:`observe_instance` as any other).

:func:`start_metrics_server` serves :data:`REGISTRY` over HTTP (127.0.0.1 by default) and adds
the database-backed gauges (studies per state, queue depth, destination backlog, quarantine,
heartbeat age, spool free space). GPU memory is reported when this process has initialised
CUDA.

Labels carry only our own names and codes (states, route/model/destination names from the
configuration, reason codes), never UIDs or patient data: values that are not a short
lower-case code, or that look like a DICOM UID, are reported as ``other``.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from dicomai.config import Settings
from dicomai.db import utcnow
from dicomai.jobs import reads
from dicomai.jobs.states import ACTIVE_STATES, JobState
from dicomai.logs import log_fields

__all__ = [
    "REGISTRY",
    "STAGES",
    "DatabaseCollector",
    "GpuCollector",
    "MetricsServer",
    "observe_connection_dropped",
    "observe_http_request",
    "observe_instance",
    "observe_job",
    "observe_refused",
    "observe_send",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

#: Stages of :func:`observe_job`.
STAGES = ("inference", "send", "end_to_end")
_CODE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_UIDISH = re.compile(r"\d+(\.\d+){3,}")
_known: dict[str, frozenset[str]] = {}  # "model"/"destination" -> configured names

#: The registry every dicomai metric lives in (not prometheus_client's global one).
REGISTRY = CollectorRegistry(auto_describe=True)

_INSTANCES = Counter(
    "dicomai_instances_received", "Instances stored by the receiver.", registry=REGISTRY
)
_BYTES = Counter(
    "dicomai_bytes_received", "Bytes of instances stored by the receiver.", registry=REGISTRY
)
_REFUSED = Counter(
    "dicomai_instances_refused",
    "Objects refused by the receiver, by reason code.",
    ["reason"],
    registry=REGISTRY,
)
_DURATION = Histogram(
    "dicomai_job_duration_seconds",
    "Seconds per job and stage: inference (model run and result building), send (one "
    "delivery attempt), end_to_end (last instance received to results accepted).",
    ["stage", "model"],
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1800, 3600),
)
_DROPPED = Counter(
    "dicomai_connections_dropped",
    "Connections the receiver dropped or refused, by reason (no patient data).",
    ["reason"],
    registry=REGISTRY,
)
_HTTP_REQUESTS = Counter(
    "dicomai_http_requests",
    "STOW-RS requests the DICOMweb receiver answered, by HTTP status.",
    ["status"],
    registry=REGISTRY,
)
_SEND = Counter(
    "dicomai_send",
    "Result objects sent, per destination and outcome (sent, retry, refused).",
    ["destination", "outcome"],
    registry=REGISTRY,
)


def _label(value: object, kind: str | None = None) -> str:
    """A label value that cannot carry patient data or a UID."""
    text = str(value or "").strip().lower()
    if not _CODE.match(text) or _UIDISH.search(text):
        return "other"
    known = _known.get(kind or "")
    if known and text not in known:
        return "other"
    return text


def observe_instance(size_bytes: int) -> None:
    """The receiver stored one new instance of ``size_bytes``."""
    try:
        _INSTANCES.inc()
        _BYTES.inc(max(0, int(size_bytes)))
    except Exception:  # metrics never break the caller
        logger.debug("metric update failed", exc_info=True)


def observe_refused(reason: str) -> None:
    """The receiver refused an object (a quarantine reason code, or e.g. ``out_of_space``)."""
    try:
        _REFUSED.labels(reason=_label(reason)).inc()
    except Exception:
        logger.debug("metric update failed", exc_info=True)


def observe_connection_dropped(reason: str) -> None:
    """The receiver dropped a connection before or instead of serving it (``timeout``,
    ``evicted``, ``not_association``, ``stalled``, ``invalid_pdu``, ``local_limit``, ...)."""
    try:
        _DROPPED.labels(reason=_label(reason)).inc()
    except Exception:
        logger.debug("metric update failed", exc_info=True)


def observe_http_request(status: int) -> None:
    """The DICOMweb receiver answered a request with HTTP ``status`` (a client that went away
    before its answer counts as 499, as in common web servers' logs)."""
    try:
        code = int(status)
        _HTTP_REQUESTS.labels(status=str(code) if 100 <= code <= 599 else "other").inc()
    except Exception:
        logger.debug("metric update failed", exc_info=True)


def observe_job(stage: str, model: str | None, seconds: float) -> None:
    """A job spent ``seconds`` in ``stage`` (one of :data:`STAGES`) with ``model``."""
    if stage not in STAGES:
        logger.warning(
            "unknown metrics stage", extra=log_fields("metrics.bad_stage", stage=str(stage)[:32])
        )
        return
    try:
        _DURATION.labels(stage=stage, model=_label(model, "model")).observe(
            max(0.0, float(seconds))
        )
    except Exception:
        logger.debug("metric update failed", exc_info=True)


def observe_send(destination: str, outcome: str) -> None:
    """One result object's delivery to ``destination`` ended with ``outcome``."""
    try:
        _SEND.labels(destination=_label(destination, "destination"), outcome=_label(outcome)).inc()
    except Exception:
        logger.debug("metric update failed", exc_info=True)


# -- collectors read at scrape time ------------------------------------------------------
class DatabaseCollector(Collector):
    """Gauges read from the database (and the spool) on each scrape.

    ``dicomai_studies{state}`` counts studies by their latest generation's state (as
    `dicomai status` does); ``dicomai_queue_depth{state}`` counts jobs in the non-terminal
    states. A database error gives ``dicomai_database_up 0`` instead of a failed scrape.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: never touch the database at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dicomai_database_up", "1 when the database answered this scrape.")
        try:
            with self.engine.connect() as conn:
                g = reads.gauges(conn)
        except Exception as exc:  # any driver error: report it as a gauge, not a 500
            logger.warning(
                "metrics: database unavailable",
                extra=log_fields("metrics.db_error", error=type(exc).__name__),
            )
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        studies = GaugeMetricFamily(
            "dicomai_studies", "Studies by the state of their latest generation.", labels=["state"]
        )
        for state in JobState:
            studies.add_metric([state.value], g.studies_by_state.get(state.value, 0))
        yield studies
        queue = GaugeMetricFamily(
            "dicomai_queue_depth", "Jobs in each non-terminal state.", labels=["state"]
        )
        for state in ACTIVE_STATES:
            queue.add_metric([state.value], g.jobs_by_state.get(state.value, 0))
        yield queue
        dest = GaugeMetricFamily(
            "dicomai_destination_backlog",
            "Result objects waiting to be sent, per destination.",
            labels=["destination"],
        )
        for d in self.settings.destinations:
            dest.add_metric([_label(d.name)], g.pending_by_destination.get(d.name, 0))
        yield dest
        quar = GaugeMetricFamily(
            "dicomai_quarantined_objects",
            "Refused objects kept in quarantine, by reason code.",
            labels=["reason"],
        )
        for reason, n in sorted(g.quarantined_by_reason.items()):
            quar.add_metric([_label(reason)], n)
        yield quar
        if g.newest_heartbeat is not None:
            age = GaugeMetricFamily(
                "dicomai_heartbeat_age_seconds", "Seconds since the newest component heartbeat."
            )
            age.add_metric([], max(0.0, (utcnow() - g.newest_heartbeat) / timedelta(seconds=1)))
            yield age
        try:
            free = shutil.disk_usage(self.settings.spool_path).free
        except OSError:
            return
        disk = GaugeMetricFamily(
            "dicomai_spool_free_bytes", "Free bytes on the spool's file system."
        )
        disk.add_metric([], free)
        yield disk
        floor = GaugeMetricFamily(
            "dicomai_spool_min_free_bytes",
            "The receiver's free-space floor ([receiver] min_free_disk_mb) in bytes.",
        )
        floor.add_metric([], self.settings.receiver.min_free_disk_mb * 1024 * 1024)
        yield floor


class GpuCollector(Collector):
    """``dicomai_gpu_memory_bytes{device}`` (allocated by tensors) and
    ``dicomai_gpu_memory_reserved_bytes{device}``, only when this process has initialised
    CUDA (a model was loaded on a GPU); never imports torch or initialises CUDA itself."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return
            allocated = GaugeMetricFamily(
                "dicomai_gpu_memory_bytes", "GPU memory allocated by tensors.", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "dicomai_gpu_memory_reserved_bytes",
                "GPU memory reserved by the caching allocator.",
                labels=["device"],
            )
            for i in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{i}"], torch.cuda.memory_allocated(i))
                reserved.add_metric([f"cuda:{i}"], torch.cuda.memory_reserved(i))
        except Exception:
            logger.debug("gpu metrics failed", exc_info=True)
            return
        yield allocated
        yield reserved


REGISTRY.register(GpuCollector())


@dataclass
class MetricsServer:
    """A running metrics endpoint; :meth:`stop` shuts it down and removes its collector."""

    httpd: Any
    thread: threading.Thread
    collector: DatabaseCollector | None
    host: str
    _stopped: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        if self.collector is not None:
            try:
                REGISTRY.unregister(self.collector)
            except KeyError:
                pass
        logger.info("metrics server stopped", extra=log_fields("metrics.stopped"))


def start_metrics_server(
    host: str = "127.0.0.1",
    port: int = 9464,
    settings: Settings | None = None,
    engine: Engine | None = None,
) -> MetricsServer:
    """Serve :data:`REGISTRY` at ``http://host:port/metrics`` from a background thread.

    With ``settings`` and ``engine``, the database-backed gauges are added (and removed again
    by :meth:`MetricsServer.stop`); the configured model and destination names become the only
    label values accepted for those labels.

    Raises
    ------
    OSError
        The address cannot be bound.
    """
    collector = None
    if settings is not None:
        _known["model"] = frozenset(n.lower() for n in settings.models)
        _known["destination"] = frozenset(d.name.lower() for d in settings.destinations)
        if engine is not None:
            collector = DatabaseCollector(settings, engine)
            REGISTRY.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except Exception:
        if collector is not None:
            REGISTRY.unregister(collector)
        raise
    server = MetricsServer(httpd=httpd, thread=thread, collector=collector, host=host)
    logger.info(
        "metrics server listening", extra=log_fields("metrics.started", host=host, port=server.port)
    )
    return server
