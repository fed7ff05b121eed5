"""Serve OHIF's prebuilt viewer beside Orthanc's DICOMweb API, on one loopback origin.

OHIF 3 (``@ohif/app``'s ``dist/``) is a static single-page app. This server:

* serves ``dist/`` and falls back to ``index.html`` for the app's own routes (``/viewer`` ...);
* answers ``/app-config.js`` with our configuration (one DICOMweb data source on this origin,
  errors shown on screen) instead of the shipped one;
* forwards the DICOMweb paths (``/dicom-web/``, ``/wado``) to Orthanc, so the browser sees one
  origin and needs no CORS;
* sends ``Cross-Origin-Opener-Policy``/``Cross-Origin-Embedder-Policy`` on every answer (OHIF's
  decoders use SharedArrayBuffer, which needs a cross-origin isolated page).

Stdlib only. Run it by hand to look at a study in a desktop browser::

    python -m tests.viewers.ohif_server --dist ~/.cache/dicomai/viewers/ohif-3.13.2/dist \
        --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: Paths forwarded to Orthanc (the DicomWeb plugin's "Root" and "WadoRoot").
PROXIED_PREFIXES = ("/dicom-web/", "/dicom-web?", "/wado")

#: Headers that belong to one hop of a connection and are not forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length",
})

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}

EXTRA_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
    ".json": "application/json", ".css": "text/css", ".svg": "image/svg+xml",
    ".woff2": "font/woff2", ".map": "application/json", ".onnx": "application/octet-stream",
}


def app_config(data_source_name: str = "orthanc", workers: int = 2) -> str:
    """The ``app-config.js`` OHIF loads first: ``window.config`` for a same-origin Orthanc."""
    # Roots are built from window.location in the page, so the config does not depend on the
    # port this server happens to get.
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": data_source_name,
        "configuration": {
            "friendlyName": "Orthanc (dicomai viewer tests)",
            "name": data_source_name,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
            "dicomUploadEnabled": False,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": workers,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "showErrorDetails": "always",
        "defaultDataSourceName": data_source_name,
        "dataSources": [source],
    }
    return (
        "// Written by tests/viewers/ohif_server.py for the dicomai viewer tests.\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
        "(function () {\n"
        "  const origin = window.location.origin;\n"
        "  const c = window.config.dataSources[0].configuration;\n"
        "  c.qidoRoot = origin + '/dicom-web';\n"
        "  c.wadoRoot = origin + '/dicom-web';\n"
        "  c.wadoUriRoot = origin + '/wado';\n"
        "  window.config.httpErrorHandler = function (error) {\n"
        "    console.warn('dicomai-tests: HTTP error', error && error.status);\n"
        "  };\n"
        "})();\n"
    )


class _Handler(BaseHTTPRequestHandler):
    server: OhifHTTPServer
    protocol_version = "HTTP/1.1"
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    # -- dispatch ----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._proxy()

    def _dispatch(self, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if self.path.startswith(PROXIED_PREFIXES) or path == "/dicom-web":
            self._proxy()
        elif path == "/app-config.js":
            self._send_bytes(self.server.config_js.encode(), "text/javascript", head,
                             cache="no-store")
        else:
            self._static(path, head)

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log is not None:
            with self.server.log_lock:
                self.server.log.write(f"{self.address_string()} {format % args}\n")
                self.server.log.flush()

    # -- static files ------------------------------------------------------------------
    def _static(self, path: str, head: bool) -> None:
        dist = self.server.dist
        rel = urllib.parse.unquote(path).lstrip("/")
        target = (dist / rel).resolve() if rel else dist / "index.html"
        if not target.is_relative_to(dist):
            self.send_error(404)
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            if "." in Path(rel).name:  # a missing asset, not an app route
                self.send_error(404)
                return
            target = dist / "index.html"  # single-page app: the router reads the path
        ctype = EXTRA_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
        ctype = ctype or "application/octet-stream"
        # index.html names the hashed bundles; those never change for one OHIF version.
        cache = "no-store" if target.name == "index.html" else "public, max-age=86400"
        size = target.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if not head:
            with open(target, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _send_bytes(self, body: bytes, ctype: str, head: bool, cache: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    # -- DICOMweb proxy ----------------------------------------------------------------
    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        # Orthanc builds absolute BulkDataURIs from Host: keep ours so they come back here.
        host, port = self.server.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self.send_error(502, f"Orthanc unreachable: {exc}")
            return
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP and not name.lower().startswith("cross-origin-"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class OhifHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dist: Path, upstream: tuple[str, int],
                 config_js: str, log: Any = None) -> None:
        super().__init__(address, _Handler)
        self.dist = dist.resolve()
        self.upstream = upstream
        self.config_js = config_js
        self.log = log
        self.log_lock = threading.Lock()


class OhifServer:
    """OHIF's ``dist/`` plus a DICOMweb proxy to ``orthanc_url``, in a background thread."""

    def __init__(self, dist: Path, orthanc_url: str, host: str = "127.0.0.1", port: int = 0,
                 log_path: Path | None = None, config_js: str | None = None) -> None:
        dist = Path(dist)
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build in {dist} (run scripts/setup.sh)")
        up = urllib.parse.urlsplit(orthanc_url)
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None
        self.httpd = OhifHTTPServer((host, port), dist, (up.hostname or "127.0.0.1",
                                                         up.port or 80),
                                    config_js or app_config(), self._log)
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def viewer_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"

    def start(self) -> OhifServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True, help="OHIF's dist/ folder")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042",
                        help="Orthanc's HTTP root (its DicomWeb plugin at /dicom-web/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = OhifServer(args.dist, args.orthanc, args.host, args.port)
    print(f"OHIF on {server.url}/ (DICOMweb from {args.orthanc}); Ctrl-C stops", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
