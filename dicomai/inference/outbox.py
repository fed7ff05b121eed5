"""A job's result objects and failure notices written to the spool, as the result rows the
sender delivers.

The worker decides what to write (:mod:`dicomai.jobs.policy` decides the job's next state);
these functions build the DICOM objects per destination flavour, write them atomically under
the job's result folder and return the :class:`~dicomai.db.ResultObject` rows, all PENDING.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from dicomai.config import DestinationSettings, Settings
from dicomai.db import Job, ResultObject
from dicomai.inference.findings import Findings, ModelIdentity, Task
from dicomai.ingest.spool import Spool
from dicomai.jobs.states import ResultState
from dicomai.logs import log_fields
from dicomai.results import ResultOptions, build_failure_notice, build_results
from dicomai.results.sc import Renderer

__all__ = [
    "failure_notice_rows",
    "notice_destinations",
    "options_for",
    "result_kind",
    "result_rows",
]

logger = logging.getLogger(__name__)


def options_for(dest: DestinationSettings) -> ResultOptions:
    """Result flavour a destination asked for."""
    return ResultOptions(
        sr_sop_class=dest.sr_sop_class,
        emit_sc=dest.emit_sc,
        emit_text_sr=dest.emit_text_sr,
        emit_ko=dest.emit_ko,
        emit_seg=dest.emit_seg,
        sc_heatmap=dest.sc_heatmap,
    )


def result_kind(ds: Dataset) -> str:
    """The kind a result row records (``sr``, ``text-sr``, ``ko``, ``seg`` or ``sc``)."""
    modality = str(ds.get("Modality", ""))
    if modality == "SR":
        return "text-sr" if ds.SOPClassUID == pydicom.uid.BasicTextSRStorage else "sr"
    if modality == "KO":
        return "ko"
    if modality == "SEG":
        return "seg"
    return "sc"


def _write(spool: Spool, job_id: int, name: str, ds: Dataset) -> str:
    path = spool.result_path(job_id, name)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    spool.write_atomic(path, buf.getvalue())
    return str(path)


def _row(job_id: int, destination: str, kind: str, ds: Dataset, path: str) -> ResultObject:
    return ResultObject(
        job_id=job_id,
        destination=destination,
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        path=path,
        state=ResultState.PENDING,
    )


def result_rows(
    settings: Settings,
    spool: Spool,
    job: Job,
    datasets: Sequence[Dataset],
    findings: Findings,
    *,
    previous_sr_refs: Sequence[tuple[str, str, str, str]],
    render: Renderer | None,
) -> list[ResultObject]:
    """Build and write the result objects of an analysed job: one set per result flavour,
    one row per destination and object. Destinations removed by a reload are left out."""
    rows: list[ResultObject] = []
    built: dict[ResultOptions, list[tuple[str, Dataset, str]]] = {}
    configured = {d.name for d in settings.destinations}
    for dest_name in job.destinations:
        if dest_name not in configured:  # removed by a configuration reload
            logger.warning(
                "destination no longer configured",
                extra=log_fields("job.destination_missing", job_id=job.id, destination=dest_name),
            )
            continue
        options = options_for(settings.destination(dest_name))
        if options not in built:
            objects = build_results(
                datasets, findings, options, previous_sr_refs=previous_sr_refs, render=render
            )
            files = []
            for index, ds in enumerate(objects):
                kind = result_kind(ds)
                path = _write(spool, job.id, f"{kind}-{index}-{ds.SOPInstanceUID}.dcm", ds)
                files.append((kind, ds, path))
            built[options] = files
        rows.extend(_row(job.id, dest_name, kind, ds, path) for kind, ds, path in built[options])
    return rows


def notice_destinations(settings: Settings, job: Job) -> list[str]:
    """The job's destinations that want a failure notice when its analysis fails for good."""
    if not job.model:
        return []
    return [d for d in job.destinations if settings.destination(d).emit_failure_notice]


def failure_notice_rows(
    settings: Settings,
    spool: Spool,
    job: Job,
    destinations: Sequence[str],
    sources: Sequence[Dataset],
    identity: ModelIdentity | None,
    code: str,
) -> list[ResultObject]:
    """Build and write a failure notice (a text SR saying the analysis could not be completed,
    and why: ``code``) per destination; ``identity`` is the loaded model's, or ``None`` when
    it could not be loaded (the configured name and version are used)."""
    if not destinations or not sources or not job.model:
        return []
    if identity is None:
        spec = settings.models[job.model]
        identity = ModelIdentity(
            name=job.model,
            version=spec.version,
            sha256=spec.sha256 or "unknown",
            task=Task(spec.task),
            architecture="unknown",
            description="model could not be loaded",
            body_part=spec.body_part,
        )
    reason = re.sub(r"[^a-z0-9_]+", "_", code.lower()).strip("_") or "failed"
    out = []
    for dest in destinations:
        notice = build_failure_notice(
            sources, identity, reason, options_for(settings.destination(dest))
        )
        path = _write(spool, job.id, f"notice-{notice.SOPInstanceUID}.dcm", notice)
        out.append(_row(job.id, dest, "notice", notice, path))
    return out
