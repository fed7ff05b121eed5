"""Sender: results returned to destinations, over C-STORE or STOW-RS, with retries kept in the
database.

A job's pending objects are grouped by destination; each destination gets one association
(:func:`send_objects`) or one STOW-RS request (:func:`send_objects_stow`), all destinations of a
job in parallel. Whatever the kind, each object ends sent, retried, refused or skipped, and the
job's next state, backoff, give-up and audit follow from those outcomes alone.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicomai import audit, metrics
from dicomai.config import DestinationSettings, Settings
from dicomai.delivery import stow_client
from dicomai.errors import StateConflict
from dicomai.http_auth import credentials, file_problem, secret_file_problem
from dicomai.jobs.queue import Queue, RetryPolicy
from dicomai.jobs.states import JobState, ResultState
from dicomai.logs import log_fields
from dicomai.runtime.scheduler import claimer_name

__all__ = [
    "Outcome",
    "SendCancel",
    "SendItem",
    "SendReport",
    "Sender",
    "classify_status",
    "send_objects",
    "send_objects_stow",
    "stow_target",
]

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What happened to one object."""

    SENT = "sent"
    RETRY = "retry"
    REFUSED = "refused"
    SKIPPED = "skipped"  # an optional object whose SOP class the destination does not accept


#: Result kinds a destination may decline (its SOP class not accepted) without failing the job.
OPTIONAL_KINDS = frozenset({"seg"})
_RESULT_STATE = {
    Outcome.SENT: ResultState.SENT,
    Outcome.RETRY: ResultState.PENDING,
    Outcome.REFUSED: ResultState.FAILED,
    Outcome.SKIPPED: ResultState.SKIPPED,
}


def classify_status(status: int | None) -> Outcome:
    """0x0000 and 0xB0xx are success; 0xA7xx retryable; anything else permanent."""
    if status is None:
        return Outcome.RETRY
    if status == 0x0000 or (status & 0xF000) == 0xB000:
        return Outcome.SENT
    if (status & 0xFF00) == 0xA700:
        return Outcome.RETRY
    return Outcome.REFUSED


@dataclass(frozen=True, slots=True)
class SendItem:
    """One file to send (our result row id and its path)."""

    result_id: int
    path: str
    sop_class_uid: str
    #: Sent where the destination accepts its SOP class, skipped (not failed) elsewhere.
    optional: bool = False


@dataclass(slots=True)
class SendReport:
    """Outcome per result row, plus an association-level error if any."""

    outcomes: dict[int, tuple[Outcome, int | None, str | None]] = field(default_factory=dict)
    error: str | None = None

    @property
    def all_sent(self) -> bool:
        """Every object was accepted."""
        return bool(self.outcomes) and all(o[0] is Outcome.SENT for o in self.outcomes.values())


class SendCancel:
    """Cuts short the :func:`send_objects` calls in flight (at shutdown), so a destination
    that hangs does not hold the daemon for its whole timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assocs: set[Any] = set()
        self.cancelled = False

    def track(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN handler of a sending association."""
        with self._lock:
            self._assocs.add(event.assoc)
            cancelled = self.cancelled
        if cancelled:
            _cut(event.assoc)

    def forget(self, assoc: Any) -> None:
        with self._lock:
            self._assocs.discard(assoc)

    def cancel(self) -> int:
        """Abort every association in flight (negotiating or established); returns how
        many."""
        with self._lock:
            self.cancelled = True
            assocs = list(self._assocs)
        for assoc in assocs:
            _cut(assoc)
        return len(assocs)


def _cut(assoc: Any) -> None:
    """A-ABORT an established association; close the connection in any case (a peer that
    never answers the association request is waited for on the socket)."""
    try:
        if assoc.is_established:
            assoc.abort()
            # A C-STORE waiting for its response waits on this queue for the DIMSE timeout:
            # "no response" ends the wait now.
            assoc.dimse.msg_queue.put((None, None))
    except Exception:
        logger.debug("abort failed", exc_info=True)
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def send_objects(
    dest: DestinationSettings,
    items: Sequence[SendItem],
    *,
    calling_ae: str,
    timeout: float,
    cancel: SendCancel | None = None,
) -> SendReport:
    """Send files to ``dest`` over one association with exactly the contexts needed."""
    report = SendReport()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({i.sop_class_uid for i in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if cancel is not None and cancel.cancelled:
        report.error = "not sent: shutting down"
        for item in items:
            report.outcomes[item.result_id] = (Outcome.RETRY, None, report.error)
        return report
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, cancel.track)] if cancel is not None else []
    try:
        assoc = ae.associate(
            dest.host, int(dest.port or 0), ae_title=dest.ae_title, evt_handlers=handlers
        )
    except Exception as exc:  # socket errors surface in several types
        report.error = f"association failed: {type(exc).__name__}"
        for item in items:
            report.outcomes[item.result_id] = (Outcome.RETRY, None, report.error)
        ae.shutdown()
        return report
    try:
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
            report.error = f"association {reason}"
            # A rejection by the peer (wrong AE title) is configuration: retrying may help once
            # the PACS admin fixes it, so it stays retryable until send attempts run out.
            for item in items:
                report.outcomes[item.result_id] = (Outcome.RETRY, None, report.error)
            return report
        for item in items:
            try:
                ds = pydicom.dcmread(item.path)
                status_ds = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for the SOP class
                outcome = Outcome.SKIPPED if item.optional else Outcome.REFUSED
                report.outcomes[item.result_id] = (
                    outcome,
                    None,
                    f"SOP class not accepted: {exc}"[:300],
                )
                continue
            except Exception as exc:
                report.outcomes[item.result_id] = (Outcome.RETRY, None, type(exc).__name__)
                continue
            status = int(status_ds.Status) if status_ds and "Status" in status_ds else None
            outcome = classify_status(status)
            error = (
                None
                if outcome is Outcome.SENT
                else ("no response" if status is None else f"status 0x{status:04X}")
            )
            report.outcomes[item.result_id] = (outcome, status, error)
            if status is None and not assoc.is_established:
                break
        for item in items:
            report.outcomes.setdefault(item.result_id, (Outcome.RETRY, None, "association lost"))
        if assoc.is_established:
            assoc.release()
    finally:
        if cancel is not None:
            cancel.forget(assoc)
        ae.shutdown()
    return report


_VERDICT = {
    stow_client.Verdict.STORED: Outcome.SENT,
    stow_client.Verdict.RETRY: Outcome.RETRY,
    stow_client.Verdict.REFUSED: Outcome.REFUSED,
}


def stow_target(dest: DestinationSettings, settings: Settings) -> stow_client.StowTarget:
    """The STOW-RS target of a DICOMweb destination (files resolved against data_dir)."""

    def resolved(path: Any) -> Any:
        return None if path is None else settings.resolve(path)

    verify: bool | str = str(resolved(dest.ca_file)) if dest.ca_file else dest.verify
    if verify is False:
        import urllib3

        # The operator turned verification off for this destination; said once at start
        # (dicomai.runtime.daemon), not on every request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    creds = credentials(
        dest.auth,
        user=dest.user,
        password_file=resolved(dest.password_file),
        token_file=resolved(dest.token_file),
    )
    return stow_client.StowTarget(
        dest.url, creds, verify, dest.timeout_seconds or settings.sender.timeout_seconds
    )


def send_objects_stow(
    dest: DestinationSettings,
    items: Sequence[SendItem],
    *,
    target: stow_client.StowTarget,
    cancel: SendCancel | None = None,
) -> SendReport:
    """Send files to a DICOMweb destination in one STOW-RS request; outcomes per object."""
    report = SendReport()
    datasets: list[pydicom.Dataset] = []
    by_uid: dict[str, SendItem] = {}
    for item in items:
        try:
            ds = pydicom.dcmread(item.path)
            uid = str(ds.SOPInstanceUID)
        except Exception as exc:  # a result file that cannot be read now may be later
            report.outcomes[item.result_id] = (Outcome.RETRY, None, type(exc).__name__)
            continue
        datasets.append(ds)
        by_uid[uid] = item
    if not datasets:
        report.error = "no readable result file"
        return report
    result = stow_client.store(
        target, datasets, cancelled=(lambda: cancel.cancelled) if cancel else None
    )
    report.error = result.error
    for uid, item in by_uid.items():
        v = result.instances[uid]
        if v.verdict is stow_client.Verdict.CLASS_REFUSED:
            outcome = Outcome.SKIPPED if item.optional else Outcome.REFUSED
        else:
            outcome = _VERDICT[v.verdict]
        error = None if outcome is Outcome.SENT else (v.detail or result.error)
        report.outcomes[item.result_id] = (outcome, v.reason, error)
    if result.auth_problem:
        logger.warning(
            "DICOMweb destination refused our credentials or they cannot be read",
            extra=log_fields(
                "send.auth_problem",
                destination=dest.name,
                http_status=result.http_status,
                error=result.error,
            ),
        )
    return report


def _audit_address(dest: DestinationSettings) -> str:
    if dest.kind == "dicomweb":
        return urlsplit(dest.url).netloc  # host[:port]; a url holds no credentials
    return f"{dest.host}:{dest.port}"


class Sender:
    """Delivers OUTBOX jobs: OUTBOX → SENDING → DONE (or OUTBOX with backoff, or FAILED)."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        clock: Callable[[], datetime],
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.name = name or claimer_name("sender")
        s = settings.sender
        self.policy = RetryPolicy(s.max_attempts, s.retry_base_seconds, s.retry_max_seconds)
        self._stop = threading.Event()
        self._cancel = SendCancel()
        #: Set by the queue when a job of this process becomes outbox, and on stop.
        self._wake = threading.Event()
        queue.subscribe(JobState.OUTBOX, self._wake)
        self._threads: list[threading.Thread] = []
        #: STOW-RS targets by destination settings: one per destination (its secret files
        #: are re-read on change), a new one when a reload changes the destination.
        self._targets: dict[DestinationSettings, stow_client.StowTarget] = {}
        self._targets_lock = threading.Lock()

    def start(self) -> None:
        """Start the claim loops in background threads."""
        for dest in self.settings.destinations:
            if dest.kind == "dicomweb" and not dest.verify and not dest.ca_file:
                logger.warning(
                    "TLS certificates of this destination are not verified",
                    extra=log_fields("send.tls_unverified", destination=dest.name),
                )
            for key, path, secret in dest.files():
                check = secret_file_problem if secret else file_problem
                problem = check(self.settings.resolve(path))
                if problem:  # sends retry until it is fixed; the file is read at each send
                    logger.warning(
                        "destination file unusable",
                        extra=log_fields(
                            "send.file_problem", destination=dest.name, key=key, problem=problem
                        ),
                    )
        for i in range(self.settings.sender.threads):
            t = threading.Thread(target=self._loop, name=f"sender-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def request_stop(self) -> None:
        """Stop claiming new jobs."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        """Stop claiming; give the sends in flight ``grace`` seconds, then abort their
        associations (their jobs go back to the outbox, no attempt counted) and wait for the
        threads to record that (bounded by ``timeout``)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + min(grace, timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            aborted = self._cancel.cancel()
            logger.warning(
                "sends in flight aborted at shutdown",
                extra=log_fields("send.aborted_at_stop", associations=aborted),
            )
        else:
            self._cancel.cancel()
        deadline = time.monotonic() + max(0.0, timeout - min(grace, timeout))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                logger.exception("sender loop error", extra=log_fields("sender.loop_error"))
                worked = False
            if not worked:
                self._wake.wait(self.settings.sender.poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and deliver one job; False when nothing was due."""
        job = self.queue.claim_next(JobState.OUTBOX, JobState.SENDING, self.name, self.clock())
        if job is None:
            return False
        try:
            self.deliver(job.id, job.send_attempts)
        except StateConflict:
            logger.warning("send claim lost", extra=log_fields("send.lost_claim", job_id=job.id))
        return True

    def _record(
        self,
        job_id: int,
        study_uid: str,
        dest: DestinationSettings,
        items: Sequence[SendItem],
        report: SendReport,
    ) -> None:
        now = self.clock()
        for result_id, (outcome, status, error) in report.outcomes.items():
            state = _RESULT_STATE[outcome]
            self.queue.mark_result(result_id, state=state, status_code=status, error=error, now=now)
            metrics.observe_send(dest.name, outcome.value)
        sent = sum(1 for o in report.outcomes.values() if o[0] is Outcome.SENT)
        audit.instances_transferred(
            received=False,
            study_uid=study_uid,
            count=sent if report.all_sent else len(items),
            source_ae=self.settings.sender.ae_title,
            source_address="",
            destination_ae=dest.ae_title,
            destination_address=_audit_address(dest),
            outcome=audit.OUTCOME_SUCCESS if report.all_sent else audit.OUTCOME_SERIOUS_FAILURE,
            reason=report.error,
        )
        event = "send.completed" if report.all_sent else "send.failed"
        logger.log(
            logging.INFO if report.all_sent else logging.WARNING,
            "results sent",
            extra=log_fields(
                event,
                job_id=job_id,
                destination=dest.name,
                objects=len(items),
                sent=sent,
                error=report.error,
            ),
        )

    def _target(self, dest: DestinationSettings) -> stow_client.StowTarget:
        with self._targets_lock:
            target = self._targets.get(dest)
            if target is None:
                target = self._targets[dest] = stow_target(dest, self.settings)
            return target

    def _send(self, dest: DestinationSettings, items: Sequence[SendItem]) -> SendReport:
        """One destination's share of a job, over its kind of transport."""
        if dest.kind == "dicomweb":
            return send_objects_stow(dest, items, target=self._target(dest), cancel=self._cancel)
        return send_objects(
            dest,
            items,
            calling_ae=self.settings.sender.ae_title,
            timeout=dest.timeout_seconds or self.settings.sender.timeout_seconds,
            cancel=self._cancel,
        )

    def deliver(self, job_id: int, send_attempts: int) -> None:
        """Send every pending object of a SENDING job and choose its next state."""
        rows = [r for r in self.queue.results_for(job_id) if r.state == ResultState.PENDING]
        by_dest: dict[str, list[SendItem]] = {}
        configured = {d.name for d in self.settings.destinations}
        outcomes: list[Outcome] = []
        errors: list[str] = []
        for r in rows:
            if r.destination not in configured:  # removed from the configuration (reload)
                self.queue.mark_result(
                    r.id,
                    state=ResultState.FAILED,
                    status_code=None,
                    error="destination no longer configured",
                    now=self.clock(),
                )
                outcomes.append(Outcome.REFUSED)
                errors.append(f"{r.destination}: no longer configured")
                continue
            by_dest.setdefault(r.destination, []).append(
                SendItem(r.id, r.path, r.sop_class_uid, optional=r.kind in OPTIONAL_KINDS)
            )
        job = self.queue.get_job(job_id)
        study_uid = self.queue.study_uid(job)
        started = time.perf_counter()
        # Destinations are served in parallel and recorded as each finishes: a dead one
        # (timing out) delays no other.
        with ThreadPoolExecutor(
            max_workers=max(1, len(by_dest)), thread_name_prefix="send"
        ) as pool:
            futures = {
                pool.submit(self._send, self.settings.destination(name), items): name
                for name, items in by_dest.items()
            }
            for future in as_completed(futures):
                name = futures[future]
                report = future.result()
                self._record(
                    job_id, study_uid, self.settings.destination(name), by_dest[name], report
                )
                outcomes.extend(o[0] for o in report.outcomes.values())
                errors.extend(f"{name}: {o[2]}" for o in report.outcomes.values() if o[2])
        metrics.observe_job("send", job.model or "", time.perf_counter() - started)
        retry = Outcome.RETRY in outcomes
        refused = Outcome.REFUSED in outcomes
        now = self.clock()
        message = "; ".join(dict.fromkeys(errors))[:500] or None
        if retry and self._cancel.cancelled:
            # Cut short by our own shutdown: not the destination's fault, no attempt counted.
            self.queue.transition(
                job_id,
                JobState.SENDING,
                JobState.OUTBOX,
                reason="retry.shutdown",
                now=now,
                not_before=now,
                last_error=message,
                claimed_by=None,
            )
        elif retry:
            attempts = send_attempts + 1
            if attempts >= self.policy.max_attempts:
                self.queue.transition(
                    job_id,
                    JobState.SENDING,
                    JobState.FAILED,
                    reason="send.attempts_exhausted",
                    now=now,
                    send_attempts=attempts,
                    last_error=message,
                )
                return
            self.queue.transition(
                job_id,
                JobState.SENDING,
                JobState.OUTBOX,
                reason="retry.send",
                now=now,
                send_attempts=attempts,
                not_before=now + self.policy.delay(attempts),
                last_error=message,
                claimed_by=None,
            )
        elif refused:
            self.queue.transition(
                job_id,
                JobState.SENDING,
                JobState.FAILED,
                reason="send.refused",
                now=now,
                last_error=message,
            )
        elif (self.queue.get_job(job_id).findings or {}).get("failure_notice"):
            # The analysis failed for good; the notice saying so has been delivered.
            self.queue.transition(
                job_id,
                JobState.SENDING,
                JobState.FAILED,
                reason="failed.notice_sent",
                now=now,
                claimed_by=None,
            )
        else:
            self.queue.transition(
                job_id,
                JobState.SENDING,
                JobState.DONE,
                reason="send.done",
                now=now,
                claimed_by=None,
                last_error=None,
            )
            metrics.observe_job(
                "end_to_end", job.model or "", (now - job.last_instance_at).total_seconds()
            )
