"""STOW-RS answers only once every stored instance is durable, proven on the wire.

The daemon runs under strace while curl posts a multipart body of several instances:
the HTTP answer listing them is written to the client's socket only after, for each
instance, its spool record was sealed and synced after its last write, and its
directory entry synced after its creation (the same order C-STORE Success follows,
see test_disk_faults).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.reliability.test_disk_faults import read_trace, record_not_durable
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.orthanc import build_multipart_related
from tests.support.synth import ct_series


@pytest.mark.slow
def test_stow_answer_follows_every_file_and_directory_fsync(tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    syscalls = "openat,fsync,fdatasync,pwrite64,sendto,sendmsg,write,writev"
    strace = ["/usr/bin/strace", "-f", "-tt", "-yy", "-x", "-s", "64", "-e", f"trace={syscalls}", "-o", str(trace)]
    gw = Gateway(tmp_path / "gw", wrapper=strace)
    files = ct_series(tmp_path / "ct", 8, rows=128, columns=128)
    content_type, body = build_multipart_related([f.read_bytes() for f in files])
    (tmp_path / "body").write_bytes(body)
    try:
        gw.start(timeout=90)
        r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", f"Content-Type: {content_type}",
                 "--data-binary", f"@{tmp_path / 'body'}", timeout=120)
        assert r.status == 200, r.body
        assert len(r.json()["00081199"]["Value"]) == 8
        gw.wait_counts(delivered=8, timeout=60)
        listing = gw.cli("spool", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        spooled = [str(gw.spool_dir / row["file"]) for row in json.loads(listing.stdout)]
    finally:
        gw.stop(timeout=60)
    calls = read_trace(trace)
    answer_re = re.compile(rf'^(?:sendto|sendmsg|write|writev)\(\d+<TCP:\[127\.0\.0\.1:{gw.http_port}->[^\]]*\]>, "HTTP/1\.1 200 OK\\r\\nContent-Type: application/dicom\+json')
    answers = [c for c in calls if answer_re.match(c.text)]
    assert len(answers) == 1, [c.text[:120] for c in answers]
    answer = answers[0]
    assert len(spooled) == 8
    for final in spooled:
        problem = record_not_durable(calls, final, answer)
        assert problem is None, f"{final}: the answer went out before {problem}"
