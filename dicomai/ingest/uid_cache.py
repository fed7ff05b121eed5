"""Standard DICOM UIDs converted once, for pynetdicom's association set-up.

An A-ASSOCIATE-RQ from DCMTK's ``storescu`` proposes about 120 presentation contexts with
three transfer syntaxes each. pynetdicom converts and validates every UID in it several
times over (``set_uid``, its UI validator, ``PresentationContext.add_transfer_syntax``):
about 1,750 pydicom ``UID`` constructions per association, each with a regular-expression
check. They were most of the time between an A-ASSOCIATE-RQ and our A-ASSOCIATE-AC, which
delays every association of a sender that opens one per study or per image (the measurements
are in the README, "Performance").

:func:`install` wraps those three functions so that a UID of the DICOM standard (root
``1.2.840.10008.``: a bounded set, whatever peers send) is converted and checked once per
process and its ``UID`` object reused. Anything else (private UIDs, bytes that are not ASCII,
empty or invalid values) takes pynetdicom's own path, errors and warnings included, and a
standard UID is remembered only once pynetdicom's own path accepted it without a warning.
Shared ``UID`` objects are safe: they are immutable strings, and only private transfer
syntaxes carry per-object state (``set_private_encoding``), which are never cached.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom.presentation import PresentationContext

from dicomai.ingest import pynetdicom_seam as seam

__all__ = ["install", "installed"]

_DICOM_ROOT = "1.2.840.10008."
#: Modules that imported ``set_uid`` by name (``from pynetdicom.utils import set_uid``).
_SET_UID_MODULES = (
    "pynetdicom.utils",
    "pynetdicom.pdu_items",
    "pynetdicom.pdu_primitives",
    "pynetdicom.presentation",
    "pynetdicom.dimse_primitives",
    "pynetdicom.ae",
)

#: Standard UIDs accepted by pynetdicom without a warning, by their str or bytes value.
_ACCEPTED: dict[str | bytes, UID] = {}
_installed = False


def _standard(value: object) -> bool:
    if isinstance(value, str):
        return value.startswith(_DICOM_ROOT) and len(value) <= 64
    if isinstance(value, bytes):
        return value.startswith(_DICOM_ROOT.encode()) and len(value) <= 65
    return False


def _clean(uid: object) -> bool:
    """Whether pynetdicom has nothing to say about ``uid`` (valid, conformant, standard)."""
    return isinstance(uid, UID) and uid.is_valid and not uid.is_private


def _wrap_set_uid(original: Callable[..., UID | None]) -> Callable[..., UID | None]:
    def set_uid(
        value: Any,
        name: str,
        allow_empty: bool = True,
        allow_none: bool = True,
        validate: bool = True,
    ) -> UID | None:
        if _standard(value):
            found = _ACCEPTED.get(value)
            if found is not None:
                return found
            uid = original(value, name, allow_empty, allow_none, validate)
            if validate and _clean(uid):
                _ACCEPTED[value] = uid  # type: ignore[assignment]  # _clean(uid): not None
            return uid
        return original(value, name, allow_empty, allow_none, validate)

    set_uid.__wrapped__ = original  # type: ignore[attr-defined]  # as functools.wraps sets it
    return set_uid


def _wrap_validator(
    original: Callable[[Any], tuple[bool, str]],
) -> Callable[[Any], tuple[bool, str]]:
    def validate_ui(value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and value in _ACCEPTED:
            return True, ""
        return original(value)

    validate_ui.__wrapped__ = original  # type: ignore[attr-defined]  # as functools.wraps
    return validate_ui


def _wrap_add_transfer_syntax(
    original: Callable[[PresentationContext, Any], None],
) -> Callable[[PresentationContext, Any], None]:
    def add_transfer_syntax(self: PresentationContext, syntax: Any) -> None:
        if _standard(syntax):
            uid = _ACCEPTED.get(syntax)
            if uid is not None and uid.is_transfer_syntax:
                # what pynetdicom does for a valid, conformant transfer syntax: append once
                syntaxes = seam.transfer_syntax_list(self)
                if uid not in syntaxes:
                    syntaxes.append(uid)
                return
        original(self, syntax)

    add_transfer_syntax.__wrapped__ = original  # type: ignore[attr-defined]  # as wraps does
    return add_transfer_syntax


def install() -> bool:
    """Wrap pynetdicom's UID conversions (once per process; the receiver checks the
    pynetdicom version first, :func:`dicomai.ingest.pynetdicom_seam.check`)."""
    global _installed
    if _installed:
        return True
    utils = importlib.import_module("pynetdicom.utils")
    original_set_uid = utils.set_uid
    set_uid = _wrap_set_uid(original_set_uid)
    for name in _SET_UID_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "set_uid", None) is original_set_uid:
            setattr(module, "set_uid", set_uid)  # noqa: B010  # a module attribute mypy cannot see
    seam.set_ui_validator(_wrap_validator(seam.ui_validator()))
    # mypy: a plain function is assigned where a method was declared (it works as one).
    PresentationContext.add_transfer_syntax = _wrap_add_transfer_syntax(  # type: ignore[method-assign,assignment]
        PresentationContext.add_transfer_syntax
    )
    _installed = True
    return True


def installed() -> bool:
    """Whether :func:`install` wrapped pynetdicom in this process."""
    return _installed
