"""STOW-RS answers only once every stored instance is durable, proven on the wire.

The daemon runs under strace while curl posts a multipart body of several instances:
the HTTP answer listing them is written to the client's socket only after, for each
instance, its spooled file was fsynced, renamed into ``objects/xx/`` and that
directory fsynced (the same order C-STORE Success follows, see test_disk_faults).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.reliability.test_disk_faults import fsynced_paths, read_trace, renamed_paths
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.orthanc import build_multipart_related
from tests.support.synth import ct_series


@pytest.mark.slow
def test_stow_answer_follows_every_file_and_directory_fsync(tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    syscalls = "openat,fsync,fdatasync,rename,renameat,renameat2,sendto,sendmsg,write,writev"
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
    fsyncs, renames = fsynced_paths(calls), renamed_paths(calls)
    assert len(spooled) == 8
    for final in spooled:
        rename, source = renames[final]
        assert any(path == source and c.end < rename.start for c, path in fsyncs), f"{final}: not fsynced before its rename"
        assert rename.end < answer.start, f"{final}: renamed into place after the answer"
        directory = str(Path(final).parent)
        assert any(path == directory and rename.end < c.start and c.end < answer.start for c, path in fsyncs), (
            f"{final}: the answer went out before its directory was fsynced"
        )
