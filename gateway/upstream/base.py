"""The `Upstream` protocol: what a front (DIMSE SCP, DICOMweb facade) may ask of an archive.

Fronts only ever see this interface, so adding an archive type never touches them.
Names follow PS3.18 (and dicomweb-client's protocol) so that each method maps to one
DICOMweb transaction. Search and retrieval methods join as the C-FIND, C-MOVE and
facade issues land.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.spool.queue import Outcome, SpooledInstance


@dataclass(frozen=True)
class Health:
    """Whether the archive answered a cheap request, and what it said."""

    reachable: bool
    detail: str


class Upstream(Protocol):
    """An archive the gateway forwards to and reads from."""

    kind: str

    async def start(self) -> None:
        """Open sessions and pools; called once by the daemon before use."""

    async def close(self) -> None:
        """Release sessions and pools."""

    async def store_instances(
        self, study_uid: str, instances: list[SpooledInstance]
    ) -> list[Outcome]:
        """STOW-RS the given instances of one study; one Outcome per instance, never raises
        for per-instance failures (transport failures become ``retry`` outcomes)."""
        ...

    async def health(self) -> Health:
        """A cheap reachability probe for /healthz."""
        ...
