"""dicomai.http_auth: secret files re-read on change, headers, server-side check."""

from __future__ import annotations

import base64
import os

import pytest

from dicomai.http_auth import (
    AuthScheme,
    SecretUnavailable,
    check_auth_fields,
    credentials,
    secret_file_problem,
)


def test_basic_header_and_reread_when_the_file_changes(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("first\n")
    creds = credentials("basic", user="dicomai", password_file=pw)
    expected = "Basic " + base64.b64encode(b"dicomai:first").decode()
    assert creds.headers() == {"Authorization": expected}
    # Same size, same mtime second: the inode of an atomic replace still tells.
    new = tmp_path / "pw.new"
    new.write_text("other\n")
    os.replace(new, pw)
    assert creds.authorization() == "Basic " + base64.b64encode(b"dicomai:other").decode()
    # Rewritten in place with another length.
    pw.write_text("third-password\r\n")
    assert creds.authorization() == "Basic " + base64.b64encode(
        b"dicomai:third-password").decode()


def test_bearer_and_none(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc.def")
    assert credentials("bearer", token_file=token).headers() == {
        "Authorization": "Bearer abc.def"}
    none = credentials("none")
    assert none.headers() == {} and none.accepts(None) and none.accepts("Basic xyz")


def test_secrets_never_in_repr(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    creds = credentials("basic", user="u", password_file=pw)
    creds.authorization()
    assert "s3cret" not in repr(creds) and str(pw) in repr(creds)


def test_unreadable_files_raise_naming_the_file_only(tmp_path):
    pw = tmp_path / "pw"
    creds = credentials("basic", user="u", password_file=pw)
    with pytest.raises(SecretUnavailable, match=r"does not exist|cannot be read"):
        creds.headers()
    pw.write_text("\n")
    with pytest.raises(SecretUnavailable, match="is empty"):
        creds.headers()
    pw.write_text("line one\nline two\n")
    with pytest.raises(SecretUnavailable, match="more than one line") as info:
        creds.headers()
    assert "line one" not in str(info.value)
    pw.write_text("ok\n")
    assert creds.headers()


def test_server_side_check(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("pa:ss\n")
    basic = credentials("basic", user="orthanc", password_file=pw)
    good = "Basic " + base64.b64encode(b"orthanc:pa:ss").decode()
    assert basic.accepts(good) and basic.accepts(good.replace("Basic", "basic"))
    for bad in (None, "", "Basic", "Basic !!!", "Bearer pa:ss",
                "Basic " + base64.b64encode(b"orthanc:pa:sS").decode(),
                "Basic " + base64.b64encode(b"other:pa:ss").decode()):
        assert not basic.accepts(bad), bad
    token = tmp_path / "token"
    token.write_text("t0k")
    bearer = credentials("bearer", token_file=token)
    assert bearer.accepts("Bearer t0k") and not bearer.accepts("Bearer t0K")
    assert not bearer.accepts("Basic t0k")


def test_field_shape():
    check_auth_fields("none", user="", password_file=None, token_file=None)
    check_auth_fields("basic", user="u", password_file="p", token_file=None)
    check_auth_fields("bearer", user="", password_file=None, token_file="t")
    with pytest.raises(ValueError, match="needs password_file and user"):
        check_auth_fields("basic", user="", password_file=None, token_file=None)
    with pytest.raises(ValueError, match="needs token_file"):
        check_auth_fields("bearer", user="", password_file=None, token_file=None)
    with pytest.raises(ValueError, match="token_file not used"):
        check_auth_fields("basic", user="u", password_file="p", token_file="t")
    with pytest.raises(ValueError, match="password_file and user not used"):
        check_auth_fields("none", user="u", password_file="p", token_file=None)
    with pytest.raises(ValueError, match="must not contain"):
        check_auth_fields("basic", user="a:b", password_file="p", token_file=None)
    assert AuthScheme("bearer") is AuthScheme.BEARER


def test_secret_file_problem(tmp_path):
    assert "does not exist" in secret_file_problem(tmp_path / "nope")
    assert "not a regular file" in secret_file_problem(tmp_path)
    f = tmp_path / "f"
    f.write_text("")
    assert "is empty" in secret_file_problem(f)
    f.write_text("x\n")
    assert secret_file_problem(f) is None
