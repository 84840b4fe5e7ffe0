"""Unit tests of the conversion step: the memory budget every transcode takes from, the
window onto a Part 10 file inside a larger answer, and the `Transcoder` itself (in
memory, and spilled to a file when the result is larger than the spill size)."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite

from gateway.codecs.syntaxes import EXPLICIT_VR_LE, RLE_LOSSLESS
from gateway.part10 import read_file_meta
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import Fetched, FileSlice
from gateway.retrieval.transcode import ByteBudget, Transcoder, part10_file
from gateway.spill import SpillArea
from gateway.upstream.base import Retrieved
from tests.codecs.helpers import bundled


def test_byte_budget_grants_in_order_and_a_large_one_alone() -> None:
    """Transcodes wait until their estimate fits, in order of asking (a small one does
    not overtake a large one waiting); one larger than the budget runs alone; a
    cancelled waiter gives up its place."""

    async def go() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []

        async def job(name: str, size: int, hold: asyncio.Event) -> None:
            held = await budget.acquire(size)
            order.append(name)
            await hold.wait()
            budget.release(held)

        first, big, small, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(job("first", 60, first))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("big", 500, big)))  # more than the budget
        await asyncio.sleep(0)
        doomed = asyncio.create_task(job("cancelled", 10, cancelled))
        tasks.append(asyncio.create_task(job("small", 30, small)))
        await asyncio.sleep(0)
        assert order == ["first"] and budget.held == 60  # small fits, but waits its turn
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["first", "big"] and budget.held == 100  # alone
        big.set()
        await asyncio.sleep(0.01)
        assert budget.held == 30
        small.set()
        await asyncio.gather(*tasks)
        assert budget.held == 0
        return order

    assert asyncio.run(go()) == ["first", "big", "small"]


def test_part10_file_is_bounded_to_the_instance(tmp_path: Path) -> None:
    """A retrieved instance inside a larger answer reads as a file of its own."""
    body = b"--boundary\r\n" + b"0123456789" + b"\r\n--boundary--"
    spill = tmp_path / "answer"
    spill.write_bytes(body)
    for retrieved in (Retrieved(body, None, 12, 10), Retrieved(None, spill, 12, 10)):
        with part10_file(retrieved) as fp:
            assert fp.read() == b"0123456789"
            fp.seek(4)
            assert fp.read(3) == b"456"
            fp.seek(-2, 2)
            assert fp.read(10) == b"89"


def test_transcoder_converts_in_memory_or_into_a_spill_file(tmp_path: Path) -> None:
    """An RLE multi-frame instance, for a receiver taking Explicit VR Little Endian
    only: the data set comes back in that syntax with the source's pixels, in memory
    when small and in a spill file (the caller's to delete) when above the spill size;
    the budget is whole again afterwards."""
    source = bundled("SC_rgb_rle_2frame.dcm")
    assert source.file_meta.TransferSyntaxUID == RLE_LOSSLESS
    buffer = io.BytesIO()
    dcmwrite(buffer, source, enforce_file_format=True)
    raw = buffer.getvalue()
    meta = read_file_meta(raw[:65536])

    async def convert(spill_bytes: int) -> tuple[str, bytes, Path | None, int]:
        budget = ByteBudget(1 << 30)
        with ThreadPoolExecutor(2) as executor:
            transcoder = Transcoder(executor, budget, False, SpillArea(tmp_path), spill_bytes)
            item = Fetched(InstanceRef("1", "2", meta.sop_instance_uid, meta.sop_class_uid), Retrieved(raw, None, 0, len(raw)),
                           meta.transfer_syntax, meta.sop_class_uid, meta.dataset_offset)
            syntax, dataset, spilled = await transcoder.transcoded(item, [EXPLICIT_VR_LE])
        if isinstance(dataset, FileSlice):
            data = dataset.path.read_bytes()[dataset.offset : dataset.offset + dataset.length]
        else:
            data = bytes(dataset)
        return syntax, data, spilled, budget.held

    expected = source.pixel_array
    in_memory = asyncio.run(convert(1 << 30))
    spilled = asyncio.run(convert(0))
    for syntax, data, _, held in (in_memory, spilled):
        ds = read_dataset(io.BytesIO(data), False, True)
        ds.file_meta = dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta
        ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
        assert syntax == EXPLICIT_VR_LE and held == 0
        assert np.array_equal(ds.pixel_array, expected)
    assert in_memory[2] is None and in_memory[1] == spilled[1]
    assert spilled[2] is not None and spilled[2].parent == tmp_path and spilled[2].exists()
