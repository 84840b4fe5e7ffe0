"""The frames retrieve path: instances rebuilt from GetImageSetMetadata (gzip JSON)
and GetImageFrame (HTJ2K) equal the originals in every attribute the metadata
carries, and in pixel data after decoding; a C-MOVE through it reaches an
uncompressed-only receiver with GetDICOMInstance never called."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

import gateway.codecs  # noqa: F401 - registers the HTJ2K decoder with pydicom
from gateway.spill import SpillArea
from gateway.upstream.base import ANY_SYNTAX
from gateway.upstream.errors import AnswerTooLarge, UpstreamRejected
from gateway.upstream.healthimaging import HealthImagingUpstream
from gateway.upstream.healthimaging.frames import frames_size
from tests.healthimaging.test_daemon import healthimaging_upstream, key_env
from tests.healthimaging.test_upstream import credentials, run, upstream_for  # noqa: F401 - a fixture
from tests.support.corpus import (
    PYDICOM_TEST_FILES,
    pydicom_corpus,
    read_item,
    sample_items,
    unique_by_sop_instance,
)
from tests.support.dcmtk import StoreSCP, movescu, storescu
from tests.support.healthimaging import Emulator
from tests.support.synth import ct_series

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
# Single and multi-frame, 8 and 16 bit, signed, RGB, lossless and lossy sources, nested
# sequences and private attributes.
# A structured report without pixel data is read with GetDICOMInstance.
CORPUS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "rtdose.dcm", "examples_overlay.dcm",
    "examples_palette.dcm", "test-SR.dcm",
)
_BINARY_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}


def carried(ds: Dataset, top: bool = True) -> dict[int, Any]:
    """What the image set metadata carries of a data set: every attribute but the
    File Meta, the pixel data, binary values and private attributes inside sequences."""
    values: dict[int, Any] = {}
    for elem in ds:
        if elem.tag.group <= 2 or elem.tag == 0x7FE00010 or elem.VR in _BINARY_VRS or (elem.tag.is_private and not top):
            continue
        if elem.VR == "SQ":
            values[int(elem.tag)] = [carried(item, top=False) for item in elem.value]
        else:
            values[int(elem.tag)] = (elem.VR, elem.value)
    return values


def frames(ds: Dataset) -> list[bytes]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    return [ds.PixelData.rstrip(b"\0")]


@pytest.mark.usefixtures("credentials")
def test_instances_rebuilt_from_metadata_and_frames_equal_the_originals(emulator: Emulator, tmp_path: Path) -> None:
    corpus = unique_by_sop_instance([read_item(PYDICOM_TEST_FILES / name) for name in CORPUS], tmp_path / "corpus")
    paths = ct_series(tmp_path / "ct", 3, rows=64, columns=64) + [item.path for item in corpus]
    emulator.load(p.read_bytes() for p in paths)
    originals = [pydicom.dcmread(p) for p in paths]
    upstream = upstream_for(emulator, retrieve_path="frames")

    async def scenario(up: HealthImagingUpstream) -> list[bytes]:
        got = []
        for ds in originals:
            retrieved = await up.retrieve_instance(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, SpillArea(tmp_path), 1 << 30, acceptable=ANY_SYNTAX
            )
            assert retrieved.data is not None
            got.append(retrieved.read())
        return got

    rebuilt = run(upstream, scenario)
    without_pixels = [ds for ds in originals if "PixelData" not in ds]
    assert len([r for r in emulator.requests if r.operation == "GetDICOMInstance"]) == len(without_pixels) == 1
    assert not emulator.refusals()
    htj2k = 0
    for path, original, data in zip(paths, originals, rebuilt):
        stored = emulator.instance(str(original.SOPInstanceUID))
        assert stored is not None
        copy = pydicom.dcmread(io.BytesIO(data))
        assert str(copy.file_meta.TransferSyntaxUID) == stored.stored_syntax, path.name
        assert carried(copy) == carried(original), path.name
        if "PixelData" not in original:
            continue
        if stored.stored_syntax == HTJ2K_RPCL:
            htj2k += 1
            assert np.array_equal(copy.pixel_array, original.pixel_array), path.name
        else:  # lossy, or kept as received: the stored frames, byte for byte
            assert frames(copy) == frames(pydicom.dcmread(io.BytesIO(stored.stored))), path.name
    assert htj2k >= 8
    frame_reads = [r for r in emulator.requests if r.operation == "GetImageFrame"]
    assert frame_reads and all(r.status == 200 for r in frame_reads)


@pytest.mark.usefixtures("credentials")
def test_a_frame_past_max_answer_mb_is_refused_not_read_whole(emulator: Emulator, tmp_path: Path) -> None:
    """GetImageFrame's blob is read to ``upstream.max_answer_mb`` and no further (a
    2048 x 2048 CT frame is ~3 MB of HTJ2K; the bound here 1 MiB)."""
    [path] = ct_series(tmp_path / "big", 1, rows=2048, columns=2048)
    emulator.load([path.read_bytes()])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    upstream = upstream_for(emulator, retrieve_path="frames", max_answer_mb=1)

    async def scenario(up: HealthImagingUpstream) -> None:
        with pytest.raises(AnswerTooLarge, match=r"the GetImageFrame answer is larger than 1 MiB \(upstream.max_answer_mb\)"):
            await up.retrieve_instance(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, SpillArea(tmp_path), 1 << 30, acceptable=ANY_SYNTAX
            )

    run(upstream, scenario)
    assert [r.status for r in emulator.requests if r.operation == "GetImageFrame"] == [200]


@pytest.mark.slow
def test_a_move_through_the_frames_path_decodes_for_an_uncompressed_only_receiver(
    emulator: Emulator, gateway: Any, tmp_path: Path
) -> None:
    scp = StoreSCP(output_dir=tmp_path / "received", ae_title="IMPLICIT", implicit_only=True).start()
    try:
        paths = ct_series(tmp_path / "series", 20, rows=64, columns=64)
        peers = f'\n[[dimse.peers]]\nae_title = "IMPLICIT"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        upstream = healthimaging_upstream(emulator)  # the frames path is the default
        gw = gateway(upstream=upstream, env=key_env(*emulator.add_key()), extra=peers)
        assert storescu(gw.port, paths, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=len(paths), timeout=60)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": first.SeriesInstanceUID}
        result = movescu(gw.port, gw.ae_title, "IMPLICIT", keys)
        assert result.returncode == 0, result.stdout + result.stderr
        received = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in scp.wait_for_files(len(paths), timeout=30))}
        for path in paths:
            sent = pydicom.dcmread(path)
            got = received[str(sent.SOPInstanceUID)]
            assert str(got.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
            assert carried(got) == carried(sent)
            assert np.array_equal(got.pixel_array, sent.pixel_array)
        operations = [r.operation for r in emulator.requests]
        assert "GetDICOMInstance" not in operations
        assert operations.count("GetImageSetMetadata") == 1 and operations.count("GetImageFrame") == len(paths)
        assert not emulator.refusals()
    finally:
        scp.cleanup()
        shutil.rmtree(tmp_path / "received", ignore_errors=True)


@pytest.mark.usefixtures("credentials")
def test_a_named_syntax_is_honoured_and_an_impossible_one_refused(emulator: Emulator, tmp_path: Path) -> None:
    """The frames path serves the stored syntax only: a caller naming another gets it
    from GetDICOMInstance, and one the service cannot produce is refused (406)."""
    (path,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    emulator.load([path.read_bytes()])
    ds = pydicom.dcmread(path)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))

    async def scenario(up: HealthImagingUpstream) -> bytes:
        explicit = await up.retrieve_instance(*uids, SpillArea(tmp_path), 1 << 30, acceptable=(ExplicitVRLittleEndian,))
        with pytest.raises(UpstreamRejected) as refused:
            await up.retrieve_instance(*uids, SpillArea(tmp_path), 1 << 30, acceptable=(JPEGBaseline8Bit,))
        assert refused.value.status == 406
        return explicit.read()

    got = pydicom.dcmread(io.BytesIO(run(upstream_for(emulator, retrieve_path="frames"), scenario)))
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert [r.status for r in emulator.requests if r.operation == "GetDICOMInstance"] == [200, 406]


@pytest.mark.usefixtures("credentials")
def test_an_instance_above_the_spill_threshold_is_read_with_get_dicom_instance(emulator: Emulator, tmp_path: Path) -> None:
    """A rebuild is held in memory: one larger than the spill threshold is read with
    GetDICOMInstance, whose answer goes to disk as it arrives."""
    (path,) = ct_series(tmp_path / "ct", 1, rows=64, columns=64)
    emulator.load([path.read_bytes()])
    ds = pydicom.dcmread(path)

    async def scenario(up: HealthImagingUpstream) -> Any:
        return await up.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, SpillArea(tmp_path), 64, acceptable=ANY_SYNTAX
        )

    retrieved = run(upstream_for(emulator, retrieve_path="frames"), scenario)
    assert retrieved.path is not None and retrieved.temporary
    assert np.array_equal(pydicom.dcmread(retrieved.path).pixel_array, ds.pixel_array)
    retrieved.release()
    operations = [r.operation for r in emulator.requests]
    assert "GetImageFrame" not in operations and operations.count("GetDICOMInstance") == 1


@pytest.mark.slow
@pytest.mark.usefixtures("credentials")
def test_the_whole_corpus_through_the_frames_path_keeps_every_carried_attribute(emulator: Emulator, tmp_path: Path) -> None:
    """Every encoding and structure of the corpus: rebuilt where it can be, otherwise
    (no pixel data, a value invalid for its VR such as badVR.dcm's) read with
    GetDICOMInstance; never an error, never an attribute changed."""
    items = unique_by_sop_instance(sample_items() + pydicom_corpus(dcmtk_only=False), tmp_path / "corpus")
    emulator.load(i.path.read_bytes() for i in items)

    async def scenario(up: HealthImagingUpstream) -> list[bytes]:
        return [
            (await up.retrieve_instance(i.study_uid, i.series_uid, i.sop_instance_uid, SpillArea(tmp_path), 1 << 30, acceptable=ANY_SYNTAX)).read()
            for i in items
        ]

    rebuilt = run(upstream_for(emulator, retrieve_path="frames"), scenario)
    for item, data in zip(items, rebuilt):
        assert carried(pydicom.dcmread(io.BytesIO(data))) == carried(pydicom.dcmread(item.path)), item.path.name
    without_pixels = len([i for i in items if "PixelData" not in pydicom.dcmread(i.path)])
    gets = len([r for r in emulator.requests if r.operation == "GetDICOMInstance"])
    assert gets == without_pixels + 1  # badVR.dcm: Number of Frames "1A" is no IS, so not rebuilt


def test_frame_sizes_the_metadata_does_not_give_as_numbers_count_as_none() -> None:
    entry = {"ImageFrames": [{"ID": "a", "FrameSizeInBytes": 10}, {"ID": "b", "FrameSizeInBytes": "12"}, {"ID": "c"}, "odd"]}
    assert frames_size(entry) == 10
