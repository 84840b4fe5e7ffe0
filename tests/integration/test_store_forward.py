"""Every sample and every readable pydicom test file, sent by dcmtk's storescu to the
gateway, reaches Orthanc by STOW-RS with an identical data set and transfer syntax."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, generate_uid

from gateway.codecs import transcode

from tests.support import dcmtk
from tests.support.compare import assert_same_dataset
from tests.support.corpus import (
    CorpusItem,
    group_by_transfer_syntax,
    read_item,
    pydicom_corpus,
    sample_items,
    unique_by_sop_instance,
)
from tests.support.pyscu import send_files
from tests.support.synth import ct_series


def send_and_compare(tmp_path: Path, orthanc, gw, items: list[CorpusItem]) -> None:
    by_syntax = group_by_transfer_syntax(items)
    for syntax, group in by_syntax.items():
        sendable = [i for i in group if i.dcmtk_sendable]
        others = [i for i in group if not i.dcmtk_sendable]
        if sendable:
            # One association per transfer syntax: storescu proposes one per SOP class.
            args = dcmtk.storescu_for_syntax(syntax, {i.sop_class_uid for i in sendable}, tmp_path / "cfg")
            result = dcmtk.storescu(gw.port, [i.path for i in sendable], gw.ae_title, extra_args=args)
            assert result.returncode == 0, f"{syntax}: {result.stdout}{result.stderr}"
        if others:
            # storescu refuses these files (UIDs encoded as UN); a pynetdicom SCU sends them.
            statuses = send_files(gw.port, [i.path for i in others], gw.ae_title)
            assert statuses == [0] * len(others), f"{syntax}: {statuses}"
    gw.wait_counts(delivered=len(items), timeout=180)
    assert orthanc.sop_instance_uids() == {i.sop_instance_uid for i in items}
    for item in items:
        received = orthanc.dicomweb_instance(item.study_uid, item.series_uid, item.sop_instance_uid)
        try:
            assert_same_dataset(item.path, received)
        except AssertionError as exc:
            raise AssertionError(f"{item.path.name} ({item.transfer_syntax_uid}): {exc}") from None


def test_samples_reach_orthanc_identical(tmp_path: Path, orthanc, gateway) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    send_and_compare(tmp_path, orthanc, gw, sample_items())
    assert "delivered" in gw.log()


@pytest.mark.slow
def test_pydicom_corpus_reaches_orthanc_identical(tmp_path: Path, orthanc, gateway) -> None:
    items = unique_by_sop_instance(pydicom_corpus(), tmp_path / "corpus")
    assert len(group_by_transfer_syntax(items)) >= 12
    gw = gateway(upstream_url=orthanc.dicomweb_url, spool={"batch_max_instances": 8})
    send_and_compare(tmp_path, orthanc, gw, items)


def test_htj2k_is_stored_as_received(tmp_path: Path, orthanc, gateway) -> None:
    """dcmtk 3.6.7 cannot send HTJ2K and Orthanc 1.10 refuses it over C-STORE; the
    gateway accepts it (pynetdicom as the modality) and Orthanc takes it over STOW-RS."""
    source = pydicom.dcmread(ct_series(tmp_path / "ct", 1, rows=64, columns=64)[0])
    paths = []
    for syntax in (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K):
        ds = transcode(source, syntax)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{syntax}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    assert send_files(gw.port, paths, gw.ae_title) == [0, 0, 0]
    gw.wait_counts(delivered=3, timeout=60)
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        received = orthanc.dicomweb_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert_same_dataset(path, received)


def test_archive_refusal_is_recorded_not_lost(tmp_path: Path, orthanc, gateway) -> None:
    """pydicom's RT Dose RLE files carry their UIDs as UN: storescu will not send them,
    Orthanc's DIMSE stores them, but its STOW-RS answers 400. The gateway acknowledges
    (the data is durable), then keeps them as dead with the archive's answer."""
    odd = [i for i in pydicom_corpus(dcmtk_only=False) if not i.dcmtk_sendable]
    assert odd, "expected pydicom files storescu refuses"
    items = unique_by_sop_instance(odd, tmp_path / "odd")
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    assert send_files(gw.port, [i.path for i in items], gw.ae_title) == [0] * len(items)
    gw.wait_counts(dead=len(items), timeout=60)
    dead = json.loads(gw.cli("spool", "list", "--state", "dead", "--json").stdout)
    assert all(row["last_error"].startswith("HTTP 400") for row in dead)


def _base(sop_class: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Privacy^Check"
    ds.PatientID = "PHI-12345"
    ds.PatientBirthDate = "19700101"
    return ds


def test_pdf_and_sr_reach_orthanc_and_logs_hold_no_phi(tmp_path: Path, orthanc, gateway) -> None:
    pdf = _base("1.2.840.10008.5.1.4.1.1.104.1")  # Encapsulated PDF Storage
    pdf.Modality = "DOC"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n" + b"0" * 300_001 + b"\n%%EOF\n"
    sr = _base("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    item = pydicom.Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "No acute findings."
    sr.ContentSequence = [item]
    paths = []
    for name, ds in (("pdf.dcm", pdf), ("sr.dcm", sr)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        paths.append(tmp_path / name)
    items = [read_item(p) for p in paths]
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    send_and_compare(tmp_path, orthanc, gw, items)
    log = gw.log()
    for phi in ("Privacy", "PHI-12345", "19700101"):
        assert phi not in log
