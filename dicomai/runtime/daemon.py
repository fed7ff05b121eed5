"""Composition root: builds the components, starts and stops them, handles signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from dicomai import audit
from dicomai.config import Settings
from dicomai.db import make_engine, make_session_factory
from dicomai.delivery.sender import Sender
from dicomai.ingest.copies import restore_copies
from dicomai.ingest.file_limits import FileLimits
from dicomai.ingest.file_limits import configure as configure_file_limits
from dicomai.ingest.index import InstanceIndex
from dicomai.ingest.scp import Receiver
from dicomai.ingest.spool import Spool
from dicomai.jobs.queue import Queue
from dicomai.logs import log_fields
from dicomai.metrics import MetricsServer, start_metrics_server
from dicomai.migrations import upgrade
from dicomai.runtime.clock import Clock, SystemClock
from dicomai.runtime.leadership import leadership_for
from dicomai.runtime.roles import ROLES
from dicomai.runtime.scheduler import PROCESS_TOKEN, Scheduler, reclaim_dead_local, sweep_orphans

if TYPE_CHECKING:  # imported in start(), after the receiver listens: it brings in torch
    from dicomai.inference.worker import Worker
    from dicomai.ingest.stow_server import DicomWebReceiver
    from dicomai.models.pool import ModelPool

__all__ = ["Daemon"]

logger = logging.getLogger(__name__)


class Daemon:
    """``dicomai serve``: receiver, worker, sender and scheduler threads sharing DB and spool."""

    def __init__(
        self,
        settings: Settings,
        *,
        roles: Iterable[str] = ROLES,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.roles = tuple(r for r in ROLES if r in set(roles))
        self.clock: Clock = clock or SystemClock()
        self.engine = make_engine(
            settings.database_url,
            echo=settings.database.echo,
            busy_timeout=settings.database.busy_timeout_seconds,
        )
        self.sessions = make_session_factory(self.engine)
        self.queue = Queue(self.sessions)
        self.index = InstanceIndex(self.sessions)
        self.spool = Spool(settings.spool_path)
        self.models: ModelPool | None = None
        self.instance_name = f"{socket.gethostname()}:{os.getpid()}"
        self.receiver: Receiver | None = None
        #: The STOW-RS receiver ([dicomweb] enabled), storing through ``receiver``.
        self.dicomweb: DicomWebReceiver | None = None
        self.worker: Worker | None = None
        self.sender: Sender | None = None
        self.scheduler: Scheduler | None = None
        self.metrics_server: MetricsServer | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Create storage, start the receiver, then the rest in data-flow order; models load
        in the background (a PACS forwarding during start-up must not be refused)."""
        self.settings.general.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.engine)
        self.spool.start()
        restore_copies(self.index)  # small instances' files a machine crash may have cut
        a = self.settings.audit
        audit.configure(
            self.settings.resolve(a.file) if a.file and str(a.file) else None,
            syslog=a.syslog,
            syslog_address=a.syslog_address,
            site=self.settings.general.site_name,
        )
        reclaim_dead_local(
            self.queue, socket.gethostname(), self.clock.now(), own_token=PROCESS_TOKEN
        )
        if "scheduler" in self.roles:
            self.index.restart_quiet_clocks(self.clock.now())
            sweep_orphans(self.index, self.spool)
        if "receiver" in self.roles:
            # What one received data set may cost ([receiver] max_inflated_mb etc.).
            configure_file_limits(FileLimits.from_settings(self.settings.receiver))
            self.receiver = Receiver(self.settings.receiver, self.spool, self.index, self.clock.now)
            self.receiver.start()
            logger.info("receiving", extra=log_fields("daemon.receiving", port=self.receiver.port))
            if self.settings.dicomweb.enabled:
                from dicomai.ingest.stow_server import DicomWebReceiver

                self.dicomweb = DicomWebReceiver(self.settings, self.receiver, self.clock.now)
                self.dicomweb.start()
        from dicomai.inference.worker import Worker  # torch: seconds to import
        from dicomai.models.pool import ModelPool

        self.models = ModelPool(self.settings)
        if "worker" in self.roles:
            self.models.start_loading(self.settings.served_models())
            self.worker = Worker(self.settings, self.queue, self.spool, self.models, self.clock)
            self.worker.start()
        if "sender" in self.roles:
            self.sender = Sender(self.settings, self.queue, self.clock)
            self.sender.start()
        if "scheduler" in self.roles:
            self.scheduler = Scheduler(
                self.settings, self.queue, self.index, self.spool, self.clock
            )
            self.scheduler.leadership = leadership_for(self.engine, self.settings.general.data_dir)
            self.scheduler.start()
            if self.receiver is not None:
                self.receiver.on_release = self.scheduler.wake
        if self.settings.metrics.enabled:
            m = self.settings.metrics
            self.metrics_server = start_metrics_server(m.host, m.port, self.settings, self.engine)
        self._beat()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._beat_thread.start()
        logger.info("daemon started", extra=log_fields("daemon.started", roles=list(self.roles)))

    def _beat(self) -> None:
        info: dict[str, Any] = {"pid": os.getpid(), "roles": list(self.roles)}
        if self.receiver is not None and self.receiver.server is not None:
            info["receiver"] = {
                "ae_title": self.settings.receiver.ae_title,
                "host": self.settings.receiver.host,
                "port": self.receiver.port,
                "processes": 1,
            }
            web = self.settings.dicomweb
            info["receiver"]["dicomweb"] = (
                {
                    "enabled": True,
                    "host": web.host,
                    "port": self.dicomweb.port,
                    "path": web.path or "/",
                    "tls": web.tls_cert_file is not None,
                    "auth": web.auth,
                }
                if self.dicomweb is not None
                else {"enabled": False}
            )
        if self.scheduler is not None:
            info["scheduler"] = "active" if self.scheduler.active else "standby"
        models = self.models
        # Not-ready states first: a model that finishes loading in between is then in both
        # (status shows it ready), never in neither.
        not_ready = models.states() if models is not None else {}
        info["models"] = (
            {}
            if models is None
            else {
                name: {
                    "version": b.identity.version,
                    "sha256": b.identity.sha256,
                    "device": b.device,
                    "description": b.identity.description,
                }
                for name, b in models.loaded().items()
            }
        )
        if not_ready:
            info["models_not_ready"] = not_ready  # loading, or failed with its error
        self.queue.beat(f"daemon@{self.instance_name}", "daemon", self.clock.now(), info)

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(5.0):
            try:
                self._beat()
            except Exception:
                logger.warning("heartbeat failed", extra=log_fields("daemon.heartbeat_failed"))

    def reload(self, new: Settings) -> list[str]:
        """Apply a new configuration without dropping associations (SIGHUP).

        Routes, destinations, models (thresholds, files: the new model is loaded before the old
        is released), worker, sender, scheduler, audit and logging levels take effect at once.
        ``[general]``, ``[receiver]``, ``[dicomweb]``, ``[database]`` and ``[spool]`` need a
        restart (the password or token files are read again on change, without one): their old
        values stay, and a warning names them. Returns those sections.
        """
        fixed = ("general", "receiver", "dicomweb", "database", "spool")
        needs_restart = [k for k in fixed if getattr(new, k) != getattr(self.settings, k)]
        merged = new.model_copy(update={k: getattr(self.settings, k) for k in fixed})
        if self.models is not None:
            self.models.reload(merged)
        self.settings = merged
        for component in (self.worker, self.sender, self.scheduler):
            if component is not None:
                component.settings = merged
        logger.info(
            "configuration reloaded",
            extra=log_fields(
                "daemon.reloaded",
                restart_needed=needs_restart,
                routes=len(merged.routes),
                destinations=len(merged.destinations),
            ),
        )
        if needs_restart:
            logger.warning(
                "some changes need a restart",
                extra=log_fields("daemon.reload_partial", sections=needs_restart),
            )
        return needs_restart

    def stop(self, timeout: float = 30.0) -> None:
        """Stop in reverse data-flow order, each step bounded and logged with its duration."""
        # Nothing new is claimed while the receiver drains its associations.
        for component in (self.worker, self.sender):
            if component is not None:
                component.request_stop()
        if self.models is not None:
            self.models.stop(0.0)  # no new model loads; one in progress ends on its own
        steps: list[tuple[str, Callable[[], None]]] = []
        dicomweb, receiver, worker, sender = self.dicomweb, self.receiver, self.worker, self.sender
        if dicomweb is not None:  # first: it stores through the receiver's flusher
            steps.append(("dicomweb", lambda: dicomweb.stop(min(timeout, 10.0))))
        if receiver is not None:
            steps.append(("receiver", lambda: receiver.stop(min(timeout, 10.0))))
        if worker is not None:
            steps.append(("worker", lambda: worker.stop(timeout)))
        if sender is not None:
            steps.append(("sender", lambda: sender.stop(timeout)))
        if self.scheduler is not None:
            steps.append(("scheduler", self.scheduler.stop))
        for name, step in steps:
            t0 = time.perf_counter()
            step()
            logger.info(
                "component stopped",
                extra=log_fields(
                    "daemon.component_stopped",
                    component=name,
                    seconds=round(time.perf_counter() - t0, 3),
                ),
            )
        self.spool.close()  # unused pre-created files of this process
        self._beat_stop.set()
        if self._beat_thread is not None:  # a beat in progress holds a connection
            self._beat_thread.join(10.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        try:
            self.queue.forget_component(f"daemon@{self.instance_name}")
        except Exception:
            logger.warning("could not clear heartbeat", extra=log_fields("daemon.stop_warning"))
        self.engine.dispose()
        logger.info("daemon stopped", extra=log_fields("daemon.stopped"))

    def run(
        self,
        stop_event: threading.Event | None = None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> int:
        """Start, wait for ``stop_event`` (or SIGTERM/SIGINT), stop; returns the exit code.

        SIGHUP calls ``reload_settings`` (re-reading the config file) and :meth:`reload`.
        """
        stop_event = stop_event or threading.Event()
        reload_requested = threading.Event()
        previous: dict[int, Any] = {}

        def handle(signum: int, _frame: FrameType | None) -> None:
            if stop_event.is_set() and signum == signal.SIGINT:
                os._exit(1)  # second Ctrl-C: force
            logger.info("signal received", extra=log_fields("daemon.signal", signal=signum))
            stop_event.set()

        def hangup(_signum: int, _frame: FrameType | None) -> None:
            reload_requested.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handle)
            if reload_settings is not None:
                previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
        try:
            self.start()
            while not stop_event.wait(0.5):
                if reload_requested.is_set() and reload_settings is not None:
                    reload_requested.clear()
                    try:
                        self.reload(reload_settings())
                    except Exception:  # a bad file must not take the daemon down
                        logger.exception(
                            "configuration reload failed; keeping the old one",
                            extra=log_fields("daemon.reload_failed"),
                        )
        finally:
            self.stop(max(10.0, self.settings.worker.heartbeat_seconds * 3))
            for number, old in previous.items():
                signal.signal(number, old)
        if self.worker is not None and self.worker.busy():
            # A model call that does not return in time: leave now rather than let the
            # interpreter tear torch down under it. The job stays RUNNING and is reclaimed
            # at the next start (same host) or after stale_claim_seconds.
            logger.warning(
                "exiting with a model run still in progress", extra=log_fields("daemon.forced_exit")
            )
            logging.shutdown()
            os._exit(0)
        return 0
