"""The studies each open transfer delivers (an association, or a STOW-RS request of
:mod:`dicomai.ingest.stow_server`), and the early-close mark of a released transfer's studies.

A study arriving partly over DIMSE and partly over DICOMweb is one study: both kinds of
transfer are counted here, and a study another open transfer is still delivering is not
marked released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from dicomai.ingest.index import InstanceIndex
from dicomai.logs import log_fields

__all__ = ["Transfers"]

logger = logging.getLogger(__name__)


class Transfers:
    """Open transfers and their instances per study.

    Parameters
    ----------
    index
        Where studies are marked released.
    clock
        The time of the mark.
    after_release
        Called after studies were marked (the daemon wakes the scheduler with it, so an
        early close need not wait for the next tick); its errors are logged.
    """

    def __init__(
        self,
        index: InstanceIndex,
        clock: Callable[[], datetime],
        after_release: Callable[[], None],
    ) -> None:
        self._index = index
        self._clock = clock
        self._after_release = after_release
        self._lock = threading.Lock()
        self._open: dict[int, dict[str, int]] = {}

    def open(self, key: int) -> None:
        """Start counting the studies transfer ``key`` delivers: :meth:`tally` counts its
        instances, :meth:`close` ends it. Keys must be unique among open transfers."""
        with self._lock:
            self._open.setdefault(key, {})

    def tally(self, key: int, study_uid: str) -> None:
        """One more instance of ``study_uid`` stored by transfer ``key``."""
        with self._lock:
            per_study = self._open.setdefault(key, {})
            per_study[study_uid] = per_study.get(study_uid, 0) + 1

    def close(self, key: int, *, released: bool) -> dict[str, int] | None:
        """End transfer ``key``: its instances per study (``None`` when it was closed
        already: the first caller pops), and, when ``released`` (an association released,
        a STOW-RS request answered), the early-close mark of its studies that no other open
        transfer is still delivering."""
        with self._lock:
            per_study = self._open.pop(key, None)
            # A study another open transfer is still delivering is not released yet.
            still_open = {uid for other in self._open.values() for uid in other}
        if per_study and released:
            self._released([uid for uid in per_study if uid not in still_open])
        return per_study

    def _released(self, study_uids: list[str]) -> None:
        if not study_uids:
            return
        try:
            self._index.mark_released(study_uids, self._clock())
        except Exception:  # the studies then close after their quiet period instead
            logger.exception(
                "could not mark studies released",
                extra=log_fields("association.release_mark_failed"),
            )
            return
        try:
            self._after_release()
        except Exception:
            logger.exception(
                "release callback failed", extra=log_fields("association.release_mark_failed")
            )
