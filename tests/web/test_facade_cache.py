"""The facade cache's bound and eviction order, its expiry of study/series metadata and
its validators, on the class itself (the integration test counts an archive's requests)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.upstream.base import Frame, JsonObject
from gateway.upstream.errors import UpstreamUnavailable
from gateway.web.app import facade_cache
from gateway.web.bulk_uris import point_at_facade, with_root
from gateway.web.cache import FacadeCache, etag_for, not_modified

STUDY, SERIES = "1.2.3", "1.2.3.4"


class Archive:
    """Counts what the cache asks of it; every frame is 1000 bytes. Its metadata, at any
    level, is one object of an instance these tests never read alone (an instance in a
    series' metadata is kept as that instance's: see the series tests below)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int]] = []
        self.metadata = 0

    async def fetch_frames(self, sop: str, numbers: list[int]) -> AsyncIterator[Frame]:
        for n in numbers:
            self.frames.append((sop, n))
            yield Frame(n, bytes([n % 256]) * 1000, "1.2.840.10008.1.2.1")

    async def fetch_metadata(self) -> list[JsonObject]:
        self.metadata += 1
        return [{"00080018": {"vr": "UI", "Value": ["1.2.3.4.99"]}}]


async def _frames(cache: FacadeCache, archive: Archive, sop: str, numbers: list[int]) -> list[Frame]:
    return [f async for f in cache.frames(STUDY, SERIES, sop, numbers, lambda run: archive.fetch_frames(sop, run))]


def test_bounded_least_recently_used_and_in_order(tmp_path: Path) -> None:
    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=3500, metadata_seconds=60)
        archive = Archive()
        got = await _frames(cache, archive, "9.1", [1, 2, 3])
        assert [f.number for f in got] == [1, 2, 3] and archive.frames == [("9.1", 1), ("9.1", 2), ("9.1", 3)]
        # frame 2 cached, 1 and 3 too: nothing new asked; the order is the one asked
        got = await _frames(cache, archive, "9.1", [3, 2, 1])
        assert [f.number for f in got] == [3, 2, 1] and len(archive.frames) == 3
        assert got[0].data == bytes([3]) * 1000
        # a fourth frame evicts the least recently used (frame 3, used before 2 and 1)
        await _frames(cache, archive, "9.1", [4])
        assert cache.bytes <= 3500 and sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 3500
        await _frames(cache, archive, "9.1", [1, 2, 3])
        assert archive.frames[4:] == [("9.1", 3)]  # only the evicted one went back to the archive
        # a value larger than the whole cache is served but not kept
        small = FacadeCache(tmp_path / "s", max_bytes=500, metadata_seconds=60)
        await _frames(small, archive, "9.2", [1])
        await _frames(small, archive, "9.2", [1])
        assert archive.frames[-2:] == [("9.2", 1), ("9.2", 1)] and small.bytes == 0

    asyncio.run(run())


def test_entries_share_segment_files_and_a_used_segment_outlives_the_others(tmp_path: Path) -> None:
    """Entries go into segment files (a sixteenth of the bound: four 1000-byte frames a
    segment here), not a file each; past the bound the least recently used segment goes
    whole, its frames with it, so a frame read again keeps its segment-mates too; a key
    kept again replaces its value; the files never exceed the bound."""

    async def run() -> None:
        directory = tmp_path / "c"
        cache = FacadeCache(directory, max_bytes=64_000, metadata_seconds=60)
        archive = Archive()
        await _frames(cache, archive, "9.4", list(range(1, 41)))
        assert len(list(directory.iterdir())) == 10 and cache.disk_bytes == cache.bytes == 40_000
        await _frames(cache, archive, "9.4", [1])  # the first segment (frames 1-4) is used again
        await _frames(cache, archive, "9.4", list(range(41, 73)))  # 32 more: two segments go
        assert sum(p.stat().st_size for p in directory.iterdir()) <= 64_000 and cache.disk_bytes <= 64_000
        asked = len(archive.frames)
        await _frames(cache, archive, "9.4", [1, 2, 3, 4, *range(13, 73)])
        assert len(archive.frames) == asked  # all kept
        await _frames(cache, archive, "9.4", [5, 9])
        assert archive.frames[asked:] == [("9.4", 5), ("9.4", 9)]  # their segments (5-8, 9-12) went
        await cache.keep_frames(STUDY, SERIES, "9.4", [Frame(2, b"new" * 10, "1.2.840.10008.1.2.1")], None, None)
        got = await _frames(cache, archive, "9.4", [2, 3])
        assert [f.data for f in got] == [b"new" * 10, bytes([3]) * 1000]
        # however large the bound, its segments stay sixteen-odd files (descriptors)
        large = FacadeCache(tmp_path / "large", max_bytes=1 << 40, metadata_seconds=60)
        await _frames(large, archive, "9.5", list(range(1, 1001)))
        assert len(list((tmp_path / "large").iterdir())) == 1 and large.bytes == 1_000_000

    asyncio.run(run())


def test_series_metadata_expires_instance_metadata_does_not(tmp_path: Path) -> None:
    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=0.2)
        archive = Archive()
        for _ in range(2):
            await cache.metadata(STUDY, SERIES, None, archive.fetch_metadata)
            await cache.metadata(STUDY, SERIES, "1.2.3.4.5", archive.fetch_metadata)
        assert archive.metadata == 2
        await asyncio.sleep(0.3)
        await cache.metadata(STUDY, SERIES, None, archive.fetch_metadata)
        await cache.metadata(STUDY, SERIES, "1.2.3.4.5", archive.fetch_metadata)
        assert archive.metadata == 3  # the series' again, the instance's still kept
        cache.forget_study(STUDY)
        await cache.metadata(STUDY, SERIES, "1.2.3.4.5", archive.fetch_metadata)
        assert archive.metadata == 4 and cache.bytes > 0

    asyncio.run(run())


def test_storing_drops_what_it_makes_stale_and_nothing_else(tmp_path: Path) -> None:
    """The study's and the series' metadata and the stored instance's own entries go;
    another series' metadata, another instance's frames, another study's stay."""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=600)
        archive = Archive()
        other_study = "1.2.9"
        reads = [
            (STUDY, None, None), (STUDY, SERIES, None), (STUDY, "1.2.3.7", None), (STUDY, SERIES, "1.2.3.4.5"),
            (STUDY, SERIES, "1.2.3.4.6"), (other_study, None, None),
        ]
        for study, series, sop in reads:
            await cache.metadata(study, series, sop, archive.fetch_metadata)
        await _frames(cache, archive, "1.2.3.4.5", [1])
        await _frames(cache, archive, "1.2.3.4.6", [1])
        assert archive.metadata == 6 and len(archive.frames) == 2
        cache.forget_stored(STUDY, [(SERIES, "1.2.3.4.5")])
        for study, series, sop in reads:
            await cache.metadata(study, series, sop, archive.fetch_metadata)
        assert archive.metadata == 6 + 3  # the study's, the series', the stored instance's
        await _frames(cache, archive, "1.2.3.4.5", [1])
        await _frames(cache, archive, "1.2.3.4.6", [1])
        assert archive.frames[2:] == [("1.2.3.4.5", 1)]

    asyncio.run(run())


def test_an_answer_fetched_across_a_store_is_not_kept(tmp_path: Path) -> None:
    """A series' metadata read from the archive while an instance of it was stored may
    predate the instance: it answers its own request but is not kept."""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=600)
        archive = Archive()

        async def slow() -> list[JsonObject]:
            cache.forget_stored(STUDY, [(SERIES, "1.2.3.4.7")])  # stored while the read is under way
            return await archive.fetch_metadata()

        assert await cache.metadata(STUDY, SERIES, None, slow) == await archive.fetch_metadata()
        await cache.metadata(STUDY, SERIES, None, archive.fetch_metadata)
        assert archive.metadata == 3  # read again: the first answer was not kept
        await cache.metadata(STUDY, SERIES, None, archive.fetch_metadata)
        assert archive.metadata == 3

        async def frames_across(run: list[int]) -> AsyncIterator[Frame]:
            cache.forget_stored(STUDY, [(SERIES, "1.2.3.4.8")])
            async for frame in archive.fetch_frames("1.2.3.4.8", run):
                yield frame

        assert len([f async for f in cache.frames(STUDY, SERIES, "1.2.3.4.8", [1], frames_across)]) == 1
        await _frames(cache, archive, "1.2.3.4.8", [1])
        assert archive.frames == [("1.2.3.4.8", 1)] * 2  # read again: the first was not kept
        await _frames(cache, archive, "1.2.3.4.8", [1])
        assert len(archive.frames) == 2

    asyncio.run(run())


def _instance(sop: str, series: str = SERIES) -> JsonObject:
    return {"0020000E": {"vr": "UI", "Value": [series]}, "00080018": {"vr": "UI", "Value": [sop]}}


class SeriesArchive:
    """Series metadata of three instances (slow enough for requests to overlap), and each
    instance's own, counted apart."""

    def __init__(self, fail: bool = False) -> None:
        self.series = 0
        self.instances: list[str] = []
        self.fail = fail

    async def fetch_series(self) -> list[JsonObject]:
        self.series += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise UpstreamUnavailable("archive error: HTTP 500")
        return [_instance(f"1.2.3.4.{n}") for n in (1, 2, 3)] + [_instance("1.2.3.4.9", "1.2.3.8")]

    def fetch_instance(self, sop: str):  # noqa: ANN201
        async def fetch() -> list[JsonObject]:
            self.instances.append(sop)
            return [_instance(sop)]

        return fetch


def test_an_instances_metadata_comes_from_its_series_read_once(tmp_path: Path) -> None:
    """Frames of a series asked at once cost the archive one series metadata request,
    not one instance metadata request per frame; an instance the series' answer lacks is
    asked alone, once; and what the series' answer says of another series is not kept."""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=60)
        archive = SeriesArchive()

        async def read(sop: str) -> list[JsonObject]:
            return await cache.instance_metadata(STUDY, SERIES, sop, archive.fetch_series, archive.fetch_instance(sop))

        answers = await asyncio.gather(*(read(f"1.2.3.4.{n}") for n in (1, 2, 3, 1, 2, 3, 1, 2)))
        assert [a[0]["00080018"]["Value"] for a in answers] == [[f"1.2.3.4.{n}"] for n in (1, 2, 3, 1, 2, 3, 1, 2)]
        assert archive.series == 1 and archive.instances == []
        assert (await read("1.2.3.4.7"))[0]["00080018"]["Value"] == ["1.2.3.4.7"]  # newer than the series' answer
        await read("1.2.3.4.7")
        await read("1.2.3.4.9")  # the series' answer put it in another series
        assert archive.series == 1 and archive.instances == ["1.2.3.4.7", "1.2.3.4.9"]
        # a viewer's own series metadata request keeps every instance's too
        viewer = FacadeCache(tmp_path / "v", max_bytes=1 << 20, metadata_seconds=60)
        assert len(await viewer.metadata(STUDY, SERIES, None, archive.fetch_series)) == 4
        await viewer.instance_metadata(STUDY, SERIES, "1.2.3.4.2", archive.fetch_series, archive.fetch_instance("1.2.3.4.2"))
        assert archive.series == 2 and archive.instances == ["1.2.3.4.7", "1.2.3.4.9"]

    asyncio.run(run())


def test_a_series_metadata_failure_falls_back_to_the_instance(tmp_path: Path) -> None:
    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=60)
        archive = SeriesArchive(fail=True)
        for sop in ("1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.1"):
            got = await cache.instance_metadata(STUDY, SERIES, sop, archive.fetch_series, archive.fetch_instance(sop))
            assert got[0]["00080018"]["Value"] == [sop]
        # the series tried once (not again within metadata_seconds), each instance once
        assert archive.series == 1 and archive.instances == ["1.2.3.4.1", "1.2.3.4.2"]

    asyncio.run(run())


def test_a_malformed_series_answer_is_passed_on_and_keeps_nothing_it_cannot_read(tmp_path: Path) -> None:
    """Objects of an archive's series metadata that are not DICOM JSON are answered as
    they came (the route's business) but kept for no instance."""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=60)
        odd: list[JsonObject] = [{"00080018": ["1.2.3.4.1"]}, {"00080018": {"vr": "UI", "Value": "1.2.3.4.2"}}, _instance("1.2.3.4.3")]
        instances: list[str] = []

        async def series() -> list[JsonObject]:
            return odd

        async def instance() -> list[JsonObject]:
            instances.append("1.2.3.4.1")
            return [_instance("1.2.3.4.1")]

        assert await cache.metadata(STUDY, SERIES, None, series) == odd
        assert (await cache.instance_metadata(STUDY, SERIES, "1.2.3.4.3", series, instance))[0] == _instance("1.2.3.4.3")
        assert (await cache.instance_metadata(STUDY, SERIES, "1.2.3.4.1", series, instance))[0] == _instance("1.2.3.4.1")
        assert instances == ["1.2.3.4.1"]

    asyncio.run(run())


def test_kept_metadata_is_answered_as_its_text_with_the_requests_root(tmp_path: Path) -> None:
    """A series' metadata is answered from the text kept, without the archive, each
    BulkDataURI (sequences included) pointed at the facade under the request's root:
    the same JSON the objects give; an object without valid UIDs keeps the archive's
    URI, and so does a URI without a bulk data segment."""
    bulk = "http://archive:8042/dicom-web/studies/1.2.3/series/1.2.3.4/instances/{}/bulk/{}"

    def instance(sop: str) -> JsonObject:
        return {
            "0020000E": {"vr": "UI", "Value": [SERIES]},
            "00080018": {"vr": "UI", "Value": [sop]},
            "00282000": {"vr": "OB", "BulkDataURI": bulk.format(sop, "00282000")},
            "00540016": {"vr": "SQ", "Value": [{"00189089": {"vr": "FD", "BulkDataURI": bulk.format(sop, "00540016/0/00189089?x=1")}}]},
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://archive/elsewhere/7fe00010"},
        }

    calls = 0

    async def fetch() -> list[JsonObject]:
        nonlocal calls
        calls += 1
        return [instance("1.2.3.4.1"), instance("1.2.3.4.2"), {**instance("bad uid"), "00080018": {"vr": "UI", "Value": ["x y"]}}]

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=60)
        root = 'https://gw.example:8443/dicom-web "ü"'
        cold = with_root(await cache.metadata_body(STUDY, SERIES, None, fetch), root)
        warm = with_root(await cache.metadata_body(STUDY, SERIES, None, fetch), root)
        assert calls == 1 and cold == warm
        got = json.loads(warm)
        facade = f"{root}/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.2/bulkdata/"
        assert got[1]["00282000"]["BulkDataURI"] == facade + "00282000"
        assert got[1]["00540016"]["Value"][0]["00189089"]["BulkDataURI"] == facade + "00540016/0/00189089"
        assert got[1]["7FE00010"]["BulkDataURI"] == "http://archive/elsewhere/7fe00010"
        assert got[2]["00282000"]["BulkDataURI"] == bulk.format("bad uid", "00282000")
        # what serialising the objects pointed at the facade gives, byte for byte
        objects = [instance("1.2.3.4.1"), instance("1.2.3.4.2"), {**instance("bad uid"), "00080018": {"vr": "UI", "Value": ["x y"]}}]
        for obj in objects:
            point_at_facade(obj, root, STUDY)
        assert warm == json.dumps(objects, ensure_ascii=False).encode("utf-8")
        # an instance's own entry, kept from its series', is its text too
        one = with_root(await cache.metadata_body(STUDY, SERIES, "1.2.3.4.1", fetch), root)
        assert calls == 1 and json.loads(one) == [got[0]]

    asyncio.run(run())


def test_if_none_match() -> None:
    tag = etag_for("1.2.3", [1], "application/octet-stream", "1.2.840.10008.1.2.5")
    assert tag.startswith('W/"') and tag != etag_for("1.2.3", [1], "application/octet-stream", "1.2.840.10008.1.2.1")
    assert not_modified(tag, tag) and not_modified(f'"x", {tag}', tag) and not_modified("*", tag)
    assert not_modified(tag.removeprefix("W/"), tag)  # weak comparison
    assert not not_modified(None, tag) and not not_modified('"other"', tag)


def test_cache_keys_and_where_the_cache_lives(tmp_path: Path) -> None:
    default = parse_config({
        "spool": {"directory": str(tmp_path / "spool")},
        "upstream": {"type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
    })
    assert default.http.cache.max_mb == 256 and default.http.cache.metadata_seconds == 60
    cache = facade_cache(default)
    assert cache is not None and cache.directory == default.spool.directory / "facade-cache"
    config = parse_config({
        "spool": {"directory": str(tmp_path / "spool")},
        "upstream": {"type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        "http": {"cache": {"max_mb": 0.5, "directory": str(tmp_path / "c"), "metadata_seconds": 5, "client_max_age": 10}},
    })
    cache = facade_cache(config)
    assert cache is not None and cache.directory == tmp_path / "c" and cache.max_bytes == 1 << 19
    assert facade_cache(parse_config({})) is None  # the embedded archive is on disk already
    off = {
        "spool": {"directory": str(tmp_path / "spool")},
        "upstream": {"type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        "http": {"cache": {"max_mb": 0}},
    }
    assert facade_cache(parse_config(off)) is None
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"cache": {"max_mb": -1, "size": 3}}})
    assert "http.cache.max_mb" in str(info.value) and "http.cache.size: unknown key" in str(info.value)


def test_an_unusable_cache_directory_disables_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = parse_config({
        "spool": {"directory": str(tmp_path / "spool")},
        "upstream": {"type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        "http": {"cache": {"directory": str(blocker / "cache")}},
    })
    assert facade_cache(config) is None
    assert "facade cache disabled" in caplog.text


def test_an_entry_whose_file_was_cut_short_is_no_longer_counted(tmp_path: Path) -> None:
    """A segment file truncated behind the cache's back (an admin freeing space) loses
    its entries: each is dropped when read short, and fetched again. (A segment file
    deleted instead still answers: the cache holds it open until it evicts it.)"""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=1 << 20, metadata_seconds=60)
        archive = Archive()
        await _frames(cache, archive, "9.3", [1])
        for path in (tmp_path / "c").iterdir():
            os.truncate(path, 0)

        async def archive_down(numbers: list[int]) -> AsyncIterator[Frame]:
            raise UpstreamUnavailable("archive down")
            yield Frame(0, b"", "")  # an async generator, as the archive's are

        with pytest.raises(UpstreamUnavailable):
            [f async for f in cache.frames(STUDY, SERIES, "9.3", [1], archive_down)]
        assert cache.bytes == 0 and not cache.index  # the bound counts only what is on disk
        got = await _frames(cache, archive, "9.3", [1])
        assert got[0].data == bytes([1]) * 1000 and archive.frames == [("9.3", 1), ("9.3", 1)]
        assert cache.bytes == 1000

    asyncio.run(run())


def test_a_value_derived_from_instance_metadata_lives_as_long_as_that_metadata(tmp_path: Path) -> None:
    """What a frame request derives from an instance's metadata (its pixel description)
    is kept in memory only while the metadata entry is cached: gone when the instance is
    stored again, when the entry is evicted, and never kept across a change of the study."""

    async def run() -> None:
        cache = FacadeCache(tmp_path / "c", max_bytes=2500, metadata_seconds=60)
        archive = Archive()
        sop = "1.2.3.4.99"

        async def read() -> None:
            await cache.metadata(STUDY, SERIES, sop, archive.fetch_metadata)

        # not kept while the metadata is not in the cache
        cache.remember(STUDY, SERIES, sop, None, "pixels", "v0", cache.generation(STUDY))
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") is None
        await read()
        cache.remember(STUDY, SERIES, sop, None, "pixels", "v1", cache.generation(STUDY))
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") == "v1"
        assert cache.derived(STUDY, SERIES, sop, "image-set", "pixels") is None  # another scope
        # stored again (Azure's PUT replaces it): dropped with the metadata
        cache.forget_stored(STUDY, [(SERIES, sop)])
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") is None
        # derived from metadata read before a change of the study: not kept
        before = cache.generation(STUDY)
        await read()
        cache.forget_stored(STUDY, [(SERIES, "1.2.3.4.5")])  # another instance of the study stored
        cache.remember(STUDY, SERIES, sop, None, "pixels", "v2", before)
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") is None
        cache.remember(STUDY, SERIES, sop, None, "pixels", "v3", cache.generation(STUDY))
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") == "v3"
        # evicted with its entry (frames fill the 2500-byte cache)
        await _frames(cache, archive, "9.1", [1, 2, 3])
        assert cache.derived(STUDY, SERIES, sop, None, "pixels") is None

    asyncio.run(run())
