"""A static web site on its own loopback port: the "other origin" browser tests load
their pages from, so every request they make to the facade is cross-origin, as it is
for a viewer deployed apart from the gateway.

aiohttp in a thread of the test process: the site serves files from a directory,
pages given as strings (e.g. a viewer's ``app-config.js``) over them, and, as a
single-page application's host must, ``index.html`` for any other path without a dot
in its last segment (a viewer's client-side routes such as ``/viewer``).
"""

from __future__ import annotations

import asyncio
import mimetypes
import threading
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from tests.support.ports import free_port

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


class StaticSite:
    """``StaticSite(root, pages={"/app-config.js": "..."}).start()``; ``.origin`` is its URL."""

    def __init__(self, root: Path | None = None, pages: Mapping[str, str] | None = None, spa: bool = False) -> None:
        self.root = root.resolve() if root is not None else None
        self.pages = dict(pages or {})
        self.spa = spa
        self.port = free_port()
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if request.path in self.pages:
            kind = mimetypes.guess_type(request.path)[0] or "text/html"
            return web.Response(text=self.pages[request.path], content_type=kind, headers={"Cache-Control": "no-store"})
        if self.root is None:
            raise web.HTTPNotFound()
        path = (self.root / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.root):
            raise web.HTTPNotFound()
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            if not self.spa or "." in request.path.rsplit("/", 1)[-1]:
                raise web.HTTPNotFound()
            path = self.root / "index.html"
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": kind})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> StaticSite:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
