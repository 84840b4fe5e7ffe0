"""Byte ranges, what asks for video, and a video's fragments found in place."""

from __future__ import annotations

import io

import pytest
from aiohttp import web
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from gateway.codecs.errors import TranscodeError
from gateway.codecs.stream import fragment_spans
from gateway.web.video import asks_video, byte_range

VIDEO_CLASS = {"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.77.1.1.1"]}}
CT = {"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}
AVAILABLE_H264 = {**CT, "00083002": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.102"]}}


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-", (0, 1000)),
    ("bytes=100-199", (100, 200)),
    ("bytes=900-5000", (900, 1000)),
    ("bytes=-100", (900, 1000)),
    ("bytes=-5000", (0, 1000)),
    ("bytes=0-9, 20-29", None),  # several ranges: the whole
    ("items=0-9", None),
    ("bytes=20-10", None),  # invalid: ignored
    ("bytes=x-", None),
])
def test_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=-0"])
def test_an_unsatisfiable_range_names_the_length(header: str) -> None:
    with pytest.raises(web.HTTPRequestRangeNotSatisfiable) as info:
        byte_range(header, 1000)
    assert info.value.headers["Content-Range"] == "bytes */1000"


def test_what_asks_for_video() -> None:
    assert asks_video("*/*", VIDEO_CLASS) and asks_video(None, VIDEO_CLASS) and asks_video("*/*", AVAILABLE_H264)
    assert not asks_video("*/*", CT) and not asks_video("image/jpeg, */*", VIDEO_CLASS)
    assert asks_video("video/mp4", CT) and asks_video("video/*", {}) and asks_video("video/mpeg2;q=0.9, image/png;q=0.5", CT)
    assert not asks_video('multipart/related; type="image/jpeg"', VIDEO_CLASS)


def test_the_fragments_of_a_video_are_found_in_place() -> None:
    stream = bytes(range(256)) * 40
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PixelData = encapsulate([stream[:4000], stream[4000:7000], stream[7000:]], has_bot=True)
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    syntax, spans = fragment_spans(io.BytesIO(data))
    assert syntax == "1.2.840.10008.1.2.4.102" and len(spans) == 3
    assert b"".join(data[offset:offset + length] for offset, length in spans).rstrip(b"\0") == stream
    with pytest.raises(TranscodeError):
        fragment_spans(io.BytesIO(data[: spans[1][0] + 10]))  # cut inside a fragment: no delimiter
