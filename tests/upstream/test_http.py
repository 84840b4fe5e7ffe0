"""The HTTP plumbing every HTTP upstream shares (gateway.upstream.http): one mapping of
statuses and transport failures to typed errors, the injected session, and the signer
hook a SigV4 signer will plug into.

No real archive can be told to answer 401, 429 or a stalled body on demand, so these
run against a small aiohttp server scripted per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.config import AuthConfig, UpstreamConfig
from gateway.dicomweb.qido import QidoOptions
from gateway.model.query import make_key
from gateway.model.search import Search
from gateway.spill import SpillArea
from gateway.upstream.base import ANY_SYNTAX, StoreItem
from gateway.upstream.dicomweb import DicomWebUpstream
from gateway.upstream.errors import (
    NotFound,
    NotSupported,
    UpstreamAuthError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.http import HttpClient, SignableRequest
from tests.support.ports import closed_port, free_port

Routes = Callable[[web.Application], None]


async def serving(routes: Routes) -> tuple[web.AppRunner, str]:
    """Start a scripted server; (runner to clean up, DICOMweb root URL)."""
    app = web.Application()
    routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/dicom-web"


def run(routes: Routes, scenario: Callable[[str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        runner, url = await serving(routes)
        try:
            return await scenario(url)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def status_route(request: web.Request) -> web.Response:
    status = int(request.match_info["status"])
    return web.Response(status=status, text="scripted body", headers={"Retry-After": "7"})


@pytest.mark.parametrize(
    ("status", "expected", "message"),
    [
        (401, UpstreamAuthError, "archive refused credentials: HTTP 401"),
        (403, UpstreamAuthError, "archive refused credentials: HTTP 403"),
        (404, NotFound, "not in the archive"),
        (408, UpstreamUnavailable, "archive error: HTTP 408"),
        (429, UpstreamUnavailable, "archive error: HTTP 429"),
        (500, UpstreamUnavailable, "archive error: HTTP 500"),
        (503, UpstreamUnavailable, "archive error: HTTP 503"),
        (424, UpstreamUnavailable, "archive error: HTTP 424"),
        (400, UpstreamRejected, "archive rejected search: HTTP 400"),
        (405, UpstreamRejected, "archive rejected search: HTTP 405"),
        (409, UpstreamRejected, "archive rejected search: HTTP 409"),
    ],
)
def test_status_mapping(status: int, expected: type[Exception], message: str) -> None:
    async def scenario(url: str) -> Exception:
        client = HttpClient(url, timeout=5, connect_timeout=5)
        await client.start()
        try:
            async with client.request("GET", client.url(f"s/{status}"), what="search"):
                pass
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
        finally:
            await client.close()
        raise AssertionError("no error raised")

    exc = run(lambda app: app.router.add_get("/dicom-web/s/{status}", status_route), scenario)
    assert type(exc) is expected
    assert str(exc).startswith(message)
    assert "scripted body" not in str(exc)  # archive bodies may carry PHI
    if isinstance(exc, UpstreamRejected):
        assert exc.status == status
    if isinstance(exc, UpstreamUnavailable):
        assert exc.retry_after == 7


def test_passthrough_statuses_reach_the_caller() -> None:
    async def scenario(url: str) -> tuple[int, bytes]:
        client = HttpClient(url, timeout=5, connect_timeout=5)
        await client.start()
        try:
            async with client.request("GET", client.url("s/503"), what="search", passthrough={503}) as resp:
                return resp.status, await resp.read()
        finally:
            await client.close()

    assert run(lambda app: app.router.add_get("/dicom-web/s/{status}", status_route), scenario) == (503, b"scripted body")


def test_transport_failures_are_typed() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def stalled_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first bytes")
        await asyncio.sleep(2)
        return resp

    def routes(app: web.Application) -> None:
        app.router.add_get("/dicom-web/slow", slow)
        app.router.add_get("/dicom-web/stalled", stalled_body)

    async def failure(client: HttpClient, path: str, timeout: aiohttp.ClientTimeout | None = None, raise_inside: bool = False) -> str:
        try:
            async with client.request("GET", client.url(path), what="retrieve", timeout=timeout) as resp:
                if raise_inside:
                    raise FileNotFoundError(2, "No such file or directory")
                await resp.read()
        except UpstreamUnavailable as exc:
            return str(exc)
        raise AssertionError("no error raised")

    async def scenario(url: str) -> list[str]:
        client = HttpClient(url, timeout=0.3, connect_timeout=5)
        refused = HttpClient(f"http://127.0.0.1:{closed_port()}/dicom-web", timeout=5, connect_timeout=5)
        await client.start()
        await refused.start()
        try:
            return [
                await failure(client, "slow"),
                await failure(client, "stalled", aiohttp.ClientTimeout(total=None, sock_read=0.3)),
                await failure(client, "slow", aiohttp.ClientTimeout(total=5), raise_inside=True),
                await failure(refused, "slow"),
            ]
        finally:
            await client.close()
            await refused.close()

    messages = run(routes, scenario)
    assert messages[0] == "archive timeout after 0.3 s"
    assert messages[1] == "archive silent for 0.3 s"
    assert messages[2] == "local file error: No such file or directory"
    assert messages[3].startswith("archive unreachable: ClientConnector")


def part10() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_signer_runs_once_per_attempt_with_the_url_as_sent(tmp_path: Path) -> None:
    """Every attempt (an Accept fallback, each QIDO page) is signed anew, with the URL
    byte for byte as the server receives it, query string included; the signer's
    headers reach the server on that attempt."""
    received: list[tuple[str, str, str]] = []  # (method, path and query as received, Authorization)
    body = part10()

    async def instance(request: web.Request) -> web.Response:
        received.append((request.method, request.raw_path, request.headers.get("Authorization", "")))
        if "transfer-syntax=*" in request.headers.get("Accept", ""):
            return web.Response(status=406)
        boundary = "b0undary"
        payload = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body + f"\r\n--{boundary}--\r\n".encode()
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def studies(request: web.Request) -> web.Response:
        received.append((request.method, request.raw_path, request.headers.get("Authorization", "")))
        offset = int(request.query["offset"])
        page = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}} for n in range(offset, min(offset + 2, 3))]
        return web.json_response(page, content_type="application/dicom+json")

    def routes(app: web.Application) -> None:
        app.router.add_get("/dicom-web/studies/{s}/series/{se}/instances/{i}", instance)
        app.router.add_get("/dicom-web/studies", studies)

    signed: list[SignableRequest] = []

    async def signer(request: SignableRequest) -> dict[str, str]:
        signed.append(request)
        return {"Authorization": f"Sig {len(signed)}"}

    async def scenario(url: str) -> tuple[str, str]:
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url), QidoOptions(page_size=2, relax_unsafe=False), signer=signer)
        await up.start()
        try:
            first = await up.retrieve_instance("1.2", "1.2.3", "1.2.3.4", SpillArea(tmp_path), 1 << 20, acceptable=ANY_SYNTAX)
            second = await up.retrieve_instance("1.2", "1.2.3", "1.2.3.5", SpillArea(tmp_path), 1 << 20, acceptable=ANY_SYNTAX)
            key = make_key(DataElement(0x00100010, "PN", "DOE^JO HN"))
            search = Search(keys=(key,))
            found = [obj async for obj in up.search_for_studies(search)]
            assert len(found) == 3
            return first.transfer_syntax, second.transfer_syntax
        finally:
            await up.close()

    syntaxes = run(routes, scenario)
    assert syntaxes == (ExplicitVRLittleEndian, ExplicitVRLittleEndian)  # read from the File Meta
    # 406 then bare for the first instance; the second goes straight to bare; then the
    # pages: the first full, then two asked at once (the one past the end may be
    # cancelled before it is sent, once the one before it came back short)
    assert 5 <= len(received) <= len(signed) <= 6
    for method, path, authorization in received:  # each request carries the header signed for it
        request = signed[int(authorization.removeprefix("Sig ")) - 1]
        assert request.method == method == "GET"
        assert request.url.split("127.0.0.1:", 1)[1].split("/", 1)[1] == path.lstrip("/")
        assert request.body.length == 0 and request.body.sha256 is not None
        assert "Accept" in request.headers
    assert len({authorization for _, _, authorization in received}) == len(received)
    assert "00100010=DOE%5EJO%20HN" in received[3][1]
    assert sorted(path.split("offset=")[1].split("&")[0] for _, path, _ in received[3:])[:2] == ["0", "2"]


def test_static_auth_is_a_signer_and_injected_session_stays_open() -> None:
    """upstream.auth's headers go on every request through the signer hook; a session
    passed in is used as is and left open for its owner."""
    seen: list[tuple[str, str]] = []

    async def studies(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization", ""), request.headers.get("X-Session", "")))
        return web.json_response([], content_type="application/dicom+json")

    async def scenario(url: str) -> bool:
        session = aiohttp.ClientSession(headers={"X-Session": "injected"})
        cfg = UpstreamConfig(type="dicomweb", url=url, auth=AuthConfig(type="bearer", token="t0ken"))
        up = DicomWebUpstream(cfg, session=session)
        await up.start()
        health = await up.health()
        await up.close()
        try:
            assert health.reachable and health.detail == "HTTP 200"
            return session.closed
        finally:
            await session.close()

    closed = run(lambda app: app.router.add_get("/dicom-web/studies", studies), scenario)
    assert closed is False
    assert seen == [("Bearer t0ken", "injected")]


def test_delete_maps_statuses_and_learns_it_is_not_supported() -> None:
    requests: list[str] = []

    async def delete(request: web.Request) -> web.Response:
        requests.append(request.path)
        study = request.match_info["study"]
        return web.Response(status={"1.1": 204, "1.2": 404, "1.3": 405}[study])

    async def scenario(url: str) -> list[Any]:
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url))
        await up.start()
        out: list[Any] = [up.capabilities.delete]
        try:
            await up.delete_study("1.1")
            out.append(up.capabilities.delete)
            for study in ("1.2", "1.3", "1.3"):
                try:
                    await up.delete_study(study)
                except (NotFound, NotSupported) as exc:
                    out.append((type(exc).__name__, getattr(exc, "status", None)))
            out.append(up.capabilities.delete)
            return out
        finally:
            await up.close()

    outcome = run(lambda app: app.router.add_delete("/dicom-web/studies/{study}", delete), scenario)
    assert outcome == [None, True, ("NotFound", None), ("NotSupported", 405), ("NotSupported", 0), False]
    assert requests == ["/dicom-web/studies/1.1", "/dicom-web/studies/1.2", "/dicom-web/studies/1.3"]


def test_metadata_and_search_answers_that_are_not_json_are_rejected() -> None:
    async def junk(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy error page</html>", content_type="application/dicom+json")

    async def scenario(url: str) -> list[str]:
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url))
        await up.start()
        out = []
        try:
            for attempt in (up.retrieve_metadata("1.2"), _drain(up.search_for_studies(Search()))):
                try:
                    await attempt
                except UpstreamRejected as exc:
                    out.append(str(exc))
            return out
        finally:
            await up.close()

    def routes(app: web.Application) -> None:
        app.router.add_get("/dicom-web/studies/{s}/metadata", junk)
        app.router.add_get("/dicom-web/studies", junk)

    assert run(routes, scenario) == [
        "archive answered metadata with invalid JSON",
        "archive answered a search with invalid JSON",
    ]


async def _drain(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


def test_body_description_of_a_stow_request(tmp_path: Path) -> None:
    """A streamed STOW-RS body is described by its length, without a hash (it is read
    from the spool files only while being sent)."""
    path = tmp_path / "1.dcm"
    path.write_bytes(part10())
    inst = StoreItem(path, path.stat().st_size, "1.2.3.1", CTImageStorage, "1.2", "1.2.3", ExplicitVRLittleEndian)
    signed: list[SignableRequest] = []

    def signer(request: SignableRequest) -> dict[str, str]:
        signed.append(request)
        return {}

    async def stow(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)  # no Store Instances Response: all stored

    async def scenario(url: str) -> str:
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url), signer=signer)
        await up.start()
        try:
            (outcome,) = await up.store_instances("1.2", [inst])
            return outcome.kind
        finally:
            await up.close()

    assert run(lambda app: app.router.add_post("/dicom-web/studies/{study}", stow), scenario) == "delivered"
    (request,) = signed
    assert request.method == "POST" and request.url.endswith("/dicom-web/studies/1.2")
    assert request.body.sha256 is None and request.body.length == int(request.headers["Content-Length"])
