"""A DICOMweb archive that never stops answering, for tests of the gateway's bounds
on what it reads from its archive.

Orthanc answers within reason; a broken archive, or a proxy or captive portal in
front of one, need not. Every GET is answered by ``mode``:

- ``endless-json``: 200 and a JSON array that never ends (searches, metadata);
- ``gzip-bomb``: 200, ``Content-Encoding: gzip``, 64 KiB on the wire that inflate to
  64 MiB of spaces (Content-Length is the compressed size);
- ``endless-frame``: 200, multipart/related, one frame part that never ends (a
  metadata request gets one 512 x 512 16-bit instance, so the frame is asked for);
- ``endless-error``: 500 with an error page that never ends;
- ``deep-json``: 200 and 400 KB of JSON arrays nested 200,000 deep (no bound on size
  is passed, but Python's parser gives up on the nesting).

A body without Content-Length ends with the connection (HTTP/1.0 style); the
server writes until the client closes it. ``sent`` counts the bytes written. A POST
(a token request, a STOW-RS) is read whole, then answered as a GET.
"""

from __future__ import annotations

import functools
import gzip
import json
from http.server import BaseHTTPRequestHandler

from tests.support.loopbackserver import ScriptedArchive

MODES = ("endless-json", "gzip-bomb", "endless-frame", "endless-error", "deep-json")
_OBJECT = b'{"0020000D":{"vr":"UI","Value":["1.2.3.4"]},"00080061":{"vr":"CS","Value":["CT"]}},'
_CHUNK = _OBJECT * 4096  # ~350 KB
_INSTANCE = {
    "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]},
    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
    "00080018": {"vr": "UI", "Value": ["1.2.3.4.5.6"]},
    "0020000D": {"vr": "UI", "Value": ["1.2.3.4"]},
    "0020000E": {"vr": "UI", "Value": ["1.2.3.4.5"]},
    "00280002": {"vr": "US", "Value": [1]},
    "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
    "00280010": {"vr": "US", "Value": [512]},
    "00280011": {"vr": "US", "Value": [512]},
    "00280100": {"vr": "US", "Value": [16]},
    "00280101": {"vr": "US", "Value": [16]},
    "00280102": {"vr": "US", "Value": [15]},
    "00280103": {"vr": "US", "Value": [0]},
}


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b" " * (64 << 20), compresslevel=9)


class FloodArchive(ScriptedArchive):
    """``FloodArchive("endless-json").start()``; ``.url`` is the DICOMweb root."""

    def __init__(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.sent = 0
        super().__init__()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                pass

            def _endless(self, first: bytes) -> None:
                try:
                    self.wfile.write(first)
                    while True:
                        self.wfile.write(_CHUNK)
                        archive.sent += len(_CHUNK)
                except OSError:  # the gateway closed the connection: what is wanted
                    pass

            def _whole(self, body: bytes, **headers: str) -> None:
                """A 200 JSON answer of ``body``, with its Content-Length and ``headers``."""
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                    archive.sent += len(body)
                except OSError:
                    pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                mode = archive.mode
                if mode == "deep-json":
                    self._whole(b"[" * 200_000 + b"]" * 200_000)
                elif mode == "gzip-bomb":
                    self._whole(_bomb(), Content_Encoding="gzip")
                elif mode == "endless-frame" and self.path.split("?")[0].endswith("/metadata"):
                    self._whole(json.dumps([_INSTANCE]).encode())
                else:
                    self._endless_answer(mode)

            def _endless_answer(self, mode: str) -> None:
                if mode == "endless-frame":
                    self.send_response(200)
                    self.send_header("Content-Type", 'multipart/related; type="application/octet-stream"; boundary=B')
                    self.end_headers()
                    self._endless(
                        b"--B\r\nContent-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\n"
                    )
                    return
                self.send_response(500 if mode == "endless-error" else 200)
                self.send_header("Content-Type", "text/html" if mode == "endless-error" else "application/dicom+json")
                self.end_headers()
                self._endless(b"<html>" if mode == "endless-error" else b"[")

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                length = int(self.headers.get("Content-Length") or 0)
                while length > 0:  # the whole request first, as an archive does
                    length -= len(self.rfile.read(min(length, 1 << 20)) or b"x" * length)
                self.do_GET()

        return Handler
