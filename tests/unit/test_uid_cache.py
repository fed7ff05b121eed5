"""dicomai.ingest.uid_cache: standard UIDs of association requests are converted once, and
pynetdicom behaves as before (same results, same errors and warnings)."""

from __future__ import annotations

import logging

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, build_context, evt, utils
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomai.ingest import uid_cache


@pytest.fixture(autouse=True)
def installed() -> None:
    assert uid_cache.install() is True
    assert uid_cache.installed()


def test_standard_uid_converted_once_and_equal_to_pynetdicom_s() -> None:
    from pynetdicom import pdu_items

    original = utils.set_uid.__wrapped__  # type: ignore[attr-defined]
    for value in (CTImageStorage, str(CTImageStorage), str(CTImageStorage).encode()):
        first = pdu_items.set_uid(value, "abstract_syntax_name")
        again = pdu_items.set_uid(value, "abstract_syntax_name")
        assert first == original(value, "abstract_syntax_name") == CTImageStorage
        assert isinstance(first, UID)
        assert again is first  # from the cache: no second conversion


def test_private_uid_takes_pynetdicom_s_own_path() -> None:
    a = utils.set_uid("1.2.3.4.5", "x")
    b = utils.set_uid("1.2.3.4.5", "x")
    assert a == b == "1.2.3.4.5" and a is not b
    assert "1.2.3.4.5" not in uid_cache._ACCEPTED


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_non_conformant_and_invalid_values_take_pynetdicom_s_path(caplog) -> None:
    from pynetdicom import _config

    odd = "1.2.840.10008.1.2.x"  # standard root, not conformant: accepted with a warning
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pynetdicom"):
            assert utils.set_uid(odd, "transfer_syntax_name") == odd
        assert "Non-conformant 'transfer_syntax_name'" in caplog.text  # every time
    assert odd not in uid_cache._ACCEPTED
    long = "1.2.840.10008." + "1" * 60  # longer than 64: refused
    with pytest.raises(ValueError, match="must not exceed 64"):
        utils.set_uid(long, "transfer_syntax_name")
    assert _config.VALIDATORS["UI"](long)[0] is False
    # add_transfer_syntax: the same outcome as pynetdicom's own method.
    cx, plain = PresentationContext(), PresentationContext()
    cx.add_transfer_syntax(odd)
    PresentationContext.add_transfer_syntax.__wrapped__(plain, odd)  # type: ignore[attr-defined]
    assert cx.transfer_syntax == plain.transfer_syntax == [odd]
    with pytest.raises(ValueError):
        cx.add_transfer_syntax(long)
    # A standard UID that is not a transfer syntax is added with pynetdicom's warning.
    cx = PresentationContext()
    utils.set_uid(str(CTImageStorage), "abstract_syntax_name")  # now cached
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        cx.add_transfer_syntax(str(CTImageStorage))
    assert cx.transfer_syntax == [CTImageStorage]
    assert "not a transfer syntax" in caplog.text


def test_add_transfer_syntax_appends_once_in_order() -> None:
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        utils.set_uid(str(ts), "transfer_syntax_name")  # cached
    cx = PresentationContext()
    cx.abstract_syntax = CTImageStorage
    for ts in (str(ImplicitVRLittleEndian), ExplicitVRLittleEndian.encode(),
               ImplicitVRLittleEndian, str(JPEG2000Lossless), None):
        cx.add_transfer_syntax(ts)
    assert cx.transfer_syntax == [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                  JPEG2000Lossless]
    assert all(type(ts) is UID for ts in cx.transfer_syntax)


def test_real_association_negotiates_every_proposed_context() -> None:
    """120 storage contexts with three transfer syntaxes each (as DCMTK storescu proposes)
    against a pynetdicom acceptor, twice: the second time from the cache, same outcome."""
    scp = AE(ae_title="SCP")
    scp.supported_contexts = StoragePresentationContexts[:120]
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    port = server.server_address[1]
    try:
        outcomes = []
        for _ in range(2):
            scu = AE(ae_title="SCU")
            scu.requested_contexts = [
                build_context(cx.abstract_syntax, [ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian, JPEG2000Lossless])
                for cx in StoragePresentationContexts[:120]]
            assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            outcomes.append(sorted((cx.abstract_syntax, cx.transfer_syntax[0])
                                   for cx in assoc.accepted_contexts))
            assoc.release()
        assert len(outcomes[0]) == 120
        assert outcomes[0] == outcomes[1]
        assert str(CTImageStorage) in uid_cache._ACCEPTED
    finally:
        server.shutdown()
