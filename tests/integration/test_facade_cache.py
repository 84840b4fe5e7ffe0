"""The facade's cache over a remote upstream (Orthanc, behind a proxy counting what
reaches it): a viewer scrolling a series twice costs the archive one pass, and a
client revalidating with If-None-Match gets 304 without a body."""

from __future__ import annotations

import contextlib
import copy
import io
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless

HTJ2K = "1.2.840.10008.1.2.4.201"

from gateway.codecs.convert import transcode
from tests.support.archiveproxy import ArchiveProxy
from tests.support.curl import CurlResult, curl
from tests.support.daemon import Gateway
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc
from tests.support.synth import ct_series

# What OHIF Viewer 3 sends for series metadata and for frames.
METADATA_ACCEPT = "Accept: application/dicom+json"
FRAMES_ACCEPT = "Accept: multipart/related; type=application/octet-stream; transfer-syntax=*"


@dataclass
class Setup:
    gw: Gateway
    proxy: ArchiveProxy
    datasets: list[pydicom.Dataset]
    cache_dir: Path

    @property
    def series_url(self) -> str:
        return f"{self.gw.web_url}/dicom-web{self.series_path}"

    @property
    def series_path(self) -> str:
        ds = self.datasets[0]
        return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"

    def frame_url(self, ds: pydicom.Dataset) -> str:
        return f"{self.series_url}/instances/{ds.SOPInstanceUID}/frames/1"

    def scroll(self) -> list[bytes]:
        """What a viewer does to show the series: its metadata, then each slice's frame."""
        answers = [curl(f"{self.series_url}/metadata", "--header", METADATA_ACCEPT)]
        answers += [curl(self.frame_url(ds), "--header", FRAMES_ACCEPT) for ds in self.datasets]
        assert all(a.status == 200 for a in answers), [a.status for a in answers]
        return [answers[0].body] + [a.parts()[0][1] for a in answers[1:]]


def cache_lookups(gw: Gateway) -> dict[tuple[str, str], float]:
    """``gateway_facade_cache_lookups_total`` by (kind, result), from /metrics."""
    with urllib.request.urlopen(f"{gw.web_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.labels["kind"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_facade_cache_lookups_total"
    }


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    paths = ct_series(tmp_path / "ct", 4, rows=64, columns=64)
    datasets = [pydicom.dcmread(p) for p in paths]
    datasets[2] = transcode(datasets[2], RLELossless)
    datasets[2].save_as(paths[2], enforce_file_format=True)
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
    proxy = ArchiveProxy(orthanc.dicomweb_url).start()
    cache_dir = tmp_path / "facade-cache"
    gw = Gateway(tmp_path / "gw", upstream_url=proxy.url, http={"cors_origins": ["http://viewer.localhost"]}, extra=f'\n[http.cache]\ndirectory = "{cache_dir}"\nmax_mb = 8\n')
    try:
        orthanc.upload(paths)
        gw.start()
        yield Setup(gw, proxy, datasets, cache_dir)
    finally:
        gw.kill()
        proxy.stop()
        orthanc.cleanup()


@contextlib.contextmanager
def htj2k_behind_a_proxy(
    tmp_path: Path, count: int, frames: int, extra: str = ""
) -> Iterator[tuple[Gateway, ArchiveProxy, list[pydicom.Dataset], str]]:
    """``count`` HTJ2K instances of ``frames`` frames in an Orthanc (which refuses their
    frames as stored) behind a proxy counting requests, and a gateway over the proxy
    (``extra``: more of its configuration); yields those and the URL of the series'
    instances."""
    paths = ct_series(tmp_path / "ct", count, rows=64, columns=64, frames=frames)
    datasets = [transcode(pydicom.dcmread(p), HTJ2K) for p in paths]
    for ds, path in zip(datasets, paths):
        ds.save_as(path, enforce_file_format=True)
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
    proxy = ArchiveProxy(orthanc.dicomweb_url).start()
    gw = Gateway(tmp_path / "gw", upstream_url=proxy.url, extra=extra)
    try:
        orthanc.upload(paths)
        gw.start()
        ds0 = datasets[0]
        yield gw, proxy, datasets, f"{gw.web_url}/dicom-web/studies/{ds0.StudyInstanceUID}/series/{ds0.SeriesInstanceUID}/instances"
    finally:
        gw.kill()
        proxy.stop()
        orthanc.cleanup()

def test_a_series_scrolled_twice_is_fetched_from_the_archive_once(setup: Setup) -> None:
    first = setup.scroll()
    asked = list(setup.proxy.requests)
    assert any(p.endswith("/metadata") for p in asked) and sum("/frames/" in p for p in asked) == len(setup.datasets)
    # each frame's instance metadata came out of the series' the viewer asked first
    metadata = [p for p in asked if p.endswith("/metadata")]
    assert len(metadata) == 1 and metadata[0].endswith(f"{setup.series_path}/metadata"), metadata
    after_first = cache_lookups(setup.gw)
    second = setup.scroll()
    assert setup.proxy.requests == asked, setup.proxy.requests[len(asked):]  # nothing more reached the archive
    assert second == first
    # as stored: the RLE slice's frame is its RLE codestream, the others native pixels
    assert first[1 + 2] == next(generate_frames(setup.datasets[2].PixelData, number_of_frames=1))
    assert first[1] == setup.datasets[0].PixelData
    assert sum(f.stat().st_size for f in setup.cache_dir.iterdir()) <= 8 << 20
    assert "Traceback" not in setup.gw.log()
    # the hit ratio an admin graphs: the second pass repeated every lookup of the first
    # (series metadata, and each frame's instance metadata and frame) as a hit
    lookups = cache_lookups(setup.gw)
    frames = len(setup.datasets)
    assert lookups[("frame", "miss")] == lookups[("frame", "hit")] == frames
    for kind in ("frame", "metadata"):
        first_pass = after_first.get((kind, "hit"), 0) + after_first[(kind, "miss")]
        assert lookups[(kind, "miss")] == after_first[(kind, "miss")] >= 1
        assert lookups[(kind, "hit")] - after_first.get((kind, "hit"), 0) == first_pass == (frames if kind == "frame" else frames + 1)


def test_a_frame_converted_for_a_client_is_decoded_once(setup: Setup) -> None:
    """A client asking frames in another syntax than the stored one (ELE of an RLE
    slice, HTJ2K of a native one) has them converted the first time and served from the
    cache the second: the same bytes, a `converted` hit, nothing more from the archive."""
    rle, native = setup.datasets[2], setup.datasets[0]
    asks = [
        (rle, "Accept: multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"),
        (native, f"Accept: multipart/related; type=image/jphc; transfer-syntax={HTJ2K}"),
    ]

    def fetch() -> list[tuple[str, str, bytes]]:
        out = []
        for ds, accept in asks:
            r = curl(setup.frame_url(ds), "--header", accept)
            assert r.status == 200, r.body
            (headers, data), = r.parts()
            out.append((r.headers["etag"], headers["content-type"], data))
        return out

    first = fetch()
    asked = list(setup.proxy.requests)
    assert cache_lookups(setup.gw)[("converted", "miss")] == 2
    assert fetch() == first  # the same representation: ETag, part type and bytes
    assert [t for _, t, _ in first] == [
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", f"image/jphc; transfer-syntax={HTJ2K}"
    ]
    assert setup.proxy.requests == asked, setup.proxy.requests[len(asked):]
    lookups = cache_lookups(setup.gw)
    assert (lookups[("converted", "miss")], lookups[("converted", "hit")]) == (2, 2)
    assert lookups.get(("frame", "hit"), 0) == 0  # the second pass read no frame as stored
    for (ds, accept), (etag, _, _) in zip(asks, first):
        assert _revalidate(setup.frame_url(ds), accept, etag).status == 304
    assert first[0][2] == rle.pixel_array.tobytes()  # decoded as pydicom decodes it
    decoded = copy.deepcopy(native)
    decoded.file_meta.TransferSyntaxUID = HTJ2K
    decoded.PixelData = pydicom.encaps.encapsulate([first[1][2]])
    assert (decoded.pixel_array == native.pixel_array).all()  # lossless, pixel for pixel


def _retrieved_sops(answer: CurlResult) -> list[str]:
    return [str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for _, data in answer.parts()]


def test_a_series_retrieve_lists_the_instances_only_when_the_archive_left_some_out(setup: Setup) -> None:
    """A series retrieve is checked against the archive's count of the series'
    instances (one series-level search), not against a listing of every instance
    (Orthanc: 120-140 ms of its CPU per 300): the listing, and a retrieval of each
    instance the bulk answer lacked, only when the count says one is missing."""
    accept = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
    expected = sorted(str(ds.SOPInstanceUID) for ds in setup.datasets)

    def asked_during(answer: Callable[[], CurlResult]) -> list[str]:
        before = len(setup.proxy.requests)
        r = answer()
        assert r.status == 200 and sorted(_retrieved_sops(r)) == expected
        return [p.split("?")[0] for p in setup.proxy.requests[before:]]

    study = f"/dicom-web/studies/{setup.datasets[0].StudyInstanceUID}"
    asked = asked_during(lambda: curl(setup.series_url, "--header", accept))
    assert asked == [f"/dicom-web{setup.series_path}", f"{study}/series"], asked
    asked = asked_during(lambda: curl(f"{setup.gw.web_url}{study}", "--header", accept))  # the study: counted alike
    assert asked == [study, "/dicom-web/studies"], asked

    setup.proxy.drop_bulk_parts = 1
    asked = asked_during(lambda: curl(setup.series_url, "--header", accept))  # the left-out one fetched alone
    assert asked[2] == f"/dicom-web{setup.series_path}/instances", asked  # the listing
    assert len(asked) == 4 and asked[3].startswith(f"/dicom-web{setup.series_path}/instances/"), asked


def test_frames_orthanc_refuses_as_stored_are_cut_from_instances_asking_once_per_series(tmp_path: Path) -> None:
    """Orthanc 1.10 answers 500 to RetrieveFrames of HTJ2K instances as stored: the
    facade cuts the frames out of the instances, and after the first refusal it asks the
    series' other instances whole at once; their metadata came in one series request."""
    with htj2k_behind_a_proxy(tmp_path, 3, frames=1) as (gw, proxy, datasets, base):
        ds0 = datasets[0]
        for ds in datasets:
            r = curl(f"{base}/{ds.SOPInstanceUID}/frames/1", "--header", FRAMES_ACCEPT)
            assert r.status == 200, r.body
            (headers, stream), = r.parts()
            assert headers["content-type"].endswith(f"transfer-syntax={HTJ2K}")
            assert stream == next(generate_frames(ds.PixelData, number_of_frames=1))
        asked = proxy.requests
        assert sum("/frames/" in p for p in asked) == 1, asked  # the first instance's, refused
        assert sum(p.split("?")[0].endswith(str(ds.SOPInstanceUID)) for p in asked for ds in datasets) == 3
        assert [p.split("?")[0].rsplit("/", 2)[-2:] for p in asked if "/metadata" in p] == [[str(ds0.SeriesInstanceUID), "metadata"]]
        assert gw.log().count("cutting them from the instances") == 1 and "Traceback" not in gw.log()



def test_a_multi_frame_instance_orthanc_refuses_is_retrieved_once_for_all_its_frames(tmp_path: Path) -> None:
    """A viewer asks a multi-frame HTJ2K instance's frames one request at a time, several
    at once; Orthanc refuses them frame by frame, so the facade cuts them out of the
    instance: retrieved once for all its frames (before: once per request), each frame
    the stored codestream. Concurrent first requests share the one retrieval."""
    with htj2k_behind_a_proxy(tmp_path, 2, frames=12) as (gw, proxy, datasets, base):
        ds0 = datasets[0]

        def frame(ds: pydicom.Dataset, number: int) -> bytes:
            r = curl(f"{base}/{ds.SOPInstanceUID}/frames/{number}", "--header", FRAMES_ACCEPT)
            assert r.status == 200, r.body
            (headers, data), = r.parts()
            assert headers["content-type"].endswith(f"transfer-syntax={HTJ2K}")
            return data

        def retrievals(ds: pydicom.Dataset) -> int:
            return sum(p.split("?")[0].endswith(str(ds.SOPInstanceUID)) for p in proxy.requests)

        # the first instance: frame 1 (refused, cut), then the others, 4 requests at a time
        got = {1: frame(ds0, 1)}
        with ThreadPoolExecutor(4) as pool:
            got.update(zip(range(2, 13), pool.map(lambda n: frame(ds0, n), range(2, 13))))
        # the second: its first 6 frames asked at once, the series already known refused
        ds1 = datasets[1]
        with ThreadPoolExecutor(6) as pool:
            second = dict(zip(range(1, 7), pool.map(lambda n: frame(ds1, n), range(1, 7))))
        for ds, answers in ((ds0, got), (ds1, second)):
            stored = list(generate_frames(ds.PixelData, number_of_frames=12))
            assert all(answers[n] == stored[n - 1] for n in answers), sorted(answers)
        asked = proxy.requests
        assert sum("/frames/" in p for p in asked) == 1, asked  # the first instance's frame 1, refused
        assert (retrievals(ds0), retrievals(ds1)) == (1, 1), asked
        assert "Traceback" not in gw.log()


@pytest.mark.parametrize("ele_served", [True, False], ids=["frames-as-ele", "refused-in-every-form"])
def test_an_instance_too_large_to_keep_is_retrieved_once_then_asked_as_ele(tmp_path: Path, ele_served: bool) -> None:
    """A multi-frame HTJ2K instance larger than a quarter of the cache (24 KiB of a 96
    KiB cache here) is not cut whole into it: the first request cuts its own frames out
    of one retrieval (before: retrieved, found too large, retrieved again); later ones
    ask Orthanc for their frames as ELE, which it serves as stored, not the whole
    instance. An archive refusing that too has the instance retrieved once per request."""
    extra = "\n[http.cache]\nmax_mb = 0.09375\n"
    with htj2k_behind_a_proxy(tmp_path, 1, frames=12, extra=extra) as (gw, proxy, datasets, base):
        if not ele_served:
            proxy.fail_frames, proxy.status = 1 << 30, 500
        ds = datasets[0]
        stored = list(generate_frames(ds.PixelData, number_of_frames=12))
        assert len(ds.PixelData) > 24 << 10
        for numbers in ("3", "7,2", "12"):
            r = curl(f"{base}/{ds.SOPInstanceUID}/frames/{numbers}", "--header", FRAMES_ACCEPT)
            assert r.status == 200, r.body
            for (headers, data), n in zip(r.parts(), numbers.split(","), strict=True):
                assert headers["content-type"].endswith(f"transfer-syntax={HTJ2K}") and data == stored[int(n) - 1]
        retrievals = [p for p in proxy.requests if p.split("?")[0].endswith(str(ds.SOPInstanceUID))]
        frames = [p for p in proxy.requests if "/frames/" in p]
        # served: the first request's refused as stored, the others' as ELE;
        # refused in every form: the first as stored, the second as ELE
        assert (len(retrievals), len(frames)) == ((1, 3) if ele_served else (3, 2)), proxy.requests
        assert "Traceback" not in gw.log()


def test_a_passing_frames_failure_is_answered_503_and_not_remembered(tmp_path: Path) -> None:
    """RetrieveFrames failed with 503 (an archive throttling or restarting) is passing,
    unlike Orthanc's 500 refusal: the viewer is answered 503 and asks again; the facade
    neither retrieves the whole instance for it nor switches the series to whole
    instances (over HealthImaging, a quota twenty times smaller)."""
    paths = ct_series(tmp_path / "ct", 2, rows=64, columns=64)  # native: Orthanc serves their frames
    datasets = [pydicom.dcmread(p) for p in paths]
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
    proxy = ArchiveProxy(orthanc.dicomweb_url, fail_frames=1, status=503).start()
    gw = Gateway(tmp_path / "gw", upstream_url=proxy.url)
    try:
        orthanc.upload(paths)
        gw.start()
        ds0 = datasets[0]
        base = f"{gw.web_url}/dicom-web/studies/{ds0.StudyInstanceUID}/series/{ds0.SeriesInstanceUID}/instances"
        first = curl(f"{base}/{ds0.SOPInstanceUID}/frames/1", "--header", FRAMES_ACCEPT)
        assert first.status == 503, first.body
        for ds in datasets:
            r = curl(f"{base}/{ds.SOPInstanceUID}/frames/1", "--header", FRAMES_ACCEPT)
            assert r.status == 200, r.body
            assert r.parts()[0][1] == ds.PixelData
        asked = proxy.requests
        assert sum("/frames/" in p for p in asked) == 3, asked
        assert not any(p.split("?")[0].endswith(str(ds.SOPInstanceUID)) for p in asked for ds in datasets), asked
        assert "cutting them from the instances" not in gw.log()
    finally:
        gw.kill()
        proxy.stop()
        orthanc.cleanup()

def test_rendered_and_thumbnails_use_the_cached_frames(setup: Setup) -> None:
    setup.scroll()
    asked = list(setup.proxy.requests)
    for ds in setup.datasets:
        url = f"{setup.series_url}/instances/{ds.SOPInstanceUID}"
        for path in ("rendered", "thumbnail", "frames/1/rendered"):
            r = curl(f"{url}/{path}", "--header", "Accept: image/png")
            assert r.status == 200 and r.body.startswith(b"\x89PNG"), path
    assert setup.proxy.requests == asked, setup.proxy.requests[len(asked):]


def _revalidate(url: str, accept: str, etag: str) -> CurlResult:
    return curl(url, "--header", accept, "--header", f"If-None-Match: {etag}")


def test_if_none_match_gets_304_without_a_body(setup: Setup) -> None:
    ds = setup.datasets[0]
    frame = curl(setup.frame_url(ds), "--header", FRAMES_ACCEPT)
    assert frame.status == 200 and frame.headers["etag"]
    assert "max-age=" in frame.headers["cache-control"]
    assert frame.headers["vary"] == "Accept"  # a browser keeps one answer per Accept
    cross = curl(setup.frame_url(ds), "--header", FRAMES_ACCEPT, "--header", "Origin: http://viewer.localhost")
    assert cross.headers["vary"] == "Accept, Origin" and cross.headers["access-control-allow-origin"] == "http://viewer.localhost"
    again = _revalidate(setup.frame_url(ds), FRAMES_ACCEPT, frame.headers["etag"])
    assert again.status == 304 and again.body == b"" and again.headers["etag"] == frame.headers["etag"]
    # another representation of the same frame has another validator
    native = curl(setup.frame_url(ds), "--header", "Accept: multipart/related; type=application/octet-stream")
    assert native.status == 200 and native.headers["etag"] != ""
    other = _revalidate(setup.frame_url(setup.datasets[1]), FRAMES_ACCEPT, frame.headers["etag"])
    assert other.status == 200 and other.parts()[0][1] == setup.datasets[1].PixelData

    metadata = curl(f"{setup.series_url}/metadata", "--header", METADATA_ACCEPT)
    assert metadata.status == 200 and metadata.headers["cache-control"] == "private, no-cache"
    again = _revalidate(f"{setup.series_url}/metadata", METADATA_ACCEPT, metadata.headers["etag"])
    assert again.status == 304 and again.body == b""
    stale = _revalidate(f"{setup.series_url}/metadata", METADATA_ACCEPT, '"0123"')
    assert stale.status == 200 and stale.body == metadata.body


def _another_of_the_series(ds: pydicom.Dataset, path: Path, number: int) -> pydicom.Dataset:
    new = ds.copy()
    new.file_meta = ds.file_meta.copy()
    new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    new.InstanceNumber = number
    new.save_as(path, enforce_file_format=True)
    return new


def _sops(answer: CurlResult) -> set[str]:
    return {obj["00080018"]["Value"][0] for obj in answer.json()}


def test_instances_stored_through_the_gateway_show_in_metadata_at_once(setup: Setup, tmp_path: Path) -> None:
    """Series and study metadata are kept 60 s by default; an instance stored through
    the facade (STOW-RS) or by C-STORE shows in them as soon as it is in the archive,
    even when a viewer asked between the STOW-RS answer and the delivery."""
    ds = setup.datasets[0]
    study_url = f"{setup.gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}/metadata"
    series_url = f"{setup.series_url}/metadata"
    before = {str(d.SOPInstanceUID) for d in setup.datasets}
    assert _sops(curl(series_url, "--header", METADATA_ACCEPT)) == before
    assert _sops(curl(study_url, "--header", METADATA_ACCEPT)) == before

    stowed = _another_of_the_series(ds, tmp_path / "stowed.dcm", 5)
    r = curl("-X", "POST", f"{setup.gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}", "--header", "Content-Type: application/dicom",
             "--header", "Accept: application/dicom+json", "--data-binary", f"@{tmp_path / 'stowed.dcm'}")
    assert r.status == 200, r.body
    curl(series_url, "--header", METADATA_ACCEPT)  # a viewer asking before delivery
    setup.gw.wait_counts(delivered=1)
    after = before | {str(stowed.SOPInstanceUID)}
    assert _sops(curl(series_url, "--header", METADATA_ACCEPT)) == after
    assert _sops(curl(study_url, "--header", METADATA_ACCEPT)) == after

    stored = _another_of_the_series(ds, tmp_path / "stored.dcm", 6)
    assert storescu(setup.gw.port, [tmp_path / "stored.dcm"], setup.gw.ae_title).returncode == 0
    setup.gw.wait_counts(delivered=2)
    after |= {str(stored.SOPInstanceUID)}
    assert _sops(curl(series_url, "--header", METADATA_ACCEPT)) == after
    assert _sops(curl(study_url, "--header", METADATA_ACCEPT)) == after


def test_xml_metadata_has_a_validator_too(setup: Setup, tmp_path: Path) -> None:
    xml = 'Accept: multipart/related; type="application/dicom+xml"'
    url = f"{setup.series_url}/metadata"
    first = curl(url, "--header", xml)
    assert first.status == 200 and first.headers["etag"] and first.headers["cache-control"] == "private, no-cache"
    assert first.headers["etag"] != curl(url, "--header", METADATA_ACCEPT).headers["etag"]  # one per representation
    again = _revalidate(url, xml, first.headers["etag"])
    assert again.status == 304 and again.body == b"" and again.headers["etag"] == first.headers["etag"]
    # a new instance in the series: a new validator, and the whole answer
    _another_of_the_series(setup.datasets[0], tmp_path / "new.dcm", 5)
    r = curl("-X", "POST", f"{setup.gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom",
             "--data-binary", f"@{tmp_path / 'new.dcm'}")
    assert r.status == 200
    setup.gw.wait_counts(delivered=1)
    changed = _revalidate(url, xml, first.headers["etag"])
    assert changed.status == 200 and changed.headers["etag"] != first.headers["etag"]
    assert len(changed.parts()) == len(setup.datasets) + 1
