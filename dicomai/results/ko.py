"""Key Object Selection document flagging the images an AI result refers to (optional)."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai.inference.findings import Findings, result_uid
from dicomai.results.common import (
    model_line,
    no_name_warnings,
    stamp_series_time,
    uid_key,
    with_type2_defaults,
)

__all__ = ["build_ko", "flagged_uids"]

#: Slices flagged at most, most suspicious first (KOS for CT stays readable).
MAX_FLAGGED = 20


def flagged_uids(findings: Findings) -> list[str]:
    """Key images, then every image with a label at or above its threshold, best first."""
    scored = []
    for uid, scores in findings.image_scores.items():
        above = [s for label, s in scores.items() if s >= findings.thresholds.get(label, 1.0)]
        if above:
            scored.append((-max(above), uid))
    ordered = list(findings.key_image_uids) + [uid for _, uid in sorted(scored)]
    return list(dict.fromkeys(ordered))[:MAX_FLAGGED]


def build_ko(sources: Sequence[Dataset], findings: Findings, *, series_number: int) -> Dataset:
    """KOS (title 113000 "Of Interest") referencing the key and positive images.

    Parameters
    ----------
    sources
        Every analysed instance (headers are enough), all of one study.
    findings
        The model run; its key images and images above threshold are flagged.
    series_number
        Series Number of the KOS series.

    Returns
    -------
    pydicom.dataset.Dataset
        The KOS document; its UIDs are keyed on the inputs and the model like the SR's.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    flagged = [with_type2_defaults(by_uid[u]) for u in flagged_uids(findings) if u in by_uid]
    if not flagged:
        raise ValueError('Argument "findings" flags no image of "sources".')
    key = uid_key(sources, findings.model)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=findings.model.device_uid,
            name=findings.model.name,
            manufacturer_name=findings.model.vendor,
            model_name=findings.model.name,
        ),
    )
    positive = ", ".join(findings.positive_labels) or "no finding above threshold"
    description = (
        f"AI key images ({positive}); {model_line(findings.model)}; "
        f"{findings.model.description}; not for diagnostic use"
    )[:1024]
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=flagged,
        observer_device_context=observer,
        description=description,
    )
    with no_name_warnings():
        ko = hd.ko.KeyObjectSelectionDocument(
            evidence=flagged,
            content=content,
            series_instance_uid=result_uid("ko-series", **key),
            series_number=series_number,
            sop_instance_uid=result_uid("ko", **key),
            instance_number=1,
            manufacturer=findings.model.vendor,
        )
    ko.SeriesDescription = "AI KEY IMAGES - NOT FOR DIAGNOSTIC USE"
    stamp_series_time(ko, findings.started)
    # Content date/time of the analysis, not "now": rebuilds of a result agree.
    ko.ContentDate, ko.ContentTime = ko.SeriesDate, ko.SeriesTime
    return ko
