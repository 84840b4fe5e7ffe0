"""A scripted QIDO-RS server for failure and cancellation tests.

Orthanc cannot be told to answer 401, 503 or to stall, nor does it say how many
pages it served; this server can. It answers ``GET .../studies`` with ``count``
synthetic studies paged by ``limit``/``offset``, optionally slowly, or with a fixed
HTTP status (with ``body`` and reason phrase ``reason`` if given, e.g. an error page
that echoes what it was sent), or not at all (``hang``), and records every request
path. A ``POST`` (STOW-RS) gets the fixed status and body too, or an empty 200.

Two archive caps, each announced with PS3.18's ``Warning: 299 ...: There are N
additional results that can be requested`` (which Orthanc never sends):
``page_cap`` cuts each page to that many results, the rest being reachable with
``offset``; ``reach`` serves only the first ``reach`` results of a search, the page
that ends there carrying the Warning and every later page coming back empty.

Azure's DICOM service, as its conformance statement describes it: ``max_limit``
refuses a ``limit`` above it with 400 (Azure takes 1 to 200), and ``arrivals`` studies
are stored, newest first, once the first page has been served, so later offsets shift
and repeat results of earlier pages; an offset past the end gets 204.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.support.loopbackserver import ScriptedArchive


class FakeQido(ScriptedArchive):
    """``FakeQido(count=500, page_delay=0.2).start()``; ``.url`` is the DICOMweb root."""

    def __init__(
        self,
        count: int = 100,
        page_delay: float = 0.0,
        status: int = 200,
        hang: bool = False,
        body: bytes = b'{"error": "scripted failure"}',
        reason: str | None = None,
        page_cap: int | None = None,
        reach: int | None = None,
        max_limit: int | None = None,
        arrivals: int = 0,
        extra: dict[str, object] | None = None,
    ) -> None:
        """``extra``: DICOM JSON attributes added to every study (malformed ones too)."""
        self.count = count
        self.extra = extra or {}
        self.max_limit = max_limit
        self.arrivals = arrivals
        self.order = list(range(count))  # study numbers, newest first
        self.page_cap = page_cap
        self.reach = reach
        self.page_delay = page_delay
        self.status = status
        self.hang = hang
        self.body = body
        self.reason = reason
        self.requests: list[str] = []
        self._stop = threading.Event()
        super().__init__()

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    def study(self, n: int) -> dict[str, object]:
        return {
            "0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.10.1137.99.{n}"]},
            "00100020": {"vr": "LO", "Value": ["FAKE"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "FAKE^PATIENT"}]},
            "00080020": {"vr": "DA", "Value": ["20240101"]},
            **self.extra,
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
                asked = int(query.get("limit", ["1000"])[0])
                offset = int(query.get("offset", ["0"])[0])
                if fake.max_limit is not None and not 1 <= asked <= fake.max_limit:
                    self.scripted(400, f'{{"error": "limit must be between 1 and {fake.max_limit}"}}'.encode())
                    return
                time.sleep(fake.page_delay)
                limit = min(asked, fake.page_cap or asked)
                total = len(fake.order)
                available = min(total, fake.reach if fake.reach is not None else total)
                page = [fake.study(n) for n in fake.order[offset:min(offset + limit, available)]]
                if fake.arrivals:
                    fake.order[:0] = range(fake.count, fake.count + fake.arrivals)
                    fake.count += fake.arrivals
                    fake.arrivals = 0
                if not page and fake.max_limit is not None:  # Azure: an offset past the end
                    self.send_response(204)
                    self.end_headers()
                    return
                body = json.dumps(page).encode()
                self.send_response(200)
                left = total - offset - len(page)
                if page and left > 0 and (len(page) < asked or offset + len(page) >= available):  # a cap: say so
                    self.send_header("Warning", f'299 fakeqido: "There are {left} additional results that can be requested"')
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
