"""The `Upstream` protocol: what a front (DIMSE SCP, DICOMweb facade) may ask of an archive.

Fronts only ever see this interface, so adding an archive type never touches them.
Names follow PS3.18 (and dicomweb-client's protocol) so that each method maps to one
DICOMweb transaction. Search and retrieval methods join as the C-FIND, C-MOVE and
facade issues land.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.model.search import Search

JsonObject = Mapping[str, Any]


@dataclass(frozen=True)
class Health:
    """Whether the archive answered a cheap request, and what it said."""

    reachable: bool
    detail: str


@dataclass
class Retrieved:
    """One retrieved instance: a Part 10 file at ``[offset, offset + length)`` of either
    ``data`` (small answers stay in memory) or the file ``path`` (large answers spilled
    to disk, or the embedded archive's own file). ``temporary`` files are the
    receiver's to delete, with `release`."""

    data: bytes | None
    path: Path | None
    offset: int
    length: int
    temporary: bool = False

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
        self.data = None
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
    ``error`` names the reason without any attribute value.
    """

    kind: str
    error: str = ""
    retry_after: float | None = None


class Upstream(Protocol):
    """An archive the gateway forwards to and reads from."""

    kind: str

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

    def search_for_studies(self, search: Search) -> AsyncIterator[JsonObject]:
        """QIDO-RS SearchForStudies: every matching study as DICOM JSON, paging inside.

        Answers may include studies that do not match every key (the caller re-checks),
        never fewer. Raises UpstreamAuthError, UpstreamRejected or UpstreamUnavailable.
        """
        ...

    def search_for_series(self, search: Search) -> AsyncIterator[JsonObject]:
        """SearchForSeries, within ``search.study_uid`` when set; as search_for_studies."""
        ...

    def search_for_instances(self, search: Search) -> AsyncIterator[JsonObject]:
        """SearchForInstances, within the study/series UIDs set; as search_for_studies."""
        ...

    async def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, spill_dir: Path, spill_bytes: int
    ) -> Retrieved:
        """WADO-RS RetrieveInstance in its stored transfer syntax where the archive allows.

        Answers above ``spill_bytes`` go to a temporary file in ``spill_dir`` so memory
        stays bounded whatever the instance size. Raises NotFound, UpstreamAuthError,
        UpstreamRejected or UpstreamUnavailable.
        """
        ...

    def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_dir: Path, spill_bytes: int
    ) -> AsyncIterator[Retrieved]:
        """WADO-RS RetrieveSeries (RetrieveStudy when ``series_uid`` is None): every
        instance, each handed out as soon as it has arrived, spilled as in
        `retrieve_instance`. The answer may lack instances (the caller compares with a
        search); raises as `retrieve_instance`, also after some instances were handed out.
        """
        ...
