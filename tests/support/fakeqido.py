"""A scripted QIDO-RS server for failure and cancellation tests.

Orthanc cannot be told to answer 401, 503 or to stall, nor does it say how many
pages it served; this server can. It answers ``GET .../studies`` with ``count``
synthetic studies paged by ``limit``/``offset``, optionally slowly, or with a fixed
HTTP status (with ``body`` and reason phrase ``reason`` if given, e.g. an error page
that echoes what it was sent), or not at all (``hang``), and records every request
path. A ``POST`` (STOW-RS) gets the fixed status and body too, or an empty 200.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.support.ports import free_port


class FakeQido:
    """``FakeQido(count=500, page_delay=0.2).start()``; ``.url`` is the DICOMweb root."""

    def __init__(
        self,
        count: int = 100,
        page_delay: float = 0.0,
        status: int = 200,
        hang: bool = False,
        body: bytes = b'{"error": "scripted failure"}',
        reason: str | None = None,
    ) -> None:
        self.count = count
        self.page_delay = page_delay
        self.status = status
        self.hang = hang
        self.body = body
        self.reason = reason
        self.requests: list[str] = []
        self.port = free_port()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> FakeQido:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def study(self, n: int) -> dict[str, object]:
        return {
            "0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.10.1137.99.{n}"]},
            "00100020": {"vr": "LO", "Value": ["FAKE"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "FAKE^PATIENT"}]},
            "00080020": {"vr": "DA", "Value": ["20240101"]},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                return

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                fake.requests.append(self.path)
                if fake.hang:
                    fake._stop.wait(60)
                    return
                if fake.status != 200:
                    self.scripted(fake.status, fake.body)
                    return
                query = parse_qs(urlsplit(self.path).query)
                limit = int(query.get("limit", ["1000"])[0])
                offset = int(query.get("offset", ["0"])[0])
                time.sleep(fake.page_delay)
                page = [fake.study(n) for n in range(offset, min(offset + limit, fake.count))]
                body = json.dumps(page).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                fake.requests.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.scripted(fake.status, fake.body if fake.status != 200 else b"")

            def scripted(self, status: int, body: bytes) -> None:
                self.send_response(status, fake.reason)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
