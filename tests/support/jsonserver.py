"""The HTTP side every identity provider emulator shares (tests.support.tokenserver,
googleidp, oidc): a threaded server on a free loopback port whose GET and POST answers
are one method each, returning a status, a JSON (or text) body and extra headers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.ports import free_port

Answer = tuple[int, Any, dict[str, str]]  # status, body (str: text as is), headers (Content-Type: JSON's unless given)


class JsonServer:
    """Subclasses answer `get` and/or `post`; headers reach them with lower-case names."""

    content_type = "application/json; charset=utf-8"

    def __init__(self) -> None:
        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Any:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def get(self, path: str, headers: dict[str, str]) -> Answer:
        return 405, {"error": "method not allowed"}, {}

    def post(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        return 405, {"error": "method not allowed"}, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, answer: Answer) -> None:
                status, body, extra = answer
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": server.content_type, **extra}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _headers(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self._send(server.get(self.path, self._headers()))

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._send(server.post(self.path, self._headers(), body))

            def log_message(self, *args: object) -> None:
                pass

        return Handler
