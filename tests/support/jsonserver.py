"""The HTTP side every identity provider emulator shares (tests.support.tokenserver,
googleidp, oidc): a threaded server on a free loopback port whose GET and POST answers
are one method each, returning a status, a JSON (or text) body and extra headers."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.loopbackserver import LoopbackServer

Answer = tuple[int, Any, dict[str, str]]  # status, body (str: text as is), headers (Content-Type: JSON's unless given)


class JsonServer(LoopbackServer):
    """Subclasses answer `get` and/or `post`; headers reach them with lower-case names."""

    content_type = "application/json; charset=utf-8"

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
