"""HealthImagingUpstream and its SigV4 signer against the emulator, in process: every
request must verify there (the emulator recomputes each signature from the spec)."""

from __future__ import annotations

import asyncio
import gzip
import io
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway.config import parse_config
from gateway.dicomweb.qido import QidoOptions
from gateway.model.query import make_key
from gateway.model.search import Search
from gateway.spill import SpillArea
from gateway.upstream import make_upstream
from gateway.upstream.base import ANY_SYNTAX, StoreItem
from gateway.upstream.errors import NotSupported, SearchTruncated
from gateway.upstream.healthimaging import HealthImagingUpstream
from gateway.upstream.errors import AnswerTooLarge
from gateway.upstream.healthimaging.native import _gunzip, continuable, criteria
from tests.support.healthimaging import Emulator
from tests.support.healthimaging.studies import tiny_studies
from tests.support.ports import closed_port
from tests.support.synth import ct_series

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"


def config(emulator: Emulator, **extra: Any) -> Any:
    return parse_config(
        {
            "upstream": {
                "type": "healthimaging",
                "region": emulator.region,
                "datastore_id": emulator.datastore.id,
                "dicomweb_endpoint_url": emulator.dicomweb_url,
                "runtime_endpoint_url": emulator.runtime_url,
                **extra,
            }
        }
    )


def run(upstream: HealthImagingUpstream, scenario: Callable[[HealthImagingUpstream], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await upstream.start()
        try:
            return await scenario(upstream)
        finally:
            await upstream.close()

    return asyncio.run(main())


def item(path: Path) -> StoreItem:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return StoreItem(
        path, path.stat().st_size, ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
        str(ds.file_meta.TransferSyntaxUID),
    )


@pytest.fixture
def credentials(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    key, secret = emulator.add_key()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return key, secret


def upstream_for(emulator: Emulator, relax: bool = True, **extra: Any) -> HealthImagingUpstream:
    cfg = config(emulator, **extra)
    upstream = make_upstream(cfg)
    assert isinstance(upstream, HealthImagingUpstream)
    upstream.qido = QidoOptions(page_size=cfg.find.page_size, relax_unsafe=relax)
    return upstream


def _named(study: str, name: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.Modality = "OT"
    return ds


@pytest.mark.parametrize("relax", [True, False], ids=["wildcarded", "percent-encoded"])
def test_searches_with_awkward_values_verify_and_match(
    emulator: Emulator, credentials: tuple[str, str], tmp_path: Path, relax: bool
) -> None:
    """PatientName with ``^``, ``*``, ``?``, a space and non-ASCII, a UID list with commas:
    each query is signed as it is sent, and the emulator finds the studies."""
    studies = [generate_uid() for _ in range(3)]
    paths = []
    for n, (study, name) in enumerate(zip(studies, ["Müller^Zoë Anne", "O'Brien^Seán", "VAN DAM^J"])):
        path = tmp_path / f"{n}.dcm"
        _named(study, name, f"P{n}").save_as(path, enforce_file_format=True)
        paths.append(path)
    upstream = upstream_for(emulator, relax=relax)

    async def scenario(up: HealthImagingUpstream) -> list[list[str]]:
        for path in paths:
            assert [o.kind for o in await up.store_instances(item(path).study_uid, [item(path)])] == ["delivered"]
        found = []
        for keys in (
            {"PatientName": "Müller^Zo?*"},
            {"PatientName": "O'Brien^Seán"},
            {"PatientName": "VAN DAM*", "PatientID": "P2"},
            {"StudyInstanceUID": "\\".join(studies[:2])},
            {"PatientSex": "F"},  # not a documented study key: matched by the gateway only
        ):
            search = Search(keys=tuple(make_key(DataElement(k, "PN" if k == "PatientName" else "UI" if k.endswith("UID") else "LO", v)) for k, v in keys.items()))
            found.append(sorted([obj["0020000D"]["Value"][0] async for obj in up.search_for_studies(search)]))
        return found

    found = run(upstream, scenario)
    assert not emulator.refusals(), emulator.refusals()
    assert studies[0] in found[0] and studies[1] in found[1] and studies[2] in found[2]
    assert found[3] == sorted(studies[:2])
    assert len(found[4]) == 3  # sent without PatientSex, so the archive answered all


def test_store_and_retrieve_one_instance_at_a_time(emulator: Emulator, credentials: tuple[str, str], tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "in", 3, rows=32, columns=32)
    items = [item(p) for p in paths]
    study, series = items[0].study_uid, items[0].series_uid
    upstream = upstream_for(emulator, retrieve_path="dicomweb")  # GetDICOMInstance, not the frames path

    async def scenario(up: HealthImagingUpstream) -> Any:
        outcomes = await up.store_instances(study, items)
        listed = [obj["00080018"]["Value"][0] async for obj in up.search_for_instances(Search(study_uid=study, series_uid=series))]
        got = await up.retrieve_instance(study, series, items[0].sop_instance_uid, SpillArea(tmp_path), 1 << 20, acceptable=ANY_SYNTAX)
        with pytest.raises(NotSupported):
            async for _ in up.iter_instances(study, series, SpillArea(tmp_path), 1 << 20):
                pass
        frames = [f async for f in up.retrieve_frames(study, series, items[0].sop_instance_uid, [1], acceptable=ANY_SYNTAX)]
        metadata = await up.retrieve_metadata(study)
        return outcomes, listed, got, frames, metadata

    outcomes, listed, got, frames, metadata = run(upstream, scenario)
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    assert listed == [i.sop_instance_uid for i in items]
    assert got.transfer_syntax == HTJ2K_RPCL
    assert pydicom.dcmread(io.BytesIO(got.read())).SOPInstanceUID == items[0].sop_instance_uid
    assert frames[0].transfer_syntax == HTJ2K_RPCL
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(i.sop_instance_uid for i in items)
    assert not emulator.refusals()
    assert {r.operation for r in emulator.requests} >= {"StoreDICOMStudy", "SearchDICOMInstances", "GetDICOMInstance", "GetDICOMInstanceFrames", "GetDICOMSeriesMetadata"}


def test_a_wrong_secret_holds_delivery_and_says_so(emulator: Emulator, credentials: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials[1] + "wrong")
    paths = ct_series(tmp_path, 1, rows=8, columns=8)

    async def scenario(up: HealthImagingUpstream) -> Any:
        return await up.store_instances(item(paths[0]).study_uid, [item(paths[0])]), await up.health()

    outcomes, health = run(upstream_for(emulator), scenario)
    assert outcomes[0].kind == "config" and "InvalidSignatureException" in outcomes[0].error
    assert "secret access key" in outcomes[0].error
    assert not health.reachable and health.detail.startswith("auth refused")


def test_clock_skew_is_named(emulator: Emulator, credentials: tuple[str, str], tmp_path: Path) -> None:
    emulator.clock_offset = 600.0
    paths = ct_series(tmp_path, 1, rows=8, columns=8)

    async def scenario(up: HealthImagingUpstream) -> Any:
        return await up.store_instances(item(paths[0]).study_uid, [item(paths[0])])

    (outcome,) = run(upstream_for(emulator), scenario)
    assert outcome.kind == "config" and "system clock is" in outcome.error and "s behind HealthImaging's" in outcome.error


def test_no_credentials_hold_delivery(emulator: Emulator, tmp_path: Path) -> None:
    paths = ct_series(tmp_path, 1, rows=8, columns=8)

    async def scenario(up: HealthImagingUpstream) -> Any:
        return await up.store_instances(item(paths[0]).study_uid, [item(paths[0])]), await up.health()

    outcomes, health = run(upstream_for(emulator), scenario)
    assert outcomes[0].kind == "config" and "no AWS credentials" in outcomes[0].error
    assert health.detail.startswith("auth refused: no AWS credentials")
    assert emulator.requests == []


def test_health_says_throttled_or_unreachable(credentials: tuple[str, str]) -> None:
    with Emulator(quotas={"SearchDICOMStudies": (0.01, 1)}) as emulator:
        emulator.identities.add(*credentials)

        async def twice(up: HealthImagingUpstream) -> Any:
            return await up.health(), await up.health()

        first, second = run(upstream_for(emulator), twice)
        assert first.reachable and first.detail == "HTTP 200"
        assert second.reachable and second.detail.startswith("throttled")
        closed = config(emulator, dicomweb_endpoint_url=f"http://127.0.0.1:{closed_port()}")
        health = run(HealthImagingUpstream(closed.upstream), lambda up: up.health())
        assert not health.reachable and health.detail.startswith("unreachable")


def study_search(**keys: str) -> Search:
    vrs = {"PatientID": "LO", "ModalitiesInStudy": "CS", "StudyDate": "DA", "PatientName": "PN"}
    made = tuple(make_key(DataElement(k, vrs[k], v)) for k, v in keys.items())
    return Search(keys=made, include=(0x0020000D, 0x00100020, 0x00100010))


def test_criteria_narrow_by_one_key_and_keep_primary_image_sets() -> None:
    assert criteria(study_search(PatientID="BULK00001", StudyDate="20240101-"))["filters"] == [
        {"operator": "EQUAL", "values": [{"isPrimary": True}]},
        {"operator": "EQUAL", "values": [{"DICOMPatientId": "BULK00001"}]},
    ]
    between = criteria(study_search(PatientID="BULK*", StudyDate="-20240102"))["filters"][1]
    assert between["operator"] == "BETWEEN"
    assert [v["DICOMStudyDateAndTime"]["DICOMStudyDate"] for v in between["values"]] == ["00010101", "20240102"]
    assert continuable(study_search(PatientName="Bulk*"))
    assert not continuable(study_search(ModalitiesInStudy="OT"))


def test_a_study_search_past_the_qido_reach_continues_with_search_image_sets(
    emulator: Emulator, credentials: tuple[str, str]
) -> None:
    emulator.load(tiny_studies(30, run=1))
    upstream = upstream_for(emulator)
    upstream._capabilities = replace(upstream.capabilities, search_limit=10)  # the service's 10,000, cheaply

    async def scenario(up: HealthImagingUpstream) -> Any:
        found = [obj async for obj in up.search_for_studies(study_search(PatientName="Bulk*"))]
        cut = []
        with pytest.raises(SearchTruncated) as truncated:
            async for obj in up.search_for_studies(study_search(ModalitiesInStudy="OT")):
                cut.append(obj)
        return found, cut, truncated.value.returned

    found, cut, returned = run(upstream, scenario)
    uids = [obj["0020000D"]["Value"][0] for obj in found]
    assert len(uids) == len(set(uids)) == 30
    assert all(obj["00100010"]["Value"][0]["Alphabetic"].startswith("Bulk^") for obj in found)
    assert len(cut) == returned == 10
    searches = [r for r in emulator.requests if r.operation == "SearchImageSets"]
    assert len(searches) == 1 and searches[0].status == 200 and not emulator.refusals()


def test_image_set_metadata_is_inflated_to_max_answer_mb_and_no_further() -> None:
    """64 KiB of gzip can be 64 MiB of JSON: the bound counts what it inflates to."""
    document = b'{"Study": {}}' + b" " * (2 << 20)
    packed = gzip.compress(document)
    assert len(packed) < 64 * 1024
    assert _gunzip(packed, 4 << 20) == document
    with pytest.raises(AnswerTooLarge, match="GetImageSetMetadata answer is larger than 1 MiB"):
        _gunzip(packed, 1 << 20)
    with pytest.raises(EOFError):
        _gunzip(packed[: len(packed) // 2], 4 << 20)
