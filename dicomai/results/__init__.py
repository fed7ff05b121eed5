"""DICOM result objects of a model run: Structured Report, Secondary Capture, Basic Text SR.

How they look is specified in ``docs/ai-result-objects.md``; everything here is pure (values in,
datasets out): no I/O, no database, no logging of dataset content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset

from dicomai.inference.findings import Findings, ModelIdentity, Task
from dicomai.results.codes import CodeStatus, LabelCode, table_for
from dicomai.results.common import check_findings, check_sources
from dicomai.results.ko import build_ko
from dicomai.results.regions import locate
from dicomai.results.sc import HEATMAP_CHOICES, Renderer, build_sc_series
from dicomai.results.seg import build_seg
from dicomai.results.sr import SR_CLASSES, build_sr
from dicomai.results.text_sr import build_failure_text_sr, build_text_sr

__all__ = [
    "CodeStatus",
    "LabelCode",
    "ResultOptions",
    "build_failure_notice",
    "build_results",
    "table_for",
]

_SR_SOP_CLASSES = (*SR_CLASSES, "none")
_MAX_IS = 2**31 - 1
_DEFAULT_SC_IMAGES = {Task.CHEST_XRAY: 1, Task.BONE_XRAY: 1, Task.HEAD_CT_ICH: 5}


@dataclass(frozen=True, slots=True)
class ResultOptions:
    """What to emit for one destination.

    Attributes
    ----------
    sr_sop_class
        ``"comprehensive3d"`` (IHE AIR), ``"comprehensive"``, ``"enhanced"`` or ``"none"``.
    emit_sc
        Emit Secondary Capture images of the key images.
    emit_text_sr
        Also emit a Basic Text SR.
    sc_max_images
        Most SC images; ``None``: 1 for X-ray, 5 for CT.
    max_slice_groups
        Most per-slice groups in a CT SR.
    series_number_base
        SR series is base + 1, SC base + 2, text SR and failure notice base + 3, KOS base + 4,
        SEG base + 5.
    emit_ko
        Also emit a Key Object Selection flagging the key and positive images.
    emit_seg
        Emit a Segmentation of the regions where present findings were found, which viewers
        overlay on the source images (none when nothing is present).
    sc_heatmap
        When the SC shows a heat map: ``"positive"`` (a finding at or above its threshold),
        ``"always"`` or ``"never"``.
    """

    sr_sop_class: str = "comprehensive3d"
    emit_sc: bool = True
    emit_text_sr: bool = False
    sc_max_images: int | None = None
    max_slice_groups: int = 50
    series_number_base: int = 9100
    emit_ko: bool = False
    emit_seg: bool = True
    sc_heatmap: str = "positive"

    def __post_init__(self) -> None:
        if self.sr_sop_class not in _SR_SOP_CLASSES:
            raise ValueError(f'Argument "sr_sop_class" must be one of {list(_SR_SOP_CLASSES)}.')
        if self.sc_max_images is not None and self.sc_max_images < 0:
            raise ValueError('Argument "sc_max_images" must not be negative.')
        if self.max_slice_groups < 0:
            raise ValueError('Argument "max_slice_groups" must not be negative.')
        if not 0 <= self.series_number_base <= _MAX_IS - 5:
            raise ValueError('Argument "series_number_base" must be in [0, 2147483642].')
        if self.sc_heatmap not in HEATMAP_CHOICES:
            raise ValueError(f'Argument "sc_heatmap" must be one of {list(HEATMAP_CHOICES)}.')


def build_results(
    sources: Sequence[Dataset],
    findings: Findings,
    options: ResultOptions = ResultOptions(),
    *,
    previous_sr_refs: Sequence[tuple[str, str, str, str]] = (),
    render: Renderer | None = None,
) -> list[Dataset]:
    """Result objects of one model run over one study.

    Parameters
    ----------
    sources
        Every instance the model analysed, all of one study. Headers are enough, except for
        the instances in ``findings.key_image_uids``, which need their pixel data.
    findings
        What the model found.
    options
        What to emit.
    previous_sr_refs
        ``(study_uid, series_uid, sop_class_uid, sop_instance_uid)`` of earlier SRs that this
        one amends (Predecessor Documents Sequence).
    render
        Gives the picture of a key image for its SC instead of
        :func:`~dicomai.results.sc.render_key_image` in this thread.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        The SR (if any), then the Basic Text SR (if asked for), the SC images, the KOS (if
        asked for) and the Segmentations (if any region was found). Equal inputs give equal
        Series and SOP Instance UIDs.

    Raises
    ------
    ValueError
        An argument is invalid (messages name the argument, never a dataset value).
    UnsupportedInput
        A key image has no pixel data or cannot be decoded.
    """
    if not isinstance(options, ResultOptions):
        raise TypeError('Argument "options" must be a ResultOptions.')
    check_sources(sources)
    table = check_findings(sources, findings)
    base = options.series_number_base
    wants_regions = options.sr_sop_class != "none" or options.emit_seg
    regions = locate(sources, findings) if wants_regions else {}
    out: list[Dataset] = []
    if options.sr_sop_class != "none":
        out.append(
            build_sr(
                sources,
                findings,
                sr_class=options.sr_sop_class,
                series_number=base + 1,
                max_slice_groups=options.max_slice_groups,
                previous_sr_refs=previous_sr_refs,
                regions=regions,
            )
        )
    if options.emit_text_sr:
        out.append(build_text_sr(sources, findings, series_number=base + 3))
    if options.emit_sc:
        limit = options.sc_max_images
        if limit is None:
            limit = _DEFAULT_SC_IMAGES[findings.model.task]
        out.extend(
            build_sc_series(
                sources,
                findings,
                series_number=base + 2,
                max_images=limit,
                heatmap=options.sc_heatmap,
                render=render,
            )
        )
    if options.emit_ko:
        out.append(build_ko(sources, findings, series_number=base + 4))
    if options.emit_seg:
        out.extend(build_seg(sources, findings, table, regions, series_number=base + 5))
    return out


def build_failure_notice(
    sources: Sequence[Dataset],
    model: ModelIdentity,
    reason_code: str,
    options: ResultOptions = ResultOptions(),
    *,
    started: datetime | None = None,
) -> Dataset:
    """Basic Text SR "AI analysis could not be completed" for a study.

    Parameters
    ----------
    sources
        Instances the model was to analyse (headers are enough), all of one study.
    model
        The model that was to run.
    reason_code
        Our short reason code (``"unsupported_input"``, ``"inference_failed"``); never
        dataset text.
    options
        Series numbering (the notice takes base + 3).
    started
        When the attempt started (aware); pins ContentDate/Time. ``None``: now.

    Returns
    -------
    pydicom.dataset.Dataset
        The notice, with UIDs keyed on the inputs, the model and ``reason_code``.
    """
    if not isinstance(options, ResultOptions):
        raise TypeError('Argument "options" must be a ResultOptions.')
    return build_failure_text_sr(
        sources,
        model,
        reason_code,
        series_number=options.series_number_base + 3,
        started=started,
    )
