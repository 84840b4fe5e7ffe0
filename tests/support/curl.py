"""Run the real curl against the facade, as the vendors' examples do, and read what it got."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.orthanc import parse_multipart_related

CURL = "/usr/bin/curl"


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]  # lower-case names, the final response's
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        return json.loads(self.body)

    def parts(self) -> list[tuple[dict[str, str], bytes]]:
        return parse_multipart_related(self.content_type, self.body)


def curl(*args: str, timeout: float = 60) -> CurlResult:
    """``curl -sS <args>`` with the response headers and body captured (``-o`` and
    ``-D`` are added here; pass the vendor's other options as written)."""
    with tempfile.TemporaryDirectory(prefix="curl-") as tmp:
        body_path, head_path = Path(tmp) / "body", Path(tmp) / "head"
        result = subprocess.run(
            [CURL, "-sS", "-o", str(body_path), "-D", str(head_path), *args],
            capture_output=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
        raw_headers = head_path.read_bytes().decode("latin-1").split("\r\n\r\n")
        block = [b for b in raw_headers if b.strip()][-1]
        lines = block.split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        # curl writes no body file for an empty body (a 304, a 204)
        return CurlResult(status, headers, body_path.read_bytes() if body_path.exists() else b"")
