"""Proof that the test-support library drives the real tools end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import dcmtk, pyscu
from tests.support.compare import assert_same_dataset, load
from tests.support.corpus import (
    PYDICOM_TEST_FILES,
    group_by_transfer_syntax,
    pydicom_corpus,
    sample_files,
    sample_items,
    scan,
    unique_by_sop_instance,
)
from tests.support.orthanc import Orthanc
from tests.support.ports import free_port, port_is_open, wait_until

JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # no storescu -x flag in dcmtk 3.6.7
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"


def test_orthanc_echo_store_and_wado_roundtrip(orthanc: Orthanc) -> None:
    assert dcmtk.echoscu(orthanc.dicom_port, orthanc.aet).returncode == 0
    item = sample_items()[0]
    result = dcmtk.storescu(orthanc.dicom_port, [item.path], orthanc.aet)
    assert result.returncode == 0, result.stderr
    assert orthanc.instance_count() == 1
    assert orthanc.sop_instance_uids() == {item.sop_instance_uid}
    wado = orthanc.dicomweb_instance(item.study_uid, item.series_uid, item.sop_instance_uid)
    assert_same_dataset(item.path, wado)
    assert_same_dataset(item.path, orthanc.get_instance_bytes(item.sop_instance_uid))


def test_orthanc_restart_keeps_ports_and_data(orthanc: Orthanc) -> None:
    orthanc.upload(sample_files())
    http_port, dicom_port = orthanc.http_port, orthanc.dicom_port
    orthanc.kill()
    assert not port_is_open("127.0.0.1", http_port)
    orthanc.restart()
    assert (orthanc.http_port, orthanc.dicom_port) == (http_port, dicom_port)
    assert orthanc.instance_count() == 3
    orthanc.clear()
    assert orthanc.instance_count() == 0


def test_orthanc_cmove_to_storescp(orthanc: Orthanc, storescp: Callable[..., dcmtk.StoreSCP]) -> None:
    scp = storescp(ae_title="DEST")
    orthanc.set_modality("dest", "DEST", "127.0.0.1", scp.port)
    items = sample_items()
    orthanc.upload([i.path for i in items])
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": items[0].study_uid}
    result = dcmtk.movescu(orthanc.dicom_port, orthanc.aet, "DEST", keys)
    assert result.returncode == 0, result.stderr
    received = scp.wait_for_files(len(items))
    assert {str(load(p).SOPInstanceUID) for p in received} == {i.sop_instance_uid for i in items}


def test_storescp_receives_from_storescu(storescp: Callable[..., dcmtk.StoreSCP]) -> None:
    scp = storescp()
    sample = sample_files()[0]
    result = dcmtk.storescu(scp.port, [sample], scp.ae_title)
    assert result.returncode == 0, result.stderr
    (received,) = scp.wait_for_files(1)
    assert_same_dataset(sample, received)


def test_generated_profile_sends_syntax_without_flag(
    storescp: Callable[..., dcmtk.StoreSCP], tmp_path: Path
) -> None:
    group = group_by_transfer_syntax(unique_by_sop_instance(pydicom_corpus(), tmp_path / "corpus"))[JPEG_EXTENDED]
    scp = storescp()
    args = dcmtk.storescu_for_syntax(JPEG_EXTENDED, {i.sop_class_uid for i in group})
    result = dcmtk.storescu(scp.port, [i.path for i in group], scp.ae_title, extra_args=args)
    assert result.returncode == 0, result.stderr
    received = {str(load(p).SOPInstanceUID): p for p in scp.wait_for_files(len(group))}
    for item in group:
        assert_same_dataset(item.path, received[item.sop_instance_uid])


def test_generated_profile_proposes_only_that_syntax(storescp: Callable[..., dcmtk.StoreSCP]) -> None:
    scp = storescp(implicit_only=True)
    sample = sample_items()[0]  # Explicit VR Little Endian
    args = dcmtk.storescu_for_syntax(sample.transfer_syntax_uid, [sample.sop_class_uid])
    result = dcmtk.storescu(scp.port, [sample.path], scp.ae_title, extra_args=args)
    assert result.returncode != 0
    assert scp.files() == []


def test_pynetdicom_scu_sends_stored_bytes(storescp: Callable[..., dcmtk.StoreSCP], tmp_path: Path) -> None:
    group = group_by_transfer_syntax(unique_by_sop_instance(pydicom_corpus(), tmp_path / "corpus"))
    items = group[JPEG_LS_NEAR_LOSSLESS]
    scp = storescp()
    assert pyscu.send_files(scp.port, [i.path for i in items], scp.ae_title) == [0] * len(items)
    received = {str(load(p).SOPInstanceUID): p for p in scp.wait_for_files(len(items))}
    for item in items:
        assert_same_dataset(item.path, received[item.sop_instance_uid])


def test_corpus_contents(tmp_path: Path) -> None:
    items, excluded = scan(PYDICOM_TEST_FILES)
    assert {p.name for p in excluded} >= {"MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm", "no_meta.dcm"}
    assert {i.path.name for i in items if not i.dcmtk_sendable} == {"rtdose_rle.dcm", "rtdose_rle_1frame.dcm"}
    corpus = pydicom_corpus()
    assert len({i.sop_instance_uid for i in corpus}) < len(corpus)  # same instance, several encodings
    copies = unique_by_sop_instance(corpus, tmp_path)
    assert len({c.sop_instance_uid for c in copies}) == len(copies)
    assert [c.transfer_syntax_uid for c in copies] == [i.transfer_syntax_uid for i in corpus]
    assert all(c.study_uid and c.series_uid for c in copies)


def test_assert_same_dataset_reports_differences(tmp_path: Path) -> None:
    sample = sample_files()[0]
    changed = load(sample)
    changed.PatientName = "Changed^Name"
    changed.save_as(tmp_path / "changed.dcm")
    with pytest.raises(AssertionError, match=r"\(0010,0010\) PatientName"):
        assert_same_dataset(sample, tmp_path / "changed.dcm")

    mr_rle = PYDICOM_TEST_FILES / "MR_small_RLE.dcm"
    fragments = load(mr_rle)
    fragments.PixelData = fragments.PixelData[:-2] + b"\x00\x00"
    fragments.save_as(tmp_path / "fragment.dcm")
    with pytest.raises(AssertionError, match=r"PixelData: fragment 1 differs"):
        assert_same_dataset(mr_rle, tmp_path / "fragment.dcm")

    with pytest.raises(AssertionError, match="transfer syntax changed"):
        assert_same_dataset(mr_rle, PYDICOM_TEST_FILES / "MR_small.dcm")


def test_port_helpers() -> None:
    port = free_port()
    assert not port_is_open("127.0.0.1", port)
    # The kernel may hand one port to two binds in a row; free_port never does.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == 500 and port not in ports
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.2, message="never true")
    assert wait_until(lambda: 42, timeout=0.2) == 42
