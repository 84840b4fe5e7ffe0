"""C-FIND SCP (PS3.4 Annex C): Patient Root and Study Root, answered from the upstream.

A request becomes a `Query` (hierarchy checked), then a search on the upstream at the
matching level; every answer is re-checked with the PS3.4 matching rules (the archive
may have matched more loosely, or ignored a key), reduced to the requested keys and
sent as a Pending response as soon as its page arrives. Patient Root PATIENT level
has no QIDO resource: it is a study search grouped by patient.

Answers are matched and written straight from the DICOM JSON
(``gateway.dimse.identifier``) unless a match needs what only the pydicom path
covers (sequences, binary values, Big Endian, PATIENT-level grouping).

The service runs as a task on the loop; a C-CANCEL cancels that task, which cancels
the upstream request in flight, so paging stops at once. Failures become statuses
here, in one table (`failure_status`), and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from gateway.codecs.syntaxes import EXPLICIT_VR_BE, IMPLICIT_VR_LE
from gateway.config import Config
from gateway.model.json import dataset_from_json
from gateway.model.search import Search
from gateway.dimse.association import Association, Message
from gateway.dimse.command import C_FIND_RSP, response
from gateway.dimse.identifier import Attribute, AnswerWriter, Unsupported, attributes_from_json
from gateway.model.query import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    UNIQUE_KEY,
    Model,
    Query,
    InvalidValue,
    QueryError,
    entity_values,
    parse_identifier,
    tag_name,
)
from gateway.upstream.base import JsonObject, Upstream
from gateway.upstream.errors import SearchTruncated, UpstreamAuthError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("gateway.dimse")

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

FIND_SOP_CLASSES = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)

PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
SEARCH_METHOD = {
    "PATIENT": "search_for_studies",  # grouped by patient in FindService._patients
    "STUDY": "search_for_studies",
    "SERIES": "search_for_series",
    "IMAGE": "search_for_instances",
}
# Counts a PATIENT-level answer computes from the studies it groups.
PATIENT_COUNTS = {
    0x00201200: None,  # NumberOfPatientRelatedStudies: one per study
    0x00201202: 0x00201206,  # NumberOfPatientRelatedSeries <- NumberOfStudyRelatedSeries
    0x00201204: 0x00201208,  # NumberOfPatientRelatedInstances <- NumberOfStudyRelatedInstances
}


@dataclass(frozen=True)
class Failure:
    """A final failure response: status, ErrorComment (no PHI) and offending tags."""

    status: int
    comment: str
    offending: tuple[int, ...] = ()
    internal: bool = False  # a bug of ours, not a refusal: worth an ERROR line


def failure_status(exc: BaseException) -> Failure:
    """The one table from errors to C-FIND statuses (PS3.4 C.4.1.1.4)."""
    if isinstance(exc, InvalidValue):
        return Failure(UNABLE_TO_PROCESS, str(exc), tuple(exc.offending))
    if isinstance(exc, QueryError):
        return Failure(IDENTIFIER_DOES_NOT_MATCH, str(exc), tuple(exc.offending))
    if isinstance(exc, UpstreamAuthError):
        return Failure(UNABLE_TO_PROCESS, str(exc))
    if isinstance(exc, UpstreamRejected):
        return Failure(UNABLE_TO_PROCESS, str(exc))
    if isinstance(exc, UpstreamUnavailable):
        return Failure(OUT_OF_RESOURCES, str(exc))
    if isinstance(exc, TimeoutError):
        return Failure(OUT_OF_RESOURCES, "archive did not answer in time")
    return Failure(UNABLE_TO_PROCESS, f"internal error ({type(exc).__name__})", internal=True)


class MatchLimit(Exception):
    """More matches exist than ``find.max_matches`` allows in one answer."""


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """The request identifier as a Dataset (text decoded lazily with its own charset)."""
    return read_dataset(
        BytesIO(data),
        is_implicit_VR=transfer_syntax == IMPLICIT_VR_LE,
        is_little_endian=transfer_syntax != EXPLICIT_VR_BE,
    )


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode a response identifier in the presentation context's transfer syntax."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BE
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
    write_dataset(fp, ds)
    return fp.getvalue()


# Pending responses per write at most; more wait for the next write.
BATCH_ANSWERS = 64


class PendingSender:
    """The Pending responses of one C-FIND, written several at a time.

    The answers of an archive's page are ready together. Written one by one, each cost
    two system calls and a wake-up of the peer, more than encoding it; here they go out
    in batches: a full batch at once, a partial one as soon as the service waits for
    anything (the archive's next page): the ``call_soon`` callback runs only once the
    task suspends, so no answer waits for the archive behind it. Batches start at one
    answer and double up to ``BATCH_ANSWERS``, so the peer starts taking answers at
    once. The command set of a Pending response is the same for every answer, so it
    is encoded once.
    """

    def __init__(self, assoc: Association, context_id: int, command: bytes) -> None:
        self.assoc = assoc
        self.context_id = context_id
        self.command = assoc.pdus(context_id, command, True)
        self.batch: list[bytes] = []
        self.size = 1  # answers in the next full batch
        self.scheduled = False
        self.closed = False

    async def add(self, answer: bytes) -> None:
        self.batch += (self.command, self.assoc.pdus(self.context_id, answer, False))
        if len(self.batch) >= 2 * self.size:
            self.size = min(2 * self.size, BATCH_ANSWERS)
            await self.flush()
        elif not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        self.scheduled = False
        if self.batch and not self.closed:
            self.assoc.write_now(b"".join(self.batch))
        self.batch.clear()

    async def flush(self) -> None:
        """Write what is batched and wait until the peer takes it (``dimse_timeout``)."""
        if self.batch and not self.closed:
            pieces = list(self.batch)  # written as they are (writev), not joined first
            self.batch.clear()
            await self.assoc.send_raw(pieces)

    def close(self) -> None:
        """Drop what is batched (C-CANCEL): nothing more goes out."""
        self.closed = True
        self.batch.clear()


class FindService:
    """The C-FIND service for both information models, with its dependencies bound."""

    def __init__(self, config: Config, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream

    async def __call__(self, assoc: Association, message: Message) -> None:
        command, context = message.command, message.context
        syntax = context.transfer_syntax
        started = time.monotonic()
        sent = 0

        async def send(status: int, body: bytes | None = None, extra: dict[int, Any] | None = None) -> None:
            rsp = response(command, C_FIND_RSP, status, has_dataset=body is not None, extra=extra)
            await assoc.send_message(context.id, rsp, body)

        query: Query | None = None
        identifier: Dataset | None = None
        pending = PendingSender(assoc, context.id, response(command, C_FIND_RSP, PENDING, has_dataset=True))
        try:
            try:
                identifier = decode_identifier(message.dataset or b"", syntax)
                query = parse_identifier(identifier, Model(context.abstract_syntax))
            except QueryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's malformed identifier
                raise InvalidValue(f"unreadable identifier ({type(exc).__name__})") from exc
            async with contextlib.aclosing(self.answers(query, syntax)) as answers:
                async for answer in answers:
                    await pending.add(answer)
                    sent += 1
            await pending.flush()
        except asyncio.CancelledError:
            pending.close()
            self._report(assoc, context.abstract_syntax, identifier, query, sent, "cancelled", started)
            await asyncio.shield(send(CANCEL))
            raise
        except (MatchLimit, SearchTruncated) as exc:
            # The archive capping its answer is the match cap reached elsewhere: never Success.
            by = " by the archive" if isinstance(exc, SearchTruncated) else ""
            self._report(assoc, context.abstract_syntax, identifier, query, sent, f"cut at {sent} matches{by}", started)
            await pending.flush()
            await send(OUT_OF_RESOURCES, extra={0x0902: f"more than {sent} matches; refine the query"})
            return
        except Exception as exc:  # noqa: BLE001 - every failure must end the request with a status
            failure = failure_status(exc)
            if failure.internal:
                # The traceback goes to DEBUG: exception messages may quote values (PHI).
                log.error("C-FIND from %s failed: %s", assoc.peer, failure.comment)
                log.debug("C-FIND internal error", exc_info=exc)
            self._report(assoc, context.abstract_syntax, identifier, query, sent, f"failed 0x{failure.status:04X}: {failure.comment}", started)
            await pending.flush()
            extra: dict[int, Any] = {0x0902: failure.comment[:64]}
            if failure.offending:
                extra[0x0901] = failure.offending
            await send(failure.status, extra=extra)
            return
        self._report(assoc, context.abstract_syntax, identifier, query, sent, "success", started)
        await send(SUCCESS)

    def _report(
        self, assoc: Association, context_syntax: str, identifier: Dataset | None, query: Query | None, sent: int,
        outcome: str, started: float,
    ) -> None:
        """One line per request: level, key names (never values: they may be PHI); and
        one audit message, the identifier with its values blanked."""
        assoc.audit.searched(
            assoc.participant(), context_syntax, identifier,
            outcome == "success", f"C-FIND: {sent} matches, {outcome}",
        )
        what = "?" if query is None else f"{query.model.name} {query.level} [{' '.join(tag_name(k.tag) for k in query.keys)}]"
        elapsed = time.monotonic() - started
        log.info(
            "C-FIND from %s %s: %d matches, %s, %.3f s", assoc.peer, what, sent, outcome, elapsed,
            extra={"fields": {
                "event": "operation", "operation": "C-FIND", "calling_ae": assoc.calling_ae,
                "level": query.level if query else None, "matches": sent, "outcome": outcome, "seconds": round(elapsed, 3),
            }},
        )

    async def answers(self, query: Query, syntax: str) -> AsyncGenerator[bytes, None]:
        """Response identifiers for the query, encoded in ``syntax``, in the order the
        archive returns matches.

        Raises MatchLimit once a match beyond ``find.max_matches`` is seen (so an
        answer of exactly the limit is still a Success).
        """
        limit = self.config.find.max_matches
        count = 0
        async with contextlib.aclosing(self._unbounded(query, syntax)) as answers:
            async for answer in answers:
                if count == limit:
                    raise MatchLimit()
                count += 1
                yield answer

    async def _unbounded(self, query: Query, syntax: str) -> AsyncGenerator[bytes, None]:
        ae_title = self.config.dimse.ae_title
        tags = {k.tag for k in query.keys} | {UNIQUE_KEY[query.level if query.level != "PATIENT" else "STUDY"]}
        if query.level == "PATIENT":
            async with contextlib.aclosing(self._patients(query, tags)) as patients:
                async for entity in patients:
                    yield encode_identifier(query.answer(entity, ae_title), syntax)
            return
        known_uids = {
            UNIQUE_KEY[level]: uid
            for level in ("STUDY", "SERIES")
            if level != query.level and (uid := query.uid(level))
        }
        direct = syntax != EXPLICIT_VR_BE and all(k.vr != "SQ" for k in query.keys)
        writer = AnswerWriter(query, ae_title, implicit=syntax == IMPLICIT_VR_LE)
        seen: set[str] = set()
        async with contextlib.aclosing(self._search(query, tags)) as found:
            async for obj in found:
                answer = None
                if direct:
                    with contextlib.suppress(Unsupported):
                        answer = _direct_answer(writer, obj, tags, known_uids, seen)
                if answer is None:
                    answer = self._dataset_answer(query, obj, tags, known_uids, syntax, seen)
                if answer:
                    yield answer

    def _dataset_answer(
        self, query: Query, obj: JsonObject, tags: set[int], known_uids: dict[int, str], syntax: str, seen: set[str]
    ) -> bytes:
        """``_direct_answer`` through pydicom: any result, any transfer syntax."""
        entity = dataset_from_json(obj, tags)
        for tag, uid in known_uids.items():
            if tag not in entity:
                entity.add_new(tag, "UI", uid)
        if not query.matches(entity):
            return b""
        unique = "\\".join(entity_values(entity.get(UNIQUE_KEY[query.level])))
        if unique in seen:
            return b""  # the archive changed between pages and repeated a match
        answer = encode_identifier(query.answer(entity, self.config.dimse.ae_title), syntax)
        seen.add(unique)
        return answer

    async def _patients(self, query: Query, tags: set[int]) -> AsyncGenerator[Dataset, None]:
        """PATIENT level: studies grouped by patient (PatientID and its issuer).

        Without count keys a patient is answered at its first study; with
        NumberOfPatientRelated* keys every study must be seen first.
        """
        counts = [t for t in PATIENT_COUNTS if query.key(t) is not None]
        tags = tags | {PATIENT_ID, ISSUER_OF_PATIENT_ID} | {s for s in PATIENT_COUNTS.values() if s}
        patients: dict[tuple[str, str], Dataset] = {}
        totals: dict[tuple[str, str], list[int]] = {}
        async with contextlib.aclosing(self._search(query, tags)) as studies:
            async for obj in studies:
                study = dataset_from_json(obj, tags)
                if not query.matches(study):
                    continue
                ident = (str(study.get("PatientID", "")), str(study.get("IssuerOfPatientID", "")))
                if ident not in patients:
                    patients[ident] = study
                    totals[ident] = [0, 0, 0]
                    if not counts:
                        yield study
                total = totals[ident]
                total[0] += 1
                for i, source in enumerate((0x00201206, 0x00201208), start=1):
                    elem = study.get(source)
                    total[i] += int(elem.value) if elem is not None and elem.value not in (None, "") else 0
        if counts:
            for ident, patient in patients.items():
                for tag, value in zip(PATIENT_COUNTS, totals[ident]):
                    patient.add_new(tag, "IS", value)
                yield patient

    def _search(self, query: Query, tags: set[int]) -> AsyncGenerator[JsonObject, None]:
        """The upstream search for the query's level, each page bounded by ``find.timeout``."""
        f = self.config.find
        level = query.level
        search = Search(
            keys=query.match_keys,
            include=tuple(sorted(t for t in tags if not query.is_below(t))),
            study_uid=query.uid("STUDY") if level in ("SERIES", "IMAGE") else None,
            series_uid=query.uid("SERIES") if level == "IMAGE" else None,
            include_only=True,
        )
        method: Callable[[Search], AsyncIterator[JsonObject]] = getattr(self.upstream, SEARCH_METHOD[level])
        return _bounded(method(search), f.timeout + 5)


def _direct_answer(
    writer: AnswerWriter, obj: JsonObject, tags: set[int], known_uids: dict[int, str], seen: set[str]
) -> bytes:
    """One result answered straight from its JSON: the encoded identifier, or ``b""``
    when it does not match or repeats a match; Unsupported when the result needs the
    pydicom path (``FindService._dataset_answer``). Only the keys that match and the
    unique key are decoded before the answer is known to be wanted."""
    attrs = attributes_from_json(obj, writer.check_tags)
    for tag, uid in known_uids.items():
        attrs.setdefault(tag, Attribute("UI", (uid,)))
    if not writer.matches(attrs):
        return b""
    unique_attr = attrs.get(UNIQUE_KEY[writer.query.level])
    unique = "" if unique_attr is None else "\\".join(unique_attr.texts())
    if unique in seen:
        return b""  # the archive changed between pages and repeated a match
    answer = writer.encode_json(obj, known_uids)
    if answer is None:
        attrs = attributes_from_json(obj, tags)
        for tag, uid_text in known_uids.items():
            attrs.setdefault(tag, Attribute("UI", (uid_text,)))
        answer = writer.encode(attrs)  # may raise Unsupported: record the match only once answered
    seen.add(unique)
    return answer


async def _bounded(source: AsyncIterator[JsonObject], timeout: float) -> AsyncGenerator[JsonObject, None]:
    """Re-yield ``source``, failing with TimeoutError if one step takes longer than
    ``timeout`` (an archive that accepts the connection and then never answers).

    Closing this iterator closes ``source`` at once, which cancels its request in
    flight: that is what makes C-CANCEL and the match cap stop the paging.
    """
    step: Callable[[], Awaitable[JsonObject]] = source.__anext__
    try:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    item = await step()
            except StopAsyncIteration:
                return
            yield item
    finally:
        await source.aclose()  # type: ignore[attr-defined]
