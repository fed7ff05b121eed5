"""HTTP credentials kept in files, for both DICOMweb directions.

A configuration names a scheme (``auth = "none" | "basic" | "bearer"``) and files, never the
secret itself: ``basic`` takes ``user`` and ``password_file``, ``bearer`` takes ``token_file``.
Each file is read again when it changes (its mtime, size or inode), so a password or token is
rotated by replacing the file, without a restart or reload.

* A client asks :meth:`HttpCredentials.headers` for the ``Authorization`` header of each request.
* A server asks :meth:`HttpCredentials.accepts` whether a request's ``Authorization`` header
  matches (compared in constant time).
* :func:`check_auth_fields` is the shape check a settings model calls; :func:`secret_file_problem`
  (and :func:`file_problem` for a CA bundle or certificate) the check ``dicomai check-config``
  makes.

Nothing here logs or formats a secret: errors name the file, never its content.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

__all__ = [
    "AuthScheme",
    "HttpCredentials",
    "SecretFile",
    "SecretUnavailable",
    "check_auth_fields",
    "credentials",
    "file_problem",
    "secret_file_problem",
]


class AuthScheme(StrEnum):
    """How an HTTP peer proves who it is."""

    NONE = "none"
    BASIC = "basic"  # RFC 7617: user and password
    BEARER = "bearer"  # RFC 6750: an opaque token


class SecretUnavailable(OSError):
    """A secret file cannot be read (missing, unreadable, empty); the message names the file."""


def check_auth_fields(
    scheme: str, *, user: str, password_file: Path | None, token_file: Path | None
) -> None:
    """Raise ValueError when the fields do not fit ``scheme`` (a settings model's check).

    ``basic`` needs ``user`` (without ``:``, RFC 7617) and ``password_file``; ``bearer`` needs
    ``token_file``; a field the scheme does not use is an error, so that a forgotten
    ``auth = "basic"`` does not leave a configured password unused.
    """
    wanted = {
        AuthScheme.NONE: set(),
        AuthScheme.BASIC: {"user", "password_file"},
        AuthScheme.BEARER: {"token_file"},
    }[AuthScheme(scheme)]
    given = {
        name
        for name, value in (
            ("user", user),
            ("password_file", password_file),
            ("token_file", token_file),
        )
        if value
    }
    if missing := sorted(wanted - given):
        raise ValueError(f'auth = "{scheme}" needs {" and ".join(missing)}')
    if extra := sorted(given - wanted):
        raise ValueError(f'{" and ".join(extra)} not used with auth = "{scheme}"')
    if ":" in user:
        raise ValueError("user must not contain ':' (HTTP basic authentication)")


def file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being read as a file (a CA bundle, a certificate), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be examined: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    return None


def secret_file_problem(path: Path) -> str | None:
    """What keeps ``path`` from serving as a secret file, or None when it can be read.

    Checked by ``dicomai check-config``; at send or receive time the same faults raise
    :class:`SecretUnavailable` instead.
    """
    if problem := file_problem(path):
        return problem
    try:
        _read_secret(path)
    except SecretUnavailable as exc:
        return str(exc)
    return None


def _read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SecretUnavailable(f"secret file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise SecretUnavailable(f"secret file {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise SecretUnavailable(f"secret file {path} cannot be read: {exc.strerror}") from exc
    # One line: the line end a text editor or `echo` adds is not part of the secret.
    secret = text[:-1] if text.endswith("\n") else text
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        raise SecretUnavailable(f"secret file {path} is empty")
    if "\n" in secret or "\r" in secret:
        raise SecretUnavailable(f"secret file {path} holds more than one line")
    return secret


class SecretFile:
    """A secret in a file, read again whenever the file's mtime, size or inode changes.

    Thread-safe; a stat per use, a read only after a change. Its repr names the path only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._value = ""

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"

    def read(self) -> str:
        """The current secret.

        Raises
        ------
        SecretUnavailable
            The file is missing, unreadable, empty or holds more than one line.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise SecretUnavailable(f"secret file {self.path} does not exist") from exc
        except OSError as exc:
            raise SecretUnavailable(
                f"secret file {self.path} cannot be read: {exc.strerror}"
            ) from exc
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        with self._lock:
            if key != self._key:
                self._value = _read_secret(self.path)
                self._key = key
            return self._value


@dataclass(frozen=True, slots=True)
class HttpCredentials:
    """One configured ``auth``: what a client sends and what a server accepts."""

    scheme: AuthScheme = AuthScheme.NONE
    user: str = ""
    secret: SecretFile | None = field(default=None)  # password (basic) or token (bearer)

    def __repr__(self) -> str:
        where = f", {self.secret!r}" if self.secret is not None else ""
        return f"HttpCredentials({self.scheme.value!r}{where})"

    def authorization(self) -> str | None:
        """The ``Authorization`` header value, None for ``auth = "none"``.

        Raises
        ------
        SecretUnavailable
            The password or token file cannot be read.
        """
        if self.scheme is AuthScheme.NONE or self.secret is None:
            return None
        secret = self.secret.read()
        if self.scheme is AuthScheme.BASIC:
            pair = f"{self.user}:{secret}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return f"Bearer {secret}"

    def headers(self) -> dict[str, str]:
        """Headers to add to a request (empty for ``auth = "none"``)."""
        value = self.authorization()
        return {"Authorization": value} if value else {}

    def accepts(self, header: str | None) -> bool:
        """Whether a request's ``Authorization`` header value carries these credentials.

        Always true for ``auth = "none"``. The comparison takes the same time wherever the
        values differ. A secret file that cannot be read accepts nobody (and raises
        :class:`SecretUnavailable`, for the server to answer 503 rather than 401).
        """
        if self.scheme is AuthScheme.NONE or self.secret is None:
            return True
        expected = self.secret.read()
        scheme, _, value = (header or "").strip().partition(" ")
        value = value.strip()
        if self.scheme is AuthScheme.BEARER:
            return scheme.lower() == "bearer" and hmac.compare_digest(
                value.encode(), expected.encode()
            )
        if scheme.lower() != "basic":
            return False
        try:
            pair = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        user_ok = hmac.compare_digest(pair.partition(b":")[0], self.user.encode())
        secret_ok = hmac.compare_digest(pair.partition(b":")[2], expected.encode())
        return user_ok and secret_ok


def credentials(
    scheme: str,
    *,
    user: str = "",
    password_file: Path | None = None,
    token_file: Path | None = None,
) -> HttpCredentials:
    """The credentials of a configured ``auth`` (paths as given; resolve them first)."""
    kind = AuthScheme(scheme)
    if kind is AuthScheme.BASIC and password_file is not None:
        return HttpCredentials(kind, user, SecretFile(Path(password_file)))
    if kind is AuthScheme.BEARER and token_file is not None:
        return HttpCredentials(kind, "", SecretFile(Path(token_file)))
    return HttpCredentials()
