"""The real daemon with the HealthImaging emulator as its upstream: C-STORE, C-FIND,
C-MOVE and C-GET from dcmtk's tools, every request to the emulator SigV4-verified;
a wrong secret key and short-lived credentials."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import gateway.codecs  # noqa: F401 - registers the HTJ2K decoder with pydicom
from gateway.codecs import Fidelity, syntax_info
from tests.support import dcmtk, findrun
from tests.support.corpus import (
    CorpusItem,
    group_by_transfer_syntax,
    pydicom_corpus,
    sample_items,
    unique_by_sop_instance,
)
from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP, findscu, getscu, movescu, storescu
from tests.support.healthimaging import Emulator
from tests.support.healthimaging.studies import tiny_studies
from tests.support.ports import wait_until
from tests.support.pyscu import send_files
from tests.support.synth import ct_series

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
CREDPROC = Path(__file__).resolve().parents[1] / "support" / "healthimaging" / "credproc.py"


def healthimaging_upstream(emulator: Emulator, extra: str = "") -> str:
    return (
        f'type = "healthimaging"\nregion = "{emulator.region}"\ndatastore_id = "{emulator.datastore.id}"\n'
        f'dicomweb_endpoint_url = "{emulator.dicomweb_url}"\nruntime_endpoint_url = "{emulator.runtime_url}"\n'
        f"timeout = 30\n{extra}"
    )


def key_env(key: str, secret: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


def pixels(ds: Dataset) -> np.ndarray | None:
    try:
        return ds.pixel_array
    except Exception:  # noqa: BLE001 - no decoder here for this one
        return None


def send(gw: Gateway, items: list[CorpusItem], tmp_path: Path) -> None:
    """Each item in its own transfer syntax: storescu per syntax, pynetdicom for the
    few storescu refuses."""
    for syntax, group in group_by_transfer_syntax(items).items():
        sendable = [i for i in group if i.dcmtk_sendable]
        if sendable:
            args = dcmtk.storescu_for_syntax(syntax, {i.sop_class_uid for i in sendable}, tmp_path / "cfg")
            result = storescu(gw.port, [i.path for i in sendable], gw.ae_title, extra_args=args)
            assert result.returncode == 0, f"{syntax}: {result.stdout}{result.stderr}"
        others = [i.path for i in group if not i.dcmtk_sendable]
        if others:
            assert send_files(gw.port, others, gw.ae_title) == [0] * len(others)


def test_corpus_reaches_healthimaging_and_lossless_pixels_survive_htj2k(
    emulator: Emulator, gateway: Any, tmp_path: Path
) -> None:
    items = unique_by_sop_instance(sample_items() + pydicom_corpus(dcmtk_only=False), tmp_path / "corpus")
    gw = gateway(upstream=healthimaging_upstream(emulator), env=key_env(*emulator.add_key()), spool={"batch_max_instances": 8})
    send(gw, items, tmp_path)
    gw.wait_counts(delivered=len(items), timeout=240)
    assert not emulator.refusals()
    converted = 0
    for item in items:
        stored = emulator.instance(item.sop_instance_uid)
        assert stored is not None, item.path.name
        sent = pydicom.dcmread(item.path)
        if "PixelData" not in sent or syntax_info(item.transfer_syntax_uid).fidelity is not Fidelity.LOSSLESS:
            continue
        kept = pydicom.dcmread(io.BytesIO(stored.stored))
        if stored.stored_syntax == HTJ2K_RPCL:
            converted += 1
            assert np.array_equal(pixels(kept), pixels(sent)), item.path.name
        else:  # the service keeps what it cannot encode (1-bit, unreadable attributes) as received
            assert kept.PixelData == sent.PixelData, item.path.name
    assert converted >= 60


@dataclass
class Loaded:
    emulator: Emulator
    gateway: Gateway
    scp: StoreSCP
    series: list[Path]
    other: Path  # one instance of a second study


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """A gateway on the emulator holding a 12-instance CT series and one other study,
    with an uncompressed-only storescp (Implicit VR LE) as its move destination; it
    retrieves with GetDICOMInstance (the frames path has tests of its own)."""
    root = tmp_path_factory.mktemp("hi-loaded")
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(root / "absent-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "absent-credentials"),
    }
    emulator = Emulator().start()
    scp = StoreSCP(output_dir=root / "received", ae_title="IMPLICIT", implicit_only=True).start()
    gw: Gateway | None = None
    try:
        series = ct_series(root / "series", 12, rows=64, columns=64)
        other_path = ct_series(root / "other", 1, rows=16, columns=16)[0]
        other = pydicom.dcmread(other_path)
        other.PatientName, other.PatientID, other.Modality = "Ødegård^Åse", "P-ØDE", "MR"
        other.save_as(other_path)
        peers = f'\n[[dimse.peers]]\nae_title = "IMPLICIT"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        gw = Gateway(
            root / "gw", upstream=healthimaging_upstream(emulator, 'retrieve_path = "dicomweb"\n'),
            env={**env, **key_env(*emulator.add_key())}, extra=peers,
        ).start()
        result = storescu(gw.port, [*series, other_path], gw.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr
        gw.wait_counts(delivered=13, timeout=60)
        yield Loaded(emulator, gw, scp, series, other_path)
    finally:
        if gw is not None:
            gw.kill()
        scp.cleanup()
        emulator.stop()


def find(loaded: Loaded, keys: dict[str, str], out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    result = findscu(loaded.gateway.port, loaded.gateway.ae_title, keys, output_dir=out)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_find_at_study_series_and_image_level(loaded: Loaded, tmp_path: Path) -> None:
    first = pydicom.dcmread(loaded.series[0], stop_before_pixels=True)
    other = pydicom.dcmread(loaded.other, stop_before_pixels=True)
    studies = find(loaded, {"QueryRetrieveLevel": "STUDY", "PatientName": "Synth*", "PatientSex": "", "StudyInstanceUID": ""}, tmp_path / "s")
    assert [str(s.StudyInstanceUID) for s in studies] == [first.StudyInstanceUID]
    named = find(loaded, {"QueryRetrieveLevel": "STUDY", "SpecificCharacterSet": "ISO_IR 192", "PatientName": "Ødegård^Åse", "StudyInstanceUID": ""}, tmp_path / "n")
    assert [str(s.StudyInstanceUID) for s in named] == [other.StudyInstanceUID]
    series = find(loaded, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": first.StudyInstanceUID, "Modality": "CT", "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}, tmp_path / "se")
    assert [(str(s.SeriesInstanceUID), int(s.NumberOfSeriesRelatedInstances)) for s in series] == [(first.SeriesInstanceUID, 12)]
    images = find(loaded, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": first.SeriesInstanceUID, "SOPInstanceUID": "", "InstanceNumber": ""}, tmp_path / "i")
    assert sorted(int(i.InstanceNumber) for i in images) == list(range(1, 13))
    searched = {r.operation for r in loaded.emulator.requests if r.status == 200}
    assert {"SearchDICOMStudies", "SearchDICOMSeries", "SearchDICOMInstances"} <= searched
    assert not loaded.emulator.refusals()


def test_move_to_an_uncompressed_only_destination_fetches_instance_by_instance(loaded: Loaded) -> None:
    first = pydicom.dcmread(loaded.series[0], stop_before_pixels=True)
    before = len([r for r in loaded.emulator.requests if r.operation == "GetDICOMInstance"])
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": first.SeriesInstanceUID}
    result = movescu(loaded.gateway.port, loaded.gateway.ae_title, "IMPLICIT", keys)
    assert result.returncode == 0, result.stdout + result.stderr
    received = loaded.scp.wait_for_files(12, timeout=30)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in received}
    for path in loaded.series:
        sent = pydicom.dcmread(path)
        got = by_uid[str(sent.SOPInstanceUID)]
        assert str(got.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
        assert np.array_equal(got.pixel_array, sent.pixel_array)
    fetched = [r for r in loaded.emulator.requests if r.operation == "GetDICOMInstance"][before:]
    assert len(fetched) == 12 and all(r.status == 200 for r in fetched)
    assert not [r for r in loaded.emulator.requests if r.operation == "UnknownOperation"]
    assert not loaded.emulator.refusals()
    assert "bulk retrieval stopped" not in loaded.gateway.log()  # no series retrieve was tried


def test_study_command_asks_healthimaging_with_a_signed_search(loaded: Loaded) -> None:
    """`dicom-gateway study` beside the running daemon: the spool's rows of the series
    and the data store's count, read with one SigV4-signed series search."""
    first = pydicom.dcmread(loaded.series[0], stop_before_pixels=True)
    before = len(loaded.emulator.requests)
    result = loaded.gateway.cli("study", str(first.StudyInstanceUID), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    (row,) = data["series"]
    assert row["series_uid"] == first.SeriesInstanceUID and row["states"]["delivered"] == 12
    assert row["archive_instances"] == 12 and row["calling_aes"] == {"STORESCU": 12}
    assert data["archive"] == {"error": None, "series": 1, "instances": 12}
    asked = loaded.emulator.requests[before:]
    assert [r.operation for r in asked] == ["SearchDICOMSeries"] and asked[0].status == 200
    assert not loaded.emulator.refusals()


def test_get_a_study(loaded: Loaded, tmp_path: Path) -> None:
    other = pydicom.dcmread(loaded.other)
    before = len(loaded.emulator.requests)
    result = getscu(loaded.gateway.port, loaded.gateway.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(other.StudyInstanceUID)}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (got,) = [pydicom.dcmread(p) for p in tmp_path.iterdir() if p.is_file()]
    assert got.SOPInstanceUID == other.SOPInstanceUID and np.array_equal(got.pixel_array, other.pixel_array)
    assert [r.operation for r in loaded.emulator.requests[before:]] == ["SearchDICOMStudyInstances", "GetDICOMInstance"]


def test_a_wrong_secret_holds_delivery_logged_once_then_delivers_after_the_fix(
    emulator: Emulator, gateway: Any, tmp_path: Path
) -> None:
    key, secret = emulator.add_key()
    paths = ct_series(tmp_path / "in", 3, rows=16, columns=16)
    gw = gateway(upstream=healthimaging_upstream(emulator), env=key_env(key, secret + "typo"))
    assert storescu(gw.port, paths, gw.ae_title).returncode == 0
    wait_until(lambda: len(emulator.refusals()) >= 3, 30, 0.2, "the gateway never retried")
    counts = gw.counts()
    assert counts.get("dead", 0) == 0 and counts.get("delivered", 0) == 0
    problems = gw.health()["problems"]
    assert any("InvalidSignatureException" in p["reason"] for p in problems), problems
    assert gw.log().count("HealthImaging refused the request signature") == 1, gw.log()
    assert gw.health()["upstream"]["detail"].startswith("auth refused")
    gw.stop()
    gw.env.update(key_env(key, secret))
    gw.start()
    gw.wait_counts(delivered=3, dead=0, timeout=60)
    assert all(emulator.instance(str(pydicom.dcmread(p).SOPInstanceUID)) for p in paths)


def test_expiring_credentials_are_refreshed_without_a_failure(emulator: Emulator, gateway: Any, tmp_path: Path) -> None:
    """A credential_process profile whose credentials live 4 s: the first ones expire
    during the test, botocore gets new ones, nothing is refused or held."""
    count = tmp_path / "issued"
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile imaging]\n"
        f"credential_process = {sys.executable} {CREDPROC} {emulator.identities.master.hex()} 4 {count}\n"
    )
    gw = gateway(upstream=healthimaging_upstream(emulator, 'profile = "imaging"\n'), env={"AWS_CONFIG_FILE": str(config)})
    first, second = ct_series(tmp_path / "in", 2, rows=16, columns=16)
    assert storescu(gw.port, [first], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1, timeout=30)
    time.sleep(5)  # the credentials of the first delivery have expired by now
    assert storescu(gw.port, [second], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=2, dead=0, timeout=30)
    assert not emulator.refusals(), emulator.refusals()
    issued = count.read_text().split()
    assert len(set(issued)) >= 2
    users = {r.access_key for r in emulator.requests if r.operation == "StoreDICOMStudy"}
    assert len(users) == 2 and users <= set(issued)
    assert "delivery held" not in gw.log()


def test_a_search_of_1100_studies_pages_past_the_qido_limit(emulator: Emulator, gateway: Any) -> None:
    emulator.load(tiny_studies(1100, run=2))
    gw = gateway(upstream=healthimaging_upstream(emulator), env=key_env(*emulator.add_key()))
    result = findrun.find(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "PatientID": "BULK*", "StudyInstanceUID": ""})
    assert result.returncode == 0 and result.final.startswith("Success"), result.final
    assert len({str(a.StudyInstanceUID) for a in result.answers}) == 1100
    pages = [r for r in emulator.requests if r.operation == "SearchDICOMStudies"]
    # 100, then 200 and 400 at once, then 800 (400 come back: the end) and 1000 past
    # it (cancelled then, so it may not have been sent)
    assert len(pages) in (4, 5) and all(r.status == 200 for r in pages)
    assert not emulator.refusals()


@pytest.mark.slow
def test_a_search_past_10000_studies_goes_on_with_search_image_sets_or_ends_with_a700(emulator: Emulator, gateway: Any) -> None:
    emulator.load(tiny_studies(10_050, run=3))
    gw = gateway(upstream=healthimaging_upstream(emulator), env=key_env(*emulator.add_key()), extra="\n[find]\nmax_matches = 20000\n")
    keys = {"QueryRetrieveLevel": "STUDY", "PatientName": "Bulk*", "PatientID": "", "StudyInstanceUID": ""}
    whole = findrun.find(gw.port, gw.ae_title, keys, timeout=300, read_answers=False)
    assert whole.returncode == 0 and whole.final.startswith("Success"), whole.final
    assert whole.count == 10_050 and len(set(whole.dumped("0020,000D"))) == 10_050
    assert [r.status for r in emulator.requests if r.operation == "SearchImageSets"] == [200] * 201  # 50 image sets per page
    cut = findrun.find(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": "OT", "StudyInstanceUID": ""}, timeout=300, read_answers=False)
    assert cut.final == "Refused: OutOfResources", cut.final  # 0xA700: ModalitiesInStudy is not in the summaries
    assert cut.count == 10_000
    assert not emulator.refusals()
