"""Results sent over STOW-RS (PS3.18 10.5): one request per job and destination.

The request is built and sent by ``dicomweb-client`` (``DICOMwebClient.store_instances``) over
a ``requests`` session this module configures: credentials from :mod:`dicomai.http_auth`
(read for every request, so a rotated file counts at once), TLS verification, timeouts, and no
retries of the library's own, since the sender's queue retries with its backoff.

The answer is read per instance (:func:`read_store_response`), from the HTTP status and the
Store Instances Response (Referenced SOP Sequence, Failed SOP Sequence):

* listed in the Referenced SOP Sequence, with or without a Warning Reason: stored;
* a Failure Reason saying the archive already holds the instance (0x0111 Duplicate SOP
  Instance; 45070, Azure's DICOM service's "already stored"): stored, not an error;
* 0xA7xx (out of resources): retried; 0x0122 (SOP class not supported): refused, or skipped for
  an optional object (the SEG), as a DIMSE destination refusing the SOP class is;
* any other Failure Reason: refused;
* not listed: stored after a 200 (all stored), retried after anything else.

A request that gets no answer (connection refused or reset, timeout, TLS failure), a 5xx, 401
or 403 (logged as an authentication problem), 404, 405, 408, 413 or 429 is retried as a whole;
another 4xx without a Store Instances Response is refused.

One request per job rather than per object: the archive sees a job's results together, and a
destination that is down costs one timeout per job, not one per object. The objects are a
job's results (SR, SC, SEG, KO, text SR: small), so the body is built in memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from dicomai.http_auth import HttpCredentials, SecretUnavailable
from dicomai.logs import log_fields

__all__ = [
    "ALREADY_HELD_REASONS",
    "InstanceVerdict",
    "StowResult",
    "StowTarget",
    "Verdict",
    "probe",
    "read_store_response",
    "store",
]

logger = logging.getLogger(__name__)
# dicomweb-client retries through ``retrying``, which logs each failed attempt with its
# traceback at WARNING; its retries are off here and each failure is logged once, by us.
logging.getLogger("retrying").setLevel(logging.ERROR)

#: Failure Reasons meaning "the archive already holds this instance": 0x0111 is PS3.7's
#: Duplicate SOP Instance; 45070 (0xB00E) is what Azure's DICOM service answers for a SOP
#: Instance UID it has stored before.
ALREADY_HELD_REASONS = frozenset({0x0111, 45070})
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: HTTP statuses after which the whole request is tried again later.
RETRY_STATUSES = frozenset({401, 403, 404, 405, 408, 413, 429})
JSON_TYPES = ("application/dicom+json", "application/json")


class Verdict(StrEnum):
    """What became of one instance of a request."""

    STORED = "stored"
    RETRY = "retry"
    REFUSED = "refused"
    #: Refused because the archive does not take its SOP class (0x0122): an optional object
    #: (SEG) is skipped, any other refused.
    CLASS_REFUSED = "class_refused"


@dataclass(frozen=True, slots=True)
class InstanceVerdict:
    """One instance's verdict, with the response's reason code and a short text."""

    verdict: Verdict
    reason: int | None = None
    detail: str | None = None


@dataclass(slots=True)
class StowResult:
    """A request's outcome: HTTP status (None: no answer), per SOP Instance UID, and the
    request-level error if any."""

    http_status: int | None
    instances: dict[str, InstanceVerdict] = field(default_factory=dict)
    error: str | None = None
    #: The archive refused our credentials (401/403) or a secret file could not be read.
    auth_problem: bool = False


@dataclass(frozen=True, slots=True)
class StowTarget:
    """Where and how to send: the service root, credentials, TLS and timeout."""

    url: str
    credentials: HttpCredentials = field(default_factory=HttpCredentials)
    #: requests' ``verify``: True (system CAs), False (no verification) or a CA bundle path.
    verify: bool | str = True
    timeout: float = 30.0


class _Authorization(requests.auth.AuthBase):
    """Adds the Authorization header, read from the credentials at each request."""

    def __init__(self, credentials: HttpCredentials) -> None:
        self.credentials = credentials

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.credentials.headers())
        return request


def _hex(code: int | None) -> str:
    return "-" if code is None else f"0x{code:04X}"


def _reason(item: pydicom.Dataset, keyword: str) -> int | None:
    value = item.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _failure_verdict(reason: int | None) -> InstanceVerdict:
    if reason in ALREADY_HELD_REASONS:
        return InstanceVerdict(Verdict.STORED, reason, f"already held ({_hex(reason)})")
    if reason is not None and (reason & 0xFF00) == 0xA700:
        return InstanceVerdict(Verdict.RETRY, reason, f"out of resources ({_hex(reason)})")
    if reason == SOP_CLASS_NOT_SUPPORTED:
        return InstanceVerdict(
            Verdict.CLASS_REFUSED, reason, f"SOP class not supported ({_hex(reason)})"
        )
    return InstanceVerdict(Verdict.REFUSED, reason, f"failure reason {_hex(reason)}")


def read_store_response(
    http_status: int, response: pydicom.Dataset | None, sent: Sequence[str]
) -> StowResult:
    """Each sent SOP Instance UID's verdict from the HTTP status and the Store Instances
    Response data set (None when the answer had none, or none we could read)."""
    result = StowResult(http_status)
    listed: dict[str, InstanceVerdict] = {}
    if response is not None:
        for item in response.get("ReferencedSOPSequence") or []:
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            warning = _reason(item, "WarningReason")
            listed[uid] = InstanceVerdict(
                Verdict.STORED, warning, None if warning is None else f"warning {_hex(warning)}"
            )
        for item in response.get("FailedSOPSequence") or []:
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            listed[uid] = _failure_verdict(_reason(item, "FailureReason"))
    has_answer = any(uid in listed for uid in sent)
    if 200 <= http_status < 300 and http_status != 202:
        fallback = InstanceVerdict(Verdict.STORED)
    elif http_status == 202 or http_status == 409 or has_answer:
        fallback = InstanceVerdict(Verdict.RETRY, None, "not in the archive's answer")
        if not has_answer:
            result.error = f"HTTP {http_status} without a Store Instances Response we can read"
    elif http_status >= 500 or http_status in RETRY_STATUSES:
        result.error = f"HTTP {http_status}"
        if http_status in (401, 403):
            result.auth_problem = True
            result.error = (
                f"HTTP {http_status}: the archive refused our credentials "
                f"(check auth, user, password_file or token_file)"
            )
        fallback = InstanceVerdict(Verdict.RETRY, None, result.error)
    else:
        fallback = InstanceVerdict(Verdict.REFUSED, None, f"HTTP {http_status}")
        result.error = f"HTTP {http_status}"
    for uid in sent:
        result.instances[uid] = listed.get(uid, fallback)
    return result


class _VerifyingAdapter(requests.adapters.HTTPAdapter):
    """Sends with the destination's TLS verification whatever the environment says:
    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's ``verify``
    (a CA bundle or False set for this destination would be ignored)."""

    def __init__(self, verify: bool | str) -> None:
        super().__init__()
        self._verify = verify

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs["verify"] = self._verify
        return super().send(request, *args, **kwargs)


def _session(target: StowTarget) -> requests.Session:
    session = requests.Session()
    session.verify = target.verify
    adapter = _VerifyingAdapter(target.verify)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.auth = _Authorization(target.credentials)
    session.headers["Accept"] = JSON_TYPES[0]
    return session


def probe(target: StowTarget) -> tuple[int | None, str | None]:
    """A QIDO-RS search for one study (``GET {url}/studies?limit=1``) with the target's
    credentials and TLS settings, as ``dicomai echo`` does for a DICOMweb destination: the HTTP
    status (None: no answer) and an error text (None after a 2xx)."""
    with _session(target) as session:
        client = DICOMwebClient(
            target.url, session=session, timeout=(target.timeout, target.timeout)
        )
        client.set_http_retry_params(retry=False)
        try:
            client.search_for_studies(limit=1)
        except SecretUnavailable as exc:
            return None, str(exc)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            auth = " (credentials refused)" if status in (401, 403) else ""
            return status, f"HTTP {status}{auth}"
        except requests.Timeout:
            return None, f"no answer within {target.timeout:g} s"
        except requests.RequestException as exc:
            return None, f"connection failed: {type(exc).__name__}"
        except ValueError as exc:  # an answer that is not DICOM JSON
            return 200, f"unexpected answer: {exc}"[:200]
    return 200, None


def _response_dataset(response: requests.Response) -> pydicom.Dataset | None:
    """The Store Instances Response of a DICOM JSON answer (None if there is none)."""
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES or not response.content:
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # a malformed answer is read as no answer; the HTTP status still counts
        return None


def _all(
    sent: Sequence[str], verdict: Verdict, error: str, *, auth_problem: bool = False
) -> StowResult:
    """The same verdict for every instance of a request that got no answer we can read."""
    return StowResult(
        None, {uid: InstanceVerdict(verdict, None, error) for uid in sent}, error, auth_problem
    )


def _post(target: StowTarget, datasets: Sequence[pydicom.Dataset]) -> StowResult:
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    captured: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        captured.append(response)
        return response

    with _session(target) as session:
        client = DICOMwebClient(
            target.url, session=session, callback=keep, timeout=(target.timeout, target.timeout)
        )
        client.set_http_retry_params(retry=False)
        parsed: pydicom.Dataset | None = None
        try:
            parsed = client.store_instances(list(datasets))
        except SecretUnavailable as exc:
            return _all(sent, Verdict.RETRY, str(exc), auth_problem=True)
        except requests.HTTPError:
            pass  # 4xx/5xx: read from the captured answer below
        except requests.Timeout:
            return _all(sent, Verdict.RETRY, f"no answer within {target.timeout:g} s")
        except requests.RequestException as exc:
            return _all(sent, Verdict.RETRY, f"connection failed: {type(exc).__name__}")
        except ValueError:
            pass  # an answer in a media type the library does not read: ours below
        if not captured:
            return _all(sent, Verdict.RETRY, "no answer")
        response = captured[-1]
        dataset = _response_dataset(response)
        if dataset is None and parsed is not None and len(parsed):
            dataset = parsed  # DICOM XML, read by the library (success statuses only)
        return read_store_response(response.status_code, dataset, sent)


def store(
    target: StowTarget,
    datasets: Sequence[pydicom.Dataset],
    *,
    cancelled: Callable[[], bool] | None = None,
    poll: float = 0.1,
) -> StowResult:
    """POST ``datasets`` to ``{url}/studies`` in one request and read the answer.

    With ``cancelled``, the request runs in a helper thread and the call returns as soon as
    ``cancelled()`` turns true (at shutdown), every instance to be retried: the request may
    still complete, and sending the same instances again is harmless.
    """
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    if cancelled is None:
        return _post(target, datasets)
    if cancelled():
        return _all(sent, Verdict.RETRY, "not sent: shutting down")
    box: list[StowResult] = []

    def run() -> None:
        try:
            box.append(_post(target, datasets))
        except Exception as exc:  # reported as the request's error, the job retried
            logger.exception(
                "STOW-RS request failed",
                extra=log_fields("send.stow_error", error=type(exc).__name__),
            )
            box.append(_all(sent, Verdict.RETRY, f"error: {type(exc).__name__}"))

    worker = threading.Thread(target=run, name="stow", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll)
        if worker.is_alive() and cancelled():
            return _all(sent, Verdict.RETRY, "cut short: shutting down")
    return box[0]
