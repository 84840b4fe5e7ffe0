"""The embedded archive's writer process, driven directly (`WriterProcess`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pydicom

from gateway.upstream.archive_writer import WriterProcess
from gateway.upstream.base import StoreItem
from gateway.upstream.local import LocalUpstream
from tests.support.synth import ct_series


def item(path: Path) -> StoreItem:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    uid = lambda kw: str(ds.get(kw, "") or "")  # noqa: E731
    return StoreItem(path, path.stat().st_size, uid("SOPInstanceUID") or "1.2.3", uid("SOPClassUID"), uid("StudyInstanceUID"), uid("SeriesInstanceUID"), "")


def test_a_cancelled_batch_does_not_hand_its_answer_to_the_next(tmp_path: Path) -> None:
    """A caller cancelled while the writer works (the forwarder at shutdown) must not
    leave that batch's answer in the pipe for the next batch to read as its own."""
    LocalUpstream(tmp_path / "spool")  # creates the archive and its index
    good, other = ct_series(tmp_path / "ct", 2, rows=32, columns=32)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a Part 10 file" * 20)
    shutil.copy(other, tmp_path / "other.dcm")

    async def run() -> tuple[list[str], list[str]]:
        writer = WriterProcess(tmp_path / "spool" / "archive")
        try:
            first = asyncio.create_task(writer.store([item(garbage)]))  # rejected, when answered
            await asyncio.sleep(0.05)
            first.cancel()
            second = await writer.store([item(good), item(tmp_path / "other.dcm")])
            third = await writer.store([item(garbage)])
            return [o.kind for o in second], [o.kind for o in third]
        finally:
            await writer.close()

    assert asyncio.run(run()) == (["delivered", "delivered"], ["rejected"])
