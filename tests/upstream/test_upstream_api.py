"""The wider Upstream protocol against both archive types: a real Orthanc 1.10 behind
DicomWebUpstream, and the embedded archive (LocalUpstream), loaded with the same files
and asked the same things.

What Orthanc 1.10 (DICOMweb plugin 1.7) does that shapes these tests, observed here:

* RetrieveFrames with ``type="application/octet-stream"; transfer-syntax=*`` answers
  every frame as stored, compressed ones as ``image/jp2``, ``image/dicom-rle``...; it
  puts the transfer syntax both in each part's Content-Type and (oddly) inside the
  quoted ``type`` parameter of the answer. A frame number of 0 or past Number of
  Frames answers 400 ("Parameter out of range"); a syntax it cannot convert to
  answers 500, not 406; frames of an instance without pixel data (an SR) answer
  500 "Not implemented yet", where the embedded archive raises NotFound.
* DELETE on a study, series or instance answers 405 (``Allow: GET,POST``).
* RetrieveMetadata names Pixel Data with an absolute BulkDataURI.
* It never sends QIDO-RS's Warning header, so a capped search is scripted
  (tests/support/fakeqido.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from gateway.codecs import PixelDescription, decode_frame
from gateway.config import UpstreamConfig
from gateway.dicomweb.qido import QidoOptions
from gateway.model.query import make_key
from gateway.model.search import Search
from gateway.dimse.retrieve_request import failure_status
from gateway.spill import SpillArea
from gateway.upstream.base import ANY_SYNTAX, Capabilities, StoreItem, Upstream
from gateway.upstream.dicomweb import DicomWebUpstream
from gateway.upstream.errors import NotFound, NotSupported, SearchTruncated, UpstreamRejected
from gateway.upstream.local import LocalUpstream
from tests.support.corpus import PYDICOM_TEST_FILES, sample_files
from tests.support.fakeqido import FakeQido
from tests.support.orthanc import Orthanc
from tests.support.synth import ct_series

STUDY_UID = 0x0020000D
KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "StudyDate", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation",
)


@dataclass(frozen=True)
class Item:
    """One loaded file and the identifiers the tests ask with."""

    path: Path
    study: str
    series: str
    sop: str
    syntax: str
    frames: int

    @classmethod
    def read(cls, path: Path) -> Item:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return cls(
            path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
            str(ds.file_meta.TransferSyntaxUID), int(ds.get("NumberOfFrames") or 1),
        )


@dataclass(frozen=True)
class Corpus:
    """The three samples (one study, two series, explicit VR LE RGB) and multi-frame
    or compressed instances: 16-bit native, RLE, JPEG 2000, implicit VR LE."""

    samples: list[Item]
    frames: list[Item]

    @property
    def every(self) -> list[Item]:
        return self.samples + self.frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    synth = ct_series(root / "synth", 1, rows=32, columns=48, frames=3)
    others = [PYDICOM_TEST_FILES / n for n in ("SC_rgb_rle_2frame.dcm", "JPEG2000.dcm", "rtdose.dcm")]
    return Corpus([Item.read(p) for p in sample_files()], [Item.read(p) for p in synth + others])


@pytest.fixture(scope="module")
def loaded_orthanc(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> Iterator[Orthanc]:
    server = Orthanc(workdir=tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
        server.upload([item.path for item in corpus.every])
        yield server
    finally:
        server.cleanup()


Opener = Callable[[], contextlib.AbstractAsyncContextManager[Upstream]]


@pytest.fixture(params=["dicomweb", "local"])
def archive(request: pytest.FixtureRequest, tmp_path: Path, corpus: Corpus) -> Opener:
    """Opens the archive under test, loaded with the corpus, inside the test's loop."""
    if request.param == "dicomweb":
        url = request.getfixturevalue("loaded_orthanc").dicomweb_url

        @contextlib.asynccontextmanager
        async def open_dicomweb() -> AsyncIterator[Upstream]:
            up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url), QidoOptions(page_size=2))
            await up.start()
            try:
                yield up
            finally:
                await up.close()

        return open_dicomweb

    @contextlib.asynccontextmanager
    async def open_local() -> AsyncIterator[Upstream]:
        up = LocalUpstream(tmp_path / "spool", page_size=2)
        await up.start()
        try:
            for n, item in enumerate(corpus.every):
                copy = tmp_path / f"{n}.dcm"
                shutil.copy(item.path, copy)
                spooled = StoreItem(copy, copy.stat().st_size, item.sop, "", item.study, item.series, item.syntax)
                assert [o.kind for o in await up.store_instances(item.study, [spooled])] == ["delivered"]
            yield up
        finally:
            await up.close()

    return open_local


def run(opener: Opener, scenario: Callable[[Upstream], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with opener() as up:
            return await scenario(up)

    return asyncio.run(main())


async def raised(awaitable: Awaitable[Any]) -> BaseException:
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError("nothing raised")


async def collect(iterator: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in iterator]


def study_search(uid: str) -> Search:
    return Search(keys=(make_key(DataElement(STUDY_UID, "UI", uid)),))


# -- capabilities -------------------------------------------------------------------------


def test_capabilities(archive: Opener) -> None:
    async def scenario(up: Upstream) -> Capabilities:
        return up.capabilities

    caps = run(archive, scenario)
    assert caps.study_retrieve and caps.series_retrieve and caps.frames and caps.metadata
    assert caps.search_limit is None and caps.max_page is None
    assert caps.delete in (None, True)  # DICOMweb: unknown until an archive answers a DELETE


# -- metadata -----------------------------------------------------------------------------


def test_metadata_matches_the_stored_files(archive: Opener, corpus: Corpus) -> None:
    blue, green, red = sorted(corpus.samples, key=lambda i: i.path.name)  # by file name
    assert green.series == red.series != blue.series

    async def scenario(up: Upstream) -> list[Any]:
        return [
            await up.retrieve_metadata(green.study),
            await up.retrieve_metadata(green.study, green.series),
            await up.retrieve_metadata(blue.study, blue.series, blue.sop),
            await raised(up.retrieve_metadata("1.2.826.0.1.3680043.10.1137.404")),
        ]

    study, series, instance, missing = run(archive, scenario)
    by_uid = {item.sop: item for item in corpus.samples}
    assert sorted(o["00080018"]["Value"][0] for o in study) == sorted(by_uid)
    assert sorted(o["00080018"]["Value"][0] for o in series) == sorted([green.sop, red.sop])
    assert [o["00080018"]["Value"][0] for o in instance] == [blue.sop]
    for obj in study:
        ds = pydicom.dcmread(by_uid[obj["00080018"]["Value"][0]].path, stop_before_pixels=True)
        for keyword in KEYWORDS:
            expected = ds[keyword].to_json_dict(None, 0)
            assert obj[f"{ds[keyword].tag:08X}"].get("Value") == expected.get("Value"), keyword
        pixel_data = obj["7FE00010"]
        assert "BulkDataURI" in pixel_data and "InlineBinary" not in pixel_data
    assert isinstance(missing, NotFound)


# -- frames -------------------------------------------------------------------------------


def test_frames_decode_to_pydicom_pixels(archive: Opener, corpus: Corpus) -> None:
    """Every frame of native, RLE, JPEG 2000 and implicit VR instances, asked as stored,
    comes with the stored syntax and decodes to the pixels pydicom reads from the file;
    frames come back in the order asked."""
    items = corpus.frames + corpus.samples[:1]

    async def scenario(up: Upstream) -> list[list[Any]]:
        out = []
        for item in items:
            numbers = list(range(item.frames, 0, -1))  # last first
            out.append(await collect(up.retrieve_frames(item.study, item.series, item.sop, numbers, acceptable=ANY_SYNTAX)))
        return out

    answers = run(archive, scenario)
    for item, frames in zip(items, answers):
        ds = pydicom.dcmread(item.path)
        pixels = ds.pixel_array if item.frames > 1 else ds.pixel_array[np.newaxis]
        desc = PixelDescription.from_dataset(ds)
        assert [f.number for f in frames] == list(range(item.frames, 0, -1)), item.path.name
        for frame in frames:
            assert frame.transfer_syntax == item.syntax, item.path.name
            decoded = decode_frame(frame.data, frame.transfer_syntax, desc)
            assert np.array_equal(decoded, pixels[frame.number - 1]), f"{item.path.name} frame {frame.number}"


def test_frame_numbers_outside_the_instance_are_a_bad_request(archive: Opener, corpus: Corpus) -> None:
    item = next(i for i in corpus.frames if i.frames == 3)

    async def scenario(up: Upstream) -> list[BaseException]:
        return [
            await raised(collect(up.retrieve_frames(item.study, item.series, item.sop, [4], acceptable=ANY_SYNTAX))),
            await raised(collect(up.retrieve_frames(item.study, item.series, item.sop, [0, 1], acceptable=ANY_SYNTAX))),
            await raised(collect(up.retrieve_frames(item.study, item.series, "1.2.826.0.1.3680043.10.1137.404", [1], acceptable=ANY_SYNTAX))),
        ]

    past, zero, missing = run(archive, scenario)
    for exc in (past, zero):
        assert isinstance(exc, UpstreamRejected) and exc.status == 400
    assert isinstance(missing, NotFound)


# -- retrieve_instance --------------------------------------------------------------------


def test_retrieve_instance_reports_the_syntax_it_got(archive: Opener, corpus: Corpus, tmp_path: Path) -> None:
    items = corpus.frames + corpus.samples[:1]

    async def scenario(up: Upstream) -> list[tuple[str, str, str]]:
        out = []
        for item in items:
            for acceptable in (ANY_SYNTAX, (item.syntax,)):
                got = await up.retrieve_instance(item.study, item.series, item.sop, SpillArea(tmp_path), 1 << 16, acceptable=acceptable)
                try:
                    meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got.read()), stop_before_pixels=True)
                    out.append((got.transfer_syntax, str(meta.file_meta.TransferSyntaxUID), str(meta.SOPInstanceUID)))
                finally:
                    got.release()
        return out

    answers = run(archive, scenario)
    expected = [(i.syntax, i.syntax, i.sop) for i in items for _ in range(2)]
    assert answers == expected


# -- delete -------------------------------------------------------------------------------


def test_delete(archive: Opener, corpus: Corpus, tmp_path: Path) -> None:
    """Where the archive deletes (the embedded one), a deleted instance, series and study
    are gone from searches and retrievals; where it cannot (Orthanc: 405), delete raises
    NotSupported, the capabilities say so and nothing is gone."""
    blue, green, red = sorted(corpus.samples, key=lambda i: i.path.name)  # by file name

    async def sops(up: Upstream) -> set[str]:
        found = await collect(up.search_for_instances(Search(study_uid=green.study)))
        return {o["00080018"]["Value"][0] for o in found}

    async def scenario(up: Upstream) -> list[Any]:
        try:
            await up.delete_instance(red.study, red.series, red.sop)
        except NotSupported as exc:
            return [exc, up.capabilities.delete, await sops(up)]
        after_instance = await sops(up)
        await up.delete_series(blue.study, blue.series)
        after_series = await sops(up)
        await up.delete_study(green.study)
        return [
            after_instance,
            after_series,
            await collect(up.search_for_studies(study_search(green.study))),
            await raised(up.retrieve_instance(green.study, green.series, green.sop, SpillArea(tmp_path), 1 << 16, acceptable=ANY_SYNTAX)),
            await raised(up.retrieve_metadata(green.study)),
            await raised(up.delete_study(green.study)),
            up.capabilities.delete,
        ]

    outcome = run(archive, scenario)
    if isinstance(outcome[0], NotSupported):
        exc, delete, remaining = outcome
        assert exc.status == 405 and delete is False
        assert remaining == {green.sop, red.sop, blue.sop}
        return
    after_instance, after_series, studies, retrieve, metadata, again, delete = outcome
    assert after_instance == {green.sop, blue.sop}
    assert after_series == {green.sop}
    assert studies == []
    assert isinstance(retrieve, NotFound) and isinstance(metadata, NotFound) and isinstance(again, NotFound)
    assert delete is True


# -- search: ends normally unless the archive capped it -----------------------------------


def test_uncapped_search_ends_normally(archive: Opener, corpus: Corpus) -> None:
    async def scenario(up: Upstream) -> tuple[int, int]:
        one = await collect(up.search_for_studies(study_search(corpus.samples[0].study)))
        every = await collect(up.search_for_instances(Search()))  # paged by 2
        return len(one), len(every)

    assert run(archive, scenario) == (1, len(corpus.every))


def qido(fake: FakeQido, capabilities: Capabilities | None, page_size: int) -> tuple[list[str], BaseException | None]:
    """Search the fake's studies: (study UIDs handed out, what the iterator raised at the end)."""

    async def main() -> tuple[list[str], BaseException | None]:
        up = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=fake.url), QidoOptions(page_size=page_size), capabilities=capabilities)
        await up.start()
        got: list[str] = []
        try:
            async for obj in up.search_for_studies(Search()):
                got.append(obj["0020000D"]["Value"][0])
        except SearchTruncated as exc:
            return got, exc
        finally:
            await up.close()
        return got, None

    return asyncio.run(main())


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeQido]]:
    servers: list[FakeQido] = []

    def make(**kwargs: Any) -> FakeQido:
        servers.append(FakeQido(**kwargs).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def test_search_capped_by_the_archive_is_signalled(fake: Callable[..., FakeQido]) -> None:
    """The archive serves 30 of 50 matches and says more exist (PS3.18 Warning): all 30
    are handed out, then SearchTruncated."""
    got, exc = qido(fake(count=50, reach=30), None, 20)
    assert len(got) == len(set(got)) == 30
    assert isinstance(exc, SearchTruncated) and exc.returned == 30


def test_announced_page_cap_is_paged_through(fake: Callable[..., FakeQido]) -> None:
    got, exc = qido(fake(count=50, page_cap=15), None, 20)
    assert len(set(got)) == 50 and exc is None


def test_search_limit_is_never_passed_and_signalled(fake: Callable[..., FakeQido]) -> None:
    """An archive whose searches reach 250 results (Capabilities.search_limit): paging
    stops there, never asking past it, and says so; a smaller answer ends normally."""
    capped = fake(count=300)
    got, exc = qido(capped, Capabilities(search_limit=250), 100)
    assert len(set(got)) == 250
    assert isinstance(exc, SearchTruncated) and exc.returned == 250
    ends = [int(_param(p, "offset")) + int(_param(p, "limit")) for p in capped.requests]
    assert max(ends) == 250

    got, exc = qido(fake(count=200), Capabilities(search_limit=250), 100)
    assert len(got) == 200 and exc is None


def test_max_page_lowers_the_page_size(fake: Callable[..., FakeQido]) -> None:
    server = fake(count=100)
    got, exc = qido(server, Capabilities(max_page=30), 1000)
    assert len(set(got)) == 100 and exc is None
    assert {int(_param(p, "limit")) for p in server.requests} == {30}


def test_pages_double_and_two_are_asked_ahead(fake: Callable[..., FakeQido]) -> None:
    """1,100 matches, find.page_size 1000: a first page of 100, then 200 and 400 asked
    at once, then 800 (which comes back short: the end) and 1000 past it, dropped; each
    match handed out once, in the archive's order."""
    server = fake(count=1100)
    got, exc = qido(server, None, 1000)
    assert exc is None and got == [server.study(n)["0020000D"]["Value"][0] for n in server.order]  # type: ignore[index]
    asked = sorted((int(_param(p, "offset")), int(_param(p, "limit"))) for p in server.requests)
    assert asked[:4] == [(0, 100), (100, 200), (300, 400), (700, 800)] and asked[4:] in ([], [(1500, 1000)])


def test_a_page_cut_short_mid_search_is_asked_on_from_where_it_ended(fake: Callable[..., FakeQido]) -> None:
    """Every page cut to 150 with PS3.18's Warning: the pages asked ahead of a cut one
    start past what it sent, so they are dropped and asked again from where it ended;
    no match is lost or repeated."""
    server = fake(count=1000, page_cap=150)
    got, exc = qido(server, None, 1000)
    assert exc is None and len(got) == len(set(got)) == 1000


def _param(path: str, name: str) -> str:
    return path.split(f"{name}=")[1].split("&")[0]


def test_truncated_search_ends_a_retrieval_with_a701() -> None:
    """C-MOVE/C-GET whose instance search was capped cannot account for every match."""
    status, comment, _ = failure_status(SearchTruncated("capped", 10))
    assert status == 0xA701 and "capped" in comment


# -- the embedded archive's own rules -----------------------------------------------------


def one_bit_instance(path: Path) -> Path:
    """A 3-frame 1-bit image of 5x5 pixels: 25 bits a frame, so frames 2 and 3 start
    inside a byte."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SegmentationStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SEG"
    ds.Rows = ds.Columns = 5
    ds.NumberOfFrames = 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    rng = np.random.default_rng(3)
    ds.PixelData = pack_bits(rng.integers(0, 2, size=(3, 5, 5), dtype=np.uint8))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_embedded_archive_serves_what_it_stores(tmp_path: Path) -> None:
    """The embedded archive converts nothing: a syntax other than the stored one is
    refused with 406 (native little endian frames excepted: their bytes are the same in
    implicit and explicit VR); 1-bit frames that start inside a byte come out whole;
    an instance without pixel data has no frames."""
    one_bit = Item.read(one_bit_instance(tmp_path / "seg.dcm"))
    j2k = Item.read(PYDICOM_TEST_FILES / "JPEG2000.dcm")
    sr = Item.read(PYDICOM_TEST_FILES / "test-SR.dcm")
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"

    async def main() -> list[Any]:
        up = LocalUpstream(tmp_path / "spool")
        try:
            for n, item in enumerate((one_bit, j2k, sr)):
                copy = tmp_path / f"{n}.dcm"
                shutil.copy(item.path, copy)
                spooled = StoreItem(copy, copy.stat().st_size, item.sop, "", item.study, item.series, item.syntax)
                await up.store_instances(item.study, [spooled])

            def frames(item: Item, numbers: list[int], acceptable: tuple[str, ...]) -> Awaitable[list[Any]]:
                return collect(up.retrieve_frames(item.study, item.series, item.sop, numbers, acceptable=acceptable))

            return [
                await frames(one_bit, [1, 2, 3], (implicit,)),
                await raised(frames(j2k, [1], (explicit,))),
                await raised(up.retrieve_instance(j2k.study, j2k.series, j2k.sop, SpillArea(tmp_path), 1 << 16, acceptable=(explicit,))),
                await raised(frames(sr, [1], ANY_SYNTAX)),
            ]
        finally:
            await up.close()

    bits, frames_refused, instance_refused, no_pixels = asyncio.run(main())
    ds = pydicom.dcmread(one_bit.path)
    desc = PixelDescription.from_dataset(ds)
    assert [f.transfer_syntax for f in bits] == [implicit] * 3
    for frame in bits:
        assert np.array_equal(decode_frame(frame.data, frame.transfer_syntax, desc), ds.pixel_array[frame.number - 1])
    for exc in (frames_refused, instance_refused):
        assert isinstance(exc, UpstreamRejected) and exc.status == 406
    assert isinstance(no_pixels, NotFound)
