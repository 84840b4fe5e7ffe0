"""The SigV4 signer's parts that do not need the emulator: the canonical query string
the gateway sends, and the hash of a streamed STOW-RS body."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from gateway.dicomweb.multipart import FileMultipart
from gateway.upstream.healthimaging.signer import canonical_query
from tests.support.synth import ct_series


def test_canonical_query_encodes_all_but_unreserved_and_sorts() -> None:
    sent = "PatientName=VAN*DAM%5EJ%C3%BCrgen?&0020000D=1.2.3,1.2.4&limit=100&includefield=00081030"
    assert canonical_query(sent) == (
        "0020000D=1.2.3%2C1.2.4&PatientName=VAN%2ADAM%5EJ%C3%BCrgen%3F&includefield=00081030&limit=100"
    )
    assert canonical_query("a=%7e%20b") == "a=~%20b"


def test_multipart_hash_is_the_hash_of_what_is_sent(tmp_path: Path) -> None:
    paths = ct_series(tmp_path, 2, rows=8, columns=8)
    body = FileMultipart([(p, p.stat().st_size) for p in paths], "application/dicom")

    async def sent() -> bytes:
        return b"".join([chunk async for chunk in body])

    data = asyncio.run(sent())
    assert len(data) == body.content_length and hashlib.sha256(data).hexdigest() == body.sha256()
