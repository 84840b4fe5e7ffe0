"""C-MOVE SCP (PS3.4 C.4.2): Patient Root and Study Root, served from the upstream.

The destination AE must be a configured ``[[dimse.peers]]`` entry (an AE title alone
says nothing about where it listens, and sending patient data to an address a
caller names would be an exfiltration channel). The sub-operations go over one
association to it, opened by our own requestor (`gateway.dimse.requestor`) as soon
as the first instances are in; instances of SOP classes the search had not listed by
then go over a second one at the end (PS3.4 allows several per move). The service
base in `gateway.dimse.retrieve` and the engine in `gateway.retrieval` do the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.audit.auditor import dimse_participant
from gateway.audit.message import Participant
from gateway.dimse.association import Association, Message
from gateway.dimse.command import C_MOVE_RSP, Command
from gateway.dimse.requestor import RequestorError, StoreRequestor
from gateway.dimse.retrieve import RetrieveService, StoreSubOperations, proposals
from gateway.dimse.retrieve_request import MOVE_DESTINATION_UNKNOWN, PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import DataSource, Fetched

MOVE_SOP_CLASSES = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)


class MoveTarget(StoreSubOperations):
    """The move destination: an association we requested, with the originator named
    in every C-STORE-RQ (PS3.7 9.1.1.1) so the destination can tell who asked."""

    def __init__(
        self, requestor: StoreRequestor, originator: tuple[str, int], classes: frozenset[str], preferred: tuple[str, ...]
    ) -> None:
        self.requestor = requestor
        self.originator = originator
        self.classes = classes
        self._preferred = preferred

    @property
    def preferred(self) -> tuple[str, ...]:
        return self._preferred

    def contexts(self, sop_class_uid: str) -> dict[str, int]:
        return self.requestor.accepted.get(sop_class_uid, {})

    def asked(self, sop_class_uid: str) -> bool:
        return sop_class_uid in self.classes

    async def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        return await self.requestor.store(context_id, sop_class_uid, sop_instance_uid, dataset, self.originator)


class MoveService(RetrieveService):
    """The C-MOVE service for both information models."""

    name = "C-MOVE"
    rsp_field = C_MOVE_RSP

    def precheck(self, assoc: Association, message: Message) -> tuple[int, str] | None:
        destination = str(message.command.get(0x0600, "")).strip()
        if self.config.peer(destination) is None:
            return MOVE_DESTINATION_UNKNOWN, f"move destination {destination[:16]!r} unknown"
        return None

    def destination(self, assoc: Association, message: Message) -> Participant:
        title = str(message.command.get(0x0600, "")).strip()
        peer = self.config.peer(title)
        return dimse_participant(title, peer.host if peer is not None else "", False)

    async def open_target(
        self, assoc: Association, message: Message, refs: list[InstanceRef], first: list[Fetched]
    ) -> tuple[StoreSubOperations, Callable[[], Awaitable[None]]]:
        peer = self.config.peer(str(message.command.get(0x0600, "")).strip())
        assert peer is not None  # precheck
        contexts = proposals(refs, first, peer.transfer_syntaxes)
        if not contexts:
            # Only instances without a SOP Class UID so far: no context can name them.
            raise RequestorError("nothing to propose: no SOP Class UID known for these instances")
        requestor = await StoreRequestor.to_peer(self.config, peer, contexts)
        classes = frozenset(sop for sop, _ in contexts)
        originator = (assoc.calling_ae, message.command.message_id)
        return MoveTarget(requestor, originator, classes, peer.transfer_syntaxes), requestor.release
