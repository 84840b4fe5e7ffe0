"""The `Upstream` protocol: what a front (DIMSE SCP, DICOMweb facade) may ask of an archive.

Fronts only ever see this interface, so adding an archive type never touches them.
Names follow PS3.18 (and dicomweb-client's protocol) so that each method maps to one
DICOMweb transaction; a streaming form of a retrieval is named ``iter_``. What an
archive cannot do at all is in its `Capabilities`, and asking for it anyway raises
NotSupported.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from gateway.model.search import Search
from gateway.spill import SpillArea

JsonObject = Mapping[str, Any]

# ``acceptable`` of a retrieval: the archive's stored transfer syntax, whatever it is.
ANY_SYNTAX: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class Health:
    """Whether the archive answered a cheap request, and what it said."""

    reachable: bool
    detail: str


@dataclass(frozen=True)
class Capabilities:
    """What an archive can do, for fronts to choose a way before asking.

    ``delete`` is None while unknown: DICOMweb has no standard DELETE (Azure and
    dcm4chee have one, Orthanc answers 405), so a DICOMweb archive says after the first
    attempt. ``search_limit`` is how many results one search can reach by paging
    (offset + limit), None for no limit; ``max_page`` the archive's own cap on
    ``limit``, above which it may cut pages silently.
    """

    study_retrieve: bool = True  # RetrieveStudy in one request (iter_instances, no series)
    series_retrieve: bool = True  # RetrieveSeries in one request
    frames: bool = True  # RetrieveFrames (retrieve_frames)
    metadata: bool = True  # RetrieveMetadata (retrieve_metadata)
    delete: bool | None = True
    search_limit: int | None = None
    max_page: int | None = None


@dataclass
class Retrieved:
    """One retrieved instance: a Part 10 file at ``[offset, offset + length)`` of either
    ``data`` (small answers stay in memory) or the file ``path`` (large answers spilled
    to disk, or the embedded archive's own file). ``temporary`` files are the
    receiver's to delete, with `release`. ``transfer_syntax`` is the one the instance
    came in: what the archive said in the part's Content-Type, else its File Meta; ""
    only when the answer is not a readable Part 10 file."""

    data: bytes | None
    path: Path | None
    offset: int
    length: int
    temporary: bool = False
    transfer_syntax: str = ""
    # The file's first bytes, when the upstream read them already (the embedded archive
    # reads them for many instances per trip to a worker thread), so its File Meta is
    # parsed without another read.
    head: bytes | memoryview | None = None
    # Checked already, element by element, and known to be of the study and series it
    # was asked as: the embedded archive's files, each scanned when it was received.
    checked: bool = False

    def read(self, start: int = 0, size: int = -1) -> bytes:
        """Bytes ``[start, start + size)`` of the Part 10 file (blocking for files)."""
        size = self.length - start if size < 0 else min(size, self.length - start)
        if self.data is not None:
            return self.data[self.offset + start : self.offset + start + size]
        assert self.path is not None
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start)
            return fh.read(size)

    def release(self) -> None:
        """Drop the data; delete a temporary spill file."""
        self.data = self.head = None
        if self.temporary and self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoreItem:
    """One Part 10 file to store, with the UIDs its header gave when it was received.

    Plain data, so an upstream never depends on where the file waited (the spool,
    or a facade STOW body) and outcomes map back to items by position."""

    path: Path
    size: int
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class StoreOutcome:
    """What the archive made of one item.

    ``kind``: ``delivered``; ``retry`` (transient: again later, not before
    ``retry_after`` seconds if given); ``rejected`` (the archive refused this instance:
    it will never take it as it is); ``config`` (the archive refused the gateway itself,
    a credential or a URL: nothing about the instance, so it waits for an admin).
    ``error`` names the reason without any attribute value. ``not_primary``: delivered,
    but the archive keeps it apart from its study, where searches and retrievals of
    the study do not see it (HealthImaging's non-primary image sets).
    """

    kind: str
    error: str = ""
    retry_after: float | None = None
    not_primary: bool = False


@dataclass(frozen=True)
class Frame:
    """One frame of an instance's pixel data (``number`` counts from 1), encoded in
    ``transfer_syntax``: raw pixel bytes for the native syntaxes, one compressed
    codestream (all its fragments joined) for the others."""

    number: int
    data: bytes
    transfer_syntax: str


class MetadataText(NamedTuple):
    """One instance's metadata as its DICOM JSON text (BulkDataURIs relative to the
    instance, ``bulkdata/...``), with the UIDs that place it: what an archive that
    keeps the text hands the facade to answer as it is (the embedded archive's
    ``retrieve_metadata_texts``, an optional method of an upstream)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    text: str


class Upstream(Protocol):
    """An archive the gateway forwards to and reads from.

    Retrievals take ``acceptable``: transfer syntax UIDs the caller takes, best first,
    or `ANY_SYNTAX` for the stored one. An archive may convert (DICOMweb servers may)
    or refuse with UpstreamRejected, status 406 (the embedded archive serves what it
    stores); a caller that needs a syntax for certain asks `ANY_SYNTAX` and converts
    with ``gateway.codecs``. Every method may raise UpstreamAuthError, UpstreamRejected
    or UpstreamUnavailable besides what it names.

    Reads of one instance or series take ``image_set_id``: the HealthImaging image set
    that holds it (WADO-RS's ``imageSetId``), which that archive reads instead of
    finding the study's; other archives have no image sets and ignore it.
    """

    kind: str

    @property
    def capabilities(self) -> Capabilities:
        """What this archive can do (may be refined by its answers, see Capabilities)."""
        ...

    async def start(self) -> None:
        """Open sessions and pools; called once by the daemon before use."""

    async def close(self) -> None:
        """Release sessions and pools."""

    async def store_instances(self, study_uid: str, instances: Sequence[StoreItem]) -> list[StoreOutcome]:
        """STOW-RS the given instances of one study; one outcome per item, in order.
        Never raises for an archive's answer (transport failures become ``retry``)."""
        ...

    async def health(self) -> Health:
        """A cheap reachability probe for /healthz."""
        ...

    def search_for_studies(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        """QIDO-RS SearchForStudies: every matching study as DICOM JSON, paging inside.

        Answers may include studies that do not match every key (the caller re-checks),
        never fewer: when the archive holds more matches than it lets us page to, the
        iterator raises SearchTruncated after the last one it got.
        """
        ...

    def search_for_series(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        """SearchForSeries, within ``search.study_uid`` when set; as search_for_studies."""
        ...

    def search_for_instances(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        """SearchForInstances, within the study/series UIDs set; as search_for_studies."""
        ...

    async def retrieve_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        spill_area: SpillArea,
        spill_bytes: int,
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> Retrieved:
        """WADO-RS RetrieveInstance in one of the ``acceptable`` syntaxes; the answer's
        ``transfer_syntax`` says which one came.

        Answers above ``spill_bytes`` go to a temporary file in ``spill_area`` so memory
        stays bounded whatever the instance size. Raises NotFound.
        """
        ...

    def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_area: SpillArea, spill_bytes: int
    ) -> AsyncGenerator[Retrieved, None]:
        """WADO-RS RetrieveSeries (RetrieveStudy when ``series_uid`` is None) in the stored
        syntaxes: every instance, each handed out as soon as it has arrived, spilled as
        in `retrieve_instance`. The answer may lack instances (the caller compares it
        with the archive's count, then with a search); raises as `retrieve_instance`,
        also after some instances were handed out, and NotSupported where
        `Capabilities` rule the request out.
        """
        ...

    async def retrieve_metadata(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        image_set_id: str | None = None,
    ) -> list[JsonObject]:
        """WADO-RS RetrieveMetadata of a study, series or instance (the deepest UID given
        sets the level; an instance needs its series): one DICOM JSON object per
        instance, bulk data (Pixel Data, large binary values) as ``BulkDataURI``.
        Raises NotFound, NotSupported.
        """
        ...

    def retrieve_frames(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        frame_numbers: Sequence[int],
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> AsyncGenerator[Frame, None]:
        """WADO-RS RetrieveFrames: the frames in the order asked, each with its syntax.

        A frame number below 1 or past the instance's Number of Frames raises
        UpstreamRejected with status 400 (what PS3.18 servers answer: the instance is
        there, the request is wrong); an instance without pixel data raises NotFound.
        Raises NotSupported when the archive serves no frames.
        """
        ...

    async def delete_study(self, study_uid: str) -> None:
        """Remove a study from the archive. Raises NotFound, NotSupported."""
        ...

    async def delete_series(self, study_uid: str, series_uid: str) -> None:
        """Remove a series; as delete_study."""
        ...

    async def delete_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
        """Remove an instance; as delete_study."""
        ...
