"""Sender: results returned to destinations, over C-STORE or STOW-RS, with retries kept in the
database.

A job's pending objects are grouped by destination; each destination gets one association
(:func:`~dicomai.delivery.dimse.send_objects`) or one STOW-RS request
(:func:`~dicomai.delivery.stow.send_objects_stow`), all destinations of a job in parallel.
Whatever the kind, each object ends sent, retried, refused or skipped; the job's next state,
backoff and give-up follow from those outcomes alone (:func:`dicomai.jobs.policy.after_send`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any
from urllib.parse import urlsplit

from dicomai import audit, metrics
from dicomai.config import DestinationSettings, Settings
from dicomai.db import Job
from dicomai.delivery import stow_client
from dicomai.delivery.dimse import send_objects
from dicomai.delivery.stow import send_objects_stow
from dicomai.delivery.transport import SendCancel, SendItem, SendReport
from dicomai.errors import StateConflict
from dicomai.http_auth import credentials, file_problem, secret_file_problem
from dicomai.jobs import reads
from dicomai.jobs.policy import (
    RetryPolicy,
    SendOutcome,
    after_send,
    is_failure_notice,
    result_state,
)
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState, ResultState
from dicomai.logs import log_fields
from dicomai.runtime.clock import Clock
from dicomai.runtime.scheduler import claimer_name

__all__ = ["OPTIONAL_KINDS", "Sender", "stow_target"]

logger = logging.getLogger(__name__)


#: Result kinds a destination may decline (its SOP class not accepted) without failing the job.
OPTIONAL_KINDS = frozenset({"seg"})


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
        clock: Clock,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.name = name or claimer_name("sender")
        s = settings.sender
        self.retry = RetryPolicy(s.max_attempts, s.retry_base_seconds, s.retry_max_seconds)
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
        deadline = self.clock.monotonic() + min(grace, timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - self.clock.monotonic()))
        if any(t.is_alive() for t in self._threads):
            aborted = self._cancel.cancel()
            logger.warning(
                "sends in flight aborted at shutdown",
                extra=log_fields("send.aborted_at_stop", associations=aborted),
            )
        else:
            self._cancel.cancel()
        deadline = self.clock.monotonic() + max(0.0, timeout - min(grace, timeout))
        for t in self._threads:
            t.join(max(0.0, deadline - self.clock.monotonic()))
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
        job = self.queue.claim_next(JobState.OUTBOX, JobState.SENDING, self.name, self.clock.now())
        if job is None:
            return False
        try:
            self.deliver(job)
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
        now = self.clock.now()
        for result_id, (outcome, status, error) in report.outcomes.items():
            state = result_state(outcome)
            self.queue.mark_result(result_id, state=state, status_code=status, error=error, now=now)
            metrics.observe_send(dest.name, outcome.value)
        sent = sum(1 for o in report.outcomes.values() if o[0] is SendOutcome.SENT)
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

    def deliver(self, job: Job) -> None:
        """Send every pending object of a claimed (SENDING) job; the policy chooses its next
        state from the objects' outcomes."""
        job_id = job.id
        pending = reads.results_for(self.queue.sessions, job_id)
        rows = [r for r in pending if r.state == ResultState.PENDING]
        by_dest: dict[str, list[SendItem]] = {}
        configured = {d.name for d in self.settings.destinations}
        outcomes: list[SendOutcome] = []
        errors: list[str] = []
        for r in rows:
            if r.destination not in configured:  # removed from the configuration (reload)
                self.queue.mark_result(
                    r.id,
                    state=result_state(SendOutcome.REFUSED),
                    status_code=None,
                    error="destination no longer configured",
                    now=self.clock.now(),
                )
                outcomes.append(SendOutcome.REFUSED)
                errors.append(f"{r.destination}: no longer configured")
                continue
            by_dest.setdefault(r.destination, []).append(
                SendItem(r.id, r.path, r.sop_class_uid, optional=r.kind in OPTIONAL_KINDS)
            )
        study_uid = reads.study_uid(self.queue.sessions, job.study_id)
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
        t = after_send(
            outcomes,
            send_attempts=job.send_attempts,
            retry=self.retry,
            # Cut short by our own shutdown: not the destination's fault, no attempt counted.
            shutting_down=self._cancel.cancelled,
            # The analysis failed for good; the notice saying so has been delivered.
            failure_notice=is_failure_notice(job.findings),
            error="; ".join(dict.fromkeys(errors))[:500] or None,
        )
        now = self.clock.now()
        self.queue.apply(job_id, t, now=now)
        if t.dst is JobState.DONE:
            metrics.observe_job(
                "end_to_end", job.model or "", (now - job.last_instance_at).total_seconds()
            )
