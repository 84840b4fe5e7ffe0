"""``Expect: 100-continue``: the interim answer is sent when a handler starts reading
the body, not when the request arrives.

aiohttp sends ``100 Continue`` as soon as a route matches, before any middleware has
run, so a client with wrong credentials, or a STOW-RS the spool has no room for, was
invited to send its whole body (curl asks this for every large upload) and refused
only after. Deferred here, every refusal (401, 403, 405, 415, 429, 503) comes instead
of the interim answer, and the client never sends the body (RFC 9110 10.1.1).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http import HttpVersion11

CONTINUE = "100-continue"
CONTINUED = web.RequestKey("continued", bool)


def _expectation(request: web.BaseRequest) -> str | None:
    """What an HTTP/1.1 request's ``Expect`` asks, lower case; None from HTTP/1.0
    (which has no interim answers) or without the header."""
    if request.version != HttpVersion11 or "Expect" not in request.headers:
        return None
    return request.headers["Expect"].strip().lower()


async def defer_continue(request: web.Request) -> None:
    """The routes' expect handler: any other expectation is refused (417), as
    aiohttp's own handler does; ``100-continue`` waits for `send_continue`."""
    if _expectation(request) not in (None, CONTINUE):
        raise web.HTTPExpectationFailed(text=f"unknown expectation: {request.headers['Expect']}\n")


async def send_continue(request: web.Request) -> None:
    """Invite the body, once, if the client waits for the invitation."""
    if _expectation(request) == CONTINUE and not request.get(CONTINUED):
        request[CONTINUED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after it
