"""C-GET SCP (PS3.4 C.4.3): the same retrieval as C-MOVE, sent back to the requester.

The C-STORE sub-operations travel on the requesting association itself, in the
storage presentation contexts the requester proposed with the SCP role (role
selection, negotiated in `gateway.dimse.server`), each instance in the syntax that
context accepted (transcoded when it is not stored that way). Their C-STORE-RSPs
arrive through the association's reader, which hands them to the waiting send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.audit.message import Participant
from gateway.dimse.association import Association, Message, SendError
from gateway.dimse.command import C_GET_RSP, C_STORE_RQ, HAS_DATASET, Command, encode_command
from gateway.dimse.requestor import FrameBuffer, RequestorError, send_dataset
from gateway.dimse.retrieve import RetrieveService, StoreSubOperations
from gateway.dimse.retrieve_request import PATIENT_ROOT_GET, STUDY_ROOT_GET
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import DataSource, Fetched

GET_SOP_CLASSES = (PATIENT_ROOT_GET, STUDY_ROOT_GET)


class GetTarget(StoreSubOperations):
    """The requesting association, as the receiver of C-STORE sub-operations."""

    def __init__(self, assoc: Association, dimse_timeout: float) -> None:
        self.assoc = assoc
        self.dimse_timeout = dimse_timeout
        self._frames = FrameBuffer()
        self._syntaxes: dict[str, dict[str, int]] = {}
        for ctx in sorted(assoc.contexts.values(), key=lambda c: c.id):
            if ctx.abstract_syntax in assoc.scp_roles:
                self._syntaxes.setdefault(ctx.abstract_syntax, {}).setdefault(ctx.transfer_syntax, ctx.id)

    def contexts(self, sop_class_uid: str) -> dict[str, int]:
        return self._syntaxes.get(sop_class_uid, {})

    def asked(self, sop_class_uid: str) -> bool:
        return True  # the requester proposed its contexts before asking; there is no other

    async def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        assoc = self.assoc
        message_id = assoc.next_message_id()
        command = encode_command(
            {
                0x0002: sop_class_uid,
                0x0100: C_STORE_RQ,
                0x0110: message_id,
                0x0700: 0,
                0x0800: HAS_DATASET,
                0x1000: sop_instance_uid,
            }
        )
        future = assoc.expect_response(message_id)
        try:
            await send_dataset(assoc.send_raw, context_id, dataset, assoc.peer_max_pdu, command, self._frames)
            async with asyncio.timeout(self.dimse_timeout):
                return await future
        except SendError as exc:  # before OSError: SendError is one
            raise RequestorError(f"cannot send: {exc}") from None
        except TimeoutError:
            raise RequestorError(f"no C-STORE response within {self.dimse_timeout:g} s") from None
        except (OSError, ConnectionError) as exc:
            raise RequestorError(f"association lost: {type(exc).__name__}") from None
        finally:
            future.cancel()


class GetService(RetrieveService):
    """The C-GET service for both information models."""

    name = "C-GET"
    rsp_field = C_GET_RSP

    def destination(self, assoc: Association, message: Message) -> Participant:
        return assoc.participant()  # the requestor itself

    async def open_target(
        self, assoc: Association, message: Message, refs: list[InstanceRef], first: list[Fetched]
    ) -> tuple[StoreSubOperations, Callable[[], Awaitable[None]]]:
        async def nothing() -> None:
            return None

        return GetTarget(assoc, self.config.dimse.dimse_timeout), nothing
