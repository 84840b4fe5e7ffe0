"""C-STORE SCP: validate a received instance and make it durable before answering.

The association has already written the data set, exactly as received, to a file in
the spool's ``incoming/`` directory, so large instances never sit in memory. This handler reads only the header, checks that it is an
instance we can forward, and hands the file to the spool; or, when the association
could not store it (spool below its free-space floor, disk full), answers 0xA700 at
once. Statuses follow PS3.4 B.2.3.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from gateway.config import Config
from gateway.dimse.association import Association, Message
from gateway.dimse.command import C_STORE_RSP, response
from gateway.header import read_header
from gateway.spool.queue import Spool, SpoolFull

log = logging.getLogger("gateway.dimse")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class StoreService:
    """The C-STORE service, with its dependencies bound (no globals).

    The blocking part (header parse, fsync, spool commit, and for ``ack = "delivered"``
    the wait for the archive) runs on a worker pool sized to the association limit,
    so the loop keeps serving other associations meanwhile.
    """

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.executor = ThreadPoolExecutor(
            max_workers=config.dimse.max_associations + 2, thread_name_prefix="c-store"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def __call__(self, assoc: Association, message: Message) -> None:
        if message.refused is not None:
            # The association did not store the data set (spool full, write error).
            log.error(
                "C-STORE of %s from %s refused: %s",
                str(message.command.get(0x1000, ""))[:64] or "?", assoc.peer, message.refused,
            )
            status, comment = OUT_OF_RESOURCES, message.refused
        elif message.dataset_path is None:
            # CommandDataSetType said no data set follows: nothing to store.
            log.warning(
                "C-STORE-RQ from %s of %s without a data set answered with 0xC000",
                assoc.calling_ae, str(message.command.get(0x1000, ""))[:64] or "?",
            )
            status, comment = CANNOT_UNDERSTAND, "C-STORE-RQ without a data set"
        else:
            loop = asyncio.get_running_loop()
            status, comment = await loop.run_in_executor(
                self.executor, self._store, message, assoc.calling_ae
            )
        if status == SUCCESS:
            assoc.stats.stored += 1
        else:
            assoc.stats.failed += 1
        extra: dict[int, int | str | tuple[int, ...]] = {0x0902: comment[:64]} if comment else {}
        await assoc.send_message(
            message.context.id, response(message.command, C_STORE_RSP, status, extra=extra)
        )

    def _store(self, message: Message, calling: str) -> tuple[int, str]:
        """Validate and spool one received file; returns (status, error comment)."""
        temp = message.dataset_path
        assert temp is not None
        command = message.command
        affected_uid = str(command.get(0x1000, ""))
        header, problem = read_header(temp, str(command.get(0x0002, "")), affected_uid)
        if header is None:
            log.warning(
                "C-STORE from %s of %s rejected: %s", calling, affected_uid[:64] or "?", problem
            )
            # A900 when the data set lacks what its SOP class requires; C000 when it
            # cannot be parsed at all.
            code = CANNOT_UNDERSTAND if problem.startswith(("unreadable", "malformed")) else DATASET_DOES_NOT_MATCH
            return code, problem

        watch = self.config.dimse.ack == "delivered"
        try:
            row_id = self.spool.enqueue(temp, header, calling, watch=watch)
        except SpoolFull as exc:
            log.error("C-STORE of %s refused: %s", header.sop_instance_uid, exc)
            return OUT_OF_RESOURCES, "spool full"
        except Exception as exc:  # noqa: BLE001 - never ack what is not stored
            log.exception("C-STORE of %s could not be spooled", header.sop_instance_uid)
            return OUT_OF_RESOURCES, f"spool error: {type(exc).__name__}"
        log.debug("spooled %s as id %d", header.sop_instance_uid, row_id)

        if not watch:
            return SUCCESS, ""
        outcome = self.spool.wait_outcome(row_id, self.config.dimse.ack_timeout)
        if outcome is None:
            return OUT_OF_RESOURCES, "not delivered in time; still queued"
        if outcome.kind == "delivered":
            return SUCCESS, ""
        if outcome.kind == "rejected":
            return CANNOT_UNDERSTAND, f"archive refused: {outcome.error}"
        return OUT_OF_RESOURCES, "archive unavailable; still queued"
