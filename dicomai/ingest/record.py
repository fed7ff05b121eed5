"""An instance's header read once at the door: every value the worker could not read is
refused now (converted up front), and the fields the index needs are extracted.

Both steps are cached per process: within a series most header elements repeat byte for byte,
so an element whose bytes (VR, encoding and character set alike) converted before is not
converted again, and plain header fields are served from their converted values. The caches
are bounded and never hold patient module elements (group 0010) or person names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from dicomai.ingest.index import InstanceRecord
from dicomai.ingest.spool import safe_uid

__all__ = ["convert_all", "extract_record", "getter", "never_failing_vrs", "text_value"]

#: VRs whose conversion depends on nothing but the element's bytes, the dataset's encoding
#: and its character set (no sequences, no ambiguous VRs, no bulk data). Person names (PN)
#: are left out: no name is kept beyond the instance it came with.
_PLAIN_VRS = frozenset(
    {
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "SH",
        "SL",
        "SS",
        "ST",
        "TM",
        "UC",
        "UI",
        "UL",
        "UR",
        "US",
        "UT",
    }
)
_MAX_CACHED_VALUE = 256
_CACHE_MAX = 4096


def _cache_key(tag: int, raw: RawDataElement, encoding: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What a plain raw element's conversion depends on, or ``None`` (not cacheable).

    Patient module elements (group 0010: names, IDs, birth date) are never cached either, so
    no patient's identity outlives the handling of their own instances in this process."""
    if tag >> 16 == 0x0010:
        return None
    value = raw.value
    if not isinstance(value, bytes) or len(value) > _MAX_CACHED_VALUE:
        return None
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    return (tag, vr, value, encoding) if vr in _PLAIN_VRS else None


def _encoding(ds: Dataset, transfer_syntax: str) -> tuple[Any, ...]:
    raw = ds.get_item(0x00080005) if 0x00080005 in ds else None
    charset = getattr(raw, "value", None)
    return (str(transfer_syntax), charset if isinstance(charset, bytes) else str(charset))


#: Converted values of plain raw elements, by what their conversion depends on: the header
#: fields of a series repeat byte for byte from instance to instance. Values are only read.
_VALUES: dict[tuple[Any, ...], Any] = {}


_tag: Callable[[str], int | None] = functools.cache(tag_for_keyword)


def getter(ds: Dataset, transfer_syntax: str) -> Callable[[str], Any]:
    """``ds.get(keyword)`` served from :data:`_VALUES` where the raw bytes were seen before."""
    encoding = _encoding(ds, transfer_syntax)

    def get(keyword: str) -> Any:
        tag = _tag(keyword)
        if tag is None:
            return None
        raw = ds.get_item(tag)
        if raw is None:
            return None
        key = _cache_key(tag, raw, encoding) if isinstance(raw, RawDataElement) else None
        if key is None:
            return ds[tag].value
        try:
            return _VALUES[key]
        except KeyError:
            value = ds[tag].value
            if len(_VALUES) >= _CACHE_MAX:
                _VALUES.clear()
            _VALUES[key] = value
            return value

    return get


def text_value(get: Callable[[str], Any], keyword: str, limit: int = 128) -> str:
    value = get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)[:limit]
    return str(value).strip()[:limit]


def _int(get: Callable[[str], Any], keyword: str) -> int | None:
    try:
        value = get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def extract_record(ds: Dataset, transfer_syntax: str, sop_class_uid: str) -> InstanceRecord:
    """Header fields routing needs; raises ``ValueError`` when a required UID is missing."""
    get = getter(ds, transfer_syntax)
    study = safe_uid(get("StudyInstanceUID"))
    series = safe_uid(get("SeriesInstanceUID"))
    sop = safe_uid(get("SOPInstanceUID"))
    slice_position: float | None = None
    ipp = get("ImagePositionPatient")
    iop = get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        row, col = [float(v) for v in iop[:3]], [float(v) for v in iop[3:]]
        normal = (
            row[1] * col[2] - row[2] * col[1],
            row[2] * col[0] - row[0] * col[2],
            row[0] * col[1] - row[1] * col[0],
        )
        slice_position = sum(float(p) * n for p, n in zip(ipp, normal, strict=True))
    return InstanceRecord(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid=str(sop_class_uid),
        transfer_syntax_uid=str(transfer_syntax),
        modality=text_value(get, "Modality", 16).upper(),
        body_part=text_value(get, "BodyPartExamined", 64).upper(),
        series_number=_int(get, "SeriesNumber"),
        instance_number=_int(get, "InstanceNumber"),
        image_type=text_value(get, "ImageType").upper(),
        view_position=text_value(get, "ViewPosition", 16).upper(),
        study_description=text_value(get, "StudyDescription"),
        series_description=text_value(get, "SeriesDescription"),
        orientation="\\".join(f"{float(v):.4f}" for v in iop) if iop is not None else "",
        slice_position=slice_position,
        rows=_int(get, "Rows"),
        columns=_int(get, "Columns"),
        acquisition_number=_int(get, "AcquisitionNumber"),
        images_in_acquisition=_int(get, "ImagesInAcquisition"),
    )


#: Raw elements (by what their conversion depends on) that converted without error before;
#: converting the same bytes again gives the same result, so it is skipped. Bounded.
_CONVERTED: set[tuple[Any, ...]] = set()


#: VRs whose conversion cannot fail under pydicom's default reading validation (``WARN``):
#: text is decoded with undecodable bytes replaced and an unknown character set ignored (both
#: warn), and dates and times stay strings (``datetime_conversion`` off). About two thirds of
#: a typical header; ``tests/unit/test_record_path.py`` feeds them garbage.
_TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)
_DATE_VRS = frozenset({"DA", "DT", "TM"})


def never_failing_vrs() -> frozenset[str]:
    """The VRs :func:`convert_all` may skip under pydicom's current settings."""
    if pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE:
        return frozenset()
    return _TEXT_VRS if pydicom_config.datetime_conversion else _TEXT_VRS | _DATE_VRS


def convert_all(ds: Dataset, transfer_syntax: str) -> None:
    """Convert every top-level element now (raises on a value dicomai could not read later:
    an unknown VR, a bad length, a broken sequence, a number that is not one), not in the
    worker.

    Text, dates and times are skipped (:func:`never_failing_vrs`: converting them cannot
    fail). Most other header elements of a series repeat byte for byte from instance to
    instance; an element whose bytes (VR, encoding and character set alike) converted before
    is not converted again (pydicom's conversion is the costly part of the check).
    """
    encoding = _encoding(ds, transfer_syntax)
    skip = never_failing_vrs()
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue
        vr = raw.VR
        if vr is None:  # implicit VR: the dictionary's (a private or unknown tag: convert)
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = None
        if vr in skip:
            continue
        key = _cache_key(tag, raw, encoding)
        if key is not None and key in _CONVERTED:
            continue
        ds[tag]  # converting it is the check
        if key is not None:
            if len(_CONVERTED) >= _CACHE_MAX:
                _CONVERTED.clear()
            _CONVERTED.add(key)
