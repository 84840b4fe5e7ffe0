"""The embedded archive's writer: it stores delivered instances (a hard link to the
spool file, the header parsed, its DICOM JSON, the index row, the metadata text the
facade answers) in a process of its own.

Why a process: indexing an instance costs about a millisecond of Python (pydicom parses
the header, the DICOM JSON is built from it). In the daemon's interpreter that time
holds the GIL the receiving associations need to answer their C-STOREs. Measured on
this project's 2-core machine, two daemons of each kind interleaved in one run (200
x 512 KB CT per round): acknowledged over the embedded archive, one association
244 / 250 -> 320 / 334 instances/s (median of 7 rounds), four at once 295 / 217 ->
431 / 387 (median of 5), once the writer ran apart. The daemon keeps its own connection to the index for
searches, retrieves and deletes; SQLite's WAL lets the two processes share it.

The process is a fresh interpreter (``python -m gateway.upstream.archive_writer``),
never a fork (the daemon has threads by then); it ignores SIGINT and SIGTERM, since
systemd signals the whole control group and the daemon decides when its writer stops
(after the batch in hand), and it exits at end of file on its stdin: when the daemon
closes the pipe, or dies. If it dies mid-batch, the batch is reported ``retry`` and a
new process takes the next one: the spool still holds every instance, and storing one
again replaces its earlier copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import struct
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import VR

from gateway.fsutil import fsync_path
from gateway.sqlite import connect, immediate
from gateway.upstream.archive_metadata import converted, kept_metadata
from gateway.upstream.base import StoreItem, StoreOutcome
from gateway.upstream.raw_json import element_json

log = logging.getLogger("gateway.upstream")
# Seconds `WriterProcess.close` waits for the batch in hand before killing the process.
CLOSE_SECONDS = 20.0

# The embedded archive's index, beside its ``objects`` directory.
INDEX = "index.sqlite"
# What reading a malformed header raises.
UNREADABLE = (InvalidDicomError, OSError, ValueError, EOFError, NotImplementedError, KeyError, TypeError, AttributeError)

INDEXED = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "instance_number": "InstanceNumber",
}


# The VRs pydicom reads as plain text: one such value in the JSON is its index text.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "UC", "ST", "LT", "UT", "UR"})
_INDEXED_TAGS = {keyword: f"{tag_for_keyword(keyword):08X}" for keyword in INDEXED.values()}


def _text(ds: pydicom.Dataset, keyword: str, header: dict[str, Any]) -> str | None:
    """The index text of an attribute: ``str`` of pydicom's value, or None when it is
    absent or empty. Taken from the header's JSON where that holds one text (or none);
    names, numbers and several values take pydicom's ``str``."""
    entry = header.get(_INDEXED_TAGS[keyword])
    if entry is not None and entry["vr"] in _TEXT_VRS:
        values = entry.get("Value")
        if values is None:
            return None
        if len(values) == 1:
            return values[0] or None
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def write_row(db: sqlite_utils.Database, row: dict[str, Any], text: str | None) -> str | None:
    """Index an instance: its row, and its metadata text in ``metadata_texts`` (a text
    kept for an earlier copy of the instance goes when this one has none, so it is
    never answered for this one); the file of the row it replaced, if any."""
    uid = row["sop_instance_uid"]
    earlier = db.execute("SELECT file FROM instances WHERE sop_instance_uid = ?", [uid]).fetchone()
    columns = list(row)
    db.execute(
        f"INSERT OR REPLACE INTO instances ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        [row[c] for c in columns],
    )
    if text is None:
        db.execute("DELETE FROM metadata_texts WHERE sop_instance_uid = ?", [uid])
    else:
        db.execute("INSERT OR REPLACE INTO metadata_texts (sop_instance_uid, text) VALUES (?, ?)", [uid, text])
    return None if earlier is None else str(earlier[0])


def index_row(
    ds: pydicom.Dataset,
    uids: tuple[str, str, str, str],
    transfer_syntax: str,
    size: int,
    stored_at: float,
    file: str,
    encoded: dict[int, Any] | None = None,
) -> dict[str, Any]:
    """The index row of an archived instance whose header is ``ds``; ``uids``: its
    SOP Instance, SOP Class, Study and Series UIDs; ``file``: its path in the archive;
    ``encoded``: see `_header`. Raises what a malformed header raises (one of
    UNREADABLE)."""
    # Elements are decoded here, not by dcmread: one pydicom cannot decode (a VR
    # no standard defines) makes the instance as unreadable as a bad header.
    header = _header(ds, encoded)
    indexed = {col: _text(ds, kw, header) for col, kw in INDEXED.items()}
    sop_instance_uid, sop_class_uid, study_uid, series_uid = uids
    return {
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": sop_class_uid,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "transfer_syntax": transfer_syntax,
        **indexed,
        "size": size,
        "stored_at": stored_at,
        "metadata": json.dumps(header, separators=(",", ":")),
        "file": file,
    }


def header_json(ds: pydicom.Dataset) -> str:
    """The data set without pixel data as DICOM JSON; unencodable elements are dropped.

    What pydicom's ``Dataset.to_json_dict(suppress_invalid_tags=True)`` gives for the
    kept elements (a test holds it to that on the corpus).
    """
    return json.dumps(_header(ds), separators=(",", ":"))


def _header(ds: pydicom.Dataset, encoded: dict[int, Any] | None = None) -> dict[str, Any]:
    """`header_json` before it is serialised. Plain elements are encoded from their
    bytes (`element_json`), the rest `converted`: for a scanner's CT header, the JSON
    was most of what the archive spent on an instance (pydicom's way 30 ms for
    `CT_small.dcm`'s on a slow machine, each element converted once 21 ms, plain
    elements from their bytes 6 ms). ``encoded`` gets what `element_json` gave for
    each element, for the metadata's pass over the same data set (`kept_metadata`)."""
    out: dict[str, Any] = {}
    kept: list[pydicom.DataElement] = []
    for raw in ds.elements():
        if raw.tag.group in (0x0002, 0x7FE0):
            continue
        plain = element_json(raw) if isinstance(raw, RawDataElement) else None
        if encoded is not None:
            encoded[raw.tag] = plain
        if plain is not None:
            if not (raw.tag.is_private and plain["vr"] == VR.OB):
                out[f"{raw.tag:08X}"] = plain
            continue
        elem = converted(ds, raw)  # raises as reading the data set raised: unreadable
        if not (raw.tag.is_private and elem.VR in (VR.OB, VR.UN)):
            kept.append(elem)
            out[f"{raw.tag:08X}"] = None  # its place in the tag order
    # As pydicom's own: encoded under strict reading, and one element that cannot be
    # encoded must not lose the instance (it is left out).
    with pydicom.config.strict_reading():
        for elem in kept:
            try:
                out[f"{elem.tag:08X}"] = elem.to_json_dict(None, 65536)
            except Exception:  # noqa: BLE001 - pydicom raises what its converters raise
                # Its message may quote the value (a name, an ID): the tag alone.
                log.debug("element %08X left out of the archived metadata", elem.tag)
                del out[f"{elem.tag:08X}"]
    return out


class ArchiveWriter:
    """Stores batches into the archive at ``root`` (its index created already)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self._db = connect(root / INDEX)

    def _place(self, inst: StoreItem, target: Path) -> bool:
        """Put the instance's bytes at ``target``: a hard link to the spool file, cut to
        the instance's length (a spool record may sit in a longer blank; the cut is
        the spool file's too, which holds the same instance). Returns whether the
        file's own content or size changed (it then needs an fsync; a plain link needs
        only its directory's). Raises OSError."""
        try:
            os.link(inst.path, target)
            changed = False
        except OSError:
            # Different file system (spool moved by hand): copy instead.
            with open(inst.path, "rb") as src, open(target, "wb") as dst:
                left = inst.size
                while left and (chunk := src.read(min(1 << 20, left))):
                    dst.write(chunk)
                    left -= len(chunk)
            changed = True
        if target.stat().st_size > inst.size:
            os.truncate(target, inst.size)
            changed = True
        return changed

    def _index_row(self, inst: StoreItem, target: Path) -> tuple[dict[str, Any], str | None]:
        """The index row of a placed instance and its metadata's text (`kept_metadata`);
        raises what a malformed header raises."""
        uids = (inst.sop_instance_uid, inst.sop_class_uid, inst.study_uid, inst.series_uid)
        relative = str(target.relative_to(self.root))
        encoded: dict[int, Any] = {}
        with open(target, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            row = index_row(ds, uids, inst.transfer_syntax, inst.size, time.time(), relative, encoded)
            return row, kept_metadata(ds, fh, encoded)

    def store_batch(self, instances: Sequence[StoreItem]) -> list[StoreOutcome]:
        """Store a delivery's instances: place and index each, then make the batch
        durable at once (one fsync of each file and directory touched, one index
        commit) before any is reported delivered."""
        outcomes: list[StoreOutcome | None] = [None] * len(instances)
        rows: dict[int, tuple[dict[str, Any], str | None]] = {}
        changed: list[Path] = []
        for n, inst in enumerate(instances):
            token = uuid.uuid4().hex
            target = self.objects / token[:2] / f"{token}.dcm"
            try:
                if self._place(inst, target):
                    changed.append(target)
            except OSError as exc:
                target.unlink(missing_ok=True)
                outcomes[n] = StoreOutcome("retry", f"cannot store in the archive: {exc.strerror or exc}")
                continue
            try:
                rows[n] = self._index_row(inst, target)
            except UNREADABLE as exc:
                target.unlink(missing_ok=True)
                outcomes[n] = StoreOutcome("rejected", f"unreadable instance: {exc}")
        placed = [self.root / row["file"] for row, _ in rows.values()]
        try:
            for path in changed:
                if path in placed:
                    fsync_path(path)
            for directory in {path.parent for path in placed}:
                fsync_path(directory, directory=True)
        except OSError as exc:
            for n, (row, _) in rows.items():
                (self.root / row["file"]).unlink(missing_ok=True)
                outcomes[n] = StoreOutcome("retry", f"cannot store in the archive: {exc.strerror or exc}")
            rows = {}
        replaced: dict[int, str] = {}
        if rows:
            try:
                with immediate(self._db) as db:
                    for n, (row, text) in rows.items():
                        old = write_row(db, row, text)
                        if old is not None and old != row["file"]:
                            replaced[n] = old
            except Exception:
                for path in placed:
                    path.unlink(missing_ok=True)
                raise
        for n, previous in replaced.items():
            (self.root / previous).unlink(missing_ok=True)
        for n in rows:
            outcomes[n] = StoreOutcome("delivered", "replaced an older copy" if n in replaced else "")
        return [o if o is not None else StoreOutcome("retry", "not stored") for o in outcomes]


# -- the writer process ---------------------------------------------------------------
# A plain child process speaking over its stdin and stdout: each message is a 4-byte
# big-endian length and a pickle (a batch of StoreItems in, their StoreOutcomes out).
# No multiprocessing: its pool leaves the worker and a resource tracker running when
# the daemon is SIGKILLed, where a pipe's end of file stops this one.

_LENGTH = struct.Struct(">I")


def _serve(root: Path) -> None:
    """The writer process: store each batch read from stdin, answer on stdout, stop at
    end of file (the daemon closed the pipe, or died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Its stderr is the daemon's log: pydicom's warnings quote values (names, IDs), as
    # the daemon's own logging setup knows (`gateway.cli`).
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    writer = ArchiveWriter(root)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while head := source.read(_LENGTH.size):
        if len(head) < _LENGTH.size:
            break
        batch = pickle.loads(source.read(_LENGTH.unpack(head)[0]))
        try:
            answer: Any = writer.store_batch(batch)
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which retries the batch
            answer = f"{type(exc).__name__}: {exc}"
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(_LENGTH.pack(len(data)) + data)
        sink.flush()


class WriterProcess:
    """``await store(instances)`` in the writer process (started at `start`, or by the
    first batch; again after it died)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one batch at a time

    async def start(self) -> None:
        async with self._lock:
            await self._spawn()

    async def _spawn(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.upstream.archive_writer", str(self.root),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        return self._proc

    async def store(self, instances: Sequence[StoreItem]) -> list[StoreOutcome]:
        """The batch's outcomes; all ``retry`` if the process died on it. Raises
        RuntimeError with the writer's error when storing failed as a whole.

        A caller cancelled meanwhile leaves the exchange to finish (shielded): were its
        answer left unread in the pipe, the next batch would take it for its own."""
        data = pickle.dumps(list(instances), protocol=pickle.HIGHEST_PROTOCOL)
        exchange = asyncio.ensure_future(self._exchange(data, len(instances)))
        exchange.add_done_callback(lambda done: done.cancelled() or done.exception())
        answer = await asyncio.shield(exchange)
        if isinstance(answer, str):
            raise RuntimeError(answer)
        return answer

    async def _exchange(self, data: bytes, count: int) -> list[StoreOutcome] | str:
        """Send one pickled batch and read its answer, one exchange at a time."""
        async with self._lock:
            proc = await self._spawn()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(_LENGTH.pack(len(data)) + data)
                await proc.stdin.drain()
                head = await proc.stdout.readexactly(_LENGTH.size)
                answer: list[StoreOutcome] | str = pickle.loads(await proc.stdout.readexactly(_LENGTH.unpack(head)[0]))
            except (OSError, asyncio.IncompleteReadError):
                code = await proc.wait()
                log.error(
                    "the embedded archive's writer process ended (exit code %s); %d instance(s) will be stored again by a new one",
                    code, count,
                )
                return [StoreOutcome("retry", "the archive's writer process ended") for _ in range(count)]
        return answer

    async def close(self) -> None:
        """Let the batch in hand finish, then stop the process (end of file on its stdin)."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.returncode is not None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), CLOSE_SECONDS)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
