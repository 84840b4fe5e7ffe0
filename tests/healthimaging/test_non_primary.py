"""Instances HealthImaging puts in a non-primary image set (their study attributes
conflict with the study's primary image set): QIDO-RS and WADO-RS without
``imageSetId`` do not show them. With ``include_non_primary = true`` the gateway finds
them through SearchImageSets and serves them in C-FIND and C-MOVE; without it,
``spool status`` counts them, found the same way after delivery (the STOW-RS answer
is not documented to say which image set an instance joined)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.healthimaging.test_daemon import healthimaging_upstream, key_env
from tests.support.dcmtk import StoreSCP, findscu, movescu, storescu
from tests.support.healthimaging import Emulator
from tests.support.synth import ct_series


def study_with_a_conflict(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Three instances of one series, then two of a second series of the same study
    whose Study Description disagrees (they go to a non-primary image set)."""
    primary = ct_series(tmp_path / "primary", 3, rows=32, columns=32)
    study = str(pydicom.dcmread(primary[0], stop_before_pixels=True).StudyInstanceUID)
    conflicting = ct_series(tmp_path / "conflicting", 2, rows=32, columns=32, study_uid=study)
    for path in conflicting:
        ds = pydicom.dcmread(path)
        ds.StudyDescription = "Re-read with another description"
        ds.save_as(path)
    return primary, conflicting


def uids(paths: list[Path], keyword: str) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).get(keyword)) for p in paths}


def find(gw: Any, keys: dict[str, str], out: Path) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    result = findscu(gw.port, gw.ae_title, keys, output_dir=out)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.mark.slow
@pytest.mark.parametrize("retrieve_path", ["frames", "dicomweb"])
def test_non_primary_instances_are_found_and_moved_when_included(
    emulator: Emulator, gateway: Any, tmp_path: Path, retrieve_path: str
) -> None:
    primary, conflicting = study_with_a_conflict(tmp_path)
    scp = StoreSCP(output_dir=tmp_path / "received", ae_title="DEST").start()
    try:
        peers = f'\n[[dimse.peers]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        upstream = healthimaging_upstream(emulator, f'include_non_primary = true\nretrieve_path = "{retrieve_path}"\n')
        gw = gateway(upstream=upstream, env=key_env(*emulator.add_key()), extra=peers)
        assert storescu(gw.port, primary + conflicting, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=5, timeout=60)
        assert len([s for s in emulator.image_sets() if not s.primary]) == 1
        (study,) = uids(primary, "StudyInstanceUID")
        (second_series,) = uids(conflicting, "SeriesInstanceUID")

        series = find(gw, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study, "SeriesInstanceUID": ""}, tmp_path / "se")
        assert {str(s.SeriesInstanceUID) for s in series} == uids(primary + conflicting, "SeriesInstanceUID")
        images = find(
            gw, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SeriesInstanceUID": second_series, "SOPInstanceUID": ""},
            tmp_path / "im",
        )
        assert {str(i.SOPInstanceUID) for i in images} == uids(conflicting, "SOPInstanceUID")

        result = movescu(gw.port, gw.ae_title, "DEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert result.returncode == 0, result.stdout + result.stderr
        received = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in scp.wait_for_files(5, timeout=30))}
        for path in primary + conflicting:
            sent = pydicom.dcmread(path)
            got = received[str(sent.SOPInstanceUID)]
            assert got.get("StudyDescription") == sent.get("StudyDescription")
            assert np.array_equal(got.pixel_array, sent.pixel_array)
        read = "GetImageFrame" if retrieve_path == "frames" else "GetDICOMInstance"
        reads = [r for r in emulator.requests if r.operation == read]
        assert len(reads) == 5 and all(r.status == 200 for r in reads)
        assert not emulator.refusals()
    finally:
        scp.cleanup()


def test_non_primary_instances_stay_out_of_searches_by_default_and_spool_status_counts_them(
    emulator: Emulator, gateway: Any, tmp_path: Path
) -> None:
    primary, conflicting = study_with_a_conflict(tmp_path)
    gw = gateway(upstream=healthimaging_upstream(emulator), env=key_env(*emulator.add_key()))
    assert storescu(gw.port, primary + conflicting, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=5, timeout=60)
    (study,) = uids(primary, "StudyInstanceUID")
    (second_series,) = uids(conflicting, "SeriesInstanceUID")
    series = find(gw, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study, "SeriesInstanceUID": ""}, tmp_path / "se")
    assert {str(s.SeriesInstanceUID) for s in series} == uids(primary, "SeriesInstanceUID")
    images = find(
        gw, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SeriesInstanceUID": second_series, "SOPInstanceUID": ""},
        tmp_path / "im",
    )
    assert images == []
    status = json.loads(gw.cli("spool", "status", "--json").stdout)
    assert status["counts"]["delivered"] == 5 and status["delivered_not_primary"] == 2
    text = gw.cli("spool", "status").stdout
    assert "not primary:    2 delivered instances" in text, text
    assert f"2 instance(s) of study {study} were stored in a non-primary HealthImaging image set" in gw.log()
