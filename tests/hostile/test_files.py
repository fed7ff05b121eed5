"""Hostile files (issue 15) sent by a normal client (pynetdicom, the file's bytes as they
are), against one ``dicomai serve`` (conftest.py): each dresses up as a routable chest DX and
costs far more than its size. Each must be refused at the door (a failure status, the bytes
quarantined with a reason code, nothing stored, so nothing decoded), inside
:meth:`Target.attack`, which checks C-ECHO during and after, memory and threads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from tests.hostile.conftest import Target
from tests.hostile.files import (
    Sent,
    deflate_bomb,
    j2k_huge_and_agreeing,
    j2k_larger_than_its_header,
    many_elements,
    send_as_is,
)

pytestmark = pytest.mark.slow


def _refused(target: Target, path: Path) -> Sent:
    """Send ``path``; it must be answered with a failure status, quarantined under that
    status, and not stored."""
    sop_uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    before = len(target.quarantine())
    sent = send_as_is(path, target.port, timeout=60)
    assert sent.status is not None, f"no C-STORE response within {sent.seconds:.0f} s"
    assert sent.refused, f"answered 0x{sent.status:04X} after {sent.seconds:.1f} s"
    assert not target.stored(sop_uid)
    quarantined = target.quarantine()[before:]
    assert [s for _, s in quarantined] == [sent.status], quarantined
    print(f"{path.name}: 0x{sent.status:04X} in {sent.seconds:.2f} s, "
          f"quarantined as {quarantined[0][0]!r}")
    return sent


def _attack(target: Target, build: Callable[[Path], Path], name: str) -> Sent:
    path = build(target.root / f"{name}.dcm")
    with target.attack():
        return _refused(target, path)


def test_deflate_bomb_is_refused(target: Target) -> None:
    """A 2 MB Deflated Explicit VR Little Endian data set inflating to 2.1 GiB: refused and
    quarantined, without inflating it in memory."""
    _attack(target, deflate_bomb, "deflate-bomb")


def test_j2k_larger_than_its_header_is_refused(target: Target) -> None:
    """A 2048 x 2048 JPEG 2000 Lossless image whose codestream SIZ claims 20000 x 20000:
    refused, not decoded."""
    _attack(target, j2k_larger_than_its_header, "j2k-20000")


def test_j2k_huge_and_agreeing_is_refused(target: Target) -> None:
    """32767 x 32767 pixels in header and in an 82-byte JPEG 2000 codestream that agrees:
    refused, not decoded."""
    _attack(target, j2k_huge_and_agreeing, "j2k-32767")


def test_a_million_elements_are_refused_quickly(target: Target) -> None:
    """10^6 tiny elements (10 MB): refused within 10 s."""
    sent = _attack(target, many_elements, "many-elements")
    assert sent.seconds < 10.0, f"answered after {sent.seconds:.1f} s"


def test_a_study_is_analysed_after_the_attacks(target: Target) -> None:
    """After every hostile file: C-ECHO within 5 s and a legitimate study stored and analysed
    (job done, SR and SC at the PACS)."""
    target.echo_seconds()
    target.analyses_a_study(seed=2901)
