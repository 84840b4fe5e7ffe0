"""The life cycle every scripted HTTP server of the tests shares: a stdlib threaded
server on a free loopback port, served from a daemon thread; a subclass gives the
request handler class (`_handler`)."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from tests.support.ports import free_port


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up before its answer was written (the gateway dropping a
        search page it no longer wants) is no error of the test's; others are printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackServer:
    """``Sub().start()`` ... ``stop()``; ``port`` is known from construction on."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = _Server(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ScriptedArchive(LoopbackServer):
    """A scripted DICOMweb archive: ``url`` is its DICOMweb root."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"
