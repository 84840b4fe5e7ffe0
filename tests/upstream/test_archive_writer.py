"""The embedded archive's writer process, driven directly (`WriterProcess`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom

from gateway.upstream import archive_metadata
from gateway.upstream.archive_writer import INDEXED, ArchiveWriter, WriterProcess, header_json, index_row
from gateway.upstream.base import MetadataText, StoreItem
from gateway.upstream.local import LocalUpstream
from tests.support.corpus import pydicom_corpus, sample_items
from tests.support.synth import ct_series


def item(path: Path) -> StoreItem:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    uid = lambda kw: str(ds.get(kw, "") or "")  # noqa: E731
    return StoreItem(path, path.stat().st_size, uid("SOPInstanceUID") or "1.2.3", uid("SOPClassUID"), uid("StudyInstanceUID"), uid("SeriesInstanceUID"), "")


def test_a_cancelled_batch_does_not_hand_its_answer_to_the_next(tmp_path: Path) -> None:
    """A caller cancelled while the writer works (the forwarder at shutdown) must not
    leave that batch's answer in the pipe for the next batch to read as its own."""
    LocalUpstream(tmp_path / "spool")  # creates the archive and its index
    good, other = ct_series(tmp_path / "ct", 2, rows=32, columns=32)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a Part 10 file" * 20)
    shutil.copy(other, tmp_path / "other.dcm")

    async def run() -> tuple[list[str], list[str]]:
        writer = WriterProcess(tmp_path / "spool" / "archive")
        try:
            first = asyncio.create_task(writer.store([item(garbage)]))  # rejected, when answered
            await asyncio.sleep(0.05)
            first.cancel()
            second = await writer.store([item(good), item(tmp_path / "other.dcm")])
            third = await writer.store([item(garbage)])
            return [o.kind for o in second], [o.kind for o in third]
        finally:
            await writer.close()

    assert asyncio.run(run()) == (["delivered", "delivered"], ["rejected"])


def test_the_archived_metadata_is_what_pydicom_gives_for_the_kept_elements(tmp_path: Path) -> None:
    """`header_json` encodes plain elements from their bytes and converts the rest
    once from its raw form, at a third of pydicom's cost for a scanner's header, and
    must give exactly what pydicom's own
    ``Dataset.to_json_dict(suppress_invalid_tags=True)`` gives for the elements it
    keeps (pixel data and private binary values left out): every file of the corpus
    (every transfer syntax, character sets, sequences, private groups, invalid
    values), and a CT carrying a scanner's 258 elements. An instance pydicom cannot
    read is unreadable both ways."""

    def pydicoms(ds: pydicom.Dataset) -> str:
        kept = pydicom.Dataset()
        for elem in ds:
            if elem.tag.group not in (0x0002, 0x7FE0) and not (elem.tag.is_private and elem.VR in ("OB", "UN")):
                kept.add(elem)
        return json.dumps(kept.to_json_dict(bulk_data_threshold=65536, suppress_invalid_tags=True), separators=(",", ":"))

    def outcome(encode: Callable[[pydicom.Dataset], str], path: Path) -> str:
        try:
            return encode(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - compared, not raised
            return f"raised {type(exc).__name__}"

    paths = [i.path for i in pydicom_corpus(dcmtk_only=False) + sample_items()]
    paths += ct_series(tmp_path / "scanner", 1, rows=16, columns=16, scanner_header=True)
    assert len(pydicom.dcmread(paths[-1])) == 258
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            assert outcome(header_json, path) == outcome(pydicoms, path), path.name


def test_the_index_texts_are_what_pydicom_gives(tmp_path: Path) -> None:
    """The index columns a search matches on (`INDEXED`) hold ``str`` of pydicom's
    value, or NULL when it is absent or empty, also where `index_row` takes them from
    the header's JSON: every corpus file and a scanner's CT."""
    paths = [i.path for i in pydicom_corpus(dcmtk_only=False) + sample_items()]
    paths += ct_series(tmp_path / "scanner", 1, rows=16, columns=16, scanner_header=True)

    def pydicoms(ds: pydicom.Dataset) -> dict[str, str | None]:
        values = {col: ds.get(keyword) for col, keyword in INDEXED.items()}
        return {col: None if value is None or value == "" else str(value) for col, value in values.items()}

    def outcome(texts: Callable[[pydicom.Dataset], dict[str, str | None]], path: Path) -> object:
        try:
            return texts(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - compared, not raised
            return f"raised {type(exc).__name__}"

    def ours(ds: pydicom.Dataset) -> dict[str, str | None]:
        row = index_row(ds, ("1.2", "1.2", "1.2", "1.2"), "1.2.840.10008.1.2", 1, 0.0, "f.dcm")
        return {col: row[col] for col in INDEXED}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compared = 0
        for path in paths:
            theirs, got = outcome(pydicoms, path), outcome(ours, path)
            if isinstance(got, dict):
                assert got == theirs, path.name
                compared += 1
            else:  # unreadable: where pydicom reads the indexed values, the header is what it cannot encode
                assert not isinstance(theirs, dict) or outcome(header_json, path) == got, path.name
        assert compared > 100


def test_the_facade_metadata_of_archived_files_is_what_the_data_set_gives(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The facade's metadata of an archived file (`metadata_json`: bulk data by
    reference, values read later as needed) takes plain elements from their bytes
    (`element_json`) and the rest `converted`; it must be what indexing the data set
    gives, on every corpus file and a scanner's CT."""
    paths = [i.path for i in pydicom_corpus(dcmtk_only=False) + sample_items()]
    paths += ct_series(tmp_path / "scanner", 1, rows=16, columns=16, scanner_header=True)

    def metadata(path: Path) -> str:
        try:
            return json.dumps(archive_metadata.metadata_json(pydicom.dcmread(path, defer_size=archive_metadata.BULK_DATA_THRESHOLD)))
        except Exception as exc:  # noqa: BLE001 - compared, not raised
            return f"raised {type(exc).__name__}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = [metadata(path) for path in paths]
        monkeypatch.setattr(archive_metadata, "converted", lambda ds, raw: ds[raw.tag])
        monkeypatch.setattr(archive_metadata, "element_json", lambda raw: None)
        assert [metadata(path) for path in paths] == fast


def test_the_index_keeps_each_instances_metadata_as_its_file_gives_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The writer keeps each instance's metadata text in the index, so the facade
    answers a series' metadata from one query: it must be what reading the stored file
    gives (`file_metadata`), on every corpus file and a scanner's CT. Metadata longer
    than the index keeps, and rows without it (indexed before it was kept), are read
    from the file, and answer the same."""
    paths = [i.path for i in pydicom_corpus(dcmtk_only=False) + sample_items()]
    paths += ct_series(tmp_path / "scanner", 1, rows=16, columns=16, scanner_header=True)
    up = LocalUpstream(tmp_path / "spool")
    writer = ArchiveWriter(up.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = writer.store_batch([item(path) for path in paths])
        assert sum(o.kind == "delivered" for o in outcomes) > 100
        rows = writer._db.execute("SELECT file, text FROM instances LEFT JOIN metadata_texts USING (sop_instance_uid)").fetchall()
        assert len(rows) > 100  # fewer: corpus files repeating a SOP Instance UID replace each other
        for file, text in rows:
            assert text == expected_of(up.root / file), file

        # Over the bound: not kept, and answered from the file all the same.
        monkeypatch.setattr(archive_metadata, "KEPT_METADATA_MAX", 100)
        scanner = writer.store_batch([item(paths[-1])])
        assert [o.kind for o in scanner] == ["delivered"]
        uids = pydicom.dcmread(paths[-1], stop_before_pixels=True)
        [(file, text)] = writer._db.execute(
            "SELECT file, text FROM instances LEFT JOIN metadata_texts USING (sop_instance_uid) WHERE sop_instance_uid = ?", [str(uids.SOPInstanceUID)]
        ).fetchall()
        assert text is None

    async def answered() -> list[list[MetadataText]]:
        try:
            series = (str(uids.StudyInstanceUID), str(uids.SeriesInstanceUID))
            return [await up.retrieve_metadata_texts(*series), await up.retrieve_metadata_texts(*series, str(uids.SOPInstanceUID))]
        finally:
            await up.close()

    whole, one = asyncio.run(answered())
    assert whole == one == [MetadataText(*map(str, (uids.StudyInstanceUID, uids.SeriesInstanceUID, uids.SOPInstanceUID)), expected_of(up.root / file))]


def expected_of(path: Path) -> str:
    return archive_metadata.metadata_text(archive_metadata.file_metadata(path))
