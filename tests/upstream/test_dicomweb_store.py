"""How DicomWebUpstream turns STOW-RS answers into per-instance outcomes.

Orthanc (used by the integration suites) cannot be made to answer 503, 429 or a
partial 409 on demand, so these cases use a small aiohttp server that speaks only
the HTTP status codes and PS3.18 response bodies under test.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway.config import UpstreamConfig
from gateway.upstream.base import StoreItem
from gateway.upstream.dicomweb import DicomWebUpstream, retry_after_seconds
from tests.support.ports import closed_port, free_port


def inst(tmp_path: Path, n: int) -> StoreItem:
    path = tmp_path / f"{n}.dcm"
    path.write_bytes(bytes([n]) * (1000 + n))
    return StoreItem(path, 1000 + n, f"1.2.3.{n}", "1.2", "1.2.3", "1.2.3.9", "1.2.840.10008.1.2.1")


def failed_json(pairs: dict[str, int], ok: list[str]) -> str:
    return json.dumps(
        {
            "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in ok]},
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}}
                    for u, r in pairs.items()
                ],
            },
        }
    )


def run_against(
    handler: Callable[[web.Request], web.Response | Awaitable[web.Response]], instances: list[StoreItem]
):
    seen: list[bytes] = []

    async def wrapped(request: web.Request) -> web.Response:
        seen.append(await request.read())  # aiohttp keeps it: a handler may read() again
        answer = handler(request)
        return await answer if inspect.isawaitable(answer) else answer

    async def main():
        app = web.Application()
        app.router.add_post("/dicom-web/studies/{study}", wrapped)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web"))
        await up.start()
        try:
            return await up.store_instances("1.2.3", instances), seen
        finally:
            await up.close()
            await runner.cleanup()

    return asyncio.run(main())


def test_body_is_multipart_with_every_file(tmp_path: Path) -> None:
    items = [inst(tmp_path, 1), inst(tmp_path, 2)]
    outcomes, seen = run_against(lambda r: web.Response(status=200), items)
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]
    body = seen[0]
    assert body.count(b"Content-Type: application/dicom") == 2
    # each file whole, its first 128 bytes (the spool record's preamble) as zeros
    assert bytes(128) + bytes([1]) * 873 + b"\r\n" in body and bytes(128) + bytes([2]) * 874 + b"\r\n" in body


def test_503_with_retry_after_retries(tmp_path: Path) -> None:
    outcomes, _ = run_against(
        lambda r: web.Response(status=503, text="busy", headers={"Retry-After": "30"}), [inst(tmp_path, 1)]
    )
    assert outcomes[0].kind == "retry" and outcomes[0].retry_after == 30


def test_429_and_408_retry_other_4xx_reject(tmp_path: Path) -> None:
    for status, kind in ((429, "retry"), (408, "retry"), (400, "rejected"), (413, "rejected"), (415, "rejected")):
        outcomes, _ = run_against(lambda r, s=status: web.Response(status=s), [inst(tmp_path, 1)])
        assert outcomes[0].kind == kind, status


def test_whole_batch_refusal_is_narrowed_to_the_instance_refused(tmp_path: Path) -> None:
    """Orthanc answers 400 for a whole request when one part is bad (and stores the
    others): only that instance may go dead, so a refused batch is resent one by one."""
    items = [inst(tmp_path, n) for n in (1, 2, 3)]
    for status in (400, 413, 415):
        bad = bytes([2]) * 874  # (its first 128 bytes go as zeros)

        async def handler(request: web.Request, s: int = status) -> web.Response:
            return web.Response(status=s if bad in await request.read() else 200)

        outcomes, seen = run_against(handler, items)
        assert [o.kind for o in outcomes] == ["delivered", "rejected", "delivered"], status
        assert f"HTTP {status}" in outcomes[1].error
        assert len(seen) == 4  # the batch, then each instance alone


def test_wrong_credentials_or_url_are_a_configuration_problem(tmp_path: Path) -> None:
    for status in (401, 403, 404, 405, 424):  # 424: Azure's storage or key vault out of reach
        outcomes, _ = run_against(lambda r, s=status: web.Response(status=s), [inst(tmp_path, 1), inst(tmp_path, 2)])
        assert [o.kind for o in outcomes] == ["config", "config"], status
        assert str(status) in outcomes[0].error


def test_409_marks_each_instance_on_its_own(tmp_path: Path) -> None:
    items = [inst(tmp_path, n) for n in (1, 2, 3, 4)]
    body = failed_json({"1.2.3.2": 0x0111, "1.2.3.3": 0xC000, "1.2.3.4": 0xA700}, ok=["1.2.3.1"])
    outcomes, _ = run_against(
        lambda r: web.Response(status=409, body=body, content_type="application/dicom+json"), items
    )
    assert [o.kind for o in outcomes] == ["delivered", "delivered", "rejected", "retry"]


def test_azure_failure_reasons(tmp_path: Path) -> None:
    """Azure's own FailureReason codes: 45070 already stored, 45071 still being created
    or cleaned up (retried), 43264 failed validation and 43265 wrong study (refused)."""
    items = [inst(tmp_path, n) for n in (1, 2, 3, 4)]
    body = failed_json({"1.2.3.1": 45070, "1.2.3.2": 45071, "1.2.3.3": 43264, "1.2.3.4": 43265}, ok=[])
    outcomes, _ = run_against(
        lambda r: web.Response(status=409, body=body, content_type="application/dicom+json"), items
    )
    assert [o.kind for o in outcomes] == ["delivered", "retry", "rejected", "rejected"]


def test_connection_refused_retries(tmp_path: Path) -> None:
    async def main():
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=f"http://127.0.0.1:{closed_port()}/x"))
        await up.start()
        try:
            return await up.store_instances("1.2.3", [inst(tmp_path, 1)])
        finally:
            await up.close()

    (outcome,) = asyncio.run(main())
    assert outcome.kind == "retry" and "Connect" in outcome.error


def test_retry_after_formats() -> None:
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
