"""A DICOMweb proxy in front of a real archive that breaks on cue.

Orthanc cannot be told to fail the second page of a QIDO-RS search while answering
everything else; stopping it would also break the WADO-RS retrievals of what the
first page listed. This proxy forwards every GET (and STOW-RS POST) to the archive
unchanged, except:
with ``fail_searches``, a SearchForInstances page past the first (``offset`` > 0),
answered with ``status`` (with ``fail_every_search``, every page); the first ``fail_retrievals`` single-instance
retrievals (``.../instances/<uid>``), answered with ``status`` too; and the first
``fail_frames`` RetrieveFrames, likewise; with ``slow_series_searches``, every
SearchForSeries is answered that many seconds late, with ``slow_retrievals`` every
single-instance retrieval. It records what it failed, and
every path it was asked (``requests``), so tests can count what reached the archive.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.support.loopbackserver import LoopbackServer

ROOT = "/dicom-web"
_INSTANCE = re.compile(r"/instances/([0-9.]+)$")
_BULK = re.compile(r"/studies/[0-9.]+(/series/[0-9.]+)?$")  # RetrieveStudy / RetrieveSeries
_FORWARDED_HEADERS = ("Content-Type", "Warning")


class ArchiveProxy(LoopbackServer):
    """``ArchiveProxy(orthanc.dicomweb_url, ...).start()``; ``.url`` is the DICOMweb root."""

    def __init__(
        self,
        target: str,
        *,
        fail_searches: bool = False,
        fail_every_search: bool = False,
        status: int = 503,
        fail_retrievals: int = 0,
        fail_frames: int = 0,
        drop_bulk_parts: int = 0,
        slow_series_searches: float = 0.0,
        slow_retrievals: float = 0.0,
    ) -> None:
        self.target = target.rstrip("/")
        self.fail_searches = fail_searches
        self.fail_every_search = fail_every_search
        self.status = status
        self.fail_retrievals = fail_retrievals
        self.failed_searches: list[str] = []
        self.failed_retrievals: list[str] = []  # SOP Instance UIDs
        self.fail_frames = fail_frames  # the first this many RetrieveFrames fail
        self.failed_frames: list[str] = []
        # the first part of this many study/series retrieve answers is left out (an
        # archive whose bulk answer lacks an instance it could not send whole)
        self.drop_bulk_parts = drop_bulk_parts
        self.slow_series_searches = slow_series_searches
        self.slow_retrievals = slow_retrievals
        self.requests: list[str] = []  # every GET's path and query, in order
        self._lock = threading.Lock()
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ROOT}"

    def _verdict(self, path: str) -> bool:
        """Whether to fail this request (and record it)."""
        split = urlsplit(path)
        offset = int(parse_qs(split.query).get("offset", ["0"])[0])
        with self._lock:
            if split.path.endswith("/instances") and (self.fail_every_search or self.fail_searches and offset > 0):
                self.failed_searches.append(path)
                return True
            if "/frames/" in split.path and len(self.failed_frames) < self.fail_frames:
                self.failed_frames.append(path)
                return True
            single = _INSTANCE.search(split.path)
            if single and len(self.failed_retrievals) < self.fail_retrievals:
                self.failed_retrievals.append(single.group(1))
                return True
        return False

    def _maybe_drop_first_part(self, body: bytes) -> bytes:
        """The multipart ``body`` without its first part, while drops are due."""
        with self._lock:
            if self.drop_bulk_parts <= 0:
                return body
            self.drop_bulk_parts -= 1
        delimiter = body[: body.index(b"\r\n")]  # "--boundary", how the body starts
        return body[body.index(b"\r\n" + delimiter, len(delimiter)) + 2 :]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                return

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                with proxy._lock:
                    proxy.requests.append(self.path)
                if proxy.slow_series_searches and urlsplit(self.path).path.endswith("/series"):
                    time.sleep(proxy.slow_series_searches)
                if proxy.slow_retrievals and _INSTANCE.search(urlsplit(self.path).path):
                    time.sleep(proxy.slow_retrievals)
                if proxy._verdict(self.path):
                    self._answer(proxy.status, {"Content-Type": "application/json"}, b'{"error": "scripted failure"}')
                    return
                rest = self.path[len(ROOT) :] if self.path.startswith(ROOT) else self.path
                request = urllib.request.Request(proxy.target + rest, headers={"Accept": self.headers.get("Accept", "*/*")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as resp:
                        status, headers, body = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as exc:
                    status, headers, body = exc.code, exc.headers, exc.read()
                if status == 200 and _BULK.search(urlsplit(self.path).path):
                    body = proxy._maybe_drop_first_part(body)
                self._answer(status, {h: headers[h] for h in _FORWARDED_HEADERS if headers.get(h)}, body)

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                """STOW-RS, forwarded as it came (the gateway delivering to the archive)."""
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rest = self.path[len(ROOT) :] if self.path.startswith(ROOT) else self.path
                headers = {h: self.headers[h] for h in ("Accept", "Content-Type") if self.headers.get(h)}
                request = urllib.request.Request(proxy.target + rest, data=body, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=60) as resp:
                        status, answer, content = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as exc:
                    status, answer, content = exc.code, exc.headers, exc.read()
                self._answer(status, {h: answer[h] for h in _FORWARDED_HEADERS if answer.get(h)}, content)

        return Handler
