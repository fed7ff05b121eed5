"""A minimal Storage SCP standing in for a PACS: collects what dicomai sends (demo and tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

_VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (C-ECHO)

__all__ = ["LocalPacs", "ReceivedObject"]


@dataclass(frozen=True, slots=True)
class ReceivedObject:
    """One instance the local PACS accepted."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    calling_ae_title: str
    dataset: Dataset = field(repr=False)


class LocalPacs:
    """Storage SCP on loopback that keeps every received dataset in memory (and on disk).

    ``status_fn`` lets a test answer with another status (e.g. 0xA700) per instance;
    ``refuse_sop_classes`` are storage SOP classes it does not accept (no presentation
    context), like a PACS that does not support them.
    """

    def __init__(
        self,
        ae_title: str = "PACS",
        host: str = "127.0.0.1",
        port: int = 0,
        store_dir: Path | None = None,
        status_fn: Callable[[Dataset], int] | None = None,
        refuse_sop_classes: Sequence[str] = (),
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.requested_port = port
        self.store_dir = store_dir
        self.status_fn = status_fn
        self.refuse_sop_classes = frozenset(refuse_sop_classes)
        self.received: list[ReceivedObject] = []
        self._lock = threading.Lock()
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("local PACS not started")
        return int(self._server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.status_fn(ds) if self.status_fn else 0x0000
        if status == 0x0000:
            if self.store_dir is not None:
                self.store_dir.mkdir(parents=True, exist_ok=True)
                ds.save_as(self.store_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            with self._lock:
                self.received.append(
                    ReceivedObject(
                        sop_class_uid=str(ds.SOPClassUID),
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        study_instance_uid=str(ds.StudyInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID),
                        modality=str(ds.get("Modality", "")),
                        calling_ae_title=event.assoc.requestor.ae_title.strip(),
                        dataset=ds,
                    )
                )
        return status

    def start(self) -> LocalPacs:
        """Start listening; returns self."""
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(_VERIFICATION)
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax not in self.refuse_sop_classes:
                ae.add_supported_context(str(cx.abstract_syntax))
        self._server = ae.start_server(
            (self.host, self.requested_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self._ae = ae
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def objects(self, study_uid: str | None = None) -> list[ReceivedObject]:
        """Received objects, optionally of one study."""
        with self._lock:
            return [
                o for o in self.received if study_uid is None or o.study_instance_uid == study_uid
            ]

    def __enter__(self) -> LocalPacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
