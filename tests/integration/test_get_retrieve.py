"""C-GET through the gateway (getscu as the requester), from Orthanc's DICOMweb and
from the embedded archive; and C-MOVE from the embedded archive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.integration.test_move_retrieve import LOSSLESS, _pixels, parse_move, peers
from tests.support.compare import assert_same_dataset, load
from tests.support.corpus import pydicom_corpus, sample_items, unique_by_sop_instance
from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP, getscu, movescu, storescu
from tests.support.orthanc import Orthanc
from tests.support.synth import ct_series

IMPLICIT = "1.2.840.10008.1.2"
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def by_uid(directory: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID): p for p in directory.iterdir()}


def test_get_series_and_compressed_from_dicomweb(tmp_path: Path) -> None:
    """getscu proposes uncompressed syntaxes only: the 300-instance series arrives as
    stored, compressed corpus files arrive decompressed with identical pixels (lossless)."""
    series = ct_series(tmp_path / "series", 300, 64, 64)
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    corpus = [
        i for i in unique_by_sop_instance(sample_items() + pydicom_corpus(), tmp_path / "corpus")
        if i.transfer_syntax_uid in LOSSLESS - UNCOMPRESSED
    ]
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
    gw = Gateway(tmp_path / "gw", upstream_url=orthanc.dicomweb_url)
    try:
        orthanc.upload(series + [i.path for i in corpus])
        gw.start()
        out = tmp_path / "got"
        out.mkdir()
        proc = getscu(gw.port, "DICOMGW", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(first.StudyInstanceUID)}, out, extra_args=["-v"])
        assert proc.returncode == 0 and "Number of Completed Suboperations : 300" in proc.stdout + proc.stderr, proc.stderr[-2000:]
        got = by_uid(out)
        assert len(got) == 300
        for path in series:
            assert_same_dataset(path, got[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)])

        out2 = tmp_path / "got-compressed"
        out2.mkdir()
        uids = "\\".join(dict.fromkeys(i.study_uid for i in corpus))
        proc = getscu(gw.port, "DICOMGW", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": uids}, out2, extra_args=["-v"])
        assert "Number of Failed Suboperations    : 0" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
        got = by_uid(out2)
        assert len(got) == len(corpus)
        for item in corpus:
            received = load(got[item.sop_instance_uid])
            assert str(received.file_meta.TransferSyntaxUID) in UNCOMPRESSED
            before = _pixels(load(item.path))
            if before is not None:
                assert np.array_equal(before, _pixels(received)), item.path.name
    finally:
        gw.kill()
        orthanc.cleanup()


@pytest.mark.slow
def test_move_and_get_from_embedded_archive(tmp_path: Path) -> None:
    """The embedded archive serves C-MOVE (one association, the series read whole) and
    C-GET from its own files."""
    series = ct_series(tmp_path / "series", 100, 64, 64)
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    scp = StoreSCP(output_dir=tmp_path / "dest").start()
    gw = Gateway(tmp_path / "gw", extra=peers(("STORESCP", scp.port)))
    try:
        gw.start()
        sent = storescu(gw.port, [tmp_path / "series"], gw.ae_title)
        assert sent.returncode == 0, sent.stderr
        gw.wait_counts(delivered=100)
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": str(first.StudyInstanceUID), "SeriesInstanceUID": str(first.SeriesInstanceUID)}
        result = parse_move(movescu(gw.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d"]))
        assert (result.status, result.completed, result.failed) == (0, 100, 0), result.output[-2000:]
        files = scp.wait_for_files(100)
        assert scp.log().count("Association Acknowledged") == 1
        assert "100 instances (100 in bulk)" in gw.log_path.read_text()
        got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
        for path in series:
            assert_same_dataset(path, got[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)])
        out = tmp_path / "got"
        out.mkdir()
        proc = getscu(gw.port, "DICOMGW", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(first.StudyInstanceUID)}, out, extra_args=["-v"])
        assert "Number of Completed Suboperations : 100" in proc.stdout + proc.stderr, proc.stderr[-2000:]
        assert len(list(out.iterdir())) == 100
    finally:
        gw.kill()
        scp.cleanup()


def test_allow_list_refuses_move_without_permission(tmp_path: Path) -> None:
    """A known peer without the move permission gets no C-MOVE context (refused at
    negotiation by the server's allow-list), so no sub-operation can start."""
    gw = Gateway(
        tmp_path / "gw",
        extra=peers(("STORESCP", 9)) + '\n[[dimse.peers]]\nae_title = "MOVESCU"\nhost = "127.0.0.1"\nport = 9\npermissions = ["find"]\n',
    ).start()
    try:
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3"}
        result = parse_move(movescu(gw.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d"]))
        assert result.status == -1 and "No valid Presentation Context" in result.output, result.output[-2000:]
    finally:
        gw.kill()


def test_get_only_peer_may_receive_its_c_get(tmp_path: Path) -> None:
    """A peer allowed only to get must still be offered the storage contexts it takes
    the SCP role for, or its C-GET could never deliver; it still may not C-STORE to us."""
    series = ct_series(tmp_path / "series", 5, 32, 32)
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    gw = Gateway(
        tmp_path / "gw",
        extra='\n[[dimse.peers]]\nae_title = "GETONLY"\nhost = "127.0.0.1"\nport = 9\npermissions = ["get"]\n',
    ).start()
    try:
        assert storescu(gw.port, series, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=5)
        out = tmp_path / "got"
        out.mkdir()
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(first.StudyInstanceUID)}
        proc = getscu(gw.port, "DICOMGW", keys, out, calling_ae="GETONLY", extra_args=["-v"])
        assert "Number of Completed Suboperations : 5" in proc.stdout + proc.stderr, proc.stderr[-2000:]
        assert len(list(out.iterdir())) == 5
        refused = storescu(gw.port, series[:1], gw.ae_title, calling_ae="GETONLY")
        assert refused.returncode != 0
    finally:
        gw.kill()
